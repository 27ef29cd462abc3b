"""`CacheWriter`: writes an offline knowledge cache shard by shard; an interrupted build resumes.

Shards are validated with `safetensors.safe_open` (header, tensor names, dtypes, shapes) before they
count as written; `CacheWriter.missing` lists the ones still to write (absent, truncated or corrupt).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from actors.cache.format import (EXAMPLE_IDS, FORMAT, INDEX_TENSORS, LAYERED, MANIFEST, OUTPUT_TENSORS, REBUILD,
                                 ST_DTYPES, TENSORS, VERSION, CacheError, CacheMismatchError, PartialCacheError,
                                 cache_summary, content_digest, diff, file_sha256, jsonable, length_axes,
                                 read_manifest, shard_path, shard_problem, tensors_sha256, write_atomic)
from actors.knowledge import Knowledge

log = logging.getLogger(__name__)


class CacheWriter:
    """Writes an offline knowledge cache shard by shard; an interrupted build resumes where it stopped.

    Usage (the builder, e.g. `actors.cache.build_shards`): for each teacher t and each shard s in
    `writer.missing(t)`, compute knowledge for rows [s*S, min((s+1)*S, N)) in id order and call
    `writer.write_shard(t, s, knowledge)`; then `writer.finalize(hsk_fraction)`.

    Args:
        path: the cache root folder (created if absent).
        fingerprint: what the knowledge depends on (request fingerprint, tokenizer/vocab hash, max_length,
            dataset identity, ...): an opaque dict of str -> JSON values, compared key by key on reuse.
        teacher_names: the ensemble's names in pool order; each becomes a folder, so no "/" or "..".
        num_examples: N, rows of the training split (ids 0..N-1).
        max_length: the longest padded length L the cache serves; attentions are padded to it (tokens).
        shard_size: S, rows per shard file.
        student_layers: the student layers the cached hidden/attention/[CLS] layers serve, in order
            (`request.student_layers`); `CacheReader` maps a request's layers to positions with it.
        tokens_follow_length: the token axis K is the batch length L (`request.tokens == "all"`): pad
            it to max_length on write (token_mask 0) and cut it to the caller's L on read.
        overwrite: delete an existing cache at `path` and start fresh, whatever its fingerprint. Without
            it, a cache with the same setup is resumed and one with another setup is refused.

    Raises:
        CacheMismatchError: `path` holds a cache built for another setup (each differing key listed),
            or a non-empty folder that is not a cache, and `overwrite` is false.
        CacheError: invalid arguments (empty/duplicate/unsafe teacher names, N or S < 1, ...).
    """

    def __init__(self, path: str | Path, fingerprint: dict, teacher_names: Sequence[str], num_examples: int,
                 max_length: int, shard_size: int = 1024, *, student_layers: Sequence[int] | None = None,
                 tokens_follow_length: bool = False, overwrite: bool = False) -> None:
        self.path = Path(path)
        names = list(teacher_names)
        bad = [n for n in names if not n or "/" in n or "\\" in n or n in (".", "..") or n.startswith(".")]
        if not names or bad or len(set(names)) != len(names):
            raise CacheError(f"teacher_names {names} must be unique, non-empty folder names (no '/', no leading "
                             f"'.'); rename the teachers in teachers.members")
        for what, value in (("num_examples", num_examples), ("max_length", max_length), ("shard_size", shard_size)):
            if int(value) < 1:
                raise CacheError(f"{what} must be >= 1, got {value}")
        self.teacher_names = names
        self.num_examples, self.max_length, self.shard_size = int(num_examples), int(max_length), int(shard_size)
        self.num_shards = -(-self.num_examples // self.shard_size)
        identity = {
            "version": VERSION, "fingerprint": jsonable(fingerprint, "fingerprint"), "teachers": names,
            "num_examples": self.num_examples, "max_length": self.max_length, "shard_size": self.shard_size,
            "student_layers": None if student_layers is None else [int(x) for x in student_layers],
            "tokens_follow_length": bool(tokens_follow_length),
        }
        self.path.mkdir(parents=True, exist_ok=True)
        old = self._previous(identity, overwrite)
        if old is None:
            self.manifest = {"format": FORMAT, **identity, "num_shards": self.num_shards, "complete": False,
                             "per_teacher": {n: {"layers": None, "tensors": None, "bytes": None} for n in names},
                             "bytes_per_example": None, "total_bytes": None, "hsk_fraction": None}
        else:
            self.manifest = old
        self._save()  # before any folder, so a non-empty cache folder always has a manifest
        for name in names:
            folder = self.path / name
            folder.mkdir(exist_ok=True)
            for stale in folder.glob(".shard-*.tmp-*"):  # left by a build killed mid-write
                stale.unlink(missing_ok=True)
        self._valid: dict[str, set[int]] = {n: set() for n in names}

    def _previous(self, identity: dict, overwrite: bool) -> dict | None:
        """The manifest of a cache at `path` with the same setup (to resume), or None to start afresh.

        With `overwrite`, a previous cache's manifest and teacher folders are deleted and None returned.

        Raises:
            CacheMismatchError: another setup, or a non-empty folder that is not a cache (no `overwrite`).
            CacheError: an unreadable manifest (no `overwrite`).
        """
        try:
            old = read_manifest(self.path)
        except CacheError:
            if not overwrite:
                raise
            old = None  # an unreadable manifest is deleted with the rest
        if old is not None and not overwrite:
            diffs = diff({k: old.get(k, "<absent>") for k in identity}, identity)
            if diffs:
                listed = "; ".join(f"{k}: cache has {a!r}, builder has {b!r}" for k, a, b in diffs)
                raise CacheMismatchError(
                    f"knowledge cache {self.path} was built for another setup ({listed}). Pass --overwrite to "
                    f"delete it and build afresh, or choose another cache folder; caches are never mixed")
        elif old is None and not overwrite and any(self.path.iterdir()):
            raise CacheMismatchError(f"{self.path} is not empty and has no {MANIFEST}, so it is not a knowledge "
                                     f"cache; choose an empty folder (--overwrite would delete only teacher-named folders there)")
        if overwrite:
            self._clear(set(identity["teachers"]) | set((old or {}).get("teachers", [])))
            old = None
        return old

    def _clear(self, teachers: Iterable[str]) -> None:
        """Delete a previous cache's manifest and teacher folders (other files in `path` are left alone)."""
        (self.path / MANIFEST).unlink(missing_ok=True)
        for name in teachers:
            if (self.path / name).is_dir():
                shutil.rmtree(self.path / name)

    def _save(self) -> None:
        text = json.dumps(self.manifest, indent=2)
        write_atomic(self.path / MANIFEST, lambda tmp: tmp.write_text(text))

    def _teacher(self, teacher: int | str) -> str:
        if isinstance(teacher, str):
            if teacher not in self.teacher_names:
                raise CacheError(f"teacher {teacher!r} is not in this cache (teachers: {self.teacher_names})")
            return teacher
        if not 0 <= int(teacher) < len(self.teacher_names):
            raise CacheError(f"teacher index {teacher} out of range for {len(self.teacher_names)} teachers")
        return self.teacher_names[int(teacher)]

    def rows(self, shard: int) -> tuple[int, int]:
        """[start, end) example ids held by `shard`."""
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_examples)

    def _check_shard(self, name: str, shard: int) -> bool:
        """True when the shard file exists and matches the manifest (names, dtypes, shapes, metadata, and the
        size and SHA-256 `finalize` recorded, where it did)."""
        path = shard_path(self.path, name, shard)
        spec = self.manifest["per_teacher"][name]
        if not path.is_file() or spec["tensors"] is None:
            return False
        if spec.get("shards") and shard_problem(self.path, self.manifest, name, shard, contents=True):
            return False
        start, end = self.rows(shard)
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                if set(f.keys()) != set(spec["tensors"]):
                    return False
                for key, want in spec["tensors"].items():
                    sl = f.get_slice(key)
                    if list(sl.get_shape()) != [end - start, *want["shape"]] or \
                            ST_DTYPES.get(sl.get_dtype()) != want["dtype"]:
                        return False
        except Exception:  # noqa: BLE001  (safetensors raises its own error type for every malformed file)
            return False
        return (meta.get("teacher") == name and meta.get("rows") == f"{start}:{end}"
                and json.loads(meta.get("layers", "null")) == spec["layers"])

    def missing(self, teacher: int | str) -> list[int]:
        """Shard indices of `teacher` not yet written (absent, truncated or corrupt files count as missing).

        Args:
            teacher: index into `teacher_names`, or the name.

        Returns:
            sorted shard indices in [0, num_shards); an empty list when the teacher is done.
        """
        name = self._teacher(teacher)
        out = []
        for s in range(self.num_shards):
            if s in self._valid[name]:
                continue
            if self._check_shard(name, s):
                self._valid[name].add(s)
                continue
            if shard_path(self.path, name, s).exists():
                log.warning("cache shard %s is corrupt or incomplete; it will be rewritten",
                            shard_path(self.path, name, s))
            out.append(s)
        if out and self.manifest["complete"]:
            self.manifest["complete"] = False  # a shard went missing: readers must not trust the cache
            self._save()
        return out

    def write_shard(self, teacher_index: int, shard: int, knowledge: Knowledge) -> None:
        """Write one shard atomically.

        Args:
            teacher_index: the teacher's index in `teacher_names`.
            shard: s in [0, num_shards).
            knowledge: covers exactly rows [s*S, min((s+1)*S, N)) in id order, with the arrays the request
                asked for: logits [R, C], hidden [R, k, K, W], token_index / token_mask [R, K], width_index
                [R, k, W], attentions [R, k, H, K, L] with L <= max_length, cls [R, k, D], and layers [k]
                when any layered output is present. Stored with their own dtypes (float32/float16, int64).

        Raises:
            CacheError: no arrays, wrong row count, inconsistent k, L > max_length, an unsupported dtype.
            CacheMismatchError: shapes or dtypes differ from the teacher's shards already written.
        """
        name = self._teacher(teacher_index)
        if not 0 <= shard < self.num_shards:
            raise CacheError(f"shard {shard} out of range: the cache has {self.num_shards} shards")
        start, end = self.rows(shard)
        tensors = self._tensors(knowledge, name, shard)
        layers = self._layers(knowledge, tensors)
        self._pad_lengths(tensors)
        self._record_spec(name, shard, tensors, layers)
        metadata = {"format": FORMAT, "version": str(VERSION), "teacher": name, "shard": str(shard),
                    "rows": f"{start}:{end}", "layers": json.dumps(layers)}
        path = shard_path(self.path, name, shard)
        self._valid[name].discard(shard)
        self.manifest["per_teacher"][name].pop("shards", None)  # recorded again by `finalize`
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        self._valid[name].add(shard)

    def _tensors(self, knowledge: Knowledge, name: str, shard: int) -> dict[str, np.ndarray]:
        """The knowledge's arrays checked for dtype and row count; index tensors stored compactly."""
        start, end = self.rows(shard)
        tensors: dict[str, np.ndarray] = {}
        for key in TENSORS:
            value = getattr(knowledge, key, None)
            if value is None:
                continue
            value = np.ascontiguousarray(value)
            if value.dtype.name not in ST_DTYPES.values():
                raise CacheError(f"knowledge.{key} has dtype {value.dtype}, which the cache cannot store; send "
                                 f"float32 or float16 (bfloat16 travels as float32)")
            if value.ndim < 1 or value.shape[0] != end - start:
                raise CacheError(f"knowledge.{key} has shape {value.shape}; shard {shard} of teacher {name} "
                                 f"needs {end - start} rows (ids {start}..{end - 1} in order)")
            tensors[key] = value
        for key in INDEX_TENSORS:  # positions < 32768 and 0/1 masks: int16 / uint8 on disk, int64 when read
            value = tensors.get(key)
            if value is not None and value.dtype.kind in "iu" and value.size:
                if key == "token_mask" and value.min() >= 0 and value.max() <= 1:
                    tensors[key] = value.astype(np.uint8)
                elif value.min() >= 0 and value.max() < 2 ** 15:
                    tensors[key] = value.astype(np.int16)
        if not tensors:
            raise CacheError(f"knowledge for shard {shard} of teacher {name} holds no arrays; the request must ask "
                             f"for at least one of {list(OUTPUT_TENSORS)}")
        return tensors

    def _layers(self, knowledge: Knowledge, tensors: dict[str, np.ndarray]) -> list[int] | None:
        """The teacher layers [k] of the layered tensors (checked against axis 1 and student_layers)."""
        layers = getattr(knowledge, "layers", None)
        layered = [k for k in LAYERED if k in tensors]
        if not layered:
            return None
        if layers is None:
            raise CacheError(f"knowledge.layers is required with {layered}: the teacher layers they hold")
        layers = [int(x) for x in np.asarray(layers).reshape(-1)]
        for key in layered:
            if tensors[key].ndim < 2 or tensors[key].shape[1] != len(layers):
                raise CacheError(f"knowledge.{key} has shape {tensors[key].shape}; axis 1 must be k = "
                                 f"len(layers) = {len(layers)}")
        sl = self.manifest["student_layers"]
        if sl is not None and len(sl) != len(layers):
            raise CacheError(f"knowledge.layers {layers} must serve student_layers {sl} one to one")
        return layers

    def _pad_lengths(self, tensors: dict[str, np.ndarray]) -> None:
        """Zero-pad length axes to max_length in place (padding keys get no attention mass; padded token
        slots have token_mask 0), so every shard has the same per-example shapes."""
        for key in list(tensors):
            key_axes = length_axes(key, self.manifest["tokens_follow_length"])
            if not key_axes:
                continue
            value = tensors[key]
            if value.ndim <= max(key_axes):
                raise CacheError(f"knowledge.{key} has shape {value.shape}; see actors.knowledge.Knowledge")
            pad = [(0, 0)] * value.ndim
            for axis in key_axes:
                if value.shape[axis] > self.max_length:
                    raise CacheError(f"knowledge.{key} axis {axis} has {value.shape[axis]} tokens > cache "
                                     f"max_length {self.max_length}; build the cache with the config's "
                                     f"data.max_length")
                pad[axis] = (0, self.max_length - value.shape[axis])
            tensors[key] = np.pad(value, pad)

    def _record_spec(self, name: str, shard: int, tensors: dict[str, np.ndarray], layers: list[int] | None) -> None:
        """Record the teacher's per-example shapes on its first shard; refuse a shard that differs."""
        spec = {k: {"dtype": v.dtype.name, "shape": list(v.shape[1:])} for k, v in tensors.items()}
        entry = self.manifest["per_teacher"][name]
        if entry["tensors"] is None:
            # recorded before the first shard lands, so every shard on disk has a spec to check against
            entry["tensors"], entry["layers"] = spec, layers
            self._save()
        elif entry["tensors"] != spec or entry["layers"] != layers:
            raise CacheMismatchError(
                f"shard {shard} of teacher {name} has tensors {spec} and layers {layers}, but its earlier shards "
                f"have {entry['tensors']} and layers {entry['layers']}; every shard must have the same "
                f"per-example shapes (fixed K with token_mask 0 in unused slots; with tokens == 'all' open the "
                f"writer with tokens_follow_length=True) or the build must use --overwrite")

    def write_example_ids(self, ids: np.ndarray) -> None:
        """Record the example id of every row ([N] int64, row order), so `CacheReader` can serve batches
        by example id (the ids training batches carry) rather than by row position.

        Raises:
            CacheError: not N distinct ids.
        """
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
        if ids.shape != (self.num_examples,) or len(np.unique(ids)) != self.num_examples:
            raise CacheError(f"example ids must be {self.num_examples} distinct integers, got shape {ids.shape}")
        write_atomic(self.path / EXAMPLE_IDS, lambda tmp: save_file({"ids": ids}, str(tmp)))

    def finalize(self, hsk_fraction: float | None = None) -> dict:
        """Check every shard of every teacher, record sizes, and mark the cache complete.

        Args:
            hsk_fraction: the fraction of the full hidden-state knowledge kept (layers x tokens x width),
                as the builder computed it; None when no hidden states are cached.

        Returns:
            `cache_summary(path)`.

        Raises:
            PartialCacheError: some shards are still missing (listed per teacher).
        """
        missing = {n: self.missing(n) for n in self.teacher_names}
        missing = {n: m for n, m in missing.items() if m}
        if missing:
            raise PartialCacheError(f"cannot finalize knowledge cache {self.path}: shards still missing {missing}; "
                                    f"write them first ({REBUILD} resumes the build)")
        total, shards = 0, {}
        for name in self.teacher_names:
            files = [shard_path(self.path, name, s) for s in range(self.num_shards)]
            shards[name] = [{"bytes": f.stat().st_size, "sha256": file_sha256(f), "content": tensors_sha256(f)}
                            for f in files]
            self.manifest["per_teacher"][name].update(bytes=sum(e["bytes"] for e in shards[name]),
                                                      shards=shards[name])
            total += self.manifest["per_teacher"][name]["bytes"]
        ids = self.path / EXAMPLE_IDS
        self.manifest.update(complete=True, total_bytes=total, bytes_per_example=total / self.num_examples,
                             hsk_fraction=None if hsk_fraction is None else float(hsk_fraction),
                             content_sha256=content_digest(shards, tensors_sha256(ids) if ids.is_file() else None))
        self._save()
        return cache_summary(self.path)

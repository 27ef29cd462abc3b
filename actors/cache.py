"""The offline knowledge cache: teachers' knowledge precomputed once per (teacher, example), read from disk.

A student can then train with no teacher in memory (the Marginal Utility Diminishes paper measured a
2.7-3.4x faster training with precomputed compressed HSK). Layout:

    <cache>/manifest.json                       format version, fingerprint, shapes, sizes, `complete`
    <cache>/<teacher name>/shard-00000.safetensors   rows [0, S) of the training split
    <cache>/<teacher name>/shard-00001.safetensors   rows [S, 2S) ...

Cache row = example id (ids are 0..N-1 in the training split's order). Each shard holds the arrays the
build's request asked for: `logits`, `hidden`, `token_index`, `token_mask`, `width_index`, `attentions`,
`cls` (shapes as in `actors.knowledge.Knowledge`, with B = rows of the shard). Attentions are zero-padded
on the key axis to the cache's `max_length`; the reader slices them back to the caller's L (right padding
keeps real tokens at the same positions for any L). With `tokens == "all"` the token axis K is L itself;
the writer's `tokens_follow_length` pads that axis to `max_length` too (token_mask 0) and the reader cuts
it to L. The teacher layers serving the student layers
(`layers`, [k]) are stored once per teacher in the manifest and in each shard's metadata.

Writes are atomic (tmp file + `os.replace`), so a shard or manifest on disk is either whole or absent; an
interrupted `skd cache build` resumes by writing only the shards `CacheWriter.missing` reports. Shards
are validated with `safetensors.safe_open` (header, tensor names, dtypes, shapes); reads memory-map each
shard once and gather rows with numpy fancy indexing (per-row `get_slice` calls measured ~4-12 ms for 32
random rows x 7 tensors; the memory map takes ~1-2 ms on a loaded 2-core machine).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from actors.knowledge import Knowledge, KnowledgeRequest, TokenBatch
from actors.errors import SkdError

log = logging.getLogger(__name__)

FORMAT = "skd-knowledge-cache"
VERSION = 1
MANIFEST = "manifest.json"
REBUILD = "re-run `skd cache build -c CONFIG`"

EXAMPLE_IDS = "example_ids.safetensors"
INDEX_TENSORS = ("token_index", "token_mask", "width_index")  # stored compactly, returned as int64
TENSORS = ("logits", "hidden", "token_index", "token_mask", "width_index", "attentions", "cls")
LAYERED = ("hidden", "width_index", "attentions", "cls")  # axis 1 is the layer axis k
TOKEN_AXIS = {"hidden": 2, "token_index": 1, "token_mask": 1, "attentions": 3}  # the K axis, with B first
# what each requested output needs from the cache
OUTPUT_TENSORS = {"logits": ("logits",), "hidden": ("hidden", "token_index", "token_mask", "width_index"),
                  "attentions": ("attentions", "token_index", "token_mask"), "cls": ("cls",)}
_ST_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8", "I16": "int16",
              "I32": "int32", "I64": "int64", "U8": "uint8", "U16": "uint16", "U32": "uint32",
              "U64": "uint64", "BOOL": "bool"}


class CacheError(SkdError):
    """Any problem with an offline knowledge cache; the message names the field at fault and the fix.

    A `SkdError` (itself an `Exception`), so the CLI prints it as one line and exits with status 2.
    """


class CacheNotFoundError(CacheError):
    """No `manifest.json` at the cache path: the cache was never built there."""


class PartialCacheError(CacheError):
    """The cache's build was interrupted (`complete` is false); `skd cache build` resumes it."""


class CacheMismatchError(CacheError):
    """The cache was built for another setup (fingerprint, teachers, sizes) than the one asking for it."""


# ---------------------------------------------------------------------------------------------- helpers


def _jsonable(value: Any, what: str) -> Any:
    """A JSON round trip, so tuples compare equal to the lists a manifest reads back."""
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise CacheError(f"{what} must hold only JSON values (str, number, bool, None, list, dict): {exc}") from None


def _diff(ours: Any, theirs: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, our value, their value) for every differing leaf; `<absent>` marks a missing key."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out = []
        for key in sorted(set(ours) | set(theirs), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            out += _diff(ours.get(key, "<absent>"), theirs.get(key, "<absent>"), name)
        return out
    return [] if ours == theirs else [(prefix or "<root>", ours, theirs)]


def _write_atomic(path: Path, write) -> None:
    """Call `write(tmp_path)`, fsync, then rename over `path`: readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_manifest(path: Path) -> dict | None:
    """The manifest at a cache root, or None when there is none.

    Raises:
        CacheError: the file is not valid JSON or not a knowledge-cache manifest.
    """
    file = path / MANIFEST
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except ValueError as exc:
        raise CacheError(f"{file} is not valid JSON ({exc}); delete the cache folder and {REBUILD}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CacheError(f"{file} is not a knowledge-cache manifest (format != {FORMAT!r}); point --knowledge at "
                         f"a folder written by `skd cache build`")
    return data


def _length_axes(key: str, tokens_follow_length: bool) -> list[int]:
    """Axes of tensor `key` (B first) stored padded to max_length and cut to the caller's L on read."""
    axes = [4] if key == "attentions" else []  # [B, k, H, K, L]: the key axis
    if tokens_follow_length and key in TOKEN_AXIS:
        axes.append(TOKEN_AXIS[key])
    return axes


def _shard_path(root: Path, teacher: str, shard: int) -> Path:
    return root / teacher / f"shard-{shard:05d}.safetensors"


class _MappedShard:
    """One shard memory-mapped read-only: tensor name -> [rows, ...] numpy view into the map.

    The header is parsed here (safetensors' documented layout: u64 little-endian header size, JSON
    header with `data_offsets`, then the data) because `safe_open` copies whole tensors on read.
    """

    def __init__(self, path: Path) -> None:
        try:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
            raise CacheError(f"cache shard {path} cannot be read ({exc}); {REBUILD} to rewrite it") from None
        size = len(self._map)
        try:
            (n,) = struct.unpack("<Q", self._map[:8])
            header = json.loads(self._map[8:8 + n])
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (struct.error, ValueError) as exc:
            raise CacheError(f"cache shard {path} is corrupt ({exc}); {REBUILD} to rewrite it") from None
        base = 8 + n
        self.arrays: dict[str, np.ndarray] = {}
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        for name, info in header.items():
            begin, end = info["data_offsets"]
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            if base + end > size:
                raise CacheError(f"cache shard {path} is truncated; {REBUILD} to rewrite it")
            count = (end - begin) // dtype.itemsize
            self.arrays[name] = np.frombuffer(self._map, dtype, count, base + begin).reshape(info["shape"])


# ----------------------------------------------------------------------------------------------- writer


class CacheWriter:
    """Writes an offline knowledge cache shard by shard; an interrupted build resumes where it stopped.

    Usage (the builder): for each teacher t and each shard s in `writer.missing(t)`, compute knowledge
    for rows [s*S, min((s+1)*S, N)) in id order and call `writer.write_shard(t, s, knowledge)`; then
    `writer.finalize(hsk_fraction)`.

    Args:
        path: the cache root folder (created if absent).
        fingerprint: what the knowledge depends on (request fingerprint, tokenizer/vocab hash, max_length,
            dataset identity, ...): an opaque dict of str -> JSON values, compared key by key on reuse.
        teacher_names: the ensemble's names in pool order; each becomes a folder, so no "/" or "..".
        num_examples: N, rows of the training split (ids 0..N-1).
        max_length: the longest padded length L the cache serves; attentions are padded to it (tokens).
        shard_size: S, rows per shard file.
        student_layers: the student layers the cached hidden/attention/[CLS] layers serve, in order
            (`request.student_layers`); `CachedPool` maps a request's layers to positions with it.
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
            "version": VERSION, "fingerprint": _jsonable(fingerprint, "fingerprint"), "teachers": names,
            "num_examples": self.num_examples, "max_length": self.max_length, "shard_size": self.shard_size,
            "student_layers": None if student_layers is None else [int(x) for x in student_layers],
            "tokens_follow_length": bool(tokens_follow_length),
        }
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            old = _read_manifest(self.path)
        except CacheError:
            if not overwrite:
                raise
            old = None  # an unreadable manifest is deleted with the rest
        if old is not None and not overwrite:
            diffs = _diff({k: old.get(k, "<absent>") for k in identity}, identity)
            if diffs:
                listed = "; ".join(f"{k}: cache has {a!r}, builder has {b!r}" for k, a, b in diffs)
                raise CacheMismatchError(
                    f"knowledge cache {self.path} was built for another setup ({listed}). Pass --overwrite to "
                    f"delete it and build afresh, or choose another cache folder; caches are never mixed")
        elif old is None and not overwrite and any(self.path.iterdir()):
            raise CacheMismatchError(f"{self.path} is not empty and has no {MANIFEST}, so it is not a knowledge "
                                     f"cache; choose an empty folder (--overwrite would delete only teacher-named folders there)")
        if overwrite:
            self._clear(set(names) | set((old or {}).get("teachers", [])))
            old = None
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

    def _clear(self, teachers: Iterable[str]) -> None:
        """Delete a previous cache's manifest and teacher folders (other files in `path` are left alone)."""
        (self.path / MANIFEST).unlink(missing_ok=True)
        for name in teachers:
            if (self.path / name).is_dir():
                shutil.rmtree(self.path / name)

    def _save(self) -> None:
        text = json.dumps(self.manifest, indent=2)
        _write_atomic(self.path / MANIFEST, lambda tmp: tmp.write_text(text))

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
        """True when the shard file exists and matches the manifest (names, dtypes, shapes, metadata)."""
        path = _shard_path(self.path, name, shard)
        spec = self.manifest["per_teacher"][name]
        if not path.is_file() or spec["tensors"] is None:
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
                            _ST_DTYPES.get(sl.get_dtype()) != want["dtype"]:
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
            if _shard_path(self.path, name, s).exists():
                log.warning("cache shard %s is corrupt or incomplete; it will be rewritten",
                            _shard_path(self.path, name, s))
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
        tensors: dict[str, np.ndarray] = {}
        for key in TENSORS:
            value = getattr(knowledge, key, None)
            if value is None:
                continue
            value = np.ascontiguousarray(value)
            if value.dtype.name not in _ST_DTYPES.values():
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
        layers = getattr(knowledge, "layers", None)
        layered = [k for k in LAYERED if k in tensors]
        if layered:
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
        else:
            layers = None
        # zero-pad length axes to max_length (padding keys get no attention mass; padded token slots
        # have token_mask 0), so every shard has the same per-example shapes
        for key in list(tensors):
            key_axes = _length_axes(key, self.manifest["tokens_follow_length"])
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
        metadata = {"format": FORMAT, "version": str(VERSION), "teacher": name, "shard": str(shard),
                    "rows": f"{start}:{end}", "layers": json.dumps(layers)}
        path = _shard_path(self.path, name, shard)
        self._valid[name].discard(shard)
        _write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        self._valid[name].add(shard)

    def write_example_ids(self, ids: np.ndarray) -> None:
        """Record the example id of every row ([N] int64, row order), so `CachedPool` can serve batches
        by example id (the ids training batches carry) rather than by row position.

        Raises:
            CacheError: not N distinct ids.
        """
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
        if ids.shape != (self.num_examples,) or len(np.unique(ids)) != self.num_examples:
            raise CacheError(f"example ids must be {self.num_examples} distinct integers, got shape {ids.shape}")
        _write_atomic(self.path / EXAMPLE_IDS, lambda tmp: save_file({"ids": ids}, str(tmp)))

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
        total = 0
        for name in self.teacher_names:
            size = sum(_shard_path(self.path, name, s).stat().st_size for s in range(self.num_shards))
            self.manifest["per_teacher"][name]["bytes"] = size
            total += size
        self.manifest.update(complete=True, total_bytes=total, bytes_per_example=total / self.num_examples,
                             hsk_fraction=None if hsk_fraction is None else float(hsk_fraction))
        self._save()
        return cache_summary(self.path)


# ----------------------------------------------------------------------------------------------- reader


class KnowledgeCache:
    """A complete offline knowledge cache opened for reading; shards are memory-mapped on first use.

    Picklable (only the path and manifest travel; each process maps the shards itself), so a
    `CachedPool` can be handed to Ray Train workers and Tune trials like the teacher pool.
    Open with `KnowledgeCache.open`.
    """

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = path
        self.manifest = manifest
        self._shards: dict[tuple[int, int], dict[str, np.ndarray]] = {}

    @classmethod
    def open(cls, path: str | Path, expected_fingerprint: dict | None = None) -> "KnowledgeCache":
        """Open a cache and check it is whole and built for the caller's setup.

        Args:
            path: the cache root (the folder holding manifest.json).
            expected_fingerprint: the fingerprint the current config would build; None skips the check.

        Raises:
            CacheNotFoundError: no manifest.json at `path`.
            PartialCacheError: the build was interrupted (`complete` is false).
            CacheMismatchError: another format version, or a fingerprint that differs (each differing key
                is listed with the cache's and the expected value).
            CacheError: the manifest is unreadable.
        """
        path = Path(path)
        manifest = _read_manifest(path)
        if manifest is None:
            raise CacheNotFoundError(f"no knowledge cache at {path} (no {MANIFEST}); build one with "
                                     f"`skd cache build -c CONFIG`, or point --knowledge at an existing cache")
        if manifest.get("version") != VERSION:
            raise CacheMismatchError(f"knowledge cache {path} has format version {manifest.get('version')}; this "
                                     f"skd reads version {VERSION}. Rebuild it with `skd cache build -c CONFIG "
                                     f"--overwrite`")
        if not manifest.get("complete"):
            raise PartialCacheError(f"knowledge cache {path} is incomplete: its build was interrupted. Re-run "
                                    f"`skd cache build -c CONFIG`, which resumes it from the shards already written")
        if expected_fingerprint is not None:
            diffs = _diff(manifest["fingerprint"], _jsonable(expected_fingerprint, "expected_fingerprint"))
            if diffs:
                listed = "; ".join(f"fingerprint.{k}: cache has {a!r}, config expects {b!r}" for k, a, b in diffs)
                raise CacheMismatchError(
                    f"knowledge cache {path} was built for another setup ({listed}). Rebuild it with the current "
                    f"config (`skd cache build -c CONFIG --overwrite`), or point --knowledge at a cache built "
                    f"with a matching config")
        return cls(path, manifest)

    def example_ids(self) -> np.ndarray | None:
        """[N] int64 example ids of the cached rows in order (`write_example_ids`), or None if not recorded."""
        path = self.path / EXAMPLE_IDS
        if not path.is_file():
            return None
        from safetensors.numpy import load_file

        return load_file(str(path))["ids"]

    def __getstate__(self) -> dict:
        return {"path": self.path, "manifest": self.manifest}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["manifest"])

    @property
    def teacher_names(self) -> list[str]:
        """Teacher names in pool order (teacher index = position)."""
        return list(self.manifest["teachers"])

    @property
    def num_examples(self) -> int:
        """N: rows per teacher; valid example ids are 0..N-1."""
        return int(self.manifest["num_examples"])

    @property
    def max_length(self) -> int:
        """The longest batch length L (tokens) the cache serves."""
        return int(self.manifest["max_length"])

    @property
    def student_layers(self) -> list[int] | None:
        """Student layers served by the cached layer axis, in order (None when the builder gave none)."""
        return self.manifest.get("student_layers")

    def layers(self, teacher: int) -> list[int] | None:
        """Teacher layer indices [k] stored for `teacher` (None when only logits are cached)."""
        return self.manifest["per_teacher"][self.teacher_names[teacher]]["layers"]

    def outputs(self, teacher: int) -> tuple[str, ...]:
        """Which request outputs ("logits", "hidden", "attentions", "cls") the cache holds for `teacher`."""
        tensors = self.manifest["per_teacher"][self.teacher_names[teacher]]["tensors"]
        return tuple(o for o in OUTPUT_TENSORS if o in tensors)

    def _shard(self, teacher: int, shard: int) -> dict[str, np.ndarray]:
        key = (teacher, shard)
        if key not in self._shards:
            name = self.teacher_names[teacher]
            path = _shard_path(self.path, name, shard)
            if not path.is_file():
                raise CacheError(f"cache shard {path} is missing; {REBUILD} to rewrite it")
            mapped = _MappedShard(path)
            spec = self.manifest["per_teacher"][name]["tensors"]
            rows = min(self.manifest["shard_size"], self.num_examples - shard * self.manifest["shard_size"])
            for k, want in spec.items():
                got = mapped.arrays.get(k)
                if got is None or got.dtype.name != want["dtype"] or list(got.shape) != [rows, *want["shape"]]:
                    raise CacheError(f"cache shard {path} does not match the manifest at tensor {k!r}; "
                                     f"{REBUILD} to rewrite it")
            self._shards[key] = mapped.arrays
        return self._shards[key]

    def knowledge(self, teacher: int, ids: np.ndarray, length: int, outputs: Sequence[str] | None = None,
                  layer_positions: Sequence[int] | None = None) -> Knowledge:
        """Read one teacher's knowledge for a batch of examples, bit-exact as written.

        Args:
            teacher: index into `teacher_names`.
            ids: [B] int example ids in [0, num_examples), any order, repeats allowed.
            length: the batch's padded length L (tokens), <= max_length; attentions are cut to L keys.
            outputs: request outputs to read ("logits", "hidden", "attentions", "cls"); None reads all the
                cache holds for the teacher.
            layer_positions: positions along the cached layer axis k to keep (e.g. [2] for one layer of a
                progressive schedule); None keeps all.

        Returns:
            Knowledge with, as requested, logits [B, C], hidden [B, k', K, W], token_index and token_mask
            [B, K], width_index [B, k', W], attentions [B, k', H, K, L], cls [B, k', D] and layers [k']
            (K = L when the cache's tokens follow the length); other fields None; compute_s = 0 and
            wait_s = the read time in seconds.

        Raises:
            CacheError: a teacher, id, length, output or layer position outside what the cache holds.
        """
        start = time.perf_counter()
        names = self.teacher_names
        if not 0 <= int(teacher) < len(names):
            raise CacheError(f"teacher index {teacher} is not in the cache (teachers: {names})")
        teacher = int(teacher)
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise CacheError(f"ids must be a [B] integer array, got shape {ids.shape} dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_examples):
            raise CacheError(f"example ids must be in [0, {self.num_examples}): got {ids.min()}..{ids.max()}. The "
                             f"cache was built for a {self.num_examples}-example training split; rebuild it for "
                             f"this data (`skd cache build -c CONFIG --overwrite`)")
        if not 1 <= int(length) <= self.max_length:
            raise CacheError(f"length {length} must be in [1, {self.max_length}] (the cache's max_length); "
                             f"set data.max_length <= {self.max_length} or rebuild the cache")
        held = self.outputs(teacher)
        wanted = held if outputs is None else tuple(outputs)
        absent = [o for o in wanted if o not in held]
        if absent:
            raise CacheError(f"outputs {absent} are not in the cache for teacher {names[teacher]} (it holds "
                             f"{list(held)}); rebuild the cache with them in the knowledge request")
        spec = self.manifest["per_teacher"][names[teacher]]["tensors"]
        keys = [k for k in TENSORS if k in spec and any(k in OUTPUT_TENSORS[o] for o in wanted)]
        follow = self.manifest["tokens_follow_length"]
        layers = self.layers(teacher)
        pos = None
        if layer_positions is not None and layers is not None:
            pos = np.asarray(layer_positions, dtype=np.int64).reshape(-1)
            if pos.size and (pos.min() < 0 or pos.max() >= len(layers)):
                raise CacheError(f"layer_positions {list(pos)} out of range for the {len(layers)} cached layers")
            if np.array_equal(pos, np.arange(len(layers))):
                pos = None  # all layers, in order: skip the extra gather
        # group ids by shard: one fancy-indexed read per (tensor, shard)
        size = self.manifest["shard_size"]
        shard_of, row_of = np.divmod(ids.astype(np.int64), size)
        order = np.argsort(shard_of, kind="stable")
        cuts = np.flatnonzero(np.diff(shard_of[order])) + 1
        groups = [(int(shard_of[g[0]]), g) for g in np.split(order, cuts) if g.size]
        out: dict[str, np.ndarray] = {}
        for key in keys:
            shape = list(spec[key]["shape"])
            if pos is not None and key in LAYERED:
                shape[0] = len(pos)
            cut = [slice(None)] * (len(shape) + 1)  # per-example axes plus B
            for axis in _length_axes(key, follow):
                shape[axis - 1], cut[axis] = int(length), slice(0, int(length))
            arr = np.empty([ids.size, *shape], dtype=spec[key]["dtype"])
            for shard, sel in groups:
                src = self._shard(teacher, shard)[key]
                rows = row_of[sel]
                block = src[rows[:, None], pos[None, :]] if pos is not None and key in LAYERED else src[rows]
                arr[sel] = block[tuple(cut)]
            out[key] = arr.astype(np.int64) if key in INDEX_TENSORS else arr  # as served online
        if layers is not None and any(k in LAYERED for k in keys):
            kept = layers if pos is None else [layers[i] for i in pos]
            out["layers"] = np.asarray(kept, dtype=np.int64)
        out.setdefault("logits", None)
        return Knowledge(teacher=teacher, compute_s=0.0, wait_s=time.perf_counter() - start, **out)

    def close(self) -> None:
        """Drop the shard maps (they unmap once no returned view refers to them)."""
        self._shards.clear()


# ------------------------------------------------------------------------------------------------- pool


class CachedKnowledge:
    """A knowledge read not yet performed; `result()` reads it (wait_s = the read time in seconds)."""

    def __init__(self, read, teacher: int) -> None:
        self._read = read
        self.teacher = teacher  # -1 for an average over teachers

    def result(self) -> Knowledge:
        """Read and return the knowledge (raises CacheError as `KnowledgeCache.knowledge`)."""
        return self._read()


class CachedPool:
    """Serves knowledge from an offline cache with the teacher pool's interface, so no teacher is loaded.

    Drop-in for `actors.pool.TeacherPool` in the training loop: `submit(k, batch, request).result()`,
    `submit_average`, `knowledge`, `names`, `shutdown`. Picklable (see `KnowledgeCache`).

    Args:
        cache: an opened `KnowledgeCache`.
    """

    def __init__(self, cache: KnowledgeCache) -> None:
        self.cache = cache
        self._lookup: tuple[np.ndarray, np.ndarray] | None = None
        ids = cache.example_ids()
        if ids is not None:  # batch ids are the split's example ids; cache rows are positions in the split
            order = np.argsort(ids, kind="stable")
            self._lookup = (ids[order], order)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Cache rows of example ids (identity when the cache records no example ids).

        Raises:
            CacheError: an id the cached training split does not contain.
        """
        if self._lookup is None:
            return np.asarray(ids)
        sorted_ids, order = self._lookup
        at = np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)
        if not np.array_equal(sorted_ids[at], ids):
            raise CacheError(f"example ids {sorted(set(np.asarray(ids).tolist()) - set(sorted_ids.tolist()))[:5]} "
                             f"are not in knowledge cache {self.cache.path}; rebuild it for this training split "
                             f"(`skd cache build -c CONFIG --overwrite`)")
        return order[at]

    @classmethod
    def open(cls, path: str | Path, expected_fingerprint: dict | None = None) -> "CachedPool":
        """`KnowledgeCache.open` (same errors) wrapped in a pool."""
        return cls(KnowledgeCache.open(path, expected_fingerprint))

    @property
    def names(self) -> list[str]:
        """Teacher names in pool order (a property, as on `TeacherPool`)."""
        return self.cache.teacher_names

    def _positions(self, request: KnowledgeRequest) -> list[int] | None:
        """Positions in the cache's layer axis serving `request.student_layers` (None: all of them)."""
        wanted = getattr(request, "student_layers", None)
        if not wanted or set(getattr(request, "outputs", ("logits",))) <= {"logits"}:
            return None
        cached = self.cache.student_layers
        if cached is None:
            raise CacheError(f"knowledge cache {self.cache.path} records no student_layers, so it cannot serve "
                             f"student layers {list(wanted)}; rebuild it with the current config")
        absent = [layer for layer in wanted if layer not in cached]
        if absent:
            raise CacheError(f"student layers {absent} are not in knowledge cache {self.cache.path} (it holds "
                             f"{cached}); rebuild the cache with those layers or request only cached ones")
        return [cached.index(layer) for layer in wanted]

    def _check(self, batch: TokenBatch) -> tuple[np.ndarray, int]:
        batch.check()
        ids, length = self.rows(np.asarray(batch.ids)), int(batch.input_ids.shape[1])
        if length > self.cache.max_length:
            raise CacheError(f"batch length {length} > knowledge cache max_length {self.cache.max_length}; set "
                             f"data.max_length <= {self.cache.max_length} or rebuild the cache")
        return ids, length

    def submit(self, k: int, batch: TokenBatch, request: KnowledgeRequest = KnowledgeRequest()) -> CachedKnowledge:
        """Teacher k's cached knowledge of `batch` (rows `batch.ids`, L = `batch.input_ids.shape[1]`).

        The read happens in `result()`. Raises CacheError (ids, L, outputs or layers the cache lacks),
        from `submit` for the layer and length checks and from `result()` for the rest.
        """
        ids, length = self._check(batch)
        outputs, pos = tuple(getattr(request, "outputs", ("logits",))), self._positions(request)
        return CachedKnowledge(lambda: self.cache.knowledge(k, ids, length, outputs, pos), k)

    def submit_average(self, batch: TokenBatch,
                       request: KnowledgeRequest = KnowledgeRequest()) -> CachedKnowledge:
        """All cached teachers' logits averaged (float32 [B, C]), teacher = -1; other outputs are not averaged."""
        ids, length = self._check(batch)

        def read() -> Knowledge:
            start = time.perf_counter()
            parts = [self.cache.knowledge(t, ids, length, ("logits",)) for t in range(len(self.names))]  # [B, C] each
            logits = np.mean([p.logits.astype(np.float32) for p in parts], axis=0)  # [B, C]
            return Knowledge(teacher=-1, logits=logits, compute_s=0.0, wait_s=time.perf_counter() - start)

        return CachedKnowledge(read, -1)

    def knowledge(self, k: int, batch: TokenBatch, request: KnowledgeRequest = KnowledgeRequest()) -> Knowledge:
        """Blocking form of `submit`."""
        return self.submit(k, batch, request).result()

    def shutdown(self) -> None:
        """Nothing to stop (no actors); releases the shard maps."""
        self.cache.close()


def cache_summary(path: str | Path) -> dict:
    """What `skd cache` prints about a cache (complete or not).

    Returns:
        dict with path, complete, teachers, num_examples, shard_size, max_length, shards_written
        (per teacher), total_bytes (shard files on disk now), bytes_per_example (total_bytes / N),
        per_teacher_bytes, hsk_fraction (None when unknown), fingerprint.

    Raises:
        CacheNotFoundError: no manifest.json at `path`.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    if manifest is None:
        raise CacheNotFoundError(f"no knowledge cache at {path} (no {MANIFEST}); build one with "
                                 f"`skd cache build -c CONFIG`")
    per_teacher, written = {}, {}
    for name in manifest["teachers"]:
        files = list((path / name).glob("shard-*.safetensors"))
        per_teacher[name] = sum(f.stat().st_size for f in files)
        written[name] = len(files)
    total = sum(per_teacher.values())
    return {"path": str(path), "complete": bool(manifest["complete"]), "teachers": list(manifest["teachers"]),
            "num_examples": manifest["num_examples"], "shard_size": manifest["shard_size"],
            "max_length": manifest["max_length"], "num_shards": manifest["num_shards"], "shards_written": written,
            "total_bytes": total, "bytes_per_example": total / manifest["num_examples"],
            "per_teacher_bytes": per_teacher, "hsk_fraction": manifest.get("hsk_fraction"),
            "fingerprint": manifest["fingerprint"]}


def concat_knowledge(parts: Sequence[Knowledge], max_length: int, tokens_follow_length: bool = False) -> Knowledge:
    """Join the knowledge of consecutive sub-batches (of different padded lengths) into one shard's worth.

    Length axes (attention keys; with `tokens_follow_length` also the token axis) are zero-padded to
    `max_length` first, exactly as `CacheWriter.write_shard` stores them.

    Args:
        parts: answers of one teacher for consecutive row ranges, in order.
        max_length: the cache's max_length.
        tokens_follow_length: the request keeps all tokens (K = L).

    Returns:
        One `Knowledge` with the rows of all parts (layers from the first part; compute_s summed).

    Raises:
        CacheError: no parts, or parts from different teachers.
    """
    if not parts or len({p.teacher for p in parts}) != 1:
        raise CacheError("concat_knowledge needs one or more answers of the same teacher")
    joined: dict[str, np.ndarray] = {}
    for key in TENSORS:
        arrays = [getattr(p, key, None) for p in parts]
        if arrays[0] is None:
            continue
        padded = []
        for value in arrays:
            pad = [(0, 0)] * value.ndim
            for axis in _length_axes(key, tokens_follow_length):
                pad[axis] = (0, max_length - value.shape[axis])
            padded.append(np.pad(value, pad) if any(p != (0, 0) for p in pad) else value)
        joined[key] = np.concatenate(padded)
    return Knowledge(teacher=parts[0].teacher, compute_s=sum(p.compute_s for p in parts),
                     layers=parts[0].layers, **{"logits": None, **joined})

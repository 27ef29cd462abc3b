"""Reading an offline knowledge cache: `KnowledgeCache` (rows by position) and `CacheReader` (the
`actors.knowledge.KnowledgeSource` a trainer uses instead of the teacher pool).

Reads memory-map each shard once and gather rows with numpy fancy indexing, one read per (tensor, shard),
instead of a safetensors `get_slice` call per row and tensor (`tests/test_cache.py` checks side by side
that the gather is faster).
"""

from __future__ import annotations

import json
import mmap
import struct
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from actors.cache.format import (EXAMPLE_IDS, INDEX_TENSORS, LAYERED, MANIFEST, OUTPUT_TENSORS, REBUILD, ST_DTYPES,
                                 TENSORS, VERSION, CacheError, CacheMismatchError, CacheNotFoundError,
                                 PartialCacheError, diff, jsonable, length_axes, read_manifest, shard_path,
                                 shard_problem)
from actors.knowledge import Knowledge, KnowledgeRequest, TokenBatch, average_logits


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
            dtype = np.dtype(ST_DTYPES[info["dtype"]])
            if base + end > size:
                raise CacheError(f"cache shard {path} is truncated; {REBUILD} to rewrite it")
            count = (end - begin) // dtype.itemsize
            self.arrays[name] = np.frombuffer(self._map, dtype, count, base + begin).reshape(info["shape"])


class KnowledgeCache:
    """A complete offline knowledge cache opened for reading; shards are memory-mapped on first use.

    Picklable (only the path and manifest travel; each process maps the shards itself), so a
    `CacheReader` can be handed to Ray Train workers and Tune trials like the teacher pool.
    Open with `KnowledgeCache.open`.
    """

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = path
        self.manifest = manifest
        self._shards: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self.contents_checked = False  # every shard's SHA-256 checked already (`verify`): no check per shard

    @classmethod
    def open(cls, path: str | Path, expected_fingerprint: dict | None = None) -> "KnowledgeCache":
        """Open a cache and check it is whole and built for the caller's setup.

        Args:
            path: the cache root (the folder holding manifest.json).
            expected_fingerprint: the fingerprint the current config would build; None skips the check
                (call `check_fingerprint` later).

        Raises:
            CacheNotFoundError: no manifest.json at `path`.
            PartialCacheError: the build was interrupted (`complete` is false).
            CacheMismatchError: another format version, or a fingerprint that differs (each differing key
                is listed with the cache's and the expected value).
            CacheError: the manifest is unreadable.
        """
        path = Path(path)
        manifest = read_manifest(path)
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
        cache = cls(path, manifest)
        cache.verify(contents=False)  # every shard there, at the size it was built with
        if expected_fingerprint is not None:
            cache.check_fingerprint(expected_fingerprint)
        return cache

    def verify(self, contents: bool = True) -> None:
        """Check every shard against the sizes (and with `contents`, the SHA-256s) `finalize` recorded; reads
        every byte with `contents` (about 2 s per GB on one core). Afterwards `contents_checked` spares each
        shard's check on first read (it travels with the cache to the workers).

        Raises:
            CacheError: naming each shard at fault and the rebuild command (which rewrites only those).
        """
        problems = [p for name in self.teacher_names for s in range(self.manifest["num_shards"])
                    if (p := shard_problem(self.path, self.manifest, name, s, contents))]
        self.contents_checked = contents and not problems
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise CacheError(f"knowledge cache {self.path} is damaged: {shown}. {REBUILD[0].upper()}{REBUILD[1:]} "
                             f"with the config it was built from: it rewrites only the damaged shards")

    def check_fingerprint(self, expected: dict) -> None:
        """Check the cache was built for `expected`, the fingerprint the current config would build
        (compared key by key; tuples equal lists).

        Raises:
            CacheMismatchError: the fingerprints differ (each differing key listed with the cache's and
                the expected value).
            CacheError: `expected` holds values JSON cannot represent.
        """
        diffs = diff(self.manifest["fingerprint"], jsonable(expected, "expected_fingerprint"))
        if diffs:
            listed = "; ".join(f"fingerprint.{k}: cache has {a!r}, config expects {b!r}" for k, a, b in diffs)
            raise CacheMismatchError(
                f"knowledge cache {self.path} was built for another setup ({listed}). Rebuild it with the current "
                f"config (`skd cache build -c CONFIG --overwrite`), or point --knowledge at a cache built "
                f"with a matching config")

    def example_ids(self) -> np.ndarray | None:
        """[N] int64 example ids of the cached rows in order (`write_example_ids`), or None if not recorded."""
        path = self.path / EXAMPLE_IDS
        if not path.is_file():
            return None
        from safetensors.numpy import load_file

        return load_file(str(path))["ids"]

    def __getstate__(self) -> dict:
        return {"path": self.path, "manifest": self.manifest, "contents_checked": self.contents_checked}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["manifest"])
        self.contents_checked = bool(state.get("contents_checked", False))

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
            path = shard_path(self.path, name, shard)
            problem = shard_problem(self.path, self.manifest, name, shard, contents=not self.contents_checked)
            if problem:
                raise CacheError(f"{problem}; {REBUILD} to rewrite it")
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
        teacher, ids = self._check_read(teacher, ids, length)
        keys = self._keys(teacher, outputs)
        layers = self.layers(teacher)
        pos = None
        if layer_positions is not None and layers is not None:
            pos = np.asarray(layer_positions, dtype=np.int64).reshape(-1)
            if pos.size and (pos.min() < 0 or pos.max() >= len(layers)):
                raise CacheError(f"layer_positions {list(pos)} out of range for the {len(layers)} cached layers")
            if np.array_equal(pos, np.arange(len(layers))):
                pos = None  # all layers, in order: skip the extra gather
        out = self._gather(teacher, ids, int(length), keys, pos)
        if layers is not None and any(k in LAYERED for k in keys):
            kept = layers if pos is None else [layers[i] for i in pos]
            out["layers"] = np.asarray(kept, dtype=np.int64)
        out.setdefault("logits", None)
        return Knowledge(teacher=teacher, compute_s=0.0, wait_s=time.perf_counter() - start, **out)

    def _check_read(self, teacher: int, ids: np.ndarray, length: int) -> tuple[int, np.ndarray]:
        """(teacher index, ids as an array) after checking both and `length` against the cache."""
        names = self.teacher_names
        if not 0 <= int(teacher) < len(names):
            raise CacheError(f"teacher index {teacher} is not in the cache (teachers: {names})")
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
        return int(teacher), ids

    def _keys(self, teacher: int, outputs: Sequence[str] | None) -> list[str]:
        """The cached tensors (in `TENSORS` order) that serve `outputs` (None: all the teacher holds)."""
        held = self.outputs(teacher)
        wanted = held if outputs is None else tuple(outputs)
        absent = [o for o in wanted if o not in held]
        if absent:
            raise CacheError(f"outputs {absent} are not in the cache for teacher {self.teacher_names[teacher]} (it "
                             f"holds {list(held)}); rebuild the cache with them in the knowledge request")
        spec = self.manifest["per_teacher"][self.teacher_names[teacher]]["tensors"]
        return [k for k in TENSORS if k in spec and any(k in OUTPUT_TENSORS[o] for o in wanted)]

    def _gather(self, teacher: int, ids: np.ndarray, length: int, keys: list[str],
                pos: np.ndarray | None) -> dict[str, np.ndarray]:
        """Rows `ids` of each tensor in `keys`, length axes cut to `length`, layer axis gathered at `pos`."""
        spec = self.manifest["per_teacher"][self.teacher_names[teacher]]["tensors"]
        follow = self.manifest["tokens_follow_length"]
        # group ids by shard: one fancy-indexed read per (tensor, shard)
        shard_of, row_of = np.divmod(ids.astype(np.int64), self.manifest["shard_size"])
        order = np.argsort(shard_of, kind="stable")
        cuts = np.flatnonzero(np.diff(shard_of[order])) + 1
        groups = [(int(shard_of[g[0]]), g) for g in np.split(order, cuts) if g.size]
        out: dict[str, np.ndarray] = {}
        for key in keys:
            shape = list(spec[key]["shape"])
            if pos is not None and key in LAYERED:
                shape[0] = len(pos)
            cut = [slice(None)] * (len(shape) + 1)  # per-example axes plus B
            for axis in length_axes(key, follow):
                shape[axis - 1], cut[axis] = length, slice(0, length)
            arr = np.empty([ids.size, *shape], dtype=spec[key]["dtype"])
            for shard, sel in groups:
                src = self._shard(teacher, shard)[key]
                rows = row_of[sel]
                block = src[rows[:, None], pos[None, :]] if pos is not None and key in LAYERED else src[rows]
                arr[sel] = block[tuple(cut)]
            out[key] = arr.astype(np.int64) if key in INDEX_TENSORS else arr  # as served online
        return out

    def close(self) -> None:
        """Drop the shard maps (they unmap once no returned view refers to them)."""
        self._shards.clear()


class CachedKnowledge:
    """A knowledge read not yet performed; `result()` reads it (wait_s = the read time in seconds).

    A `actors.knowledge.PendingKnowledge`.
    """

    def __init__(self, read: Callable[[], Knowledge], teacher: int) -> None:
        self._read = read
        self.teacher = teacher  # -1 for an average over teachers

    def result(self) -> Knowledge:
        """Read and return the knowledge (raises CacheError as `KnowledgeCache.knowledge`)."""
        return self._read()


class CacheReader:
    """Serves knowledge from an offline cache as a `actors.knowledge.KnowledgeSource`, so no teacher is
    loaded: drop-in for `actors.pool.TeacherPool` in the training loop (`names`, `live`, `submit`,
    `submit_average`, `close`). Picklable (see `KnowledgeCache`).

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

    @classmethod
    def open(cls, path: str | Path, expected_fingerprint: dict | None = None) -> "CacheReader":
        """`KnowledgeCache.open` (same errors) wrapped in a reader."""
        return cls(KnowledgeCache.open(path, expected_fingerprint))

    @property
    def names(self) -> list[str]:
        """Teacher names, [N], in ensemble order (a property, as on `TeacherPool`)."""
        return self.cache.teacher_names

    def live(self) -> list[int]:
        """Every teacher can serve from the cache: [0, 1, ..., N-1]."""
        return list(range(len(self.names)))

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

    def submit_average(self, batch: TokenBatch, request: KnowledgeRequest = KnowledgeRequest(),
                       teachers: list[int] | None = None) -> CachedKnowledge:
        """The cached logits of `teachers` (default: all) averaged (float32 [B, C]), teacher = -1; other outputs are not averaged
        (`actors.knowledge.average_logits`; wait_s = the read time in seconds, compute_s = 0)."""
        ids, length = self._check(batch)

        def read() -> Knowledge:
            start = time.perf_counter()
            parts = [self.cache.knowledge(t, ids, length, ("logits",)) for t in (self.live() if teachers is None else teachers)]  # [B, C] each
            return average_logits(parts, time.perf_counter() - start)

        return CachedKnowledge(read, -1)

    def knowledge(self, k: int, batch: TokenBatch, request: KnowledgeRequest = KnowledgeRequest()) -> Knowledge:
        """Blocking form of `submit`."""
        return self.submit(k, batch, request).result()

    def close(self) -> None:
        """Nothing to stop (no actors); releases the shard maps."""
        self.cache.close()

"""The on-disk format of the offline knowledge cache, shared by the writer and the reader.

Layout:

    <cache>/manifest.json                       format version, fingerprint, shapes, sizes, `complete`
    <cache>/example_ids.safetensors             [N] int64 example id of every row (optional)
    <cache>/<teacher name>/shard-00000.safetensors   rows [0, S) of the training split
    <cache>/<teacher name>/shard-00001.safetensors   rows [S, 2S) ...

Cache row = example id (ids are 0..N-1 in the training split's order). Each shard holds the arrays the
build's request asked for: `logits`, `hidden`, `token_index`, `token_mask`, `width_index`, `attentions`,
`cls` (shapes as in `actors.knowledge.Knowledge`, with B = rows of the shard). Attentions are zero-padded
on the key axis to the cache's `max_length`; the reader slices them back to the caller's L (right padding
keeps real tokens at the same positions for any L). With `tokens == "all"` the token axis K is L itself;
the writer's `tokens_follow_length` pads that axis to `max_length` too (token_mask 0) and the reader cuts
it to L. The teacher layers serving the student layers (`layers`, [k]) are stored once per teacher in the
manifest and in each shard's metadata.

Writes are atomic (tmp file + `os.replace`), so a shard or manifest on disk is either whole or absent.
`finalize` records every shard's size and file SHA-256 (`per_teacher.<name>.shards`) and `content_sha256`,
a digest over the shards' tensors and the example ids: what the cache holds, not only what it was built
from. Sizes are checked when a cache is opened, each shard's SHA-256 when it is first read
(`KnowledgeCache.verify` checks all).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from actors.errors import SkdError
from actors.knowledge import Knowledge

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
# safetensors dtype codes -> numpy dtype names
ST_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8", "I16": "int16",
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


def jsonable(value: Any, what: str) -> Any:
    """A JSON round trip, so tuples compare equal to the lists a manifest reads back."""
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise CacheError(f"{what} must hold only JSON values (str, number, bool, None, list, dict): {exc}") from None


def diff(ours: Any, theirs: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, our value, their value) for every differing leaf; `<absent>` marks a missing key."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out = []
        for key in sorted(set(ours) | set(theirs), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            out += diff(ours.get(key, "<absent>"), theirs.get(key, "<absent>"), name)
        return out
    return [] if ours == theirs else [(prefix or "<root>", ours, theirs)]


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp_path)`, fsync, then rename over `path`: readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_manifest(path: Path) -> dict | None:
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


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensors_sha256(path: Path) -> str:
    """SHA-256 over a safetensors file's tensors (name, dtype, shape and bytes, by name) and its metadata
    (sorted): what it holds, whatever order its header was written in (safetensors' header order varies
    between processes, so identical knowledge can give files with other bytes)."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), framework="numpy") as f:
        digest.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
        for key in sorted(f.keys()):
            value = f.get_tensor(key)
            digest.update(f"{key}|{value.dtype}|{value.shape}|".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def content_digest(shards: dict[str, list[dict]], example_ids: str | None) -> str:
    """SHA-256 over every shard's `tensors_sha256` (teacher by teacher, in shard order) and the example ids'
    (`example_ids`, also a `tensors_sha256`): the cache's contents in one value, equal for caches that hold
    the same knowledge, different for two of one fingerprint whose values differ."""
    digest = hashlib.sha256()
    for name, entries in shards.items():
        digest.update(name.encode() + b"\0" + "".join(e["content"] for e in entries).encode())
    digest.update((example_ids or "").encode())
    return digest.hexdigest()


def shard_problem(root: Path, manifest: dict, name: str, shard: int, contents: bool) -> str | None:
    """Why shard `shard` of teacher `name` differs from what `finalize` recorded (missing, another size, and
    with `contents` another SHA-256), or None. Caches finalized before digests were recorded pass."""
    entries = manifest["per_teacher"][name].get("shards")
    path = shard_path(root, name, shard)
    if not path.is_file():
        return f"cache shard {path} is missing"
    if entries is None:
        return None
    want = entries[shard]
    if path.stat().st_size != want["bytes"]:
        return f"cache shard {path} has {path.stat().st_size} bytes, {want['bytes']} when built"
    if contents and file_sha256(path) != want["sha256"]:
        return f"cache shard {path} does not match its SHA-256 (changed or corrupted since it was built)"
    return None


def length_axes(key: str, tokens_follow_length: bool) -> list[int]:
    """Axes of tensor `key` (B first) stored padded to max_length and cut to the caller's L on read."""
    axes = [4] if key == "attentions" else []  # [B, k, H, K, L]: the key axis
    if tokens_follow_length and key in TOKEN_AXIS:
        axes.append(TOKEN_AXIS[key])
    return axes


def shard_path(root: Path, teacher: str, shard: int) -> Path:
    """Where shard `shard` of teacher `teacher` lives under cache root `root`."""
    return root / teacher / f"shard-{shard:05d}.safetensors"


# ---------------------------------------------------------------------------------- summary and joining


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
    manifest = read_manifest(path)
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
            for axis in length_axes(key, tokens_follow_length):
                pad[axis] = (0, max_length - value.shape[axis])
            padded.append(np.pad(value, pad) if any(p != (0, 0) for p in pad) else value)
        joined[key] = np.concatenate(padded)
    return Knowledge(teacher=parts[0].teacher, compute_s=sum(p.compute_s for p in parts),
                     layers=parts[0].layers, **{"logits": None, **joined})

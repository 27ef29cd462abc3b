"""The offline knowledge cache: bit-exact round trips, resume, corruption, mismatches, the cached pool.

Pure numpy: Knowledge objects are random arrays, no Ray and no models.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from actors.cache import (CachedPool, CacheError, CacheMismatchError, CacheNotFoundError, CacheWriter,
                          KnowledgeCache, PartialCacheError, cache_summary)
from actors.knowledge import Knowledge, KnowledgeRequest, TokenBatch

FIELDS = ("logits", "layers", "hidden", "token_index", "token_mask", "width_index", "attentions", "cls")
FP = {"request": {"outputs": ["logits", "hidden"], "num_tokens": 4}, "vocab": "abc123", "max_length": 12,
      "dataset": "sst2/train/50"}


def random_knowledge(rng, rows: int, teacher: int, length: int, dtype=np.float16, k: int = 2, K: int = 4,
                     H: int = 2, W: int = 6, D: int = 8, C: int = 3, outputs=("logits", "hidden", "attentions", "cls"),
                     width: bool = True) -> Knowledge:
    """A teacher's answer for `rows` examples padded to `length` tokens, with random values."""
    f = {"logits": rng.standard_normal((rows, C)).astype(dtype)}  # [R, C]
    if "hidden" in outputs or "attentions" in outputs:
        f["token_index"] = rng.integers(0, length, (rows, K))  # [R, K] int64
        f["token_mask"] = rng.integers(0, 2, (rows, K))  # [R, K]
    if "hidden" in outputs:
        f["hidden"] = rng.standard_normal((rows, k, K, W)).astype(dtype)  # [R, k, K, W]
        if width:
            f["width_index"] = np.sort(rng.integers(0, D, (rows, k, W)), axis=-1)  # [R, k, W]
    if "attentions" in outputs:
        f["attentions"] = rng.random((rows, k, H, K, length)).astype(dtype)  # [R, k, H, K, L]
    if "cls" in outputs:
        f["cls"] = rng.standard_normal((rows, k, D)).astype(dtype)  # [R, k, D]
    if any(o in outputs for o in ("hidden", "attentions", "cls")):
        f["layers"] = np.array([2 + teacher, 4], dtype=np.int64)[:k]
    if "logits" not in outputs:
        del f["logits"]
    return Knowledge(teacher=teacher, logits=f.pop("logits", None), compute_s=0.01, **f)


def build(path: Path, n: int = 50, shard_size: int = 16, max_length: int = 12, shards=None, finalize: bool = True,
          fingerprint=FP, seed: int = 0, **writer_kw):
    """Write a two-teacher cache (t4 float16 with every output, t2 float32 logits + cls).

    Returns the writer and, per teacher, the rows as they should read back at max_length: name ->
    field -> [N, ...] (attentions zero-padded on the key axis).
    """
    rng = np.random.default_rng(seed)
    writer = CacheWriter(path, fingerprint, ["t4", "t2"], n, max_length, shard_size, student_layers=[1, 2],
                         **writer_kw)
    expected: dict[str, dict[str, list]] = {"t4": {}, "t2": {}}
    for t, (name, dtype, outputs) in enumerate([("t4", np.float16, ("logits", "hidden", "attentions", "cls")),
                                                ("t2", np.float32, ("logits", "cls"))]):
        for s in range(writer.num_shards):
            start, end = writer.rows(s)
            length = (8, 10, 12)[s % 3]  # each shard padded to its own batch length
            kn = random_knowledge(rng, end - start, t, length, dtype, outputs=outputs)
            if shards is None or s in shards.get(name, []):
                writer.write_shard(t, s, kn)
            for f in FIELDS:
                v = getattr(kn, f)
                if v is None:
                    continue
                if f == "attentions":
                    v = np.pad(v, [(0, 0)] * 4 + [(0, max_length - length)])
                if f == "layers":
                    expected[name][f] = v
                else:
                    expected[name].setdefault(f, []).append(v)
    expected = {t: {f: v if f == "layers" else np.concatenate(v) for f, v in d.items()} for t, d in expected.items()}
    if finalize:
        writer.finalize(hsk_fraction=0.01)
    return writer, expected


def assert_rows(kn: Knowledge, ref: dict, ids, length: int, fields=None, positions=None) -> None:
    """kn holds exactly ref's rows `ids` (bit-exact, same dtypes), attentions cut to `length` keys."""
    fields = [f for f in FIELDS if f in ref] if fields is None else fields
    for f in FIELDS:
        got = getattr(kn, f)
        if f not in fields:
            assert got is None, f
            continue
        want = ref[f] if f == "layers" else ref[f][ids]
        if positions is not None and f in ("layers", "hidden", "width_index", "attentions", "cls"):
            want = want[positions] if f == "layers" else want[:, positions]
        if f == "attentions":
            want = want[..., :length]
        assert got.dtype == want.dtype, f
        np.testing.assert_array_equal(got, want, err_msg=f)


def test_round_trip_bit_exact_random_ids(tmp_path):
    _, ref = build(tmp_path / "c")
    cache = KnowledgeCache.open(tmp_path / "c", FP)
    rng = np.random.default_rng(1)
    for length in (12, 9):
        ids = rng.integers(0, 50, 32)  # random, with repeats, across shards (incl. the short last shard)
        for t, name in enumerate(cache.teacher_names):
            kn = cache.knowledge(t, ids, length)
            assert kn.teacher == t and kn.compute_s == 0.0 and kn.wait_s > 0
            assert_rows(kn, ref[name], ids, length)
    kn = cache.knowledge(0, np.array([49, 0, 16, 15]), 12)
    assert kn.hidden.dtype == np.float16 and kn.attentions.shape == (4, 2, 2, 4, 12)
    assert cache.knowledge(1, np.array([3]), 12).logits.dtype == np.float32


def test_subset_of_outputs_and_layers(tmp_path):
    _, ref = build(tmp_path / "c")
    cache = KnowledgeCache.open(tmp_path / "c")
    ids = np.array([5, 40, 17, 5])
    assert_rows(cache.knowledge(0, ids, 12, outputs=("logits",)), ref["t4"], ids, 12, fields=["logits"])
    kn = cache.knowledge(0, ids, 10, outputs=("hidden",), layer_positions=[1])
    assert_rows(kn, ref["t4"], ids, 10, ["layers", "hidden", "token_index", "token_mask", "width_index"], [1])
    kn = cache.knowledge(0, ids, 10, outputs=("attentions", "cls"), layer_positions=[1, 0])
    assert_rows(kn, ref["t4"], ids, 10, ["layers", "token_index", "token_mask", "attentions", "cls"], [1, 0])
    with pytest.raises(CacheError, match=r"outputs \['hidden'\] are not in the cache for teacher t2"):
        cache.knowledge(1, ids, 12, outputs=("hidden",))
    with pytest.raises(CacheError, match="layer_positions"):
        cache.knowledge(0, ids, 12, layer_positions=[2])
    with pytest.raises(CacheError, match=r"example ids must be in \[0, 50\)"):
        cache.knowledge(0, np.array([50]), 12)
    with pytest.raises(CacheError, match="max_length"):
        cache.knowledge(0, ids, 13)


def test_partial_cache_refused_then_resumed(tmp_path):
    path = tmp_path / "c"
    writer, ref = build(path, shards={"t4": [0, 2], "t2": [1]}, finalize=False)
    assert writer.missing(0) == [1, 3] and writer.missing("t2") == [0, 2, 3]
    with pytest.raises(PartialCacheError, match=r"interrupted.*skd cache build -c CONFIG.*resumes"):
        KnowledgeCache.open(path)
    with pytest.raises(PartialCacheError, match="missing"):
        writer.finalize(0.01)
    assert cache_summary(path)["complete"] is False
    written = {p: p.stat().st_mtime_ns for p in path.rglob("shard-*.safetensors")}
    time.sleep(0.01)

    # a fresh build (same seed, same arrays) resumes: only the missing shards are written
    resumed, ref2 = build(path, finalize=False, shards={"t4": [1, 3], "t2": [0, 2, 3]})
    assert resumed.missing(0) == [] and resumed.missing(1) == []
    assert {p: p.stat().st_mtime_ns for p in written} == written
    summary = resumed.finalize(0.01)
    assert summary["complete"] and summary["shards_written"] == {"t4": 4, "t2": 4}
    cache = KnowledgeCache.open(path, FP)
    ids = np.arange(50)[::-1]
    for t, name in enumerate(cache.teacher_names):
        assert_rows(cache.knowledge(t, ids, 12), ref2[name], ids, 12)


def test_corrupt_shard_is_rewritten(tmp_path):
    path = tmp_path / "c"
    build(path)
    truncated, garbage = path / "t4" / "shard-00001.safetensors", path / "t2" / "shard-00003.safetensors"
    os.truncate(truncated, truncated.stat().st_size - 7)
    garbage.write_bytes(b"not a safetensors file")
    (path / "t2" / "shard-00000.safetensors").write_bytes(b"")
    (path / "t4" / f".shard-00002.safetensors.tmp-{os.getpid() + 1}").write_bytes(b"half")  # killed mid-write
    with pytest.raises(CacheError, match="truncated"):
        KnowledgeCache.open(path).knowledge(0, np.array([20]), 12)
    with pytest.raises(CacheError, match="cannot be read"):
        KnowledgeCache.open(path).knowledge(1, np.array([2]), 12)

    writer, ref = build(path, finalize=False, shards={})
    assert writer.missing("t4") == [1] and writer.missing("t2") == [0, 3]
    assert not list(path.glob("t4/.shard-*"))
    with pytest.raises(PartialCacheError):  # the damage reopened the cache
        KnowledgeCache.open(path)
    _, ref = build(path, shards={"t4": [1], "t2": [0, 3]})
    cache = KnowledgeCache.open(path)
    ids = np.array([16, 31, 48, 49, 0])
    for t, name in enumerate(cache.teacher_names):
        assert_rows(cache.knowledge(t, ids, 12), ref[name], ids, 12)


def test_fingerprint_mismatch_lists_each_key(tmp_path):
    build(tmp_path / "c")
    other = {**FP, "vocab": "zzz", "request": {"outputs": ("logits", "hidden"), "num_tokens": 8}, "seed": 3}
    with pytest.raises(CacheMismatchError) as err:
        KnowledgeCache.open(tmp_path / "c", other)
    msg = str(err.value)
    assert "fingerprint.vocab: cache has 'abc123', config expects 'zzz'" in msg
    assert "fingerprint.request.num_tokens: cache has 4, config expects 8" in msg
    assert "fingerprint.seed: cache has '<absent>', config expects 3" in msg
    assert "outputs" not in msg  # a tuple equals the list JSON reads back
    assert "skd cache build -c CONFIG" in msg and "--knowledge" in msg
    with pytest.raises(CacheNotFoundError, match="skd cache build"):
        KnowledgeCache.open(tmp_path / "nothing")
    with pytest.raises(CacheNotFoundError):
        cache_summary(tmp_path / "nothing")


def test_writer_refuses_another_setup_without_overwrite(tmp_path):
    path = tmp_path / "c"
    build(path, finalize=False, shards={"t4": [0]})
    with pytest.raises(CacheMismatchError, match=r"fingerprint.vocab: cache has 'abc123', builder has 'new'.*--overwr"):
        CacheWriter(path, {**FP, "vocab": "new"}, ["t4", "t2"], 50, 12, 16, student_layers=[1, 2])
    with pytest.raises(CacheMismatchError, match="num_examples: cache has 50, builder has 60"):
        CacheWriter(path, FP, ["t4", "t2"], 60, 12, 16, student_layers=[1, 2])
    assert (path / "t4" / "shard-00000.safetensors").exists()  # nothing was touched
    writer = CacheWriter(path, {**FP, "vocab": "new"}, ["t4", "t2"], 50, 12, 16, student_layers=[1, 2],
                         overwrite=True)
    assert writer.missing(0) == [0, 1, 2, 3] and not list(path.glob("t4/*"))
    assert json.loads((path / "manifest.json").read_text())["fingerprint"]["vocab"] == "new"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CacheMismatchError, match="not a knowledge cache"):
        CacheWriter(tmp_path / "other", FP, ["t4"], 10, 12)


def test_write_shard_checks_shapes(tmp_path):
    rng = np.random.default_rng(0)
    writer = CacheWriter(tmp_path / "c", FP, ["t4"], 20, 12, 16, student_layers=[1, 2])
    with pytest.raises(CacheError, match="needs 16 rows"):
        writer.write_shard(0, 0, random_knowledge(rng, 15, 0, 12))
    with pytest.raises(CacheError, match="axis 4 has 13 tokens > cache max_length 12"):
        writer.write_shard(0, 0, random_knowledge(rng, 16, 0, 13))
    writer.write_shard(0, 0, random_knowledge(rng, 16, 0, 12))
    with pytest.raises(CacheMismatchError, match="same per-example shapes"):
        writer.write_shard(0, 1, random_knowledge(rng, 4, 0, 12, K=5))
    with pytest.raises(CacheMismatchError, match="same per-example shapes"):
        writer.write_shard(0, 1, random_knowledge(rng, 4, 0, 12, dtype=np.float32))
    with pytest.raises(CacheError, match="out of range"):
        writer.write_shard(0, 2, random_knowledge(rng, 4, 0, 12))


def test_tokens_follow_length(tmp_path):
    """tokens == "all": K is the batch length; the token axis is padded on write and cut on read."""
    rng = np.random.default_rng(0)
    writer = CacheWriter(tmp_path / "c", FP, ["t4"], 20, 12, 10, student_layers=[1, 2], tokens_follow_length=True)
    written = [random_knowledge(rng, 10, 0, L, K=L, outputs=("logits", "hidden", "attentions")) for L in (7, 12)]
    for s, kn in enumerate(written):
        writer.write_shard(0, s, kn)
    writer.finalize(None)
    cache = KnowledgeCache.open(tmp_path / "c")
    kn = cache.knowledge(0, np.array([3, 1]), 7)  # rows of the shard built at L = 7
    assert kn.hidden.shape == (2, 2, 7, 6) and kn.attentions.shape == (2, 2, 2, 7, 7)
    np.testing.assert_array_equal(kn.hidden, written[0].hidden[[3, 1]])
    np.testing.assert_array_equal(kn.attentions, written[0].attentions[[3, 1]])
    np.testing.assert_array_equal(kn.token_mask, written[0].token_mask[[3, 1]])
    kn = cache.knowledge(0, np.array([3, 15]), 12)  # padded slots read back as zeros with token_mask 0
    assert kn.hidden.shape == (2, 2, 12, 6)
    np.testing.assert_array_equal(kn.hidden[0, :, :7], written[0].hidden[3])
    assert not kn.hidden[0, :, 7:].any() and not kn.token_mask[0, 7:].any()
    np.testing.assert_array_equal(kn.hidden[1], written[1].hidden[5])


def test_cached_pool_submit_and_average(tmp_path):
    _, ref = build(tmp_path / "c")
    pool = pickle.loads(pickle.dumps(CachedPool.open(tmp_path / "c", FP)))  # travels to Ray workers like the pool
    assert pool.names == ["t4", "t2"]
    ids = np.array([7, 44, 23])
    batch = TokenBatch(np.ones((3, 10), np.int64), np.ones((3, 10), np.int64), ids)

    pending = pool.submit(0, batch)  # the trainer's default request: logits only
    assert pending.teacher == 0
    assert_rows(pending.result(), ref["t4"], ids, 10, fields=["logits"])
    request = KnowledgeRequest(outputs=("logits", "hidden", "attentions"), student_layers=(2,),
                               student_num_layers=2, tokens="first", num_tokens=4).check()
    kn = pool.knowledge(0, batch, request)
    assert_rows(kn, ref["t4"], ids, 10, ["logits", "layers", "hidden", "token_index", "token_mask", "width_index",
                                         "attentions"], positions=[1])
    assert kn.layers.tolist() == [4]
    kn = pool.knowledge(0, batch, request.subset(outputs=("hidden",), student_layers=(2,)))
    assert kn.logits is None and kn.hidden.shape == (3, 1, 4, 6)
    with pytest.raises(CacheError, match=r"student layers \[3\] are not in knowledge cache"):
        pool.submit(0, batch, KnowledgeRequest(outputs=("hidden",), student_layers=(1, 3), student_num_layers=3))

    avg = pool.submit_average(batch)
    assert avg.teacher == -1
    kn = avg.result()
    want = np.mean([ref["t4"]["logits"][ids].astype(np.float32), ref["t2"]["logits"][ids]], axis=0)
    assert kn.teacher == -1 and kn.logits.dtype == np.float32 and kn.wait_s > 0
    np.testing.assert_array_equal(kn.logits, want)

    with pytest.raises(CacheError, match=r"example ids must be in \[0, 50\)"):
        pool.knowledge(1, TokenBatch(np.ones((1, 10), np.int64), np.ones((1, 10), np.int64), np.array([50])))
    with pytest.raises(CacheError, match="data.max_length"):
        pool.submit(1, TokenBatch(np.ones((3, 13), np.int64), np.ones((3, 13), np.int64), ids))
    pool.shutdown()


def test_summary_and_manifest(tmp_path):
    build(tmp_path / "c")
    s = cache_summary(tmp_path / "c")
    files = list((tmp_path / "c").rglob("shard-*.safetensors"))
    assert s["complete"] and s["teachers"] == ["t4", "t2"] and s["hsk_fraction"] == 0.01
    assert s["total_bytes"] == sum(f.stat().st_size for f in files) == sum(s["per_teacher_bytes"].values())
    assert s["bytes_per_example"] == s["total_bytes"] / 50
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["total_bytes"] == s["total_bytes"] and manifest["version"] == 1
    t4 = manifest["per_teacher"]["t4"]
    assert t4["layers"] == [2, 4] and t4["tensors"]["hidden"] == {"dtype": "float16", "shape": [2, 4, 6]}
    assert t4["tensors"]["attentions"]["shape"] == [2, 2, 4, 12]  # keys padded to max_length
    assert manifest["per_teacher"]["t2"]["tensors"]["logits"] == {"dtype": "float32", "shape": [3]}


def test_random_reads_are_fast(tmp_path):
    """32 random ids out of 8,000 rows: print the read time (well under 5 ms expected; not asserted)."""
    rng = np.random.default_rng(0)
    writer = CacheWriter(tmp_path / "c", FP, ["t"], 8000, 64, 1024, student_layers=[1, 2])
    for s in range(writer.num_shards):
        start, end = writer.rows(s)
        writer.write_shard(0, s, random_knowledge(rng, end - start, 0, 64, K=8, W=32, D=32, H=4))
    writer.finalize(0.01)
    cache = KnowledgeCache.open(tmp_path / "c")
    cache.knowledge(0, np.arange(0, 8000, 1000), 64)  # map every shard once
    times = []
    for _ in range(200):
        start = time.perf_counter()
        cache.knowledge(0, rng.integers(0, 8000, 32), 64)
        times.append(time.perf_counter() - start)
    print(f"\n[cache] 32 random ids of 8000, all outputs: median {np.median(times) * 1e3:.2f} ms, "
          f"p90 {np.percentile(times, 90) * 1e3:.2f} ms; "
          f"{cache_summary(tmp_path / 'c')['bytes_per_example']:.0f} bytes per example")

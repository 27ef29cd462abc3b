"""Filling a knowledge cache from a knowledge source (the teacher pool), config-free.

The caller (`skd cache build`) opens the `CacheWriter`, starts and stops the source, records the example
ids and finalizes the cache; `build_shards` only moves knowledge from the source into the missing shards.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from actors.cache.format import CacheError, concat_knowledge
from actors.cache.writer import CacheWriter
from actors.knowledge import Knowledge, KnowledgeRequest, KnowledgeSource, PendingKnowledge, TokenBatch

# one shard's calls: (pending answer, attention mask [b, L] of the call's batch) per call
_Calls = list[tuple[PendingKnowledge, np.ndarray]]


def build_shards(source: KnowledgeSource, writer: CacheWriter, request: KnowledgeRequest,
                 batch_of: Callable[[np.ndarray], TokenBatch], teacher_dims: Sequence[tuple[int, int]],
                 rows_per_call: int, log: Callable[[str], None] = print) -> tuple[float, float]:
    """Write every shard the writer reports missing, for every teacher, with knowledge from `source`.

    Precomputed, compressed hidden-state knowledge (HSK) as in Liu et al., ACL 2021 ("Marginal Utility
    Diminishes: Exploring the Minimum Knowledge for BERT Knowledge Distillation"): each teacher runs once
    over the training split and the student later trains with no teacher loaded.

    Shards are written in row order, interleaved over teachers; each teacher has one shard in flight (its
    calls submitted) while the previous shard is gathered and written, so all teachers compute at once.
    A shard's calls cover rows [s*S, min((s+1)*S, N)) in chunks of `rows_per_call`; their answers are
    joined with `concat_knowledge` (length axes zero-padded to `writer.max_length`) and written with
    `writer.write_shard`. One progress line per shard goes to `log`.

    Args:
        source: serves teacher k at index k of `writer.teacher_names` (e.g. `actors.pool.TeacherPool` with
            every teacher that has missing shards started). Not started or closed here.
        writer: the open cache; `writer.missing(k)` decides what is written.
        request: what each teacher returns (the cache build's full request).
        batch_of: rows -> the `TokenBatch` of those training rows; rows are [b] int64 0-based positions
            in the training split (cache rows), ascending and consecutive.
        teacher_dims: [N] (num_layers, hidden_size) of each teacher, for the full HSK size.
        rows_per_call: b, rows per `source.submit` call (>= 1).
        log: receives each progress line (default `print`).

    Returns:
        (kept, full), summed over the shards written by this call: kept = hidden-state values stored
        (k layers x kept real tokens (token_mask 1) x W dims per example; 0 without "hidden"), full = the
        full HSK of the same rows (teacher layers L_t x real tokens (attention_mask 1) x hidden size
        D_t). Both are counts of values; kept / full is the HSK fraction the manifest records.

    Raises:
        CacheError: `teacher_dims` does not have one entry per cache teacher, or `rows_per_call` < 1;
            anything `writer.write_shard` or `concat_knowledge` raises (bad shapes, L > max_length).
        Whatever `source.submit(...).result()` raises (a teacher failing).
    """
    names = writer.teacher_names
    if len(teacher_dims) != len(names):
        raise CacheError(f"teacher_dims has {len(teacher_dims)} entries; the cache has {len(names)} teachers "
                         f"{names}: give (num_layers, hidden_size) for each")
    if int(rows_per_call) < 1:
        raise CacheError(f"rows_per_call must be >= 1, got {rows_per_call}")
    todo = {k: writer.missing(k) for k in range(len(names))}
    total = sum(len(v) for v in todo.values())
    follow = request.needs_tokens and request.tokens == "all"
    kept = full = 0.0

    def submit(k: int, shard: int) -> _Calls:
        start, end = writer.rows(shard)
        calls = []
        for a in range(start, end, int(rows_per_call)):
            batch = batch_of(np.arange(a, min(a + int(rows_per_call), end)))
            calls.append((source.submit(k, batch, request), np.asarray(batch.attention_mask)))
        return calls

    queue = [(k, s) for s in range(writer.num_shards) for k in todo if s in todo[k]]
    ahead = len(todo)  # one shard per teacher in flight
    pending = {(k, s): submit(k, s) for k, s in queue[:ahead]}
    for i, (k, s) in enumerate(queue):
        t0 = time.perf_counter()
        calls = pending.pop((k, s))
        if i + ahead < len(queue):
            nk, ns = queue[i + ahead]
            pending[(nk, ns)] = submit(nk, ns)
        answers = [p.result() for p, _ in calls]
        layers, hidden = teacher_dims[k]
        for know, (_, mask) in zip(answers, calls):
            kept += _kept_values(know)
            full += int(layers) * int(mask.sum()) * int(hidden)
        writer.write_shard(k, s, concat_knowledge(answers, writer.max_length, follow))
        log(f"[skd] cache: {names[k]} shard {s + 1}/{writer.num_shards} written "
            f"({i + 1}/{total}, {time.perf_counter() - t0:.1f} s)")
    return kept, full


def _kept_values(know: Knowledge) -> int:
    """Hidden-state values kept for a batch: k layers x kept tokens x W (0 without HSK)."""
    if know.hidden is None:
        return 0
    k, w = know.hidden.shape[1], know.hidden.shape[3]
    return int(np.asarray(know.token_mask).sum()) * k * w

"""A config's knowledge request, the fingerprint of the knowledge it produces, and `skd cache build`.

`knowledge_request` turns `distill.knowledge` into the `KnowledgeRequest` every teacher serves (online)
or the cache holds (offline). `cache_fingerprint` names everything the cached values depend on: the
request, the tokenizer, max_length, the training rows and the teachers; a cache built for another
fingerprint is refused. `build_cache` runs every teacher over the training split once, shard by shard and
in parallel across the pool, and writes safetensors shards (`actors.cache.CacheWriter`); an interrupted
build resumes with the shards still missing (Liu et al. 2021: precomputed compressed HSK lets the student
train with no teacher loaded).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from actors.cache import CacheWriter, cache_summary, concat_knowledge
from actors.knowledge import KnowledgeRequest, TokenBatch
from actors.manifest import TeacherInfo, read_manifest, validate_teachers
from actors.selection import top_layers
from orchestrator.config import SkdConfig
from actors.errors import ConfigError
from orchestrator.runner import Inputs, prepare_inputs

LAYER_OUTPUTS = ("hidden", "attentions", "cls")


def student_num_layers(cfg: SkdConfig) -> int:
    """L_s: `student.num_layers`, or the depth of the student's initial model when that is None."""
    if cfg.student.num_layers is not None:
        return cfg.student.num_layers
    from transformers import AutoConfig

    from actors.models import resolve_model

    return int(AutoConfig.from_pretrained(resolve_model(cfg.student.init)).num_hidden_layers)


def knowledge_request(cfg: SkdConfig, inputs: Inputs) -> KnowledgeRequest:
    """The full request of a run: soft labels plus `distill.knowledge.outputs` at the configured layers,
    tokens and width (a schedule asks for one stage's part of it each step).

    Raises:
        ConfigError: layers beyond the student's depth, or a combination `KnowledgeRequest.check` rejects.
    """
    kn = cfg.distill.knowledge
    if not kn.outputs:
        return KnowledgeRequest(wire_dtype=kn.wire_dtype)
    depth = student_num_layers(cfg)
    if isinstance(kn.layers, int):
        if kn.layers > depth:
            raise ConfigError(f"distill.knowledge.layers: {kn.layers} layers asked, the student has {depth}")
        layers = top_layers(depth, kn.layers)
    else:
        if max(kn.layers) > depth:
            raise ConfigError(f"distill.knowledge.layers: {kn.layers} names layers beyond the student's {depth}")
        layers = tuple(sorted(kn.layers))
    sep = None
    if kn.tokens == "cls-attention-no-sep":
        from actors.models import load_tokenizer

        sep = load_tokenizer(inputs.tokenizer_init).sep_token_id
    try:
        return KnowledgeRequest(
            outputs=("logits", *[o for o in LAYER_OUTPUTS if o in kn.outputs]), student_layers=layers,
            student_num_layers=depth, tokens=kn.tokens, num_tokens=None if kn.tokens == "all" else kn.num_tokens,
            sep_token_id=sep, width=kn.width, width_fraction=1.0 if kn.width == "all" else kn.width_fraction,
            width_seed=kn.width_seed, wire_dtype=kn.wire_dtype).check()
    except ValueError as exc:
        raise ConfigError(f"distill.knowledge: {exc}") from None


def cache_fingerprint(cfg: SkdConfig, inputs: Inputs, teachers: list[TeacherInfo],
                      request: KnowledgeRequest) -> dict[str, Any]:
    """What cached knowledge depends on; compared key by key when a cache is opened.

    The training rows are identified by a SHA-256 over their token ids (so another subset, seed, max_length
    or tokenizer gives another fingerprint); teachers by name, shape, size and dev score (not by path, so
    a cache stays valid when moved) and the MLflow run that fine-tuned them (a re-prepared teacher with
    the same dev score is another teacher).
    """
    digest = hashlib.sha256()
    for row in inputs.train.input_ids:
        digest.update(np.asarray(row, dtype=np.int64).tobytes())
        digest.update(b"|")
    return {
        "request": request.fingerprint(), "task": cfg.task, "vocab": inputs.vocab,
        "max_length": cfg.data.max_length,
        "dataset": {"rows": len(inputs.train), "token_ids_sha256": digest.hexdigest()[:32]},
        "teachers": [{"name": t.name, "num_layers": t.num_layers, "hidden_size": t.hidden_size,
                      "parameters": t.parameters, "dev_metric": round(t.dev_metric, 8),
                      "mlflow_run_id": t.mlflow_run_id} for t in teachers],
    }


def default_cache_path(cfg: SkdConfig) -> Path:
    """`distill.knowledge.source`'s folder when it names a cache, else <output_dir>/knowledge-cache."""
    return cfg.distill.knowledge.cache_path or cfg.out_dir() / "knowledge-cache"


def build_cache(cfg: SkdConfig, path: Path | None = None, *, overwrite: bool = False,
                batch_size: int | None = None) -> dict[str, Any]:
    """`skd cache build`: precompute every teacher's knowledge for every training example.

    Teachers run as the pool's actors, all at once: each teacher's next shard is requested while the
    driver writes the previous one. Prints one progress line per shard.

    Args:
        cfg: the validated config (its `distill.knowledge` defines the request).
        path: the cache folder (default: `default_cache_path`).
        overwrite: delete a cache built for another setup at `path` instead of refusing.
        batch_size: rows per teacher call (default: distill.eval_batch_size).

    Returns:
        `cache_summary`: bytes per example, total bytes, fraction of full HSK kept, teachers, path.

    Raises:
        SkdError: bad config/data/teachers, or a cache for another setup at `path` (before Ray starts).
    """
    from orchestrator.distill import start_teacher_pool
    from orchestrator.runtime import ray_session

    inputs = prepare_inputs(cfg, cfg.student.init)
    names = [m.name for m in cfg.teachers.members]
    teachers = validate_teachers(read_manifest(cfg.manifest_path()), names, cfg.task, inputs.spec.num_labels,
                                 inputs.vocab)
    request = knowledge_request(cfg, inputs)
    path = Path(path or default_cache_path(cfg)).expanduser().resolve()
    kn = cfg.distill.knowledge
    writer = CacheWriter(path, cache_fingerprint(cfg, inputs, teachers, request), names, len(inputs.train),
                         cfg.data.max_length, kn.cache_shard_size, student_layers=request.student_layers or None,
                         tokens_follow_length=request.needs_tokens and request.tokens == "all", overwrite=overwrite)
    todo = {k: writer.missing(k) for k in range(len(teachers))}
    step = batch_size or cfg.distill.eval_batch_size
    kept = np.zeros(len(teachers))
    full = np.zeros(len(teachers))
    if any(todo.values()):
        done, total = 0, sum(len(v) for v in todo.values())
        print(f"[skd] cache build -> {path}: {total} shard(s) of {writer.shard_size} rows to write "
              f"({sum(writer.num_shards - len(v) for v in todo.values())} already there)", flush=True)
        with ray_session(cfg.ray):
            pool = start_teacher_pool(cfg, teachers, [k for k, v in todo.items() if v], inputs.spec.is_regression,
                                      student_workers=0)
            try:
                def submit(k: int, shard: int):
                    start, end = writer.rows(shard)
                    parts = []
                    for a in range(start, end, step):
                        rows = np.arange(a, min(a + step, end))
                        b = inputs.train.batch(rows, inputs.pad_id)
                        parts.append((pool.submit(k, TokenBatch(b["input_ids"], b["attention_mask"], b["ids"]),
                                                  request), b["attention_mask"]))
                    return parts

                queue = [(k, s) for s in range(writer.num_shards) for k in todo if s in todo[k]]
                pending = {(k, s): submit(k, s) for k, s in queue[:len(todo)]}  # one shard per teacher in flight
                for i, (k, s) in enumerate(queue):
                    t0 = time.perf_counter()
                    parts = pending.pop((k, s))
                    if i + len(todo) < len(queue):
                        nk, ns = queue[i + len(todo)]
                        pending[(nk, ns)] = submit(nk, ns)
                    answers = [p.result() for p, _ in parts]
                    for know, mask in zip(answers, (m for _, m in parts)):
                        kept[k] += _kept_values(know)
                        full[k] += teachers[k].num_layers * int(mask.sum()) * teachers[k].hidden_size
                    writer.write_shard(k, s, concat_knowledge(answers, cfg.data.max_length,
                                                              request.needs_tokens and request.tokens == "all"))
                    done += 1
                    print(f"[skd] cache: {teachers[k].name} shard {s + 1}/{writer.num_shards} written "
                          f"({done}/{total}, {time.perf_counter() - t0:.1f} s)", flush=True)
            finally:
                pool.shutdown()
    writer.write_example_ids(inputs.train.ids)
    fraction = None
    if "hidden" in request.outputs:
        measured = float(kept.sum() / full.sum()) if full.sum() > 0 else None
        if len(todo) and all(len(v) == writer.num_shards for v in todo.values()):
            fraction = measured  # every shard written by this build
        else:  # a resumed build saw only the missing shards: keep the fraction recorded earlier, if any
            fraction = writer.manifest.get("hsk_fraction") or measured
    writer.finalize(fraction)
    return {**cache_summary(path), "path": str(path)}


def _kept_values(know) -> int:
    """Hidden-state values kept for a batch: k layers x kept tokens x W (0 without HSK)."""
    if know.hidden is None:
        return 0
    k, w = know.hidden.shape[1], know.hidden.shape[3]
    return int(np.asarray(know.token_mask).sum()) * k * w

"""The knowledge part of a run plan: the request every teacher serves, the IR schedule and loss weights,
and, for `distill.knowledge.source: cache:PATH`, the offline cache checked against the run's fingerprint.

`knowledge_request` turns `distill.knowledge` into the `KnowledgeRequest` every teacher serves (online)
or the cache holds (offline). `cache_fingerprint` names everything the cached values depend on: the
request, the tokenizer, max_length, the training rows and the teachers; a cache built for another
fingerprint is refused. Both are computed once, in `plan_knowledge`, on the driver before Ray starts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from actors.errors import ConfigError
from actors.knowledge import LAYER_OUTPUTS, KnowledgeRequest
from actors.manifest import TeacherInfo
from actors.selection import top_layers
from orchestrator.config import SkdConfig
from orchestrator.driver.inputs import Inputs
from orchestrator.common.schedule import stage_at
from orchestrator.worker.spec import KnowledgePlan


def student_num_layers(cfg: SkdConfig) -> int:
    """L_s: `student.num_layers`, or the depth of the student's initial model when that is None."""
    if cfg.student.num_layers is not None:
        return cfg.student.num_layers
    from transformers import AutoConfig

    from actors.models import resolve_model

    return int(AutoConfig.from_pretrained(resolve_model(cfg.student.init)).num_hidden_layers)


def knowledge_request(cfg: SkdConfig, inputs: Inputs) -> KnowledgeRequest:
    """The full request of a run: soft labels plus `distill.knowledge.outputs` at the configured layers,
    tokens and width (a schedule asks for one stage's part of it each step). Liu et al. (ACL 2021) for
    the depth/length/width selection; Aguilar et al. (AAAI 2020) for attentions and [CLS].

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
    the same dev score is another teacher), and a teacher's tokenizer where it is not the student's (the
    student's is `vocab`; caches of one-tokenizer ensembles keep the fingerprint they had).
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
                      "mlflow_run_id": t.mlflow_run_id,
                      **({"vocab": t.vocab} if t.vocab != inputs.vocab else {})} for t in teachers],
    }


VERIFY_CONTENTS_BYTES = 2 << 30
"""Caches up to this size (bytes) have every shard's SHA-256 checked on the driver before a run (about 2 s
per GB); larger ones when a worker first reads each shard, or in full with `skd cache verify`."""


def _checked_cache_fingerprint(path: Path, fingerprint: dict[str, Any], request: KnowledgeRequest) -> dict[str, Any]:
    """Open the cache once and check it serves `request`; returns the fingerprint the workers check.

    A cache holding more outputs than the run uses (e.g. hidden + attentions + cls for a soft-label run)
    serves it: soft labels only need the same teachers, rows and wire dtype; fewer IR outputs need every
    selection setting to match.

    Raises:
        CacheError: the cache is missing, partial, damaged (a shard of another size or SHA-256 than built) or
            built for another setup.
    """
    from actors.cache import KnowledgeCache

    built = KnowledgeCache.open(path)  # missing, partial or truncated caches fail here
    try:
        if (built.manifest.get("total_bytes") or 0) <= VERIFY_CONTENTS_BYTES:
            built.verify(contents=True)  # a damaged shard is refused before Ray starts (larger: on first read)
        cached = built.manifest["fingerprint"].get("request", {})
        wanted = dict(fingerprint["request"])
        if not request.needs_layers and cached.get("wire_dtype") == wanted["wire_dtype"]:
            wanted = cached  # soft labels only: any cache of these teachers and rows serves
        elif set(wanted["outputs"]) <= set(cached.get("outputs", [])):
            wanted["outputs"] = list(cached["outputs"])  # fewer outputs; every selection setting must match
        fingerprint = {**fingerprint, "request": wanted}
        built.check_fingerprint(fingerprint)
    finally:
        built.close()
    return fingerprint


def plan_knowledge(cfg: SkdConfig, inputs: Inputs, teachers: list[TeacherInfo], total_steps: int,
                   soft_labels_only: bool = False) -> KnowledgePlan:
    """The run's `KnowledgePlan`; the schedule and the cache are checked here, on the driver, so a schedule
    too long for the run or a missing, partial or mismatched cache is a clear error before Ray starts.

    Args:
        total_steps: the run's optimizer steps (the schedule's stages must fit in them).
        soft_labels_only: ask for logits only (student-rank pre-passes score soft-label distillation).

    Raises:
        ConfigError: an invalid request or schedule; CacheError: the cache is missing, partial or built for
            another setup.
    """
    kn = cfg.distill.knowledge
    request = KnowledgeRequest(wire_dtype=kn.wire_dtype) if soft_labels_only else knowledge_request(cfg, inputs)
    foreign = [t.name for t in teachers if t.vocab != inputs.vocab]
    if "attentions" in request.outputs and foreign:
        raise ConfigError(f"distill.knowledge.outputs {list(kn.outputs)}: teachers {', '.join(foreign)} tokenize "
                          f"with another tokenizer than the student ({cfg.student.init}); their attention maps are "
                          f"over other tokens and skd does not align them (hidden states and cls it does): drop "
                          f"attentions, or use teachers of the student's tokenizer")
    unaligned = [t.name for t in teachers if t.vocab != inputs.vocab and "hidden" in request.outputs
                 and (t.vocab not in inputs.train.views or inputs.train.views[t.vocab][2] is None)]
    if unaligned:
        raise ConfigError(f"teachers {', '.join(unaligned)}: hidden states of another tokenizer need the rows "
                          f"aligned to the student's tokens (orchestrator.driver.views.with_views(align=True))")
    if request.needs_layers:
        try:
            stage_at(0, total_steps, kn.schedule, request.student_layers, kn.ir_fraction)
        except ValueError as exc:
            raise ConfigError(f"distill.knowledge: {exc}") from None
    fingerprint = None
    if kn.cache_path is not None:
        fingerprint = _checked_cache_fingerprint(kn.cache_path, cache_fingerprint(cfg, inputs, teachers, request),
                                                 request)
    return KnowledgePlan(
        request=request, schedule=kn.schedule if request.needs_layers else "none", ir_fraction=kn.ir_fraction,
        ir_weights=(("hidden", kn.hidden_weight), ("attentions", kn.attention_weight), ("cls", kn.cls_weight)),
        teacher_widths=tuple(t.hidden_size for t in teachers), cache=kn.cache_path, fingerprint=fingerprint)

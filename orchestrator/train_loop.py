"""The one training loop: teacher fine-tuning, `skd distill` and (later) Tune trials all run this.

It runs on every Ray Train worker (`train_loop(spec)`), top to bottom: data, model, optimizer, resume,
then a flat step loop. Per step (SKD, Ding et al. 2023): the seeded sampler has drawn ONE teacher k; the
student's forward pass runs while teacher k computes the batch's logits; as soon as they arrive, the
request for step t+1 goes out (prefetch), so the teacher's next forward overlaps this step's backward.
Rank 0 logs metrics (batched), evaluates on dev and writes checkpoints; every rank calls
`ray.train.report`.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch

from actors.knowledge import Knowledge, KnowledgeRequest, TokenBatch
from actors.selection import gather, gather_attention
from orchestrator.checkpointing import (PROJECTION_FILE, load_module_state, load_training_state, model_state,
                                        save_module_state, save_training_state)
from orchestrator.data import Encoded, TaskSpec
from orchestrator.gsnr import probe_gsnr
from orchestrator.losses import HiddenProjection, attention_kl, cls_cosine, distillation_loss, hidden_mse
from orchestrator.metrics import glue_metrics
from orchestrator.sampling import TeacherSampler
from orchestrator.schedule import Stage, stage_at


@dataclass
class TrainSpec:
    """Everything a worker needs, resolved by the driver (picklable; refs are Ray object refs).

    Attributes:
        model_init / num_layers: where the trained model starts (student, or a teacher being fine-tuned).
        tokenizer_init: saved beside the model so the result loads with AutoTokenizer.
        spec: the task; train / dev: refs to `Encoded` splits; pad_id: the tokenizer's pad id.
        strategy: "no-kd", "skd" (sampled teacher) or "average" (all teachers' logits averaged).
        probs: [N] sampling distribution (skd); pool: the `TeacherPool` (None for no-kd).
        teacher_names: [N]; best_teacher_metric: for retention (None: not reported).
        lr .. eval_batch_size: optimisation settings (see `DistillConfig`).
        tracking_uri / run_id: the MLflow run the driver opened.
        gsnr_every / gsnr_probe_size: GSNR probe interval (steps) and probe size (first training rows).
        stop_after: end early after this step, leaving a resumable checkpoint (preemptible runs).
        resume_from: an explicit checkpoint folder to start from when Ray Train has none.
        threads: torch threads per worker on CPU.
        request: the full knowledge request (None: soft labels only); each step asks for its stage's part.
        schedule / ir_fraction / ir_weights: internal-representation schedule (see `orchestrator.schedule`)
            and the weights of the "hidden", "attentions" and "cls" loss terms.
        teacher_widths: [N] hidden sizes D_t of the teachers (the student's projection targets).
        knowledge_cache / cache_fingerprint: read knowledge from this `skd cache build` folder (checked
            against the fingerprint) instead of `pool`.
    """

    model_init: str
    num_layers: int | None
    tokenizer_init: str
    spec: TaskSpec
    train: Any
    dev: Any
    pad_id: int
    strategy: str
    probs: list[float] | None
    pool: Any
    teacher_names: list[str]
    best_teacher_metric: float | None
    lr: float
    batch_size: int
    epochs: float
    max_steps: int | None
    warmup_ratio: float
    weight_decay: float
    seed: int
    alpha: float
    temperature: float
    eval_every: int | None
    checkpoint_every: int | None
    log_every: int
    eval_batch_size: int
    prefetch: bool
    tracking_uri: str
    run_id: str
    gsnr_every: int | None = None
    gsnr_probe_size: int = 16
    stop_after: int | None = None
    resume_from: str | None = None
    threads: int = 1
    extra_tags: dict[str, str] = field(default_factory=dict)
    request: KnowledgeRequest | None = None
    schedule: str = "none"
    ir_fraction: float = 0.5
    ir_weights: dict[str, float] = field(default_factory=dict)
    teacher_widths: list[int] = field(default_factory=list)
    knowledge_cache: str | None = None
    cache_fingerprint: dict | None = None


def plan_steps(n_examples: int, batch_size: int, world: int, epochs: float, max_steps: int | None) -> tuple[int, int]:
    """(steps per epoch, total steps). A step consumes batch_size * world examples; the last partial
    global batch of an epoch is dropped (every rank needs a share)."""
    per_epoch = max(1, n_examples // (batch_size * world))
    return per_epoch, max_steps or max(1, math.ceil(epochs * per_epoch))


def eval_steps(total: int, every: int | None) -> set[int]:
    """Steps (1-based, after the optimizer step) at which to evaluate: every `every` steps (default: 4
    evenly spaced evaluations per run) and always the last step."""
    every = every or max(1, math.ceil(total / 4))
    return set(range(every, total + 1, every)) | {total}


class _Batches:
    """Deterministic global batches: epoch e uses permutation rng(seed + e); rank r takes rows r::world."""

    def __init__(self, data: Encoded, pad_id: int, batch_size: int, world: int, rank: int, seed: int,
                 per_epoch: int) -> None:
        self.data, self.pad_id, self.gb, self.world, self.rank = data, pad_id, batch_size * world, world, rank
        self.seed, self.per_epoch = seed, per_epoch
        self._perm: tuple[int, np.ndarray] | None = None
        self._built: dict[int, dict[str, np.ndarray]] = {}  # the prefetch builds step t+1 before the loop needs it

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        if step in self._built:
            return self._built[step]
        epoch, i = divmod(step, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng(self.seed + epoch).permutation(len(self.data)))
        rows = self._perm[1][i * self.gb: (i + 1) * self.gb]
        self._built = {k: v for k, v in self._built.items() if k >= step - 1}
        self._built[step] = self.data.batch(rows[self.rank:: self.world], self.pad_id)
        return self._built[step]


def evaluate(model, data: Encoded, spec: TaskSpec, pad_id: int, batch_size: int) -> dict[str, float]:
    """The task's GLUE metrics of `model` on an encoded split (in-process, eval mode, no grad)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outs = []
    # sort by length so batches pad little; metrics do not depend on order
    order = np.argsort([len(x) for x in data.input_ids], kind="stable")
    with torch.inference_mode():
        for i in range(0, len(order), batch_size):
            b = data.batch(order[i: i + batch_size], pad_id)
            logits = model(input_ids=torch.as_tensor(b["input_ids"], device=device),
                           attention_mask=torch.as_tensor(b["attention_mask"], device=device)).logits
            outs.append(logits.float().cpu().numpy())
    preds = np.empty((len(order), outs[0].shape[-1]), dtype=np.float32)
    preds[order] = np.concatenate(outs)
    model.train(was_training)
    return glue_metrics(spec, preds, data.labels)


def _array(x: np.ndarray, device, dtype=None) -> torch.Tensor:
    """A writable torch copy of a (possibly read-only, object-store) numpy array on `device`."""
    return torch.from_numpy(np.array(x, dtype=dtype)).to(device)


def ir_loss_terms(out, know: Knowledge, stage: Stage, projection: HiddenProjection | None, teacher_width: int,
                  attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The internal-representation loss terms of one step, each summed over the stage's layers.

    hidden: MSE between the student's hidden states, projected to D_t and gathered at the teacher's kept
    tokens and dims (`actors.selection.gather`, the function the teacher used), and the teacher's HSK
    (Liu et al. 2021). attentions: KL between the teacher's and the student's attention rows of the kept
    query tokens (Aguilar et al. 2020). cls: 1 - cos between projected student and teacher [CLS] states.

    Args:
        out: the student's model output with hidden_states (L_s + 1 of [B, L, D_s]) and/or attentions
            (L_s of [B, H_s, L, L]) as the stage needs.
        know: the teacher's knowledge for `stage.layers`, in that order along its k axis.
        projection: student-to-teacher width maps (None when only attentions are distilled).
        teacher_width: D_t of the serving teacher.
        attention_mask: [B, L] of the batch.

    Returns:
        {"hidden" | "attentions" | "cls": scalar tensor} for the outputs present in `know`.
    """
    device = attention_mask.device
    terms: dict[str, torch.Tensor] = {}
    token_index = _array(know.token_index, device) if know.token_index is not None else None  # [B, K]
    token_mask = _array(know.token_mask, device) if know.token_mask is not None else None  # [B, K]
    for j, layer in enumerate(stage.layers):
        if know.hidden is not None:
            h = projection(out.hidden_states[layer], layer, teacher_width)  # [B, L, D_t]
            width = _array(know.width_index[:, j], device) if know.width_index is not None else None  # [B, W]
            term = hidden_mse(gather(h, token_index, width), _array(know.hidden[:, j], device, np.float32), token_mask)
            terms["hidden"] = terms["hidden"] + term if "hidden" in terms else term
        if know.attentions is not None:
            rows = gather_attention(out.attentions[layer - 1], token_index)  # [B, H_s, K, L]
            term = attention_kl(rows, _array(know.attentions[:, j], device, np.float32), token_mask, attention_mask)
            terms["attentions"] = terms["attentions"] + term if "attentions" in terms else term
        if know.cls is not None:
            c = projection(out.hidden_states[layer][:, 0], layer, teacher_width)  # [B, D_t]
            term = cls_cosine(c, _array(know.cls[:, j], device, np.float32))
            terms["cls"] = terms["cls"] + term if "cls" in terms else term
    return terms


def train_loop(spec: TrainSpec) -> None:
    """Ray Train worker entry point (see module docstring). Reports dev metrics and checkpoints."""
    from transformers import get_linear_schedule_with_warmup

    from actors.models import load_classifier, load_tokenizer
    from orchestrator.tracking import MetricLogger

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(spec.threads)
    device = ray.train.torch.get_device()
    train_data: Encoded = ray.get(spec.train) if isinstance(spec.train, ray.ObjectRef) else spec.train
    dev_data: Encoded = ray.get(spec.dev) if isinstance(spec.dev, ray.ObjectRef) else spec.dev
    per_epoch, total = plan_steps(len(train_data), spec.batch_size, world, spec.epochs, spec.max_steps)
    evals = eval_steps(total, spec.eval_every)
    ckpts = evals if spec.checkpoint_every is None else set(range(spec.checkpoint_every, total + 1,
                                                                   spec.checkpoint_every)) | {total}

    # --- model, optimizer, schedule -----------------------------------------------------------
    torch.manual_seed(spec.seed)
    tokenizer = load_tokenizer(spec.tokenizer_init)
    req = spec.request or KnowledgeRequest()
    ir_outputs = tuple(o for o in req.outputs if o != "logits")  # hidden / attentions / cls
    model = load_classifier(spec.model_init, spec.spec.num_labels, spec.num_layers, spec.spec.is_regression,
                            attn_implementation="eager" if "attentions" in ir_outputs else None)
    projection = None
    if "hidden" in ir_outputs or "cls" in ir_outputs:
        projection = HiddenProjection(req.student_layers, model.config.hidden_size, spec.teacher_widths).to(device)
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
         "weight_decay": spec.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    if projection is not None:
        groups[0]["params"] += list(projection.parameters())
    trained = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=spec.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(spec.warmup_ratio * total), total)

    # --- resume ------------------------------------------------------------------------------
    sampler = TeacherSampler(spec.probs, spec.seed) if spec.strategy == "skd" else None
    n_teachers = len(spec.teacher_names)
    counts = [0] * n_teachers  # examples served per teacher (global)
    start = 0
    checkpoint = ray.train.get_checkpoint()  # Ray Train's latest (a restored run), else an explicit one
    if checkpoint is None and spec.resume_from:
        checkpoint = ray.train.Checkpoint.from_directory(spec.resume_from)
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            model.load_state_dict(model_state(Path(path)))
            if projection is not None:
                projection.load_state_dict(load_module_state(Path(path), PROJECTION_FILE))
            state = load_training_state(Path(path), optimizer, scheduler)
        start, counts = state["step"], state["counts"]
        if sampler is not None and state.get("sampler") is not None:
            # the generator's position only: a PBT exploit keeps the donor's stream with its own distribution
            sampler.load_state_dict(state["sampler"])
        if scheduler.base_lrs and not math.isclose(scheduler.base_lrs[0], spec.lr, rel_tol=1e-9):
            # a checkpoint saved under another peak lr (PBT exploit): keep the schedule's position, rescale it
            scale = spec.lr / scheduler.base_lrs[0]
            scheduler.base_lrs = [spec.lr] * len(scheduler.base_lrs)
            for group in optimizer.param_groups:
                group["initial_lr"], group["lr"] = spec.lr, group["lr"] * scale
        if rank == 0:
            print(f"[skd] resumed at step {start}/{total}", flush=True)
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model

    logger = MetricLogger(spec.tracking_uri, spec.run_id, enabled=rank == 0)
    batches = _Batches(train_data, spec.pad_id, spec.batch_size, world, rank, spec.seed, per_epoch)
    if spec.knowledge_cache:  # offline: no teacher actors, knowledge read from the cache's memory-mapped shards
        from actors.cache import CachedPool

        pool = CachedPool.open(spec.knowledge_cache, spec.cache_fingerprint)
    else:
        pool = spec.pool
    sampler_states: dict[int, Any] = {}

    def stage(step: int) -> Stage:
        """Which IR layers and whether soft labels apply at `step` (schedules: `orchestrator.schedule`)."""
        if not ir_outputs:
            return Stage((), True)
        return stage_at(step, total, spec.schedule, req.student_layers, spec.ir_fraction)

    def request(step: int):
        """Draw the teacher for `step` and send its knowledge request for the step's stage (no waiting)."""
        b = batches(step)
        tb = TokenBatch(b["input_ids"], b["attention_mask"], b["ids"])
        step_request = req.subset(student_layers=stage(step).layers) if ir_outputs else req
        if spec.strategy == "average":
            return pool.submit_average(tb, step_request)
        sampler_states[step] = sampler.state_dict()
        return pool.submit(sampler.draw(), tb, step_request)

    kd = spec.strategy in ("skd", "average")
    pending = request(start) if kd and start < total else None
    window_t, window_n, window_wait = time.perf_counter(), 0, 0.0
    run_start = time.perf_counter()
    model.train()
    step = start
    while step < total:
        torch.manual_seed(spec.seed * 1_000_003 + step)  # dropout masks depend on the step only: exact resume
        b = batches(step)
        ids = torch.as_tensor(b["input_ids"], device=device)  # [B, L]
        mask = torch.as_tensor(b["attention_mask"], device=device)  # [B, L]
        labels = torch.as_tensor(b["labels"], device=device)  # [B]
        st = stage(step)
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=bool(st.layers) and projection is not None,
                    output_attentions=bool(st.layers) and "attentions" in ir_outputs)
        logits = out.logits  # [B, C]
        teacher_logits, teacher, wait, know, nbytes = None, -1, 0.0, None, 0
        if kd:
            know = pending.result()
            teacher, wait, nbytes = know.teacher, know.wait_s, know.nbytes()
            teacher_logits = _array(know.logits, device, np.float32)  # [B, C]
            pending = request(step + 1) if spec.prefetch and step + 1 < total else None
        if st.soft_labels:
            terms = distillation_loss(logits, labels, teacher_logits, spec.alpha, spec.temperature,
                                      spec.spec.is_regression)
        else:  # IR phase: no label losses; 0 * logits keeps every parameter in the graph (DDP)
            zero = logits.sum() * 0.0
            terms = {"loss": zero, "loss_hard": zero.detach(), "loss_kd": zero.detach()}
        if st.layers and know is not None:
            ir = ir_loss_terms(out, know, st, projection, spec.teacher_widths[teacher] if spec.teacher_widths else 0,
                               mask)
            terms.update({f"loss_{k}": v for k, v in ir.items()})
            terms["loss"] = terms["loss"] + sum(spec.ir_weights.get(k, 1.0) * v for k, v in ir.items())
        terms["loss"].backward()
        if projection is not None and world > 1:  # the projection is outside DDP: average its gradients
            for p in projection.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if kd and pending is None and step + 1 < total:
            pending = request(step + 1)  # prefetch disabled: request only after the update
        step += 1

        global_batch = len(b["ids"]) * world
        if teacher >= 0:
            counts[teacher] += global_batch
        elif spec.strategy == "average":
            counts = [c + global_batch for c in counts]
        window_n += global_batch
        window_wait += wait
        logger.log({**{f"train/{k}": v.item() for k, v in terms.items()}, "train/teacher": teacher,
                    "train/knowledge_wait_s": wait, "train/knowledge_bytes": nbytes,
                    "train/lr": scheduler.get_last_lr()[0]}, step)
        if step % spec.log_every == 0 or step == total:
            elapsed = time.perf_counter() - window_t
            rate = window_n / max(elapsed, 1e-9)
            logger.log({"train/samples_per_s": rate,
                        **{f"teacher_samples/{n}": c for n, c in zip(spec.teacher_names, counts)}}, step)
            logger.flush()
            if rank == 0:
                eta = (total - step) * elapsed / max(1, window_n / global_batch)
                print(f"[skd] step {step}/{total} loss {terms['loss'].item():.4f} "
                      f"(hard {terms['loss_hard'].item():.4f} kd {terms['loss_kd'].item():.4f}) "
                      f"{rate:.1f} samples/s wait {window_wait:.2f}s ETA {eta:.0f}s", flush=True)
            window_t, window_n, window_wait = time.perf_counter(), 0, 0.0

        stopping = spec.stop_after is not None and step >= spec.stop_after and step < total
        metrics: dict[str, float] = {"step": step, "finished": float(step >= total),  # not "done": Tune sets its own
                                     "wall_s": time.perf_counter() - run_start}
        if step in evals and rank == 0:
            dev = evaluate(core, dev_data, spec.spec, spec.pad_id, spec.eval_batch_size)
            metrics.update({f"dev/{k}": v for k, v in dev.items()})
            if spec.best_teacher_metric:
                metrics["dev/retention"] = dev[spec.spec.metric] / spec.best_teacher_metric
            logger.log({k: v for k, v in metrics.items() if k.startswith("dev/")}, step)
            logger.flush()
            print(f"[skd] eval step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                                          if k.startswith("dev/")), flush=True)
        if spec.gsnr_every and step % spec.gsnr_every == 0 and rank == 0:
            t0 = time.perf_counter()
            probe = train_data.batch(np.arange(min(spec.gsnr_probe_size, len(train_data))), spec.pad_id)
            stats = probe_gsnr(core, probe, spec.spec.is_regression, device)
            logger.log({**stats, "gsnr/seconds": time.perf_counter() - t0}, step)
        if step in ckpts or stopping or step in evals:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0 and (step in ckpts or stopping):
                    # the sampler state saved is the one from before step+1's draw (prefetch drew ahead)
                    sampler_state = sampler_states.get(step, sampler.state_dict()) if sampler else None
                    state = {"step": step, "counts": counts, "sampler": sampler_state}
                    save_training_state(Path(tmp), core, tokenizer, optimizer, scheduler, state)
                    if projection is not None:
                        save_module_state(Path(tmp), PROJECTION_FILE, projection)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt)
        for s in [s for s in sampler_states if s <= step]:
            del sampler_states[s]
        if stopping:
            if rank == 0:
                print(f"[skd] stopped after step {step} as asked; continue with --resume", flush=True)
            return
    logger.flush()


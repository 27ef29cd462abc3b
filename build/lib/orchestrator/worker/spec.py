"""What a Ray Train worker receives: a small nested spec (task, optimisation, knowledge, run), made on the
driver from the run plan (`orchestrator.driver.plan`) and never recomputed on the worker. The pieces of the
plan that travel with it live here too (`StepPlan`, `KnowledgePlan`, `AdaptiveSettings`): this module is
the one the driver and the commands may import of `orchestrator.worker`, with the train loop itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.knowledge import KnowledgeRequest, KnowledgeSource
from orchestrator.common.task import TaskSpec


@dataclass(frozen=True)
class TrainTask:
    """The model being trained and its data.

    Attributes:
        model_init / num_layers: where the model starts (student, or a teacher being fine-tuned) and the
            bottom layers it keeps (None: all).
        tokenizer_init: saved beside the model so the result loads with AutoTokenizer.
        spec: the GLUE (or custom) task; train / dev: Ray object refs to `Encoded` splits (or the splits).
        pad_id: the tokenizer's pad token id.
    """

    model_init: str
    num_layers: int | None
    tokenizer_init: str
    spec: TaskSpec
    train: Any
    dev: Any
    pad_id: int


@dataclass(frozen=True)
class Optimisation:
    """AdamW with linear warm-up and decay (see `DistillConfig` / `FinetuneConfig`).

    Attributes:
        lr: peak learning rate; batch_size: examples per worker per step; warmup_ratio: share of steps
        warming up; weight_decay: AdamW decay (not on biases and LayerNorm weights); seed: model head,
        dropout, data order and teacher sampler.
    """

    lr: float
    batch_size: int
    warmup_ratio: float
    weight_decay: float
    seed: int


@dataclass(frozen=True)
class KnowledgeSpec:
    """Where a distilled student's knowledge comes from and how it enters the loss.

    Attributes:
        source: the `KnowledgeSource` (teacher pool or cache reader; picklable).
        strategy: "skd" (one teacher per step, drawn from `probs`) or "average" (all teachers' logits).
        probs: [N] sampling distribution (skd); names: [N] teacher names.
        plan: request, IR schedule and weights, teacher widths.
        alpha: weight of the hard-label loss; temperature: T of the KD term (Hinton et al. 2015).
        prefetch: send step t+1's request as soon as step t's answer arrives.
        reweigh: p after a served pool's membership changed (`orchestrator.common.sampling.Reweigh`); None: p
            renormalised over the live teachers.
        adaptive: the adaptive family's settings (`orchestrator.worker.spec.AdaptiveSettings`); None: p is fixed.
        transfer_weight: weight of the soft-label term on unlabelled transfer rows (`distill.transfer_weight`).
    """

    source: KnowledgeSource
    strategy: str
    probs: list[float] | None
    names: list[str]
    plan: KnowledgePlan
    alpha: float
    temperature: float
    prefetch: bool = True
    reweigh: Any = None
    adaptive: Any = None
    transfer_weight: float = 1.0


@dataclass(frozen=True)
class RunSettings:
    """Steps, logging, evaluation and checkpoint settings of one Ray Train run.

    Attributes:
        steps: the plan's step arithmetic (total, evaluation and checkpoint steps).
        threads: torch threads (and logical CPUs) per worker.
        log_every: steps between progress lines and MLflow flushes; eval_batch_size: dev batch size.
        gsnr_every / gsnr_probe_size: GSNR probe interval (steps; None: off) and probe size (first rows).
        stop_after: end early after this step, leaving a resumable checkpoint (preemptible runs).
        resume_from: an explicit checkpoint folder to start from when Ray Train has none.
        best_teacher_metric: for retention (None: not reported).
        tracking_uri / run_id: the MLflow run the driver opened (filled by `runner.run_training`).
        control: the driver's `orchestrator.common.control.RunControl` actor (stop on Ctrl-C); None: no control.
        spill_dir: where rank 0 keeps metrics while MLflow is unreachable (`<output_dir>/metrics-spill`).
        system_metrics_s: seconds between MLflow system-metric samples on each worker (0: off).
        nonfinite: "stop" or "skip" a step with a non-finite loss or gradient (`distill.nonfinite`).
    """

    steps: StepPlan
    threads: int = 1
    log_every: int = 10
    eval_batch_size: int = 128
    gsnr_every: int | None = None
    gsnr_probe_size: int = 16
    stop_after: int | None = None
    resume_from: str | None = None
    best_teacher_metric: float | None = None
    tracking_uri: str = ""
    run_id: str = ""
    control: Any = None
    spill_dir: str = ""
    system_metrics_s: float = 0.0
    nonfinite: str = "stop"


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs (picklable): the task, the optimisation, the knowledge (None: no KD), the run."""

    task: TrainTask
    optim: Optimisation
    knowledge: KnowledgeSpec | None
    run: RunSettings


@dataclass(frozen=True)
class StepPlan:
    """The run's step arithmetic.

    Attributes:
        per_epoch: optimizer steps per epoch; a step consumes batch_size * world examples and the last
            partial global batch of an epoch is dropped (every rank needs a share).
        total: optimizer steps of the run.
        evals: 1-based steps (counted after the optimizer step) with a dev evaluation: every `eval_every`
            steps (default: 4 evenly spaced per run) and always the last.
        checkpoints: steps with a checkpoint: every `checkpoint_every` steps and the last (default: `evals`).
        world: data-parallel workers the plan was made for.
    """

    per_epoch: int
    total: int
    evals: frozenset[int]
    checkpoints: frozenset[int]
    world: int

    @classmethod
    def make(cls, n_examples: int, batch_size: int, world: int, epochs: float, max_steps: int | None,
             eval_every: int | None = None, checkpoint_every: int | None = None) -> "StepPlan":
        """Steps for `n_examples` rows (see the attributes); `max_steps` overrides `epochs`."""
        per_epoch = max(1, n_examples // (batch_size * world))
        total = max_steps or max(1, math.ceil(epochs * per_epoch))
        every = eval_every or max(1, math.ceil(total / 4))
        evals = frozenset(range(every, total + 1, every)) | {total}
        ckpts = evals if checkpoint_every is None else frozenset(range(checkpoint_every, total + 1,
                                                                       checkpoint_every)) | {total}
        return cls(per_epoch, total, evals, ckpts, world)


@dataclass(frozen=True)
class KnowledgePlan:
    """What the student asks of its teachers, and where the answers come from.

    Attributes:
        request: the full request (soft labels plus IR outputs); a schedule asks for one stage's part.
        schedule: the IR schedule ("none" when the request has no per-layer outputs).
        ir_fraction: share of steps in the IR phase (all/progressive/stacked schedules).
        ir_weights: {"hidden" | "attentions" | "cls": weight} of the IR loss terms.
        teacher_widths: [N] hidden sizes D_t of the teachers (the student's projection targets).
        cache: the offline cache folder (None: online, from teacher actors).
        fingerprint: what the cache must have been built for (None when online).
    """

    request: KnowledgeRequest
    schedule: str = "none"
    ir_fraction: float = 0.5
    ir_weights: tuple[tuple[str, float], ...] = ()
    teacher_widths: tuple[int, ...] = ()
    cache: Path | None = None
    fingerprint: dict | None = None

    @property
    def weights(self) -> dict[str, float]:
        """`ir_weights` as a dict."""
        return dict(self.ir_weights)


@dataclass(frozen=True)
class AdaptiveSettings:
    """The adaptive family's settings (`distill.distribution`).

    Attributes:
        every: steps per interval (one probe and one p update per interval).
        step_size: eta, the softmax's scale on the summed standardised rewards G.
        eps: exploration floor, in (0, 1]: p = (1 - eps) softmax + eps / N.
        probe_size: training examples in the fixed probe batch.
    """

    every: int = 10
    step_size: float = 0.1
    eps: float = 0.1
    probe_size: int = 32

"""The student trainer: set-up, one optimisation step (`forward`, then `update` once the teacher's answer
is in), evaluation, save and load.

It holds the model (wrapped by Ray Train for data parallelism), the student-to-teacher hidden-state
projection, AdamW and the linear warm-up schedule. The loss of a step (`update`) is
alpha * CE(z_s, y) + (1 - alpha) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) (Hinton et al. 2015, as
SKDBERT uses it; MSE for regression) plus the weighted internal-representation terms of the step's
stage (Liu et al. ACL 2021, Aguilar et al. AAAI 2020; see `orchestrator.worker.losses`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.knowledge import Knowledge
from orchestrator.common.checkpointing import (PROJECTION_FILE, load_module_state, load_training_state, model_state,
                                               save_module_state, save_training_state, write_manifest)
from orchestrator.common.evaluation import evaluate
from orchestrator.common.task import Encoded, is_labelled
from orchestrator.worker.losses import HiddenProjection, as_tensor, distillation_loss, ir_loss_terms
from orchestrator.common.schedule import Stage
from orchestrator.worker.spec import WorkerSpec

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight")


class StudentTrainer:
    """Model, projection, optimizer and schedule of one worker.

    Args:
        spec: the worker spec (task, optimisation, knowledge, run).
        device: the worker's torch device.
        world: data-parallel workers (the projection's gradients are averaged over them).
    """

    def __init__(self, spec: WorkerSpec, device: torch.device, world: int) -> None:
        from transformers import get_linear_schedule_with_warmup

        from actors.models import load_classifier, load_tokenizer

        self.spec, self.device, self.world = spec, device, world
        self.grad_norm = 0.0  # the last step's gradient norm before clipping (`_step_optimizer`)
        task, kn = spec.task, spec.knowledge
        request = kn.plan.request if kn is not None else None
        outputs = set(request.outputs) if request is not None else set()
        torch.manual_seed(spec.optim.seed)
        self.tokenizer = load_tokenizer(task.tokenizer_init, for_saving=True)  # saved with each checkpoint
        self.model = load_classifier(task.model_init, task.spec.num_labels, task.num_layers, task.spec.is_regression,
                                     attn_implementation="eager" if "attentions" in outputs else None,
                                     label_names=task.spec.label_names)
        self.projection = None
        self.teacher_widths = list(kn.plan.teacher_widths) if kn is not None else []  # [N] D_t; grows with joins
        if outputs & {"hidden", "cls"}:
            self.projection = HiddenProjection(request.student_layers, self.model.config.hidden_size,
                                               list(kn.plan.teacher_widths)).to(device)
        self.outputs_attentions = "attentions" in outputs
        named = list(self.model.named_parameters())
        groups = [{"params": [p for n, p in named if not n.endswith(NO_DECAY)], "weight_decay": spec.optim.weight_decay},
                  {"params": [p for n, p in named if n.endswith(NO_DECAY)], "weight_decay": 0.0}]
        if self.projection is not None:
            groups[0]["params"] += list(self.projection.parameters())
        self.trained = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=spec.optim.lr)
        total = spec.run.steps.total
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, int(spec.optim.warmup_ratio * total), total)
        self.core = self.model  # the unwrapped model (evaluation, GSNR, saving)

    def prepare(self) -> None:
        """Wrap the model for data parallelism (Ray Train's `prepare_model`); call after `load`."""
        import ray.train.torch

        self.model = ray.train.torch.prepare_model(self.model)
        self.core = self.model.module if hasattr(self.model, "module") else self.model
        self.model.train()

    def load(self, folder: Path) -> dict[str, Any]:
        """Restore model, projection, optimizer and schedule from a checkpoint folder; returns its saved state
        (step, counts, sampler). A checkpoint saved under another peak lr (a PBT exploit) keeps the
        schedule's position and is rescaled to this run's lr.

        Raises:
            FileNotFoundError: the checkpoint lacks the projection this run needs.
        """
        self.model.load_state_dict(model_state(folder))
        if self.projection is not None:
            self.projection.load_state_dict(load_module_state(folder, PROJECTION_FILE))
        state = load_training_state(folder, self.optimizer, self.scheduler)
        lr = self.spec.optim.lr
        if self.scheduler.base_lrs and not math.isclose(self.scheduler.base_lrs[0], lr, rel_tol=1e-9):
            scale = lr / self.scheduler.base_lrs[0]
            self.scheduler.base_lrs = [lr] * len(self.scheduler.base_lrs)
            for group in self.optimizer.param_groups:
                group["initial_lr"], group["lr"] = lr, group["lr"] * scale
        return state

    def save(self, folder: Path, state: dict[str, Any]) -> None:
        """Write model (save_pretrained + tokenizer), optimizer, schedule, projection and `state` (JSON), then
        the manifest of sizes and SHA-256s (`checkpointing.write_manifest`) that a resume verifies."""
        save_training_state(folder, self.core, self.tokenizer, self.optimizer, self.scheduler, state)
        if self.projection is not None:
            save_module_state(folder, PROJECTION_FILE, self.projection)
        write_manifest(folder)  # last: a folder without it was never finished

    def forward(self, batch: dict[str, np.ndarray], stage: Stage):
        """The student's forward pass on the worker's batch (run while the teacher's answer is on its way).

        Args:
            batch: `input_ids`, `attention_mask` [B, L] int64 and `labels` [B].
            stage: which IR layers apply (their hidden states / attentions are kept for the loss).

        Returns:
            The model output: logits [B, C], and hidden_states (L_s + 1 of [B, L, D_s]) / attentions
            (L_s of [B, H_s, L, L]) when the stage has IR layers that need them.
        """
        ids = torch.as_tensor(batch["input_ids"], device=self.device)  # [B, L]
        mask = torch.as_tensor(batch["attention_mask"], device=self.device)  # [B, L]
        ir = bool(stage.layers) and self.spec.knowledge is not None
        return self.model(input_ids=ids, attention_mask=mask, output_hidden_states=ir and self.projection is not None,
                          output_attentions=ir and self.outputs_attentions)

    def update(self, batch: dict[str, np.ndarray], out, knowledge: Knowledge | None,
               stage: Stage) -> dict[str, torch.Tensor]:
        """The loss of one step, its backward pass and the optimizer step.

        Args:
            batch: the batch `forward` ran on (labels [B], attention_mask [B, L]).
            out: `forward`'s output.
            knowledge: the serving teacher's answer (logits [B, C], IR outputs of `stage.layers`); None: no KD.
            stage: which IR layers and whether the soft-label loss apply (`orchestrator.common.schedule`).

        Returns:
            {"loss", "loss_hard", "loss_kd", and "loss_hidden" / "loss_attentions" / "loss_cls" when present}:
            scalar tensors (detached except "loss").
        """
        labels = torch.as_tensor(batch["labels"], device=self.device)  # [B]
        labelled = torch.as_tensor(is_labelled(batch["labels"]), device=self.device)  # [B], False: transfer rows
        teacher_logits = as_tensor(knowledge.logits, self.device, np.float32) if knowledge is not None else None
        kn = self.spec.knowledge
        if stage.soft_labels:
            terms = distillation_loss(out.logits, labels, teacher_logits, kn.alpha if kn else 1.0,
                                      kn.temperature if kn else 1.0, self.spec.task.spec.is_regression, labelled,
                                      kn.transfer_weight if kn else 1.0)
        else:  # IR phase: no label losses; 0 * logits keeps every parameter in the graph (DDP)
            zero = out.logits.sum() * 0.0
            terms = {"loss": zero, "loss_hard": zero.detach(), "loss_kd": zero.detach()}
        if stage.layers and knowledge is not None:
            mask = torch.as_tensor(batch["attention_mask"], device=self.device)  # [B, L]
            width = self.teacher_widths[knowledge.teacher] if self.teacher_widths else 0
            extra = ir_loss_terms(out, knowledge, stage, self.projection, width, mask)
            terms.update({f"loss_{k}": v for k, v in extra.items()})
            terms["loss"] = terms["loss"] + sum(kn.plan.weights.get(k, 1.0) * v for k, v in extra.items())
        terms["loss"].backward()
        self.grad_norm = self._step_optimizer()
        return terms

    def _step_optimizer(self) -> float:
        """Average the projection's gradients over workers (it is outside DDP), clip to norm 1, step; returns
        the gradient norm before clipping. A non-finite norm (a NaN/inf loss or gradient on any rank: DDP
        averages the gradients, so every rank sees the same norm) steps neither the optimizer nor the
        schedule: the weights stay as they were (`last_step_finite` False)."""
        if self.projection is not None and self.world > 1:
            for p in self.projection.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.world
        norm = float(torch.nn.utils.clip_grad_norm_(self.trained, 1.0))
        if math.isfinite(norm):
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def last_step_finite(self) -> bool:
        """Whether the last `update` changed the weights (its gradient norm was finite)."""
        return math.isfinite(self.grad_norm)

    def probe_loss(self, batch: dict[str, np.ndarray]) -> float:
        """The student's loss on labels for a fixed probe batch (`input_ids`, `attention_mask` [B, L],
        `labels` [B]): cross-entropy (MSE for regression), eval mode (no dropout), no gradient. The adaptive
        sampling family's reward is its drop over an interval (`orchestrator.worker.adaptive`)."""
        was_training = self.core.training
        self.core.eval()
        with torch.inference_mode():
            logits = self.core(input_ids=torch.as_tensor(batch["input_ids"], device=self.device),
                               attention_mask=torch.as_tensor(batch["attention_mask"], device=self.device)).logits
        self.core.train(was_training)
        labels = torch.as_tensor(batch["labels"], device=self.device)
        if self.spec.task.spec.is_regression:
            return float(torch.nn.functional.mse_loss(logits.float().squeeze(-1), labels.float()))
        return float(torch.nn.functional.cross_entropy(logits.float(), labels.long()))

    @property
    def lr(self) -> float:
        """The learning rate in force after the last step."""
        return self.scheduler.get_last_lr()[0]

    def evaluate(self, data: Encoded, batch_size: int) -> dict[str, float]:
        """The task's GLUE metrics on `data` (see `evaluate`)."""
        t = self.spec.task
        return evaluate(self.core, data, t.spec, t.pad_id, batch_size)

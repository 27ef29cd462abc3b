"""Distillation losses on soft labels (Hinton et al. 2015, as used by SKDBERT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), averaged over the batch.

    Args:
        student_logits: [B, C].
        teacher_logits: [B, C] (no gradient flows into it).
        temperature: T > 0.

    Returns:
        A scalar tensor.
    """
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)  # [B, C]
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)  # [B, C]
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature ** 2


def distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
                      alpha: float, temperature: float, regression: bool) -> dict[str, torch.Tensor]:
    """The per-step training loss and its terms.

    Classification: loss = alpha * CE(z_s, y) + (1 - alpha) * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)).
    Regression (STS-B): loss = alpha * MSE(z_s, y) + (1 - alpha) * MSE(z_s, z_t).
    Without a teacher (no-kd) the loss is the hard-label term alone.

    Args:
        student_logits: [B, C] ([B, 1] for regression).
        labels: [B] int64 class indices, or [B] float scores.
        teacher_logits: [B, C] or None.
        alpha: weight of the hard-label term, in [0, 1].
        temperature: T for the KL term.
        regression: use the MSE variant.

    Returns:
        `{"loss": total, "loss_hard": hard-label term, "loss_kd": KD term (0 when no teacher)}`.
    """
    if regression:
        pred = student_logits.squeeze(-1)  # [B]
        hard = F.mse_loss(pred, labels.float())
        soft = F.mse_loss(pred, teacher_logits.detach().squeeze(-1).float()) if teacher_logits is not None else None
    else:
        hard = F.cross_entropy(student_logits, labels)
        soft = kd_loss(student_logits, teacher_logits.float(), temperature) if teacher_logits is not None else None
    if soft is None:
        return {"loss": hard, "loss_hard": hard, "loss_kd": torch.zeros((), device=hard.device)}
    return {"loss": alpha * hard + (1 - alpha) * soft, "loss_hard": hard, "loss_kd": soft}

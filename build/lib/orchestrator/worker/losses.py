"""Distillation losses: soft labels (Hinton et al. 2015, as used by SKDBERT) and internal representations.

Internal-representation losses (Aguilar et al., "Knowledge Distillation from Internal Representations",
AAAI 2020; Liu et al., "Marginal Utility Diminishes", ACL 2021) compare the student with the teacher at
the selected tokens, dims and mapped layers that the teacher returned (`actors.selection`): hidden-state
MSE through a learned projection, attention KL and [CLS] cosine.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from actors.knowledge import Knowledge
from actors.selection import gather, gather_attention
from orchestrator.common.schedule import Stage


def kd_loss_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row, T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) (Hinton et al. 2015).

    Args:
        student_logits: [B, C].
        teacher_logits: [B, C] (no gradient flows into it).
        temperature: T > 0.

    Returns:
        [B] tensor.
    """
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)  # [B, C]
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)  # [B, C]
    return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1) * temperature ** 2


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`kd_loss_rows` averaged over the batch: a scalar tensor."""
    return kd_loss_rows(student_logits, teacher_logits, temperature).mean()


def distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
                      alpha: float, temperature: float, regression: bool, labelled: torch.Tensor | None = None,
                      transfer_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """The per-step training loss and its terms.

    Per row i, with soft_i = T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) (regression: (z_s - z_t)^2) and hard_i
    = CE(z_s, y) (regression: (z_s - y)^2):

        loss = mean_i [ alpha * hard_i + (1 - alpha) * soft_i ]   labelled rows
                    + [ transfer_weight * soft_i ]                 unlabelled transfer rows (no label to learn)

    With every row labelled this is alpha * CE + (1 - alpha) * T^2 * KL, the Hinton et al. (2015) loss SKDBERT
    uses. Without a teacher (no-kd) the loss is the hard-label term alone (transfer rows add nothing).

    Args:
        student_logits: [B, C] ([B, 1] for regression).
        labels: [B] int64 class indices, or [B] float scores (a transfer row's value is ignored).
        teacher_logits: [B, C] or None.
        alpha: weight of the hard-label term, in [0, 1].
        temperature: T for the KL term.
        regression: use the MSE variant.
        labelled: [B] bool, False for transfer rows; None: every row is labelled.
        transfer_weight: weight of the soft-label term on transfer rows.

    Returns:
        `{"loss": total, "loss_hard": hard-label term (mean over labelled rows), "loss_kd": KD term (mean over
        all rows; 0 when no teacher)}`.
    """
    b = student_logits.shape[0]
    keep = torch.ones(b, dtype=torch.bool, device=student_logits.device) if labelled is None else labelled
    if regression:
        pred = student_logits.squeeze(-1)  # [B]
        hard_i = (pred - torch.where(keep, labels.float(), pred.detach())) ** 2
        soft_i = (pred - teacher_logits.detach().squeeze(-1).float()) ** 2 if teacher_logits is not None else None
    else:
        hard_i = F.cross_entropy(student_logits, torch.where(keep, labels, torch.zeros_like(labels)), reduction="none")
        soft_i = kd_loss_rows(student_logits, teacher_logits, temperature) if teacher_logits is not None else None
    kept = keep.float()
    hard = (hard_i * kept).sum() / kept.sum().clamp(min=1.0)
    if soft_i is None:
        return {"loss": hard, "loss_hard": hard, "loss_kd": torch.zeros((), device=hard.device)}
    per_row = torch.where(keep, alpha * hard_i + (1 - alpha) * soft_i, transfer_weight * soft_i)  # [B]
    return {"loss": per_row.mean(), "loss_hard": hard, "loss_kd": soft_i.mean()}


class HiddenProjection(torch.nn.Module):
    """Learned linear maps from the student width D_s to each teacher width D_t (Aguilar et al. 2020).

    One `Linear(D_s, D_t)` per (student layer, D_t) with D_t != D_s; widths equal to D_s pass through
    unchanged. Parameters are created in sorted (layer, D_t) order, so the init is deterministic given
    the torch seed.

    Args:
        student_layers: 1-based student layers that receive hidden-state losses.
        student_width: D_s.
        teacher_widths: the hidden sizes D_t of the teachers that will serve them.

    Raises:
        ValueError: a width or layer < 1.
    """

    def __init__(self, student_layers, student_width: int, teacher_widths) -> None:
        super().__init__()
        layers, widths = sorted(set(int(l) for l in student_layers)), sorted(set(int(d) for d in teacher_widths))
        if student_width < 1 or any(d < 1 for d in widths) or any(l < 1 for l in layers):
            raise ValueError(f"HiddenProjection needs layers >= 1 and widths >= 1, got layers {layers}, "
                             f"student width {student_width}, teacher widths {widths}")
        self.student_width = student_width
        self.maps = torch.nn.ModuleDict({
            self._key(l, d): torch.nn.Linear(student_width, d) for l in layers for d in widths if d != student_width})

    @staticmethod
    def _key(layer: int, width: int) -> str:
        return f"layer{layer}_to{width}"

    def forward(self, h_s: torch.Tensor, layer: int, teacher_width: int) -> torch.Tensor:
        """Project a student layer's hidden states to a teacher width.

        Args:
            h_s: [B, L, D_s] (any leading shape, last dim D_s).
            layer: the 1-based student layer.
            teacher_width: D_t.

        Returns:
            [B, L, D_t] (h_s itself when D_t == D_s).

        Raises:
            ValueError: h_s is not D_s wide, or no map was built for (layer, D_t).
        """
        if h_s.shape[-1] != self.student_width:
            raise ValueError(f"student hidden states are {h_s.shape[-1]} wide, the projection expects "
                             f"{self.student_width}")
        if teacher_width == self.student_width:
            return h_s
        key = self._key(layer, teacher_width)
        if key not in self.maps:
            raise ValueError(f"no projection for student layer {layer} to width {teacher_width}: build "
                             f"HiddenProjection with that layer and teacher width")
        return self.maps[key](h_s)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over kept tokens and dims (the hidden-state loss of Liu et al. 2021).

    loss = sum_{b,j,w} m[b,j] (s[b,j,w] - t[b,j,w])^2 / (W * sum_{b,j} m[b,j]); masked slots count in
    neither numerator nor denominator. 0 when nothing is kept.

    Args:
        student: [B, K, W] student hidden states, projected to D_t and gathered like the teacher's.
        teacher: [B, K, W] (no gradient flows into it).
        token_mask: [B, K], 1 for kept real tokens.

    Returns:
        A float32 scalar tensor.

    Raises:
        ValueError: mismatched shapes.
    """
    if student.shape != teacher.shape or student.ndim != 3 or tuple(token_mask.shape) != tuple(student.shape[:2]):
        raise ValueError(f"hidden_mse needs student and teacher [B, K, W] and token_mask [B, K], got "
                         f"{tuple(student.shape)}, {tuple(teacher.shape)}, {tuple(token_mask.shape)}")
    m = token_mask.to(student.device).float()  # [B, K]
    sq = (student.float() - teacher.detach().to(student.device).float()) ** 2  # [B, K, W]
    return (sq * m[..., None]).sum() / (m.sum() * student.shape[-1]).clamp(min=1.0)


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, token_mask: torch.Tensor,
                 key_mask: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """KL(teacher row || student row) of self-attention probabilities (Aguilar et al. 2020).

    Per head and kept query row: sum over valid keys of p_t * (log p_t - log p_s), with both
    probabilities clamped to `eps` inside the logs; averaged over heads, then over kept rows. When the
    head counts differ, both sides are first averaged over heads.

    Args:
        student: [B, H_s, K, L] student attention rows at the teacher's kept query tokens.
        teacher: [B, H_t, K, L] (no gradient flows into it).
        token_mask: [B, K], 1 for kept rows.
        key_mask: [B, L], 1 for real keys (padded keys are ignored).
        eps: floor inside the logs.

    Returns:
        A float32 scalar tensor (0 when no row is kept).

    Raises:
        ValueError: mismatched shapes.
    """
    if student.ndim != 4 or teacher.ndim != 4 or student.shape[0] != teacher.shape[0] \
            or student.shape[2:] != teacher.shape[2:] \
            or tuple(token_mask.shape) != (student.shape[0], student.shape[2]) \
            or tuple(key_mask.shape) != (student.shape[0], student.shape[3]):
        raise ValueError(f"attention_kl needs student [B, H_s, K, L], teacher [B, H_t, K, L], token_mask [B, K] "
                         f"and key_mask [B, L], got {tuple(student.shape)}, {tuple(teacher.shape)}, "
                         f"{tuple(token_mask.shape)}, {tuple(key_mask.shape)}")
    p_s = student.float()
    p_t = teacher.detach().to(student.device).float()
    if p_s.shape[1] != p_t.shape[1]:
        p_s, p_t = p_s.mean(dim=1, keepdim=True), p_t.mean(dim=1, keepdim=True)  # [B, 1, K, L]
    keys = key_mask.to(student.device).float()[:, None, None, :]  # [B, 1, 1, L]
    kl = (keys * p_t * (p_t.clamp(min=eps).log() - p_s.clamp(min=eps).log())).sum(dim=-1)  # [B, H, K]
    rows = token_mask.to(student.device).float()  # [B, K]
    return (kl.mean(dim=1) * rows).sum() / rows.sum().clamp(min=1.0)


def cls_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(h_s[CLS], h_t[CLS]) over the batch (Aguilar et al. 2020).

    Args:
        student: [B, D] student [CLS] states, projected to D_t.
        teacher: [B, D] (no gradient flows into it).

    Returns:
        A float32 scalar tensor in [0, 2].

    Raises:
        ValueError: mismatched shapes.
    """
    if student.shape != teacher.shape or student.ndim != 2:
        raise ValueError(f"cls_cosine needs student and teacher [B, D], got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    cos = F.cosine_similarity(student.float(), teacher.detach().to(student.device).float(), dim=-1, eps=1e-8)
    return (1.0 - cos).mean()


def as_tensor(x: np.ndarray, device, dtype=None) -> torch.Tensor:
    """A writable torch copy of a (possibly read-only, object-store) numpy array on `device`."""
    return torch.from_numpy(np.array(x, dtype=dtype)).to(device)


def ir_loss_terms(out, knowledge: Knowledge, stage: Stage, projection: HiddenProjection | None, teacher_width: int,
                  attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The internal-representation loss terms of one step, each summed over the stage's layers.

    hidden: MSE between the student's hidden states, projected to D_t and gathered at the teacher's kept
    tokens and dims (`actors.selection.gather`, the function the teacher used), and the teacher's HSK
    (Liu et al. 2021). attentions: KL between the teacher's and the student's attention rows of the kept
    query tokens (Aguilar et al. 2020). cls: 1 - cos between projected student and teacher [CLS] states.

    Args:
        out: the student's model output with hidden_states (L_s + 1 of [B, L, D_s]) and/or attentions
            (L_s of [B, H_s, L, L]) as the stage needs.
        knowledge: the teacher's knowledge for `stage.layers`, in that order along its k axis.
        projection: student-to-teacher width maps (None when only attentions are distilled).
        teacher_width: D_t of the serving teacher.
        attention_mask: [B, L] of the batch.

    Returns:
        {"hidden" | "attentions" | "cls": scalar tensor} for the outputs present in `knowledge`.
    """
    device = attention_mask.device
    terms: dict[str, torch.Tensor] = {}
    token_index = as_tensor(knowledge.token_index, device) if knowledge.token_index is not None else None  # [B, K]
    token_mask = as_tensor(knowledge.token_mask, device) if knowledge.token_mask is not None else None  # [B, K]
    for j, layer in enumerate(stage.layers):
        if knowledge.hidden is not None:
            h = projection(out.hidden_states[layer], layer, teacher_width)  # [B, L, D_t]
            width = as_tensor(knowledge.width_index[:, j], device) if knowledge.width_index is not None else None  # [B, W]
            term = hidden_mse(gather(h, token_index, width), as_tensor(knowledge.hidden[:, j], device, np.float32), token_mask)
            terms["hidden"] = terms["hidden"] + term if "hidden" in terms else term
        if knowledge.attentions is not None:
            rows = gather_attention(out.attentions[layer - 1], token_index)  # [B, H_s, K, L]
            term = attention_kl(rows, as_tensor(knowledge.attentions[:, j], device, np.float32), token_mask, attention_mask)
            terms["attentions"] = terms["attentions"] + term if "attentions" in terms else term
        if knowledge.cls is not None:
            c = projection(out.hidden_states[layer][:, 0], layer, teacher_width)  # [B, D_t]
            term = cls_cosine(c, as_tensor(knowledge.cls[:, j], device, np.float32))
            terms["cls"] = terms["cls"] + term if "cls" in terms else term
    return terms

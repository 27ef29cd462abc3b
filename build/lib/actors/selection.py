"""Hidden-state knowledge selection along depth, length and width.

Implements the three selection dimensions of Liu et al., "Marginal Utility Diminishes: Exploring the
Minimum Knowledge for BERT Knowledge Distillation" (ACL 2021):

- depth: student layer l learns from teacher layer round(l * L_t / L_s); only the top k student layers;
- length: K tokens per example (the first K, or the top K by the teacher's attention from [CLS],
  optionally with [SEP] excluded);
- width: a fraction of the hidden dimensions (a fixed random set, evenly spaced, or the largest mean
  magnitudes of the batch).

All tensor functions are torch-based: the teacher calls them on its device before sending the kept
values, and the trainer calls `gather` / `gather_attention` on the student's tensors with the
teacher's indices, so both sides select exactly the same positions and dimensions (the same mask on
both sides; the paper's code masked only the teacher, which we do not copy).

Shape notation: B batch, L sequence length, K kept tokens, D hidden size, W kept dims, H heads.
"""

from __future__ import annotations

import numpy as np
import torch

from actors.knowledge import TOKEN_MODES, WIDTH_MODES


# ---------------------------------------------------------------------------------------------- depth

def map_layer(student_layer: int, student_num_layers: int, teacher_num_layers: int) -> int:
    """The teacher layer a student layer learns from: round(l * L_t / L_s), halves rounded up.

    Args:
        student_layer: l, 1-based (layer l is `hidden_states[l]`, the output of the l-th block).
        student_num_layers: L_s >= 1.
        teacher_num_layers: L_t >= 1.

    Returns:
        The 1-based teacher layer, clamped to [1, L_t] (e.g. L_s=4, L_t=3: 1, 2, 2, 3).

    Raises:
        ValueError: L_s or L_t < 1, or l outside [1, L_s].
    """
    if student_num_layers < 1 or teacher_num_layers < 1:
        raise ValueError(f"student_num_layers ({student_num_layers}) and teacher_num_layers "
                         f"({teacher_num_layers}) must be >= 1")
    if not 1 <= student_layer <= student_num_layers:
        raise ValueError(f"student layer {student_layer} is outside [1, {student_num_layers}]")
    # floor(l * L_t / L_s + 1/2) in integers, so 2.5 -> 3 (Python's round would give 2)
    mapped = (2 * student_layer * teacher_num_layers + student_num_layers) // (2 * student_num_layers)
    return min(max(mapped, 1), teacher_num_layers)


def map_layers(student_layers: tuple[int, ...], student_num_layers: int, teacher_num_layers: int) -> tuple[int, ...]:
    """`map_layer` for each student layer, in order (the result may repeat a teacher layer).

    Raises:
        ValueError: as `map_layer`.
    """
    return tuple(map_layer(l, student_num_layers, teacher_num_layers) for l in student_layers)


def top_layers(student_num_layers: int, k: int) -> tuple[int, ...]:
    """The top k student layers, ascending: (L_s - k + 1, ..., L_s).

    Raises:
        ValueError: k outside [1, L_s].
    """
    if not 1 <= k <= student_num_layers:
        raise ValueError(f"k = {k} top layers must be in [1, student_num_layers = {student_num_layers}]")
    return tuple(range(student_num_layers - k + 1, student_num_layers + 1))


# --------------------------------------------------------------------------------------------- length

def cls_attention(attentions: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """The attention from [CLS] (query 0), averaged over heads and over the given layers.

    Args:
        attentions: one [B, H, L, L] probability tensor per teacher layer (HF `outputs.attentions`).

    Returns:
        [B, L] float32 scores used by the "cls-attention" token modes.

    Raises:
        ValueError: no layers given.
    """
    if len(attentions) == 0:
        raise ValueError("cls_attention needs at least one layer's attentions (load the teacher with "
                         "attn_implementation='eager' and pass output_attentions=True)")
    return torch.stack([a[:, :, 0, :].float().mean(dim=1) for a in attentions]).mean(dim=0)  # [B, L]


def select_tokens(attention_mask: torch.Tensor, num_tokens: int | None, how: str,
                  cls_attention: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                  sep_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick K token positions per example (length selection of Liu et al. 2021).

    Modes:
        "all": K = L, index = arange(L), mask = attention_mask (num_tokens is ignored).
        "first": the first K real positions.
        "cls-attention": the K real positions with the highest `cls_attention`; ties go to the lower
            position.
        "cls-attention-no-sep": the same over real positions whose id is not `sep_token_id`.
    Padding is never selected. Kept positions are returned in ascending order; an example with fewer
    than K eligible positions fills the trailing slots with index 0 and mask 0.

    Args:
        attention_mask: [B, L] int, 1 for real tokens.
        num_tokens: K >= 1 (required unless how == "all").
        how: one of `TOKEN_MODES`.
        cls_attention: [B, L] scores (see `cls_attention`); required for the cls-attention modes.
        input_ids: [B, L]; required for "cls-attention-no-sep".
        sep_token_id: the [SEP] id; required for "cls-attention-no-sep".

    Returns:
        (token_index [B, K] int64 positions into L, token_mask [B, K] int64 1 for kept real tokens),
        on attention_mask's device.

    Raises:
        ValueError: unknown mode, K < 1, or a missing input for the mode.
    """
    if how not in TOKEN_MODES:
        raise ValueError(f"tokens = {how!r} is not one of {TOKEN_MODES}")
    B, L = attention_mask.shape
    device = attention_mask.device
    real = attention_mask.bool()  # [B, L]
    if how == "all":
        return torch.arange(L, device=device).expand(B, L).clone(), attention_mask.long().clone()
    if num_tokens is None or num_tokens < 1:
        raise ValueError(f"num_tokens = {num_tokens} must be >= 1 for tokens = {how!r}")
    positions = torch.arange(L, device=device).expand(B, L)  # [B, L]
    if how == "first":
        scores = -positions.float()  # earlier is better
    else:
        if cls_attention is None or cls_attention.shape != (B, L):
            raise ValueError(f"tokens = {how!r} needs cls_attention of shape {(B, L)}, got "
                             f"{None if cls_attention is None else tuple(cls_attention.shape)}")
        scores = cls_attention.float()
        if how == "cls-attention-no-sep":
            if input_ids is None or sep_token_id is None:
                raise ValueError("tokens = 'cls-attention-no-sep' needs input_ids and sep_token_id")
            real = real & (input_ids != sep_token_id)
    scores = scores.masked_fill(~real, float("-inf"))  # [B, L]
    # stable descending sort: among equal scores the lower position comes first
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :num_tokens]  # [B, min(K, L)]
    kept = torch.gather(real, 1, order)  # [B, min(K, L)] eligible among the top
    # ascending positions, with the unused slots (not eligible) moved to the end
    key = torch.where(kept, order, torch.full_like(order, L))
    key = torch.sort(key, dim=1).values
    mask = key < L
    index = torch.where(mask, key, torch.zeros_like(key))
    if num_tokens > L:  # more slots than positions: pad
        pad = torch.zeros(B, num_tokens - L, dtype=torch.long, device=device)
        index, mask = torch.cat([index, pad], dim=1), torch.cat([mask, pad.bool()], dim=1)
    return index.long(), mask.long()


# ---------------------------------------------------------------------------------------------- width

def kept_width(hidden_size: int, fraction: float) -> int:
    """W = max(1, round(fraction * D)), halves rounded up.

    Raises:
        ValueError: D < 1 or fraction outside (0, 1].
    """
    if hidden_size < 1:
        raise ValueError(f"hidden size {hidden_size} must be >= 1")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"width_fraction = {fraction} must be in (0, 1]")
    return max(1, min(hidden_size, int(np.floor(fraction * hidden_size + 0.5))))


def select_width(how: str, hidden_size: int, fraction: float, seed: int = 0, hidden: torch.Tensor | None = None,
                 token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pick W = `kept_width(D, fraction)` hidden dimensions (width selection of Liu et al. 2021).

    Modes:
        "all": every dim, arange(D).
        "random": a fixed random set from `np.random.default_rng(seed)`: the same for every batch and
            every teacher of width D.
        "even": evenly spaced, floor(i * D / W) for i = 0..W-1.
        "magnitude": the W dims with the largest mean |h| over the batch's kept tokens (one set per
            batch and layer; ties go to the lower dim).

    Args:
        how: one of `WIDTH_MODES`.
        hidden_size: D.
        fraction: in (0, 1].
        seed: seed of the "random" set (>= 0).
        hidden: [B, K, D] the teacher layer's hidden states at the kept tokens ("magnitude" only).
        token_mask: [B, K] 1 for kept real tokens ("magnitude" only; None counts every slot).

    Returns:
        [W] int64 ascending dims (on `hidden`'s device for "magnitude", else CPU).

    Raises:
        ValueError: unknown mode, bad fraction/seed, or missing/mis-shaped `hidden` for "magnitude".
    """
    if how not in WIDTH_MODES:
        raise ValueError(f"width = {how!r} is not one of {WIDTH_MODES}")
    W = kept_width(hidden_size, fraction)
    if how == "all":
        return torch.arange(hidden_size)
    if how == "random":
        if seed < 0:
            raise ValueError(f"width_seed = {seed} must be >= 0")
        dims = np.random.default_rng(seed).choice(hidden_size, size=W, replace=False)
        return torch.from_numpy(np.sort(dims).astype(np.int64))
    if how == "even":
        return torch.arange(W) * hidden_size // W
    if hidden is None or hidden.ndim != 3 or hidden.shape[-1] != hidden_size:
        raise ValueError(f"width = 'magnitude' needs hidden [B, K, {hidden_size}], got "
                         f"{None if hidden is None else tuple(hidden.shape)}")
    weight = torch.ones(hidden.shape[:2], device=hidden.device) if token_mask is None else token_mask.float()
    weight = weight.to(hidden.device)  # [B, K]
    total = (hidden.float().abs() * weight[..., None]).sum(dim=(0, 1))  # [D]
    mean = total / weight.sum().clamp(min=1.0)
    top = torch.sort(mean, descending=True, stable=True).indices[:W]
    return torch.sort(top).values


# --------------------------------------------------------------------------------------------- gather

def gather(h: torch.Tensor, token_index: torch.Tensor, width_index: torch.Tensor | None = None) -> torch.Tensor:
    """Select tokens then dims: out[b, j, w] = h[b, token_index[b, j], width_index[b, w]].

    The one selection both sides use: the teacher on its hidden states, the trainer on the student's
    hidden states projected to D_t (so the student is compared at exactly the teacher's positions and
    dims). Differentiable in `h`. Unused slots (token_mask 0) read position 0; losses mask them out.

    Args:
        h: [B, L, D].
        token_index: [B, K] int64 positions into L.
        width_index: [B, W] or [W] int64 dims into D; None keeps all D.

    Returns:
        [B, K, W] ([B, K, D] without width_index).

    Raises:
        ValueError: mismatched batch sizes or ranks.
    """
    if h.ndim != 3 or token_index.ndim != 2 or token_index.shape[0] != h.shape[0]:
        raise ValueError(f"gather needs h [B, L, D] and token_index [B, K], got {tuple(h.shape)} and "
                         f"{tuple(token_index.shape)}")
    B, K = token_index.shape
    D = h.shape[-1]
    token_index = token_index.to(h.device).long()
    out = torch.gather(h, 1, token_index[..., None].expand(B, K, D))  # [B, K, D]
    if width_index is None:
        return out
    width_index = width_index.to(h.device).long()
    if width_index.ndim == 1:
        width_index = width_index.expand(B, -1)
    if width_index.ndim != 2 or width_index.shape[0] != B:
        raise ValueError(f"width_index must be [B, W] or [W] with B = {B}, got {tuple(width_index.shape)}")
    return torch.gather(out, 2, width_index[:, None, :].expand(B, K, width_index.shape[1]))  # [B, K, W]


def gather_attention(attention: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """The attention rows of the kept query tokens: out[b, h, j, :] = attention[b, h, token_index[b, j], :].

    Args:
        attention: [B, H, L, L] probabilities (queries x keys).
        token_index: [B, K] int64 query positions.

    Returns:
        [B, H, K, L].

    Raises:
        ValueError: mismatched shapes.
    """
    if attention.ndim != 4 or token_index.ndim != 2 or token_index.shape[0] != attention.shape[0]:
        raise ValueError(f"gather_attention needs attention [B, H, L, L] and token_index [B, K], got "
                         f"{tuple(attention.shape)} and {tuple(token_index.shape)}")
    B, H, _, L = attention.shape
    K = token_index.shape[1]
    index = token_index.to(attention.device).long()[:, None, :, None].expand(B, H, K, L)
    return torch.gather(attention, 2, index)


def hsk_fraction(kept_values: int, attention_mask, teacher_num_layers: int, hidden_size: int) -> float:
    """The fraction of full hidden-state knowledge (HSK) kept.

    Full HSK = L_t layers (embeddings excluded) x real tokens of the batch x D_t values; kept values
    are typically k layers x sum(token_mask) x W.

    Args:
        kept_values: number of hidden-state values kept for the batch.
        attention_mask: [B, L] (numpy or torch), 1 for real tokens.
        teacher_num_layers: L_t >= 1.
        hidden_size: D_t >= 1.

    Returns:
        kept / full, a float (1.0 means all of it).

    Raises:
        ValueError: L_t or D_t < 1, or no real tokens.
    """
    if teacher_num_layers < 1 or hidden_size < 1:
        raise ValueError(f"teacher_num_layers ({teacher_num_layers}) and hidden_size ({hidden_size}) must be >= 1")
    tokens = int(np.asarray(attention_mask.cpu() if isinstance(attention_mask, torch.Tensor) else attention_mask).sum())
    if tokens < 1:
        raise ValueError("attention_mask has no real tokens")
    return float(kept_values) / (teacher_num_layers * tokens * hidden_size)

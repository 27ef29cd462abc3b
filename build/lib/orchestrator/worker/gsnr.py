"""Gradient signal-to-noise ratio of the student's parameters (Liu et al., ICLR 2020).

For parameter j with per-sample gradients g_j(x) over a probe batch of B examples:

    r_j = mean_x(g_j(x))^2 / (var_x(g_j(x)) + eps)          (var with ddof=0)

Per-sample gradients come from torch.func (functional_call + vmap + grad) in one vectorised pass, with
the model in eval mode (no dropout) and the hard-label loss (CE, or MSE for regression). Statistics are
reported per layer group (embeddings, encoder.layer.<i>, pooler, classifier): mean, median and 95th
percentile of r_j. The word-embedding table is left out: its per-sample gradients cost B x vocab x H
floats and are zero outside the probe's tokens.

Cost is bounded by the probe size (B) and the interval between probes; memory is B x (parameters without
the word embeddings) floats, e.g. 16 x 3.9M x 4 bytes = 250 MB for a 2-layer MiniLM student.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

EXCLUDED = ("word_embeddings",)


def layer_group(name: str) -> str:
    """Parameter name -> layer group: `encoder.layer.3`, `embeddings`, `pooler` or `classifier`."""
    m = re.search(r"encoder\.layer\.(\d+)\.", name)
    if m:
        return f"encoder.layer.{m.group(1)}"
    for part in ("embeddings", "pooler", "classifier"):
        if part in name:
            return part
    return name.split(".")[0]


def per_sample_grads(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     labels: torch.Tensor, regression: bool = False) -> dict[str, torch.Tensor]:
    """Gradients of each example's loss w.r.t. each probed parameter.

    Args:
        model: a sequence classifier (called with input_ids/attention_mask, returns `.logits`).
        input_ids, attention_mask: [B, L] int64.
        labels: [B] class indices, or [B] floats for regression.

    Returns:
        name -> [B, *param.shape] per-sample gradients (word embeddings excluded).
    """
    probed = {n: p.detach() for n, p in model.named_parameters() if not any(x in n for x in EXCLUDED)}
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in probed}
    fixed.update(dict(model.named_buffers()))

    # A prepared additive 4D mask [B, 1, 1, L] (0 = attend, min float = padding): transformers uses it as is,
    # instead of building one with data-dependent branches that vmap cannot trace.
    additive = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min

    def loss_one(params, ids, mask, y):
        logits = functional_call(model, {**fixed, **params}, (),
                                 {"input_ids": ids[None], "attention_mask": mask[None]}).logits  # [1, C]
        if regression:
            return F.mse_loss(logits.squeeze(-1), y[None].float())
        return F.cross_entropy(logits, y[None])

    was_training = model.training
    model.eval()
    try:
        return vmap(grad(loss_one), in_dims=(None, 0, 0, 0))(probed, input_ids, additive, labels)
    finally:
        model.train(was_training)


def gsnr(grads: dict[str, torch.Tensor], eps: float = 1e-20) -> dict[str, torch.Tensor]:
    """r_j = mean^2 / (var + eps) over the batch dimension, per parameter element; same shapes as params."""
    out = {}
    for name, g in grads.items():
        g = g.double()
        out[name] = (g.mean(0) ** 2 / (g.var(0, unbiased=False) + eps)).float()
    return out


def gsnr_by_layer(ratios: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per layer group and over all probed parameters (`all`): `gsnr/<group>/mean`, `/median`, `/p95`."""
    groups: dict[str, list[torch.Tensor]] = {}
    for name, r in ratios.items():
        groups.setdefault(layer_group(name), []).append(r.reshape(-1))
        groups.setdefault("all", []).append(r.reshape(-1))
    stats = {}
    for group, parts in sorted(groups.items()):
        v = torch.cat(parts).numpy()
        stats[f"gsnr/{group}/mean"] = float(v.mean())
        stats[f"gsnr/{group}/median"] = float(np.median(v))
        stats[f"gsnr/{group}/p95"] = float(np.percentile(v, 95))
    return stats


def probe_gsnr(model: torch.nn.Module, batch: dict[str, np.ndarray], regression: bool,
               device: torch.device | str = "cpu") -> dict[str, float]:
    """Per-layer GSNR statistics of `model` on one probe batch (`input_ids`, `attention_mask`, `labels`)."""
    ids = torch.as_tensor(batch["input_ids"], device=device)
    mask = torch.as_tensor(batch["attention_mask"], device=device)
    labels = torch.as_tensor(batch["labels"], device=device)
    return gsnr_by_layer(gsnr(per_sample_grads(model, ids, mask, labels, regression)))

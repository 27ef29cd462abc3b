"""GSNR from torch.func per-sample gradients equals a brute-force per-example loop."""

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from orchestrator.worker.gsnr import EXCLUDED, gsnr, gsnr_by_layer, layer_group, per_sample_grads


def brute_force(model, ids, mask, labels):
    model.eval()
    grads = {n: [] for n, _ in model.named_parameters() if not any(x in n for x in EXCLUDED)}
    for i in range(len(ids)):
        model.zero_grad()
        F.cross_entropy(model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits, labels[i:i + 1]).backward()
        for n, p in model.named_parameters():
            if n in grads:
                grads[n].append(p.grad.detach().clone())
    return {n: torch.stack(g) for n, g in grads.items()}


def test_per_sample_grads_and_gsnr_match_brute_force(tiny_model):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    ids = torch.randint(1000, 3000, (6, 10))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # padding must be handled per example
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    fast = per_sample_grads(model, ids, mask, labels)
    slow = brute_force(model, ids, mask, labels)
    assert set(fast) == set(slow) and not any("word_embeddings" in n for n in fast)
    for n in slow:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-4, atol=1e-6)
    r_fast, r_slow = gsnr(fast), gsnr(slow)
    g = slow["classifier.weight"].double()
    want = (g.mean(0) ** 2 / g.var(0, unbiased=False)).float()
    torch.testing.assert_close(r_slow["classifier.weight"], want, rtol=1e-4, atol=1e-8)
    stats_fast, stats_slow = gsnr_by_layer(r_fast), gsnr_by_layer(r_slow)
    assert {"gsnr/classifier/mean", "gsnr/encoder.layer.0/p95", "gsnr/embeddings/median"} <= set(stats_fast)
    for k in stats_slow:
        assert np.isclose(stats_fast[k], stats_slow[k], rtol=1e-3, atol=1e-9), k


def test_layer_groups():
    assert layer_group("bert.encoder.layer.11.attention.self.query.weight") == "encoder.layer.11"
    assert layer_group("bert.embeddings.LayerNorm.weight") == "embeddings"
    assert layer_group("classifier.bias") == "classifier"

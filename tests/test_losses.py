"""KD losses against hand computations."""

import math

import torch

from orchestrator.worker.losses import distillation_loss, kd_loss


def test_kd_loss_matches_hand_computation():
    zs = torch.tensor([[1.0, 2.0]])
    zt = torch.tensor([[3.0, 0.0]])
    T = 2.0
    ps = [math.exp(0.5) / (math.exp(0.5) + math.exp(1.0)), math.exp(1.0) / (math.exp(0.5) + math.exp(1.0))]
    pt = [math.exp(1.5) / (math.exp(1.5) + 1.0), 1.0 / (math.exp(1.5) + 1.0)]
    kl = sum(t * math.log(t / s) for t, s in zip(pt, ps))
    assert math.isclose(kd_loss(zs, zt, T).item(), T * T * kl, rel_tol=1e-5)


def test_kd_loss_is_zero_for_identical_logits_and_averages_over_batch():
    z = torch.randn(5, 3)
    assert kd_loss(z, z.clone(), 3.0).item() < 1e-6
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    per_row = [kd_loss(a[i:i + 1], b[i:i + 1], 2.0).item() for i in range(4)]
    assert math.isclose(kd_loss(a, b, 2.0).item(), sum(per_row) / 4, rel_tol=1e-5)


def test_distillation_loss_mixes_terms_with_alpha():
    zs, zt = torch.randn(6, 2, requires_grad=True), torch.randn(6, 2)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    out = distillation_loss(zs, y, zt, alpha=0.3, temperature=2.0, regression=False)
    ce = torch.nn.functional.cross_entropy(zs, y)
    assert torch.allclose(out["loss_hard"], ce)
    assert torch.allclose(out["loss"], 0.3 * ce + 0.7 * kd_loss(zs, zt, 2.0))
    out["loss"].backward()
    assert zs.grad is not None


def test_no_teacher_is_hard_loss_only():
    zs, y = torch.randn(3, 2), torch.tensor([0, 1, 0])
    out = distillation_loss(zs, y, None, alpha=0.5, temperature=2.0, regression=False)
    assert torch.allclose(out["loss"], torch.nn.functional.cross_entropy(zs, y))
    assert out["loss_kd"].item() == 0


def test_regression_uses_mse_to_labels_and_teacher():
    pred, y, t = torch.tensor([[1.0], [2.0]]), torch.tensor([1.5, 2.5]), torch.tensor([[0.0], [2.0]])
    out = distillation_loss(pred, y, t, alpha=0.25, temperature=5.0, regression=True)
    assert math.isclose(out["loss_hard"].item(), 0.25)  # ((0.5)^2 + (0.5)^2) / 2
    assert math.isclose(out["loss_kd"].item(), 0.5)  # (1 + 0) / 2
    assert math.isclose(out["loss"].item(), 0.25 * 0.25 + 0.75 * 0.5)


def test_transfer_rows_learn_the_soft_term_only_with_their_weight():
    zs, zt = torch.randn(4, 2, requires_grad=True), torch.randn(4, 2)
    y = torch.tensor([0, 1, -100, -100])  # the last two rows are unlabelled transfer rows
    labelled = torch.tensor([True, True, False, False])
    out = distillation_loss(zs, y, zt, alpha=0.3, temperature=2.0, regression=False, labelled=labelled,
                            transfer_weight=2.0)
    ce = torch.nn.functional.cross_entropy(zs[:2], y[:2], reduction="none")
    kd = [kd_loss(zs[i:i + 1], zt[i:i + 1], 2.0) for i in range(4)]
    by_hand = (0.3 * ce[0] + 0.7 * kd[0] + 0.3 * ce[1] + 0.7 * kd[1] + 2.0 * kd[2] + 2.0 * kd[3]) / 4
    assert torch.allclose(out["loss"], by_hand) and torch.allclose(out["loss_hard"], ce.mean())
    assert torch.allclose(out["loss_kd"], sum(kd) / 4)
    out["loss"].backward()
    assert torch.isfinite(zs.grad).all() and zs.grad[2:].abs().sum() > 0  # transfer rows do learn


def test_regression_transfer_rows_ignore_their_nan_label():
    zs, zt = torch.randn(3, 1, requires_grad=True), torch.randn(3, 1)
    y = torch.tensor([1.0, 2.5, float("nan")])
    out = distillation_loss(zs, y, zt, alpha=0.5, temperature=1.0, regression=True,
                            labelled=torch.tensor([True, True, False]), transfer_weight=1.0)
    p, t = zs.squeeze(-1), zt.squeeze(-1)
    by_hand = (0.5 * (p[0] - 1.0) ** 2 + 0.5 * (p[0] - t[0]) ** 2 + 0.5 * (p[1] - 2.5) ** 2
               + 0.5 * (p[1] - t[1]) ** 2 + (p[2] - t[2]) ** 2) / 3
    assert torch.allclose(out["loss"], by_hand)
    out["loss"].backward()
    assert torch.isfinite(zs.grad).all()

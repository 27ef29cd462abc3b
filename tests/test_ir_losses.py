"""Internal-representation losses and IR schedules against direct (loop / hand) computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from orchestrator.worker.losses import HiddenProjection, attention_kl, cls_cosine, hidden_mse
from orchestrator.common.schedule import Stage, stage_at

# ------------------------------------------------------------------------------------------ projection


def test_hidden_projection_identity_and_maps():
    torch.manual_seed(0)
    proj = HiddenProjection(student_layers=(1, 2), student_width=4, teacher_widths={4, 6, 8})
    assert sorted(proj.maps.keys()) == ["layer1_to6", "layer1_to8", "layer2_to6", "layer2_to8"]
    h = torch.randn(2, 3, 4)
    assert proj(h, 1, 4) is h  # same width: identity
    lin = proj.maps["layer2_to6"]
    assert torch.allclose(proj(h, 2, 6), h @ lin.weight.T + lin.bias)
    assert proj(h, 1, 8).shape == (2, 3, 8)
    torch.manual_seed(0)
    again = HiddenProjection((2, 1), 4, [8, 6, 4, 6])  # order and repeats do not change the init
    for key, p in proj.state_dict().items():
        assert torch.equal(p, again.state_dict()[key])
    with pytest.raises(ValueError, match="student layer 3"):
        proj(h, 3, 6)
    with pytest.raises(ValueError, match="width 5"):
        proj(h, 1, 5)
    with pytest.raises(ValueError, match="wide"):
        proj(torch.randn(2, 3, 5), 1, 6)


# --------------------------------------------------------------------------------------------- hidden

def test_hidden_mse_masks_tokens_in_numerator_and_denominator():
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 4)
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    total, count = 0.0, 0
    for b in range(2):
        for j in range(3):
            if m[b, j]:
                for w in range(4):
                    total += (s[b, j, w].item() - t[b, j, w].item()) ** 2
                    count += 1
    loss = hidden_mse(s, t, m)
    assert math.isclose(loss.item(), total / count, rel_tol=1e-5)
    loss.backward()
    assert torch.all(s.grad[0, 2] == 0) and torch.all(s.grad[1, 1:] == 0)  # masked slots get no gradient
    assert hidden_mse(s, t, torch.zeros(2, 3)).item() == 0.0
    with pytest.raises(ValueError, match="hidden_mse"):
        hidden_mse(s, t[:, :2], m)


def test_hidden_mse_accepts_half_precision_teacher():
    s = torch.tensor([[[1.0, 2.0]]])
    t = torch.tensor([[[0.0, 0.0]]], dtype=torch.float16)
    assert hidden_mse(s, t, torch.ones(1, 1)).item() == pytest.approx(2.5)


# ------------------------------------------------------------------------------------------ attention

def _kl_loop(s, t, token_mask, key_mask, eps=1e-12):
    """Direct KL(teacher || student) per head and row, averaged over heads then kept rows."""
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    B, H, K, L = s.shape
    rows = []
    for b in range(B):
        for q in range(K):
            if not token_mask[b, q]:
                continue
            per_head = []
            for h in range(H):
                kl = 0.0
                for key in range(L):
                    if not key_mask[b, key]:
                        continue
                    pt, ps = t[b, h, q, key].item(), s[b, h, q, key].item()
                    if pt > 0:
                        kl += pt * (math.log(max(pt, eps)) - math.log(max(ps, eps)))
                per_head.append(kl)
            rows.append(sum(per_head) / H)
    return sum(rows) / len(rows)


def _probs(*shape, key_mask):
    logits = torch.randn(*shape)
    logits = logits.masked_fill(key_mask[:, None, None, :] == 0, -1e4)
    return logits.softmax(-1)


def test_attention_kl_matches_loop_with_padding_and_masked_rows():
    torch.manual_seed(2)
    key_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    token_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    s = _probs(2, 2, 3, 5, key_mask=key_mask).requires_grad_()
    t = _probs(2, 2, 3, 5, key_mask=key_mask)
    t[0, 1, 0] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])  # a one-hot teacher row: 0 * log 0 terms
    loss = attention_kl(s, t, token_mask, key_mask)
    assert math.isclose(loss.item(), _kl_loop(s, t, token_mask, key_mask), rel_tol=1e-5)
    loss.backward()
    assert torch.all(s.grad[1, :, 2] == 0)  # the masked row contributes nothing
    assert attention_kl(t, t, token_mask, key_mask).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_kl_hand_value_and_zero_student_probability():
    # one row, one head, 2 keys: KL([.5, .5] || [.25, .75]) = .5 ln 2 + .5 ln(2/3)
    s = torch.tensor([[[[0.25, 0.75]]]])
    t = torch.tensor([[[[0.5, 0.5]]]])
    ones = torch.ones(1, 1), torch.ones(1, 2)
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert attention_kl(s, t, *ones).item() == pytest.approx(expected, rel=1e-6)
    s0 = torch.tensor([[[[0.0, 1.0]]]])  # log(0) is clamped, so the loss is large but finite
    value = attention_kl(s0, t, *ones).item()
    assert math.isfinite(value) and value == pytest.approx(0.5 * math.log(0.5 / 1e-12) + 0.5 * math.log(0.5), rel=1e-5)


def test_attention_kl_averages_heads_when_counts_differ():
    torch.manual_seed(3)
    key_mask = torch.tensor([[1, 1, 1, 0]])
    token_mask = torch.tensor([[1, 1]])
    s = _probs(1, 2, 2, 4, key_mask=key_mask)
    t = _probs(1, 3, 2, 4, key_mask=key_mask)
    loss = attention_kl(s, t, token_mask, key_mask)
    assert math.isclose(loss.item(), _kl_loop(s, t, token_mask, key_mask), rel_tol=1e-5)
    direct = attention_kl(s.mean(1, keepdim=True), t.mean(1, keepdim=True), token_mask, key_mask)
    assert math.isclose(loss.item(), direct.item(), rel_tol=1e-6)
    with pytest.raises(ValueError, match="attention_kl"):
        attention_kl(s, t[:, :, :1], token_mask, key_mask)


# ---------------------------------------------------------------------------------------------- [CLS]

def test_cls_cosine_hand_values():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    t = torch.tensor([[0.0, 1.0], [1.0, 0.0], [3.0, 0.0]])
    expected = ((1 - 0.0) + (1 - 1 / math.sqrt(2)) + (1 - 1.0)) / 3
    assert cls_cosine(s, t).item() == pytest.approx(expected, rel=1e-6)
    assert cls_cosine(t, -t).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="cls_cosine"):
        cls_cosine(s, t[:, :1])


# ------------------------------------------------------------------------------- losses on a real teacher

def test_student_equal_to_teacher_has_zero_ir_losses(tiny_model):
    """The trainer's path: project, gather with the teacher's indices, compare. A copy of the teacher scores 0."""
    from actors.knowledge import KnowledgeRequest, TokenBatch
    from actors.selection import gather, gather_attention
    from actors.teacher import Teacher

    teacher = Teacher(0, str(tiny_model), 2, device="cpu", attn_implementation="eager")
    ids = np.array([[101, 2023, 2003, 1037, 102, 0], [101, 7592, 102, 0, 0, 0]], dtype=np.int64)
    batch = TokenBatch(ids, (ids > 0).astype(np.int64), np.arange(2, dtype=np.int64))
    request = KnowledgeRequest(outputs=("hidden", "attentions", "cls"), student_layers=(3, 4), student_num_layers=4,
                               tokens="cls-attention-no-sep", num_tokens=3, sep_token_id=102, width="magnitude",
                               width_fraction=0.5)
    k = teacher.knowledge(batch, request)
    student = teacher.model  # the same weights play the student
    out = student(input_ids=torch.tensor(ids), attention_mask=torch.tensor(batch.attention_mask),
                  output_hidden_states=True, output_attentions=True)
    proj = HiddenProjection(request.student_layers, 32, {teacher.dims()["hidden_size"]})
    ti, tm = torch.from_numpy(k.token_index), torch.from_numpy(k.token_mask)
    for j, l in enumerate(request.student_layers):
        h = proj(out.hidden_states[l], l, 32)  # [B, L, D_t]
        s_hidden = gather(h, ti, torch.from_numpy(k.width_index[:, j]))  # [B, K, W]
        assert hidden_mse(s_hidden, torch.from_numpy(k.hidden[:, j]), tm).item() < 1e-10
        s_attn = gather_attention(out.attentions[l - 1], ti)  # [B, H, K, L]
        assert abs(attention_kl(s_attn, torch.from_numpy(k.attentions[:, j]), tm,
                                torch.from_numpy(batch.attention_mask)).item()) < 1e-5
        assert cls_cosine(h[:, 0], torch.from_numpy(k.cls[:, j])).item() < 1e-5


# ------------------------------------------------------------------------------------------- schedules

def _stages(total, schedule, layers=(2, 4, 6), ir_fraction=0.5):
    return [stage_at(s, total, schedule, layers, ir_fraction) for s in range(total)]


def test_schedule_none_and_joint():
    assert _stages(3, "none", ()) == [Stage((), True)] * 3
    assert _stages(3, "joint") == [Stage((2, 4, 6), True)] * 3


def test_schedule_all():
    # round(0.5 * 5) = 3 (half up): three IR steps with all layers, then soft labels
    assert _stages(5, "all", ir_fraction=0.5) == [Stage((2, 4, 6), False)] * 3 + [Stage((), True)] * 2


def test_schedule_progressive_and_stacked():
    # 12 steps, 6 IR steps in 3 chunks of 2
    assert _stages(12, "progressive") == ([Stage((2,), False)] * 2 + [Stage((4,), False)] * 2
                                          + [Stage((6,), False)] * 2 + [Stage((), True)] * 6)
    assert _stages(12, "stacked") == ([Stage((2,), False)] * 2 + [Stage((2, 4), False)] * 2
                                      + [Stage((2, 4, 6), False)] * 2 + [Stage((), True)] * 6)
    # 7 IR steps in 3 chunks: sizes 3, 2, 2 (floor(step * 3 / 7))
    layers = [s.layers for s in _stages(10, "progressive", ir_fraction=0.7)]
    assert layers == [(2,)] * 3 + [(4,)] * 2 + [(6,)] * 2 + [()] * 3
    assert _stages(3, "progressive", ir_fraction=1.0) == [Stage((2,), False), Stage((4,), False), Stage((6,), False)]


@pytest.mark.parametrize("args, match", [
    ((0, 10, "cyclic", (1,), 0.5), "schedule"),
    ((10, 10, "all", (1,), 0.5), "step"),
    ((-1, 10, "all", (1,), 0.5), "step"),
    ((0, 0, "all", (1,), 0.5), "total"),
    ((0, 10, "joint", (), 0.5), "student_layers"),
    ((0, 10, "stacked", (2, 1), 0.5), "student_layers"),
    ((0, 10, "all", (1,), 0.0), "ir_fraction"),
    ((0, 10, "all", (1,), 1.5), "ir_fraction"),
    ((0, 4, "progressive", (1, 2, 3), 0.5), "ir_fraction"),  # 2 IR steps for 3 stages
])
def test_schedule_errors(args, match):
    with pytest.raises(ValueError, match=match):
        stage_at(*args)

"""Knowledge selection (depth, length, width) against hand-worked examples, and the Teacher serving it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from actors import selection
from actors.knowledge import Knowledge, KnowledgeRequest, TokenBatch
from actors.selection import (gather, gather_attention, hsk_fraction, kept_width, map_layer, map_layers,
                              select_tokens, select_width, top_layers)

SEP = 102

# two examples of length 6: row 0 has 5 real tokens ending in [SEP]; row 1 is short (3 real, [SEP] at 2)
IDS = torch.tensor([[101, 11, 12, 13, SEP, 0],
                    [101, 21, SEP, 0, 0, 0]])
MASK = (IDS > 0).long()
# hand-made [CLS] attention; padding gets the highest scores so a bug that selects it shows
CLS_ATT = torch.tensor([[0.10, 0.30, 0.05, 0.30, 0.20, 0.90],
                        [0.20, 0.10, 0.60, 0.80, 0.90, 0.90]])


# ---------------------------------------------------------------------------------------------- depth

def test_map_layers_round_half_up_and_clamp():
    assert map_layers((1, 2), 2, 6) == (3, 6)
    assert map_layers((1, 2, 3, 4), 4, 3) == (1, 2, 2, 3)  # 0.75, 1.5 (half up), 2.25, 3
    assert map_layers((1, 2, 3), 3, 12) == (4, 8, 12)
    assert map_layer(1, 6, 1) == 1  # 1/6 rounds to 0, clamped to 1
    assert map_layers((1, 2, 3, 4), 4, 2) == (1, 1, 2, 2)  # 0.5 -> 1, 1.5 -> 2
    with pytest.raises(ValueError, match="outside"):
        map_layer(3, 2, 6)
    with pytest.raises(ValueError, match="teacher_num_layers"):
        map_layer(1, 2, 0)


def test_top_layers():
    assert top_layers(6, 1) == (6,)
    assert top_layers(6, 3) == (4, 5, 6)
    assert top_layers(4, 4) == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="k = 0"):
        top_layers(4, 0)
    with pytest.raises(ValueError, match="k = 5"):
        top_layers(4, 5)


# --------------------------------------------------------------------------------------------- length

def _sel(k, how):
    index, mask = select_tokens(MASK, k, how, CLS_ATT, IDS, SEP)
    return index.tolist(), mask.tolist()


def test_select_tokens_all_and_first():
    index, mask = select_tokens(MASK, None, "all")
    assert index.tolist() == [list(range(6))] * 2 and mask.tolist() == MASK.tolist()
    assert _sel(3, "first") == ([[0, 1, 2], [0, 1, 2]], [[1, 1, 1], [1, 1, 1]])
    assert _sel(4, "first") == ([[0, 1, 2, 3], [0, 1, 2, 0]], [[1, 1, 1, 1], [1, 1, 1, 0]])  # short row pads
    assert _sel(8, "first") == ([[0, 1, 2, 3, 4, 0, 0, 0], [0, 1, 2, 0, 0, 0, 0, 0]],
                                [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]])  # K > L


def test_select_tokens_first_with_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    index, kept = select_tokens(mask, 2, "first")
    assert index.tolist() == [[2, 3]] and kept.tolist() == [[1, 1]]


def test_select_tokens_cls_attention_ties_to_lower_position_and_skips_padding():
    # row 0: real scores .10 .30 .05 .30 .20 -> top 3 = pos 1, 3 (tie), 4; row 1: all 3 real tokens
    assert _sel(3, "cls-attention") == ([[1, 3, 4], [0, 1, 2]], [[1, 1, 1], [1, 1, 1]])
    # K = 1: positions 1 and 3 tie at .30; the lower wins
    assert _sel(1, "cls-attention") == ([[1], [2]], [[1], [1]])
    assert _sel(4, "cls-attention") == ([[0, 1, 3, 4], [0, 1, 2, 0]], [[1, 1, 1, 1], [1, 1, 1, 0]])


def test_select_tokens_cls_attention_no_sep():
    # row 0 without [SEP] (pos 4): .30 (1), .30 (3), .10 (0); row 1 without [SEP] (pos 2): only 0, 1 remain
    assert _sel(3, "cls-attention-no-sep") == ([[0, 1, 3], [0, 1, 0]], [[1, 1, 1], [1, 1, 0]])


def test_cls_attention_averages_heads_and_layers():
    a1 = torch.zeros(1, 2, 3, 3)
    a1[0, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    a1[0, 1, 0] = torch.tensor([0.0, 1.0, 0.0])
    a2 = torch.zeros(1, 2, 3, 3)
    a2[0, :, 0] = torch.tensor([0.0, 0.0, 1.0])
    a2[0, :, 1] = 5.0  # other query rows are ignored
    assert torch.allclose(selection.cls_attention([a1, a2]), torch.tensor([[0.25, 0.25, 0.5]]))


def test_select_tokens_errors():
    with pytest.raises(ValueError, match="tokens"):
        select_tokens(MASK, 3, "last")
    with pytest.raises(ValueError, match="num_tokens"):
        select_tokens(MASK, None, "first")
    with pytest.raises(ValueError, match="cls_attention"):
        select_tokens(MASK, 3, "cls-attention")
    with pytest.raises(ValueError, match="sep_token_id"):
        select_tokens(MASK, 3, "cls-attention-no-sep", CLS_ATT)


# ---------------------------------------------------------------------------------------------- width

def test_kept_width():
    assert kept_width(32, 0.25) == 8
    assert kept_width(10, 0.25) == 3  # 2.5 rounds up
    assert kept_width(10, 0.01) == 1  # at least one
    assert kept_width(384, 1.0) == 384
    with pytest.raises(ValueError, match="width_fraction"):
        kept_width(10, 0.0)


def test_select_width_random_is_fixed_by_seed():
    a = select_width("random", 32, 0.25, seed=3)
    expected = np.sort(np.random.default_rng(3).choice(32, size=8, replace=False))
    assert a.tolist() == expected.tolist()
    assert select_width("random", 32, 0.25, seed=3).tolist() == a.tolist()  # every batch, every teacher
    assert select_width("random", 32, 0.25, seed=4).tolist() != a.tolist()
    assert a.dtype == torch.int64 and a.tolist() == sorted(set(a.tolist()))


def test_select_width_even_and_all():
    assert select_width("even", 10, 0.5).tolist() == [0, 2, 4, 6, 8]
    assert select_width("even", 10, 0.3).tolist() == [0, 3, 6]
    assert select_width("even", 8, 1.0).tolist() == list(range(8))
    assert select_width("all", 5, 1.0).tolist() == list(range(5))


def test_select_width_magnitude_uses_kept_tokens_only():
    # [B=2, K=2, D=4]; the masked slot (row 1, slot 1) would make dim 0 the largest if it counted
    h = torch.tensor([[[1.0, -3.0, 0.5, 2.0], [1.0, 3.0, -0.5, 2.0]],
                      [[1.0, -1.0, 0.0, -4.0], [100.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # mean |h| over the 3 kept slots: dim0 1, dim1 7/3, dim2 1/3, dim3 8/3 -> top 2 = dims 1, 3
    assert select_width("magnitude", 4, 0.5, hidden=h, token_mask=mask).tolist() == [1, 3]
    assert select_width("magnitude", 4, 0.25, hidden=h).tolist() == [0]  # unmasked: dim0 = 103/4
    with pytest.raises(ValueError, match="magnitude"):
        select_width("magnitude", 4, 0.5)
    with pytest.raises(ValueError, match="width"):
        select_width("widest", 4, 0.5)


# --------------------------------------------------------------------------------------------- gather

def test_gather_matches_loops_and_keeps_gradients():
    h = torch.arange(2 * 5 * 4, dtype=torch.float32).reshape(2, 5, 4).requires_grad_()
    ti = torch.tensor([[4, 0, 2], [1, 1, 0]])
    wi = torch.tensor([[3, 1], [0, 2]])
    out = gather(h, ti, wi)
    assert out.shape == (2, 3, 2)
    for b in range(2):
        for j in range(3):
            for w in range(2):
                assert out[b, j, w] == h[b, ti[b, j], wi[b, w]]
    assert torch.equal(gather(h, ti), torch.stack([h[b, ti[b]] for b in range(2)]))
    assert torch.equal(gather(h, ti, torch.tensor([3, 1])), gather(h, ti, torch.tensor([[3, 1], [3, 1]])))
    out.sum().backward()
    assert h.grad.sum() == 12
    with pytest.raises(ValueError, match="token_index"):
        gather(h, ti[:1])


def test_gather_attention_takes_query_rows():
    a = torch.rand(2, 3, 5, 5)
    ti = torch.tensor([[4, 0], [2, 2]])
    out = gather_attention(a, ti)
    assert out.shape == (2, 3, 2, 5)
    for b in range(2):
        for j in range(2):
            assert torch.equal(out[b, :, j], a[b, :, ti[b, j]])


def test_hsk_fraction():
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])  # 5 real tokens
    assert hsk_fraction(6 * 5 * 384, mask, 6, 384) == 1.0
    assert hsk_fraction(1 * 2 * 10, torch.tensor(mask), 4, 20) == pytest.approx(20 / (4 * 5 * 20))
    with pytest.raises(ValueError, match="real tokens"):
        hsk_fraction(1, np.zeros((2, 3)), 4, 20)


# -------------------------------------------------------------------------------------------- request

def test_default_request_is_logits_float32():
    r = KnowledgeRequest().check()
    assert r.outputs == ("logits",) and r.wire_dtype == "float32" and not r.needs_layers
    assert KnowledgeRequest(outputs=("cls",), student_layers=(1,), student_num_layers=1).needs_layers


@pytest.mark.parametrize("kwargs, match", [
    (dict(outputs=()), "outputs is empty"),
    (dict(outputs=("logits", "probs")), "unknown"),
    (dict(outputs=("logits", "logits")), "repeats"),
    (dict(outputs=("hidden",), student_num_layers=4), "need student_layers"),
    (dict(outputs=("hidden",), student_layers=(4,)), "student_num_layers must be set"),
    (dict(outputs=("hidden",), student_layers=(3, 2), student_num_layers=4), "ascending"),
    (dict(outputs=("hidden",), student_layers=(2, 5), student_num_layers=4), r"lie in \[1, student_num_layers"),
    (dict(tokens="last"), "tokens"),
    (dict(tokens="first"), "num_tokens"),
    (dict(tokens="first", num_tokens=0), "num_tokens"),
    (dict(num_tokens=8), "num_tokens = 8 has no effect"),
    (dict(tokens="cls-attention-no-sep", num_tokens=8), "sep_token_id is required"),
    (dict(width="widest"), "width"),
    (dict(width="random", width_fraction=0.0), "width_fraction"),
    (dict(width="random", width_fraction=1.5), "width_fraction"),
    (dict(width_fraction=0.5), "needs a width mode"),
    (dict(width="random", width_fraction=0.5, width_seed=-1), "width_seed"),
    (dict(wire_dtype="float64"), "wire_dtype"),
])
def test_request_check_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KnowledgeRequest(**kwargs).check()


def test_request_fingerprint_subset_and_lists():
    r = KnowledgeRequest(outputs=["cls", "logits", "hidden"], student_layers=[2, 4], student_num_layers=4,
                         tokens="first", num_tokens=8, width="even", width_fraction=0.5).check()
    assert r.outputs == ("cls", "logits", "hidden") and r.student_layers == (2, 4)  # lists become tuples
    hash(r)
    fp = r.fingerprint()
    assert json.loads(json.dumps(fp)) == fp
    assert fp["outputs"] == ["logits", "hidden", "cls"]  # canonical order
    assert set(fp) == {"outputs", "student_layers", "student_num_layers", "tokens", "num_tokens", "sep_token_id",
                       "width", "width_fraction", "width_seed", "wire_dtype"}
    assert fp == KnowledgeRequest(outputs=("logits", "hidden", "cls"), student_layers=(2, 4), student_num_layers=4,
                                  tokens="first", num_tokens=8, width="even", width_fraction=0.5).fingerprint()
    one = r.subset(student_layers=(2,))
    assert one.student_layers == (2,) and one.outputs == r.outputs and one.num_tokens == 8
    soft = r.subset(outputs=("logits",))
    assert soft.outputs == ("logits",) and not soft.needs_layers
    assert r.subset(student_layers=()).outputs == ("logits",)  # no layers: per-layer outputs dropped
    with pytest.raises(ValueError, match="not in this request"):
        r.subset(outputs=("attentions",))
    with pytest.raises(ValueError, match="not in this request"):
        r.subset(student_layers=(3,))
    with pytest.raises(ValueError, match="outputs is empty"):
        r.subset(outputs=("hidden",), student_layers=())


def test_knowledge_backwards_compatible_and_nbytes():
    k = Knowledge(0, np.zeros((2, 3), np.float32), 0.1)
    assert k.hidden is None and k.wait_s == 0.0 and k.nbytes() == 24
    k.token_index = np.zeros((2, 4), np.int64)
    assert k.nbytes() == 24 + 64


# -------------------------------------------------------------------------------------------- teacher

@pytest.fixture(scope="module")
def teachers(tiny_model, tmp_path_factory):
    """A 4-layer 32-wide 2-head teacher (the shared tiny model) and a 2-layer 48-wide 3-head one."""
    from actors.teacher import Teacher
    from tests.tiny import make_tiny_bert

    small = make_tiny_bert(tmp_path_factory.mktemp("t2") / "bert", num_layers=2, hidden=48, heads=3, seed=1)
    return (Teacher(0, str(tiny_model), 2, device="cpu", attn_implementation="eager"),
            Teacher(1, str(small), 2, device="cpu", attn_implementation="eager"))


def _batch():
    ids = IDS.numpy().astype(np.int64)
    return TokenBatch(ids, (ids > 0).astype(np.int64), np.arange(2, dtype=np.int64))


def _reference(teacher, batch):
    out = teacher.model(input_ids=torch.tensor(batch.input_ids), attention_mask=torch.tensor(batch.attention_mask),
                        output_hidden_states=True, output_attentions=True)
    return out.hidden_states, out.attentions


@pytest.mark.parametrize("tokens, k_tokens, width", [("cls-attention-no-sep", 3, "magnitude"),
                                                     ("first", 4, "random"), ("all", None, "even")])
def test_teacher_serves_the_selection(teachers, tokens, k_tokens, width):
    batch = _batch()
    request = KnowledgeRequest(outputs=("logits", "hidden", "attentions", "cls"), student_layers=(1, 2),
                               student_num_layers=2, tokens=tokens, num_tokens=k_tokens, sep_token_id=SEP,
                               width=width, width_fraction=0.25, width_seed=7)
    for teacher, layers in zip(teachers, [(2, 4), (1, 2)]):  # heterogeneous depth: each maps to its own
        dims = teacher.dims()
        D, H = dims["hidden_size"], dims["num_heads"]
        K = 6 if tokens == "all" else k_tokens
        W = kept_width(D, 0.25)
        k = teacher.knowledge(batch, request)
        with torch.inference_mode():
            hs, attn = _reference(teacher, batch)
        assert k.layers.tolist() == list(layers)
        assert k.logits.shape == (2, 2)
        assert k.hidden.shape == (2, 2, K, W) and k.hidden.dtype == np.float32
        assert k.width_index.shape == (2, 2, W) and k.token_index.shape == (2, K) == k.token_mask.shape
        assert k.attentions.shape == (2, 2, H, K, 6) and k.cls.shape == (2, 2, D)
        expected_index, expected_mask = select_tokens(
            torch.tensor(batch.attention_mask), k_tokens, tokens, selection.cls_attention(attn), IDS, SEP)
        assert k.token_index.tolist() == expected_index.tolist()
        assert k.token_mask.tolist() == expected_mask.tolist()
        if width == "random":
            assert k.width_index[0, 0].tolist() == select_width("random", D, 0.25, seed=7).tolist()
        ti = torch.from_numpy(k.token_index)
        for j, l in enumerate(layers):
            wi = torch.from_numpy(k.width_index[:, j])
            torch.testing.assert_close(torch.from_numpy(k.hidden[:, j]), gather(hs[l], ti, wi), rtol=0, atol=1e-6)
            torch.testing.assert_close(torch.from_numpy(k.cls[:, j]), hs[l][:, 0], rtol=0, atol=1e-6)
            for b in range(2):
                for q in range(K):
                    torch.testing.assert_close(torch.from_numpy(k.attentions[b, j, :, q]), attn[l - 1][b, :, ti[b, q]],
                                               rtol=0, atol=1e-6)
        if width == "magnitude":  # per layer: dims with the largest mean |h| over the kept tokens
            for j, l in enumerate(layers):
                kept = gather(hs[l], ti)
                expected = select_width("magnitude", D, 0.25, hidden=kept, token_mask=torch.from_numpy(k.token_mask))
                assert k.width_index[0, j].tolist() == k.width_index[1, j].tolist() == expected.tolist()
        if tokens == "all":
            assert k.token_index.tolist() == [list(range(6))] * 2
            assert k.token_mask.tolist() == batch.attention_mask.tolist()


def test_teacher_full_width_hidden_and_outputs_on_demand(teachers):
    teacher = teachers[0]
    batch = _batch()
    k = teacher.knowledge(batch, KnowledgeRequest(outputs=("hidden",), student_layers=(1,), student_num_layers=1))
    with torch.inference_mode():
        hs, _ = _reference(teacher, batch)
    assert k.logits is None and k.attentions is None and k.cls is None and k.width_index is None
    assert k.hidden.shape == (2, 1, 6, 32) and k.layers.tolist() == [4]
    torch.testing.assert_close(torch.from_numpy(k.hidden[:, 0]), hs[4], rtol=0, atol=1e-6)
    plain = teacher.knowledge(batch)  # logits only, as before
    assert plain.logits.shape == (2, 2) and plain.hidden is None and plain.token_index is None
    assert plain.nbytes() == 16


def test_teacher_wire_dtypes(teachers):
    batch = _batch()
    base = dict(outputs=("logits", "hidden", "attentions", "cls"), student_layers=(2,), student_num_layers=2,
                tokens="first", num_tokens=2)
    full = teachers[1].knowledge(batch, KnowledgeRequest(**base))
    half = teachers[1].knowledge(batch, KnowledgeRequest(**base, wire_dtype="float16"))
    bf = teachers[1].knowledge(batch, KnowledgeRequest(**base, wire_dtype="bfloat16"))
    for name in ("logits", "hidden", "attentions", "cls"):
        f32, f16, b16 = getattr(full, name), getattr(half, name), getattr(bf, name)
        assert f16.dtype == np.float16 and b16.dtype == np.float32
        np.testing.assert_array_equal(f16, f32.astype(np.float16))
        rounded = torch.from_numpy(f32).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(b16, rounded)
    assert half.token_index.dtype == np.int64 and half.nbytes() < full.nbytes()


def test_teacher_rejects_bad_requests(teachers, tiny_model):
    from actors.teacher import Teacher

    with pytest.raises(ValueError, match="num_tokens"):
        teachers[0].knowledge(_batch(), KnowledgeRequest(tokens="first"))
    sdpa = Teacher(2, str(tiny_model), 2, device="cpu", attn_implementation="sdpa")
    with pytest.raises(ValueError, match="eager"):
        sdpa.knowledge(_batch(), KnowledgeRequest(outputs=("attentions",), student_layers=(1,), student_num_layers=1))
    k = sdpa.knowledge(_batch(), KnowledgeRequest(outputs=("hidden",), student_layers=(1,), student_num_layers=1,
                                                   tokens="first", num_tokens=2))
    assert k.hidden.shape == (2, 1, 2, 32)


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 0.05), ("float16", 0.01)])
def test_teacher_autocast_answers_close_to_float32_as_float32(teachers, tiny_model, dtype, tol):
    """`teachers.autocast`: the forward pass in half precision (the GPU path's bf16 inference, run here on
    CPU); logits and hidden states still leave as float32, close to the float32 teacher's."""
    from actors.teacher import Teacher

    half = Teacher(3, str(tiny_model), 2, device="cpu", attn_implementation="eager", autocast=dtype)
    request = KnowledgeRequest(outputs=("logits", "hidden"), student_layers=(1,), student_num_layers=1,
                               tokens="all", width="all")
    ref, got = teachers[0].knowledge(_batch(), request), half.knowledge(_batch(), request)
    assert got.logits.dtype == np.float32 and got.hidden.dtype == np.float32
    np.testing.assert_allclose(got.logits, ref.logits, atol=tol)
    np.testing.assert_allclose(got.hidden, ref.hidden, atol=10 * tol)
    assert not np.array_equal(got.hidden, ref.hidden)  # it did run in half precision
    with pytest.raises(ValueError, match="autocast"):
        Teacher(4, str(tiny_model), 2, device="cpu", autocast="int8")

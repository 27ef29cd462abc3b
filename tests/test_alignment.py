"""Token alignment across tokenizers by character offsets (actors.alignment), on two real tokenizers of two
families: MiniLM's BERT WordPiece (the packaged model) and the tiny MPNet's own WordPiece (trained on SST-2 with
a 1,200-token vocabulary, so it splits most words finer). Every expected match below was worked out by hand
from the two tokenizations printed in the comments."""

from __future__ import annotations

import numpy as np
import pytest

from actors.alignment import align, align_matrix, token_spans
from actors.errors import TeacherError
from actors.models import load_tokenizer
from tests.tiny import make_tiny_mpnet


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return load_tokenizer("minilm"), load_tokenizer(str(make_tiny_mpnet(tmp_path_factory.mktemp("mp") / "mp")))


def matches(student, teacher, a, b=None, max_length=64):
    """(student token, teacher token) strings of every match, and the unmatched counts."""
    s_ids = student(a, b, truncation=True, max_length=max_length)["input_ids"]
    t_ids = teacher(a, b, truncation=True, max_length=max_length)["input_ids"]
    st, tt = student.convert_ids_to_tokens(s_ids), teacher.convert_ids_to_tokens(t_ids)
    spans_s = token_spans(student, [a], None if b is None else [b], max_length)[0]
    spans_t = token_spans(teacher, [a], None if b is None else [b], max_length)[0]
    assert (len(spans_s), len(spans_t)) == (len(st), len(tt))
    al = align(spans_s, spans_t)
    return [(st[j], tt[i]) for j, i in al.pairs], al.unmatched_student, al.unmatched_teacher


def test_accents_numbers_long_words_and_emoji(tokenizers):
    # student: [CLS] de ##ja vu : 3 . 14 ghz , un ##bel ##ie ##va ##bly [UNK] ! [SEP]
    # teacher: <s> de ##j ##a v ##u : 3 . 1 ##4 g ##h ##z , un ##be ##l ##ie ##v ##ably <unk> ! </s>
    got, lost_s, lost_t = matches(*tokenizers, "Déjà vu: 3.14 GHz, unbelievably 😀!")
    assert got == [("[CLS]", "<s>"), ("de", "de"), ("##ja", "##j"), ("##ja", "##a"), ("vu", "v"), ("vu", "##u"),
                   (":", ":"), ("3", "3"), (".", "."), ("14", "1"), ("14", "##4"), ("ghz", "g"), ("ghz", "##h"),
                   ("ghz", "##z"), (",", ","), ("un", "un"), ("##bel", "##be"), ("##bel", "##l"), ("##ie", "##ie"),
                   # crossing spans: ##va (chars 26-28) and ##bly (28-31) against ##v (26-27) and ##ably (27-31)
                   ("##va", "##v"), ("##va", "##ably"), ("##bly", "##ably"),
                   ("[UNK]", "<unk>"), ("!", "!"), ("[SEP]", "</s>")]
    assert (lost_s, lost_t) == (0, 0)


def test_sentence_pairs_map_separators_by_boundary(tokenizers):
    # student: [CLS] z ##zy ##z ##x rocks [SEP] uber - cool ? [SEP]
    # teacher: <s> z ##z ##y ##z ##x rock ##s </s> </s> u ##ber - co ##ol ? </s>
    got, lost_s, lost_t = matches(*tokenizers, "Zzyzx rocks", "Über-cool?")
    assert got == [("[CLS]", "<s>"), ("z", "z"), ("##zy", "##z"), ("##zy", "##y"), ("##z", "##z"), ("##x", "##x"),
                   ("rocks", "rock"), ("rocks", "##s"), ("[SEP]", "</s>"), ("[SEP]", "</s>"),  # the middle pair
                   ("uber", "u"), ("uber", "##ber"), ("-", "-"), ("cool", "co"), ("cool", "##ol"), ("?", "?"),
                   ("[SEP]", "</s>")]
    assert (lost_s, lost_t) == (0, 0)


def test_truncation_leaves_tokens_unmatched_and_counts_them(tokenizers):
    student, teacher = tokenizers
    # max_length 8, longest-first. student: [CLS] z ##zy ##z ##x [SEP] uber [SEP]
    #                              teacher: <s> z ##z </s> </s> u ##ber </s>
    got, lost_s, lost_t = matches(student, teacher, "Zzyzx rocks the naïve crowd", "Über", max_length=8)
    assert got == [("[CLS]", "<s>"), ("z", "z"), ("##zy", "##z"), ("[SEP]", "</s>"), ("[SEP]", "</s>"),
                   ("uber", "u"), ("uber", "##ber"), ("[SEP]", "</s>")]
    assert (lost_s, lost_t) == (2, 0)  # ##z and ##x: the teacher cut them
    _, lost_s, lost_t = matches(teacher, student, "Zzyzx rocks the naïve crowd", "Über", max_length=8)
    assert (lost_s, lost_t) == (0, 2)  # the other way round the teacher's ##z ##x have no student token


def test_align_matrix_averages_and_zeroes_unmatched_rows(tokenizers):
    student, teacher = tokenizers
    texts = ["Déjà vu: 3.14 GHz", "Zzyzx rocks the naïve crowd"]
    spans_s, spans_t = token_spans(student, texts, None, 8), token_spans(teacher, texts, None, 8)
    pairs = [align(s, t).pairs for s, t in zip(spans_s, spans_t)]
    a = align_matrix(pairs, 10, 9)  # padded wider than any row
    assert a.shape == (2, 10, 9) and a.dtype == np.float32
    sums = a.sum(axis=2)
    matched = np.zeros((2, 10), bool)
    for b, p in enumerate(pairs):
        matched[b, p[:, 0]] = True
    np.testing.assert_allclose(sums[matched], 1.0, rtol=1e-6)
    assert (sums[~matched] == 0).all() and matched[:, 8:].sum() == 0  # padding rows stay zero
    # row 0 student "##ja" (position 2) averages the teacher's "##j" and "##a" (positions 2 and 3)
    np.testing.assert_allclose(a[0, 2, [2, 3]], [0.5, 0.5])
    h = np.random.default_rng(0).normal(size=(2, 9, 4)).astype(np.float32)
    np.testing.assert_allclose((a @ h)[0, 2], h[0, 2:4].mean(axis=0), rtol=1e-5)


def test_a_slow_tokenizer_is_refused_by_name(tmp_path):
    from transformers import BertTokenizerLegacy  # transformers 5's pure-Python (slow) BERT tokenizer

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
    slow = BertTokenizerLegacy(vocab_file=str(tmp_path / "vocab.txt"))
    assert not slow.is_fast
    with pytest.raises(TeacherError, match="not a fast tokenizer and gives no character offsets"):
        token_spans(slow, ["a b"], None, 8)

"""Teachers of other model families, each with its own tokenizer: the packaged MPNet source, depth cuts per
family, per-tokenizer views of the training rows, capacity, and a mixed BERT + MPNet ensemble end to end on
real Ray and MLflow (tiny random models; the MPNet one with a WordPiece tokenizer of its own)."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from actors.errors import SkdError, TeacherError
from actors.knowledge import KnowledgeRequest, TokenBatch
from actors.models import (DEPTH_KEYS, _mpnet_parts, assemble_split_zip, check_cut, count_parameters,
                           forward_flops_per_token, load_classifier, load_tokenizer, vocab_fingerprint)
from actors.teacher import Teacher
from orchestrator.config.load import load_config
from orchestrator.driver.inputs import prepare_inputs
from orchestrator.driver.views import with_views
from tests.conftest import tiny_raw
from tests.tiny import make_tiny_mpnet


@pytest.fixture(scope="module")
def tiny_mpnet(tmp_path_factory):
    return make_tiny_mpnet(tmp_path_factory.mktemp("mpnet") / "mpnet")


def test_the_two_tokenizers_really_differ(tiny_model, tiny_mpnet):
    bert, mpnet = load_tokenizer(str(tiny_model)), load_tokenizer(str(tiny_mpnet))
    a, b = bert("a gripping , funny film")["input_ids"], mpnet("a gripping , funny film")["input_ids"]
    assert a[0] == 101 and a[-1] == 102 and b[0] == 0 and b[-1] == 2  # [CLS] .. [SEP] vs <s> .. </s>
    assert a[1:-1] != b[1:-1] and vocab_fingerprint(bert) != vocab_fingerprint(mpnet)
    pair = mpnet("one", "two")["input_ids"]
    assert pair[0] == 0 and pair.count(2) == 3  # <s> A </s></s> B </s>


def test_views_pad_each_tokenizer_apart(make_config, tiny_mpnet):
    cfg = make_config()
    inputs = prepare_inputs(cfg.data, cfg.task, cfg.student.init)
    mp_vocab = vocab_fingerprint(load_tokenizer(str(tiny_mpnet)))
    viewed = with_views(inputs, {mp_vocab: str(tiny_mpnet), inputs.vocab: cfg.student.init})
    assert list(viewed.train.views) == [mp_vocab] and not inputs.train.views  # the student's needs no view
    assert with_views(viewed, {mp_vocab: str(tiny_mpnet)}) is viewed  # tokenized once
    rows = np.array([3, 0, 7])
    batch = TokenBatch.of(viewed.train.batch(rows, inputs.pad_id)).check()
    mine = batch.view(mp_vocab)
    expected = load_tokenizer(str(tiny_mpnet))([viewed.train_examples.text_a[i] for i in rows], truncation=True,
                                                max_length=cfg.data.max_length)["input_ids"]
    for r, ids in enumerate(expected):
        n = len(ids)
        assert mine.input_ids[r, :n].tolist() == ids and (mine.input_ids[r, n:] == 1).all()  # <pad> = 1
        assert mine.attention_mask[r].sum() == n
    assert mine.input_ids.shape[1] == max(map(len, expected)) and (mine.ids == batch.ids).all()
    assert batch.view(inputs.vocab).input_ids is batch.input_ids
    with pytest.raises(ValueError, match="no view for tokenizer"):
        batch.view("0" * 16)


def test_teacher_answers_in_its_own_tokens(make_config, tiny_model, tiny_mpnet):
    """An MPNet teacher behind a BERT student: its soft labels are those of its own tokenization, and it
    refuses hidden states (they are over other tokens than the student's)."""
    cfg = make_config()
    inputs = prepare_inputs(cfg.data, cfg.task, cfg.student.init)
    mp_vocab = vocab_fingerprint(load_tokenizer(str(tiny_mpnet)))
    viewed = with_views(inputs, {mp_vocab: str(tiny_mpnet)})
    rows = np.arange(8)
    batch = TokenBatch.of(viewed.train.batch(rows, inputs.pad_id))
    teacher = Teacher(0, str(tiny_mpnet), 2, device="cpu", vocab=mp_vocab)
    got = teacher.knowledge(batch).logits
    tok, model = load_tokenizer(str(tiny_mpnet)), load_classifier(str(tiny_mpnet), 2).eval()
    enc = tok([viewed.train_examples.text_a[i] for i in rows], truncation=True, max_length=cfg.data.max_length,
              padding=True, return_tensors="pt")
    with torch.inference_mode():
        want = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    hidden = KnowledgeRequest(outputs=("logits", "hidden"), student_layers=(1,), student_num_layers=1)
    with pytest.raises(ValueError, match="another tokenizer"):
        teacher.knowledge(batch, hidden)


def test_depth_cuts_per_family(tiny_model, tiny_mpnet, tmp_path):
    assert load_classifier(str(tiny_mpnet), 2, num_layers=2).config.num_hidden_layers == 2
    with pytest.raises(TeacherError, match=r"teachers.members\[mp\].num_layers = 9, but .* has only 4 layers"):
        check_cut(str(tiny_mpnet), 9, "teachers.members[mp].num_layers")
    from transformers import AlbertConfig

    AlbertConfig(num_hidden_layers=2).save_pretrained(tmp_path / "albert")  # a family without cuts: config only
    with pytest.raises(TeacherError, match="depth cuts are supported for .*'albert'"):
        check_cut(str(tmp_path / "albert"), 1, "student.num_layers")
    check_cut(str(tmp_path / "albert"), None, "student.num_layers")  # the whole model is always fine
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=32, n_layers=3, n_heads=2,
                                                         hidden_dim=64)).save_pretrained(tmp_path / "distil")
    assert load_classifier(str(tmp_path / "distil"), 2, num_layers=1).config.n_layers == 1
    assert DEPTH_KEYS["distilbert"] == "n_layers"


def test_forward_flops_per_token_by_hand(tiny_model):
    model = load_classifier(str(tiny_model), 2)  # BERT 4 x 32, vocab 30,522, 512 positions
    emb = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    n = count_parameters(model) - emb
    assert forward_flops_per_token(model, 64) == 2 * n + 2 * 4 * 64 * 32
    assert emb > 30522 * 32  # the word embeddings are left out of N (Kaplan et al.)


def test_mpnet_parts_missing_names_the_command():
    with pytest.raises(TeacherError, match="make mpnet"):
        _mpnet_parts(("skd-no-such-part-001",))


def test_split_zip_assembled_once_atomically(tmp_path):
    src = tmp_path / "src.zip"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("model/config.json", json.dumps({"a": 1}))
        zf.writestr("model/weights.bin", bytes(range(256)) * 400)
        zf.writestr("other/skip.txt", "not ours")
    blob = src.read_bytes()
    parts = []
    for i, cut in enumerate(range(0, len(blob), len(blob) // 3 + 1), 1):
        parts.append(tmp_path / f"src.zip.00{i}")
        parts[-1].write_bytes(blob[cut: cut + len(blob) // 3 + 1])
    target = tmp_path / "models" / "m"
    assert assemble_split_zip(parts, target, "model") == target
    assert json.loads((target / "config.json").read_text()) == {"a": 1} and not (target / "skip.txt").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["m"]  # no work folder left
    stamp = (target / "weights.bin").stat().st_mtime_ns
    assemble_split_zip(parts, target, "model")  # reused, not rewritten
    assert (target / "weights.bin").stat().st_mtime_ns == stamp
    with pytest.raises(TeacherError, match="was not assembled by skd"):
        assemble_split_zip(parts[:2], target, "model")  # other parts: the folder is never overwritten
    with pytest.raises(TeacherError, match="do not join into a zip|CRC"):
        assemble_split_zip(parts[:2], tmp_path / "models" / "short", "model")  # a part missing
    assert not (tmp_path / "models" / "short").exists()


@pytest.fixture(scope="module")
def mixed(ray_cluster, tiny_model, tiny_mpnet, tmp_path_factory):
    """`skd teachers prepare` of a BERT teacher (imported) and an MPNet teacher cut to 2 layers (fine-tuned in
    its own tokens), then a soft-label cache built from both."""
    from orchestrator.commands.cache_build import build_cache
    from orchestrator.commands.teachers import prepare_teachers

    tmp = tmp_path_factory.mktemp("mixed")
    raw = tiny_raw(tmp, tiny_model, distill={"max_steps": 4, "eval_every": 4, "log_every": 1})
    raw["teachers"] = {"members": [{"name": "bert4", "init": str(tiny_model), "checkpoint": str(tiny_model)},
                                   {"name": "mp2", "init": str(tiny_mpnet), "num_layers": 2}],
                       "finetune": {"max_steps": 4, "batch_size": 8, "lr": 1e-3}, "num_cpus": 0.25}

    def cfg(*overrides: str):
        return load_config(None, list(overrides), base=raw)

    teachers = prepare_teachers(cfg())
    summary = build_cache(cfg())
    return {"cfg": cfg, "teachers": teachers, "summary": summary}


def test_prepare_fine_tunes_each_family_in_its_own_tokens(mixed, tiny_model, tiny_mpnet):
    bert, mp = mixed["teachers"]
    assert (bert.family, mp.family) == ("bert", "mpnet") and (bert.num_layers, mp.num_layers) == (4, 2)
    assert mp.vocab == vocab_fingerprint(load_tokenizer(str(tiny_mpnet))) != bert.vocab
    assert vocab_fingerprint(load_tokenizer(mp.checkpoint)) == mp.vocab  # saved with its own tokenizer
    assert mp.mlflow_run_id and not bert.mlflow_run_id  # fine-tuned vs imported
    assert mp.flops_per_token == forward_flops_per_token(load_classifier(mp.checkpoint, 2), 32)


def test_cache_holds_each_teachers_soft_labels_of_its_own_tokens(mixed):
    from actors.cache import KnowledgeCache
    from orchestrator.driver.knowledge_plan import cache_fingerprint
    from orchestrator.driver.plan import make_plan

    plan = make_plan(mixed["cfg"]())
    inputs = plan.inputs
    fp = cache_fingerprint(plan.cfg, inputs, plan.teachers, plan.knowledge.request)
    assert fp["teachers"][1]["vocab"] == mixed["teachers"][1].vocab and "vocab" not in fp["teachers"][0]
    cache = KnowledgeCache.open(mixed["summary"]["path"], fp)
    rows = np.arange(0, 32)
    b = TokenBatch.of(inputs.train.batch(rows, inputs.pad_id))
    for k, info in enumerate(plan.teachers):
        online = Teacher(k, info.checkpoint, 2, device="cpu", vocab=info.vocab).knowledge(b).logits
        np.testing.assert_allclose(cache.knowledge(k, rows, b.input_ids.shape[1]).logits, online, atol=1e-5)


def test_mixed_ensemble_distills_from_the_cache(mixed):
    """(The online path of a mixed ensemble runs in test_hidden_states_of_another_tokenizer_arrive_aligned and
    test_transfer_rows_teach_through_the_teachers_only.)"""
    from orchestrator.commands.distill import run_distill

    overrides = ["distill.strategy=skd", "distill.distribution.family=uniform", "mlflow.run_name=mixed-cached",
                 f"distill.knowledge.source=cache:{mixed['summary']['path']}"]
    res = run_distill(mixed["cfg"](*overrides))
    assert res.status == "FINISHED" and res.steps == 4 and "accuracy" in res.dev
    assert sum(res.counts.values()) == 4 * 8 and set(res.counts) <= {"bert4", "mp2"}
    from mlflow.tracking import MlflowClient

    params = MlflowClient(mixed["cfg"]().tracking_uri()).get_run(res.run_id).data.params
    assert params["teacher.mp2.family"] == "mpnet" and params["teacher.bert4.layers"] == "4"
    assert int(params["teacher.mp2.forward_flops"]) == mixed["teachers"][1].flops_per_token


def test_mixed_ensemble_refuses_attentions(mixed):
    from orchestrator.driver.plan import make_plan

    with pytest.raises(SkdError, match=r"teachers mp2 tokenize with another tokenizer.*does not align them"):
        make_plan(mixed["cfg"]("distill.knowledge.outputs=[attentions]", "distill.knowledge.layers=1"))


def test_hidden_states_of_another_tokenizer_arrive_aligned(mixed):
    """The MPNet teacher's hidden states reach the student in the student's tokens: each student token gets the
    mean of the teacher tokens its characters overlap (actors.alignment), online and through the cache, and a
    hidden-state run of the mixed ensemble trains; the alignment's counts go to MLflow."""
    from mlflow.tracking import MlflowClient

    from actors.alignment import align, token_spans
    from actors.cache import KnowledgeCache
    from orchestrator.commands.cache_build import build_cache
    from orchestrator.commands.distill import run_distill
    from orchestrator.driver.plan import make_plan

    hidden = ["distill.knowledge.outputs=[hidden]", "distill.knowledge.layers=1", "distill.knowledge.tokens=all",
              "distill.knowledge.width=all"]
    plan = make_plan(mixed["cfg"](*hidden))
    inputs, mp = plan.inputs, plan.teachers[1]
    rows = np.arange(8)
    batch = TokenBatch.of(inputs.train.batch(rows, inputs.pad_id))
    got = Teacher(1, mp.checkpoint, 2, device="cpu", vocab=mp.vocab).knowledge(batch, plan.knowledge.request)
    # by hand: the teacher's own forward pass on its tokens, averaged over each student token's overlaps
    view = batch.view(mp.vocab)
    model = load_classifier(mp.checkpoint, 2).eval()
    with torch.no_grad():
        states = model(input_ids=torch.tensor(view.input_ids), attention_mask=torch.tensor(view.attention_mask),
                       output_hidden_states=True).hidden_states[int(got.layers[0])].numpy()  # [B, L_t, D_t]
    ex = inputs.train_examples
    texts = [ex.text_a[i] for i in rows]
    s_spans = token_spans(load_tokenizer(inputs.tokenizer_init), texts, None, inputs.max_length)
    t_spans = token_spans(load_tokenizer(mp.checkpoint), texts, None, inputs.max_length)
    for b in range(len(rows)):
        pairs = align(s_spans[b], t_spans[b]).pairs
        for j in range(len(s_spans[b])):
            mine = pairs[pairs[:, 0] == j, 1]
            assert got.token_mask[b, j] == int(len(mine) > 0)
            if len(mine):
                np.testing.assert_allclose(got.hidden[b, 0, j], states[b, mine].mean(axis=0), atol=1e-4)
    assert got.hidden.shape[2] == batch.input_ids.shape[1]  # the student's length, not the teacher's
    summary = build_cache(mixed["cfg"](*hidden, f"distill.knowledge.source=cache:{mixed['summary']['path']}-hsk"))
    cached = KnowledgeCache.open(summary["path"]).knowledge(1, rows, batch.input_ids.shape[1], ["hidden"])
    np.testing.assert_allclose(cached.hidden, got.hidden, atol=1e-5)
    res = run_distill(mixed["cfg"](*hidden, "mlflow.run_name=mixed-hidden"))
    assert res.status == "FINISHED"
    params = MlflowClient(mixed["cfg"]().tracking_uri()).get_run(res.run_id).data.params
    assert int(params["align.mp2.student_tokens"]) == sum(len(x) for x in inputs.train.input_ids)
    assert int(params["align.mp2.unmatched_teacher_tokens"]) >= 0 and "align.bert4.student_tokens" not in params


def test_transfer_rows_teach_through_the_teachers_only(mixed):
    """Unlabelled transfer rows (the training rows past the first 64) reach the mixed ensemble's student as soft
    labels, are counted apart and logged as a dataset of their own; no-kd skips them; a cache built without
    them is refused."""
    from mlflow.tracking import MlflowClient

    from orchestrator.driver import lineage
    from orchestrator.commands.distill import run_distill
    from orchestrator.driver.plan import make_plan

    transfer = ["data.transfer.source=rest", "data.transfer.max_rows=16"]
    res = run_distill(mixed["cfg"](*transfer, "distill.strategy=skd", "mlflow.run_name=transfer-skd"))
    assert res.status == "FINISHED" and res.steps == 4
    run = MlflowClient(mixed["cfg"]().tracking_uri()).get_run(res.run_id)
    assert (run.data.params["data.labelled_rows"], run.data.params["data.transfer_rows"]) == ("64", "16")
    names = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    tags = {t.key: t.value for t in names["sst2-transfer"].tags}
    assert tags["mlflow.data.context"] == "transfer" and tags["subset"].startswith("16 training rows past")
    no_kd = make_plan(mixed["cfg"](*transfer, "distill.strategy=no-kd"))  # a student without teachers skips them
    assert len(no_kd.inputs.train) == 64 and lineage.data_params(no_kd)["data.transfer_rows"] == "0"
    with pytest.raises(SkdError, match="cache"):
        make_plan(mixed["cfg"](*transfer, f"distill.knowledge.source=cache:{mixed['summary']['path']}"))

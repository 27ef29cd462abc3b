"""GLUE readers on the real shared files, custom files, and malformed-input errors."""

from pathlib import Path

import numpy as np
import pytest

from orchestrator.config import DataConfig
from orchestrator.driver.inputs import encode, load_split
from actors.errors import DataError
from orchestrator.common.metrics import glue_metrics
from orchestrator.common.task import GLUE_TASKS
from actors.models import load_tokenizer

# rows per split, from ../shared/data/glue/SOURCES.md
EXPECTED = {"sst2": (67349, 872), "cola": (8551, 1043), "mrpc": (3668, 408), "stsb": (5749, 1500)}


@pytest.mark.parametrize("task", EXPECTED)
def test_glue_splits_have_documented_sizes(task):
    data = DataConfig()
    train, dev = load_split(task, data, "train"), load_split(task, data, "dev")
    assert (len(train), len(dev)) == EXPECTED[task]
    assert (train.text_b is None) == (task in ("sst2", "cola"))
    if task == "stsb":
        assert dev.labels.dtype == np.float32 and 0 <= dev.labels.min() and dev.labels.max() <= 5
    else:
        assert set(np.unique(train.labels)) == {0, 1}


def test_mrpc_bom_header_and_cola_headerless_rows():
    mrpc = load_split("mrpc", DataConfig(), "dev")
    assert not mrpc.text_a[0].startswith("\ufeff") and len(mrpc.text_b) == 408
    cola = load_split("cola", DataConfig(), "dev")
    assert cola.text_a[0] and cola.labels[0] in (0, 1)


def test_subset_is_seeded_and_keeps_ids():
    a = load_split("sst2", DataConfig(max_train_samples=100, shuffle_seed=3), "train")
    b = load_split("sst2", DataConfig(max_train_samples=100, shuffle_seed=3), "train")
    c = load_split("sst2", DataConfig(max_train_samples=100, shuffle_seed=4), "train")
    assert a.text_a == b.text_a and a.text_a != c.text_a and len(a) == 100
    full = load_split("sst2", DataConfig(), "train")
    assert all(full.text_a[i] == t for i, t in zip(a.ids, a.text_a))


def test_glue_dir_env_setting(tmp_path, monkeypatch):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "dev.tsv").write_text('sentence\tlabel\na "quoted" film\t1\nbad\t0\n')
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    dev = load_split("sst2", DataConfig(), "dev")
    assert dev.text_a == ['a "quoted" film', "bad"] and dev.labels.tolist() == [1, 0]


def _glue(tmp_path: Path, body: str) -> DataConfig:
    (tmp_path / "SST-2").mkdir(exist_ok=True)
    (tmp_path / "SST-2" / "train.tsv").write_text(body)
    return DataConfig(glue_dir=tmp_path)


def test_missing_file_names_setting(tmp_path):
    with pytest.raises(DataError, match="set data.glue_dir"):
        load_split("sst2", DataConfig(glue_dir=tmp_path), "train")


def test_malformed_row_names_file_and_line(tmp_path):
    with pytest.raises(DataError, match=r"train.tsv:3: malformed row"):
        load_split("sst2", _glue(tmp_path, "sentence\tlabel\ngood\t1\nno label here\n"), "train")


def test_unknown_label_value(tmp_path):
    with pytest.raises(DataError, match=r"label 'positive', expected one of \['0', '1'\]"):
        load_split("sst2", _glue(tmp_path, "sentence\tlabel\ngood\tpositive\n"), "train")


def test_wrong_header(tmp_path):
    with pytest.raises(DataError, match="header lacks column"):
        load_split("sst2", _glue(tmp_path, "text\ty\ngood\t1\n"), "train")


def test_unknown_task():
    with pytest.raises(DataError, match="unknown task 'sst3'"):
        load_split("sst3", DataConfig(), "train")


def test_custom_csv_pairs_and_labels(tmp_path):
    f = tmp_path / "train.csv"
    f.write_text('q,a,y\n"hi, there",hello,yes\nwhat,"no, never",no\n')
    data = DataConfig(source="files", train_file=f, dev_file=f, text_column="q", text_pair_column="a",
                      label_column="y", labels=["no", "yes"])
    ex = load_split("custom", data, "train")
    assert ex.text_a == ["hi, there", "what"] and ex.text_b == ["hello", "no, never"]
    assert ex.labels.tolist() == [1, 0]
    with pytest.raises(DataError, match="needs data.labels"):
        load_split("custom", data.model_copy(update={"labels": None}), "train")


def test_encode_truncates_and_batches_pad_to_longest():
    ex = load_split("mrpc", DataConfig(max_dev_samples=5), "dev")
    enc = encode(ex, load_tokenizer("minilm"), max_length=16)
    assert max(len(x) for x in enc.input_ids) <= 16
    b = enc.batch([0, 1, 2], pad_id=0)
    assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[0] == 3
    assert (b["attention_mask"].sum(1) == [len(enc.input_ids[i]) for i in range(3)]).all()


def test_metrics_match_known_values():
    spec = GLUE_TASKS["cola"]
    logits = np.array([[0, 1], [1, 0], [0, 1], [0, 1]], dtype=float)
    m = glue_metrics(spec, logits, np.array([1, 0, 0, 1]))
    assert m["accuracy"] == 0.75 and abs(m["mcc"] - 0.5773502691896258) < 1e-9
    m = glue_metrics(GLUE_TASKS["mrpc"], logits, np.array([1, 0, 0, 1]))
    assert abs(m["f1"] - 0.8) < 1e-9
    s = glue_metrics(GLUE_TASKS["stsb"], np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]))
    assert s["spearman"] == 1.0 and 0.98 < s["pearson"] < 1.0


def test_transfer_rest_is_the_shuffle_past_the_labelled_rows():
    from orchestrator.config import TransferConfig
    from orchestrator.common.task import UNLABELLED
    from orchestrator.driver.inputs import load_transfer

    data = DataConfig(max_train_samples=100, transfer=TransferConfig(source="rest", max_rows=500))
    labelled, transfer = load_split("sst2", data, "train"), load_transfer("sst2", data)
    assert len(transfer) == 500 and (transfer.labels == UNLABELLED).all()
    assert not set(labelled.ids.tolist()) & set(transfer.ids.tolist())
    everything = load_split("sst2", DataConfig(max_train_samples=600), "train")  # the same shuffle, longer
    assert everything.ids[100:].tolist() == transfer.ids.tolist()
    assert transfer.text_a[0] == load_split("sst2", DataConfig(), "train").text_a[int(transfer.ids[0])]


def test_transfer_file_reads_text_without_labels(tmp_path):
    from orchestrator.config import TransferConfig
    from orchestrator.common.task import TRANSFER_ID_BASE
    from orchestrator.driver.inputs import load_transfer

    (tmp_path / "raw.csv").write_text('review,stars\n"good, really",5\nawful,1\n')
    data = DataConfig(transfer=TransferConfig(source="file", file=tmp_path / "raw.csv", text_column="review"))
    ex = load_transfer("stsb", data.model_copy(update={"transfer": data.transfer.model_copy(
        update={"text_pair_column": "stars"})}))
    assert ex.text_a == ["good, really", "awful"] and ex.text_b == ["5", "1"] and np.isnan(ex.labels).all()
    ex = load_transfer("sst2", data)
    assert ex.text_b is None and ex.ids.tolist() == [TRANSFER_ID_BASE, TRANSFER_ID_BASE + 1]
    with pytest.raises(DataError, match=r"header lacks column\(s\) \['sentence'\].*transfer.text_column"):
        load_transfer("sst2", DataConfig(transfer=TransferConfig(source="file", file=tmp_path / "raw.csv")))


def test_transfer_rest_needs_a_labelled_cut():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="data.max_train_samples"):
        DataConfig(transfer={"source": "rest"})


def test_holdout_rows_are_held_back_from_training_and_leave_the_labelled_and_transfer_rows_as_they_were():
    from orchestrator.config import TransferConfig
    from orchestrator.driver.inputs import eval_split, load_transfer

    plain = DataConfig(max_train_samples=100, transfer=TransferConfig(source="rest"))
    held = plain.model_copy(update={"holdout": 300})
    assert eval_split(plain) == "dev" and eval_split(held) == "holdout"
    labelled, holdout = load_split("sst2", held, "train"), load_split("sst2", held, "holdout")
    assert labelled.ids.tolist() == load_split("sst2", plain, "train").ids.tolist()  # teachers' rows, caches stay
    assert len(holdout) == 300 and not set(holdout.ids.tolist()) & set(labelled.ids.tolist())
    transfer = load_transfer("sst2", held)
    assert len(transfer) == 67349 - 100 - 300 and not set(holdout.ids.tolist()) & set(transfer.ids.tolist())
    assert transfer.ids.tolist() == load_transfer("sst2", plain).ids[:len(transfer)].tolist()
    whole = load_split("sst2", DataConfig(), "train")
    row = int(holdout.ids[0])
    assert holdout.text_a[0] == whole.text_a[row] and holdout.labels[0] == whole.labels[row]  # labelled rows
    everything = load_split("sst2", DataConfig(holdout=300), "train")  # no max: every row not held back
    assert len(everything) == 67349 - 300 and not set(everything.ids.tolist()) & set(holdout.ids.tolist())
    with pytest.raises(DataError, match=r"data.holdout: holding back 67300 of the 67349 training rows leaves 49, "
                                        r"fewer than the 100 to train on"):
        load_split("sst2", DataConfig(max_train_samples=100, holdout=67300), "train")


def test_a_run_evaluates_on_the_held_back_rows(capsys):
    from orchestrator.driver.inputs import prepare_inputs
    from actors.models import PACKAGED_MODEL

    inputs = prepare_inputs(DataConfig(max_train_samples=50, holdout=40, max_length=16), "sst2", PACKAGED_MODEL)
    assert len(inputs.train) == 50 and len(inputs.dev) == 40
    assert inputs.dev.ids.tolist() == load_split("sst2", DataConfig(holdout=40), "holdout").ids.tolist()
    assert "evaluating on 40 training rows held back from training (data.holdout)" in capsys.readouterr().out

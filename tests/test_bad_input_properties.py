"""Property-based bad input (hypothesis): whatever bytes a config or data file holds, skd answers with a
config or data error naming the file (or a valid result), never a traceback, and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.errors import ConfigError, DataError
from orchestrator.config import DataConfig
from orchestrator.config.load import load_config
from orchestrator.driver.inputs import Examples, load_split

FAST = settings(max_examples=60, deadline=None, database=None,  # no .hypothesis folder in the checkout
                suppress_health_check=[HealthCheck.function_scoped_fixture])

yaml_ish = st.one_of(
    st.binary(max_size=300),  # arbitrary bytes, non-UTF-8 included
    st.text(max_size=300).map(str.encode),
    st.lists(st.sampled_from(["task: sst2", "teachers:", "  members: [{name: a}]", "distill: {alpha: 2}",
                              "- x", ": :", "\t", "ray: [1, 2", "mlflow: {run_name: ../x}", "x" * 5000]),
             max_size=6).map(lambda lines: "\n".join(lines).encode()),
)


@FAST
@given(content=yaml_ish)
def test_any_config_file_is_loaded_or_refused_with_a_config_error(tmp_path: Path, content: bytes):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(content)
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(path) in str(exc) or "config" in str(exc)
    assert path.read_bytes() == content  # nothing written


cell = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)
rows = st.lists(st.lists(cell, min_size=0, max_size=4), max_size=8)


def _write_rows(path: Path, header: list[str], body: list[list[str]], delimiter: str) -> None:
    lines = [delimiter.join(header)] + [delimiter.join(r) for r in body]
    path.write_text("\n".join(lines), encoding="utf-8")


def _custom(tmp_path: Path, suffix: str, **extra) -> DataConfig:
    return DataConfig(source="files", train_file=tmp_path / f"train{suffix}", dev_file=tmp_path / f"dev{suffix}",
                      text_column="sentence", label_column="label", labels=["neg", "pos"], **extra)


@FAST
@given(body=rows, suffix=st.sampled_from([".tsv", ".csv"]), header=st.sampled_from(
    [["sentence", "label"], ["label", "sentence"], ["text", "label"], ["sentence"], []]))
def test_any_custom_table_is_read_or_refused_with_a_data_error(tmp_path: Path, body, suffix, header):
    data = _custom(tmp_path, suffix)
    path = Path(data.train_file)
    _write_rows(path, header, body, "," if suffix == ".csv" else "\t")
    before = path.read_bytes()
    try:
        ex = load_split("custom", data, "train")
        assert isinstance(ex, Examples) and set(ex.labels.tolist()) <= {0, 1}
    except DataError as exc:
        assert str(path) in str(exc) or "empty" in str(exc)
    assert path.read_bytes() == before


@FAST
@given(garbage=st.binary(min_size=1, max_size=200))
def test_non_utf8_data_files_are_a_data_error_naming_the_file(tmp_path: Path, garbage: bytes):
    data = _custom(tmp_path, ".tsv")
    Path(data.train_file).write_bytes(b"sentence\tlabel\n" + garbage + b"\xff\xfe\tneg\n")
    with pytest.raises(DataError, match="train.tsv"):
        load_split("custom", data, "train")


def test_an_empty_file_and_a_very_long_line_are_data_errors(tmp_path: Path):
    data = _custom(tmp_path, ".csv")
    Path(data.train_file).write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_split("custom", data, "train")
    Path(data.train_file).write_text('sentence,label\n"' + "x" * 200_000 + '",neg\n')
    ex = load_split("custom", data, "train")  # a 200k-character field is read, not refused by csv's limit
    assert len(ex.text_a[0]) == 200_000


def test_labels_outside_the_declared_set_name_the_row(tmp_path: Path):
    data = _custom(tmp_path, ".tsv")
    Path(data.train_file).write_text("sentence\tlabel\ngood\tpos\nbad\tmeh\n")
    with pytest.raises(DataError, match=r"row 2 has label 'meh', expected one of \['neg', 'pos'\]"):
        load_split("custom", data, "train")


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf"])
def test_non_finite_regression_labels_are_refused(tmp_path: Path, value: str):
    data = DataConfig(source="files", train_file=tmp_path / "train.tsv", dev_file=tmp_path / "dev.tsv",
                      text_column="sentence", label_column="score", task_type="regression")
    Path(data.train_file).write_text(f"sentence\tscore\nfine\t0.5\nodd\t{value}\n")
    with pytest.raises(DataError, match=r"train.tsv.*row 2.*not a finite number"):
        load_split("custom", data, "train")

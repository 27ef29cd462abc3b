"""Every bad input named in the issue fails with one clear message (exit 2) before Ray starts."""

import json
from pathlib import Path

import pytest
import ray
import yaml
from typer.testing import CliRunner

from actors.manifest import TeacherInfo, write_manifest
from actors.models import load_tokenizer, vocab_fingerprint
from tests.conftest import tiny_raw
from tuning.cli import app

runner = CliRunner()


@pytest.fixture
def write_cfg(tmp_path, tiny_model):
    def write(**sections) -> Path:
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(json.loads(json.dumps(tiny_raw(tmp_path, tiny_model, **sections)))))
        return path
    return write


def fake_manifest(tmp_path: Path, tiny_model: Path, **changes) -> None:
    vocab = vocab_fingerprint(load_tokenizer(str(tiny_model)))
    entries = []
    for name in ("t4", "t2"):
        fields = dict(name=name, checkpoint=str(tiny_model), num_layers=4, hidden_size=32, parameters=10**6,
                      dev_metric=0.5, metric="accuracy", vocab=vocab, num_labels=2, task="sst2")
        fields.update(changes)
        entries.append(TeacherInfo(**fields))
    write_manifest(tmp_path / "out" / "teachers" / "manifest.json", entries)


def run_cli(*args: str):
    result = runner.invoke(app, list(args))
    assert not ray.is_initialized(), "a bad input must fail before any Ray resources are taken"
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


def test_unknown_config_key(write_cfg):
    out = run_cli("distill", "-c", str(write_cfg(distill={"alpah": 0.3})))
    assert "distill.alpah: unknown setting (did you mean 'alpha'?)" in out


def test_missing_data_file(write_cfg, tmp_path):
    out = run_cli("distill", "-c", str(write_cfg(data={"glue_dir": str(tmp_path / "nowhere")})))
    assert "does not exist; set data.glue_dir" in out


def test_malformed_data_file(write_cfg, tmp_path):
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    (tmp_path / "glue" / "SST-2" / "train.tsv").write_text("sentence\tlabel\njust text\n")
    out = run_cli("distill", "-c", str(write_cfg(data={"glue_dir": str(tmp_path / "glue")})))
    assert "train.tsv:2: malformed row" in out


def test_unknown_task(write_cfg):
    out = run_cli("distill", "-c", str(write_cfg(task="sst-3")))
    assert "unknown task 'sst3'" in out


def test_unknown_label_value(write_cfg, tmp_path):
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    (tmp_path / "glue" / "SST-2" / "train.tsv").write_text("sentence\tlabel\nfine\t7\n")
    (tmp_path / "glue" / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    out = run_cli("distill", "-c", str(write_cfg(data={"glue_dir": str(tmp_path / "glue")})))
    assert "label '7', expected one of ['0', '1']" in out


def test_manifest_missing(write_cfg):
    out = run_cli("distill", "-c", str(write_cfg()))
    assert "run `skd teachers prepare -c CONFIG` first" in out


def test_teacher_checkpoint_does_not_exist(write_cfg, tmp_path, tiny_model):
    fake_manifest(tmp_path, tiny_model, checkpoint=str(tmp_path / "gone"))
    out = run_cli("distill", "-c", str(write_cfg()))
    assert "checkpoint" in out and "does not exist" in out


def test_import_checkpoint_that_does_not_exist(write_cfg, tmp_path, tiny_model):
    members = [{"name": "t4", "init": str(tiny_model), "checkpoint": str(tmp_path / "gone")}]
    out = run_cli("teachers", "prepare", "-c", str(write_cfg(teachers={"members": members})))
    assert "teachers.members[t4].checkpoint" in out


def test_manifest_tokenizer_differs_from_checkpoint(write_cfg, tmp_path, tiny_model):
    fake_manifest(tmp_path, tiny_model, vocab="0123456789abcdef")
    out = run_cli("distill", "-c", str(write_cfg()))
    assert "not the one the teachers manifest records" in out


def test_cut_deeper_than_the_model(write_cfg, tiny_model):
    members = [{"name": "t9", "init": str(tiny_model), "num_layers": 9}]
    out = run_cli("teachers", "prepare", "-c", str(write_cfg(teachers={"members": members})))
    assert "teachers.members[t9].num_layers = 9" in out and "only 4 layers" in out


def test_student_of_a_family_without_cuts(write_cfg, tmp_path):
    from transformers import AlbertConfig

    AlbertConfig(num_hidden_layers=2).save_pretrained(tmp_path / "albert")
    out = run_cli("distill", "-c", str(write_cfg(student={"init": str(tmp_path / "albert"), "num_layers": 1})))
    assert "student.num_layers: depth cuts are supported for" in out and "'albert'" in out


@pytest.mark.parametrize("weights, fragment", [({"t4": -1, "t2": 1}, ">= 0"), ({"t4": 0, "t2": 0}, "all zero")])
def test_bad_probabilities(write_cfg, tmp_path, tiny_model, weights, fragment):
    fake_manifest(tmp_path, tiny_model)
    path = write_cfg(distill={"max_steps": 8, "distribution": {"family": "weights", "weights": weights}})
    assert fragment in run_cli("distill", "-c", str(path))


def test_single_teacher_not_in_ensemble(write_cfg):
    out = run_cli("distill", "-c", str(write_cfg()), "--set", "distill.strategy=single:t9")
    assert "not in teachers.members" in out


def test_resume_from_folder_that_is_not_a_checkpoint(write_cfg, tmp_path):
    out = run_cli("distill", "-c", str(write_cfg()), "--resume-from", str(tmp_path))
    assert "not a checkpoint folder" in out


def test_evaluate_bad_model_dir(tmp_path):
    out = run_cli("evaluate", str(tmp_path), "--task", "sst2")
    assert "not a save_pretrained folder" in out

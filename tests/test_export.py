"""`skd export` (ONNX fp32 and int8, verified against PyTorch) and `skd benchmark` (speed side by side), on
tiny random BERT and MPNet classifiers and real SST-2 dev sentences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from actors.models import count_parameters, load_classifier, load_tokenizer
from orchestrator.config import DataConfig
from orchestrator.driver.inputs import encode, load_split
from orchestrator.common.task import task_spec
from orchestrator.driver.outputs import OWNED_MARK

DATA = DataConfig(max_dev_samples=48, max_length=32)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model):
    """A 4-layer BERT and a 2-layer MPNet (its own tokenizer), each saved as skd saves a student."""
    from tests.tiny import make_tiny_mpnet

    root = tmp_path_factory.mktemp("export")
    bert = root / "bert"
    load_classifier(str(tiny_model), 2, label_names=("negative", "positive")).save_pretrained(bert)
    load_tokenizer(str(tiny_model)).save_pretrained(bert)
    return {"bert": bert, "mpnet": make_tiny_mpnet(root / "mpnet", num_layers=2)}


def dev_of(model_dir: Path):
    tok = load_tokenizer(str(model_dir))
    return encode(load_split("sst2", DATA, "dev"), tok, DATA.max_length), int(tok.pad_token_id)


@pytest.mark.parametrize("family", ["bert", "mpnet"])
def test_export_is_verified_against_pytorch_and_written_beside_the_model(models, family, tmp_path, monkeypatch):
    import onnxruntime as ort

    from orchestrator.commands.export import ExportError, export_model, ort_predict, session
    from orchestrator.common.evaluation import predict

    monkeypatch.chdir(tmp_path)  # ONNX Runtime's quantisation tools must not leave files in the working folder
    model_dir = models[family]
    dev, pad = dev_of(model_dir)
    report = export_model(model_dir, task_spec("sst2", DATA), dev, pad, int8=True)
    out = model_dir / "onnx"
    assert sorted(p.name for p in out.iterdir()) == sorted([OWNED_MARK, "export.json", "model.onnx", "model.int8.onnx"])
    assert list(tmp_path.iterdir()) == [] and not list(model_dir.glob(".onnx-*"))
    fp32, int8 = report.checks
    assert fp32.backend == "onnx-fp32" and fp32.max_abs_diff < 1e-4 and fp32.delta == 0.0
    assert int8.bytes < 0.8 * fp32.bytes  # int8 MatMul weights (embeddings stay fp32)
    # the files load and compute the same function as the PyTorch model, at batch sizes and lengths never traced
    torch_logits = predict(load_classifier(str(model_dir), 2), dev, pad, 5)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert np.abs(ort_predict(sess, dev, pad, 7) - torch_logits).max() < 1e-4
    int8_diff = np.abs(ort_predict(session(out / "model.int8.onnx", 1), dev, pad, 7) - torch_logits).max()
    assert 0 < int8_diff < 0.05  # activations are quantised per batch: close to PyTorch, never identical
    export_model(model_dir, task_spec("sst2", DATA), dev, pad, int8=False)  # skd's own export is replaced
    assert not (out / "model.int8.onnx").exists()
    foreign = tmp_path / "foreign"
    load_classifier(str(model_dir), 2).save_pretrained(foreign)
    (foreign / "onnx").mkdir()
    (foreign / "onnx" / "mine.txt").write_text("keep")
    with pytest.raises(ExportError, match="not written by skd"):
        export_model(foreign, task_spec("sst2", DATA), dev, pad)
    assert (foreign / "onnx" / "mine.txt").read_text() == "keep"


def test_a_broken_export_is_refused_and_nothing_is_written(models, tmp_path, monkeypatch):
    """A graph whose classifier weights are negated computes another function: the logit check refuses it
    (fp32), the metric check refuses it (int8 has no logit check), and nothing lands beside the model."""
    import onnx
    from onnx import numpy_helper

    from orchestrator.commands import export
    from orchestrator.common.evaluation import predict

    spec = task_spec("sst2", DATA)
    model_dir = tmp_path / "student"
    load_classifier(str(models["bert"]), 2).save_pretrained(model_dir)
    load_tokenizer(str(models["bert"])).save_pretrained(model_dir)
    dev, pad = dev_of(model_dir)
    logits = predict(load_classifier(str(model_dir), 2), dev, pad, 16)
    dev.labels = logits.argmax(-1)  # gold = PyTorch's predictions: accuracy 1.0, so every flipped row counts
    real_to_onnx = export.to_onnx

    def broken(model, path, sample):
        real_to_onnx(model, path, sample)
        graph = onnx.load(str(path))
        for init in graph.graph.initializer:
            if "classifier" in init.name:
                init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
        onnx.save(graph, str(path))

    monkeypatch.setattr(export, "to_onnx", broken)
    with pytest.raises(export.ExportError, match="--atol"):
        export.export_model(model_dir, spec, dev, pad)
    with pytest.raises(export.ExportError, match=r"dev accuracy 0\.0000 against PyTorch's 1\.0000.*--tolerance"):
        export.export_model(model_dir, spec, dev, pad, atol=1e9)
    assert not (model_dir / "onnx").exists() and not list(model_dir.glob(".onnx-*"))


def test_benchmark_measures_every_model_and_backend_side_by_side(models):
    from orchestrator.commands.speed import BACKENDS, benchmark, weights_bytes

    dirs = [models["bert"], models["mpnet"]]
    rounds = []
    rows = benchmark(dirs, "sst2", DATA, threads=1, latency_rows=8, batch_rows=64, min_rounds=3, max_rounds=4,
                     max_seconds=60, progress=lambda r, s: rounds.append(r))
    assert [(r.model, r.backend) for r in rows] == [(d.name, b) for d in dirs for b in BACKENDS]
    assert rounds[:3] == [1, 2, 3] and all(r.rounds == rounds[-1] for r in rows)
    for r in rows:
        assert r.parameters == count_parameters(load_classifier(str(models[r.model]), 2))
        assert 0 < r.p50_ms <= r.p95_ms and r.samples_per_s > 0
        assert r.p50_ci[0] <= r.p50_ci[1] and r.sps_ci[0] <= r.sps_ci[1]
    by = {(r.model, r.backend): r for r in rows}
    assert by["bert", "torch-fp32"].bytes == weights_bytes(models["bert"])
    assert by["bert", "onnx-int8"].bytes < by["bert", "onnx-fp32"].bytes


def test_benchmark_and_export_refuse_bad_input_before_any_work(models, tmp_path):
    from typer.testing import CliRunner

    from tuning.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["benchmark", str(models["bert"]), "--task", "sst2", "--backend", "tensorrt"])
    assert res.exit_code == 2 and "--backend tensorrt" in res.output
    res = runner.invoke(app, ["benchmark", str(tmp_path), "--task", "sst2"])
    assert res.exit_code == 2 and "not a save_pretrained folder" in res.output
    res = runner.invoke(app, ["export", str(models["bert"])])
    assert res.exit_code == 2 and "--task sst2" in res.output
    res = runner.invoke(app, ["export", str(tmp_path), "--task", "sst2"])
    assert res.exit_code == 2 and "not a save_pretrained folder" in res.output and not (tmp_path / "onnx").exists()

"""`skd export`: a saved student or teacher as ONNX (fp32) and ONNX int8, each verified on the dev set
before it is kept.

Exporter: `torch.onnx.export` (the dynamo exporter, dynamic batch and sequence axes, weights inside the one
`.onnx` file) and `onnxruntime.quantization.quantize_dynamic` (int8 weights per channel, activations
quantised at run time: ONNX Runtime's recommended scheme for transformer encoders on CPU; no calibration
data; see `to_int8`). Optimum was
tried first: `optimum-onnx` 0.1 pins transformers 4.57, and skd runs on transformers 5, so it cannot be
installed beside skd.

The graph takes what skd's models are trained on: `input_ids` and `attention_mask` [B, L] int64 (skd
never feeds token type ids), and returns `logits` [B, C] float32 (C = 1 for regression).

Verification, for each file: the largest absolute logit difference from PyTorch over every dev row, and
the dev metrics. fp32 must stay within `atol` of PyTorch's logits; every export must keep its primary dev
metric within `tolerance` of PyTorch's (absolute, metric units: 0.01 = 1 accuracy point). A failed check
refuses the export: nothing is written beside the model. Files are built in a temporary folder inside the
model folder and renamed into `<model>/onnx/` only when every check passed.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from actors.errors import SkdError
from actors.models import MODEL_INPUTS
from orchestrator.common.task import Encoded, TaskSpec
from orchestrator.common.metrics import glue_metrics
from orchestrator.driver.outputs import OWNED_MARK, RUN_FILE

ONNX_DIR = "onnx"
FILES = {"onnx-fp32": "model.onnx", "onnx-int8": "model.int8.onnx"}
REPORT = "export.json"
INPUT_NAMES = MODEL_INPUTS


class ExportError(SkdError):
    """An export that failed its verification, or a folder skd will not write into."""


@dataclass
class ExportCheck:
    """One exported file checked against PyTorch on the dev set.

    Attributes:
        backend: "onnx-fp32" or "onnx-int8"; file: its name in `<model>/onnx/`; bytes: its size.
        max_abs_diff: largest |logit - PyTorch logit| over every dev row and class.
        metrics: its dev metrics (`glue_metrics`); delta: its primary metric minus PyTorch's.
    """

    backend: str
    file: str
    bytes: int
    max_abs_diff: float
    metrics: dict[str, float]
    delta: float


@dataclass
class ExportReport:
    """What `export_model` wrote and measured: PyTorch's dev metrics and one check per file."""

    folder: Path
    metric: str
    torch_metrics: dict[str, float]
    checks: list[ExportCheck] = field(default_factory=list)

    def to_json(self) -> dict:
        """The report as written to export.json: {"metric", "torch": metrics, "checks": [ExportCheck fields]}."""
        return {"metric": self.metric, "torch": self.torch_metrics, "checks": [asdict(c) for c in self.checks]}


def _logits_module(model):
    """`model(input_ids, attention_mask).logits` as a module with positional inputs (what the exporter traces)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    return Logits()


def to_onnx(model, path: Path, sample: dict[str, np.ndarray]) -> None:
    """Export `model` (an eval-mode `AutoModelForSequenceClassification`) to one `.onnx` file.

    Args:
        model: the PyTorch model; path: the file to write.
        sample: a padded batch, `input_ids` / `attention_mask` [B, L] int64 (B, L >= 2), that the exporter
            traces; batch and sequence stay dynamic.
    """
    import torch

    args = tuple(torch.as_tensor(sample[k]) for k in INPUT_NAMES)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {k: {0: batch, 1: sequence} for k in INPUT_NAMES}
    # the exporter's notes are not for skd's users (torchvision ops it skips, axis renames, deprecations)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_logits_module(model.eval()).eval(), args, str(path), input_names=list(INPUT_NAMES),
                              output_names=["logits"], dynamic_shapes=shapes, dynamo=True, external_data=False,
                              verbose=False)
    finally:
        quiet.setLevel(level)


def to_int8(fp32: Path, path: Path) -> None:
    """Dynamic int8 quantisation of an fp32 ONNX file (`onnxruntime.quantization`): pre-processing (graph
    optimisation; symbolic shape inference skipped, it does not complete on these graphs), then int8 weights
    per output channel with a 7-bit range (`reduce_range`), activations quantised per batch at run time.

    Chosen on SST-2 dev (docs/results.md): per-tensor weights cost the fine-tuned MPNet-base 1.7 accuracy points
    and MiniLM-6 1.4; per-channel 7-bit weights cost 0.2 and 0.5, at the same size (about a quarter of fp32).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_dynamic(str(pre), str(path), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    pre.unlink()


def session(path: Path, threads: int):
    """An ONNX Runtime CPU session with `threads` intra-op threads and one inter-op thread."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_predict(sess, data: Encoded, pad_id: int, batch_size: int) -> np.ndarray:
    """An ONNX session's logits on every row, in row order: [N, C] float32 (batches of similar length,
    as `orchestrator.common.evaluation.predict`)."""
    from orchestrator.common.evaluation import in_length_order

    return in_length_order(data, pad_id, batch_size, lambda b: sess.run(
        ["logits"], {k: np.asarray(b[k], dtype=np.int64) for k in INPUT_NAMES})[0])


def verify(path: Path, backend: str, reference: np.ndarray, labels: np.ndarray, spec: TaskSpec, data: Encoded,
           pad_id: int, *, tolerance: float, atol: float | None, threads: int = 1,
           batch_size: int = 64) -> ExportCheck:
    """Check one exported file against PyTorch's dev logits.

    Args:
        path: the `.onnx` file; backend: its name in the report ("onnx-fp32", "onnx-int8").
        reference: PyTorch's dev logits [N, C]; labels: [N] gold labels; spec: the task (primary metric).
        data: the dev rows in the model's tokens; pad_id: its pad token id.
        tolerance: the largest drop of the primary metric allowed (absolute, metric units).
        atol: the largest |logit difference| allowed (None: not checked, as for int8).

    Returns:
        The check.

    Raises:
        ExportError: the metric fell more than `tolerance` below PyTorch's, or a logit moved more than
            `atol`; the message names the setting to change.
    """
    logits = ort_predict(session(path, threads), data, pad_id, batch_size)
    diff = float(np.abs(logits - reference).max())
    metrics = glue_metrics(spec, logits, labels)
    ref = glue_metrics(spec, reference, labels)[spec.metric]
    delta = metrics[spec.metric] - ref
    if atol is not None and not diff <= atol:
        raise ExportError(f"{backend} export refused: its logits differ from PyTorch's by up to {diff:.3g} on the dev "
                          f"set (allowed: --atol {atol:g}); the exported graph does not compute the same function")
    if not delta >= -tolerance:
        raise ExportError(f"{backend} export refused: dev {spec.metric} {metrics[spec.metric]:.4f} against PyTorch's "
                          f"{ref:.4f} ({delta:+.4f}, allowed: --tolerance {tolerance:g}); raise --tolerance to keep it")
    return ExportCheck(backend, path.name, path.stat().st_size, diff, metrics, delta)


def check_target(model_dir: Path) -> Path:
    """`<model_dir>/onnx`, refused when it exists and skd did not write it.

    Raises:
        ExportError: `model_dir` is not a `save_pretrained` folder, or its `onnx/` is someone else's.
    """
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"MODEL_DIR {model_dir} is not a save_pretrained folder (no config.json)")
    out = model_dir / ONNX_DIR
    if out.exists() and not (out / OWNED_MARK).is_file():
        raise ExportError(f"{out} exists and was not written by skd (no {OWNED_MARK} in it); move it away first")
    return out


def export_model(model_dir: Path, spec: TaskSpec, dev: Encoded, pad_id: int, *, int8: bool = True,
                 tolerance: float = 0.01, atol: float = 1e-3, threads: int = 1) -> ExportReport:
    """Export a saved model to `<model_dir>/onnx/` (model.onnx, model.int8.onnx, export.json), verified.

    Args:
        model_dir: a `save_pretrained` folder (a student or teacher skd wrote, or any classifier).
        spec: its task; dev: the dev rows in the model's tokens; pad_id: its pad token id.
        int8: also write the int8 file; tolerance / atol: see `verify`; threads: ONNX Runtime threads.

    Returns:
        The report (also written as export.json).

    Raises:
        ExportError: a check failed (nothing is written), or the target folder is not skd's.
        TeacherError: the model does not load.
    """
    from actors.models import load_classifier
    from orchestrator.common.evaluation import predict

    out = check_target(model_dir)
    model = load_classifier(str(model_dir), spec.num_labels, regression=spec.is_regression).eval()
    reference = predict(model, dev, pad_id, 64)
    report = ExportReport(out, spec.metric, glue_metrics(spec, reference, dev.labels))
    tmp = Path(tempfile.mkdtemp(prefix=".onnx-", dir=model_dir))
    try:
        fp32 = tmp / FILES["onnx-fp32"]
        to_onnx(model, fp32, dev.batch(np.arange(min(2, len(dev.input_ids))), pad_id))
        report.checks.append(verify(fp32, "onnx-fp32", reference, dev.labels, spec, dev, pad_id,
                                    tolerance=tolerance, atol=atol, threads=threads))
        if int8:
            to_int8(fp32, tmp / FILES["onnx-int8"])
            report.checks.append(verify(tmp / FILES["onnx-int8"], "onnx-int8", reference, dev.labels, spec, dev,
                                        pad_id, tolerance=tolerance, atol=None, threads=threads))
        (tmp / REPORT).write_text(json.dumps(report.to_json(), indent=2))
        (tmp / OWNED_MARK).write_text("written by skd export, which may replace this folder\n")
        if out.exists():
            shutil.rmtree(out)  # skd's own earlier export (check_target)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return report


def run_of(model_dir: Path) -> str | None:
    """The MLflow run id that trained `model_dir` (its `skd-run.json`), or None."""
    try:
        return json.loads((model_dir / RUN_FILE).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def log_export(tracking_uri: str, run_id: str, report: ExportReport) -> None:
    """The exported files as artifacts `onnx/` of `run_id`, and their checks as metrics
    `export/<backend>/max_abs_diff`, `export/<backend>/dev_<metric>`, `export/<backend>/delta`, `.../mb`."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import log_metrics

    client = MlflowClient(tracking_uri)
    client.log_artifacts(run_id, str(report.folder), ONNX_DIR)
    values = {}
    for c in report.checks:
        values.update({f"export/{c.backend}/max_abs_diff": c.max_abs_diff, f"export/{c.backend}/delta": c.delta,
                       f"export/{c.backend}/mb": c.bytes / 1e6,
                       **{f"export/{c.backend}/dev_{k}": v for k, v in c.metrics.items()}})
    log_metrics(client, run_id, values, 0)

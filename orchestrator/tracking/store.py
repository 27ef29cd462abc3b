"""MLflow from one place: the driver owns runs (the store check, experiments, redacted params, metrics,
timings, figures, the UI hint, model logging); rank 0 of the trainer logs metrics in batches through
`orchestrator.tracking.logger.MetricLogger`, and the figures are drawn by `orchestrator.tracking.plots`.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow prints "View run <name> at: <tracking uri>/#/..." when a run against a server ends, credentials
# (http://user:password@host) included; skd prints its own link instead, credentials left out (`browse_hint`).
os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"

import mlflow  # noqa: E402
from mlflow.entities import Metric  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

PARAM_VALUE_LIMIT = 6000


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""The experiment tag that makes MLflow 3's UI open an experiment on its training runs (without it the UI
guesses, and opens skd's experiments on the GenAI overview of traces)."""


def ensure_experiment(tracking_uri: str, name: str, artifact_root: Path | None = None) -> str:
    """Get or create an experiment, tagged `EXPERIMENT_KIND` (an existing one without the tag gets it); with a
    sqlite store, artifacts go to `artifact_root` (absolute). Returns the experiment id."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        for key, value in EXPERIMENT_KIND.items():
            if key not in exp.tags:  # a kind the user chose stays
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    location = None
    if artifact_root is not None:
        artifact_root.mkdir(parents=True, exist_ok=True)
        location = artifact_root.resolve().as_uri()
    return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


def check_store(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast when the tracking store cannot be reached (before any Ray resource is taken).

    An http(s) store must answer its `/health` endpoint within `timeout_s` seconds; a sqlite store's folder
    must exist.

    Raises:
        SkdError: naming `mlflow.tracking_uri` and the fix.
    """
    from actors.errors import SkdError

    if tracking_uri.startswith(("http://", "https://")):
        import base64
        import urllib.parse
        import urllib.request

        url = urllib.parse.urlsplit(tracking_uri)
        request = urllib.request.Request(urllib.parse.urlunsplit(
            (url.scheme, url.hostname + (f":{url.port}" if url.port else ""), url.path.rstrip("/") + "/health", "", "")))
        if url.username or url.password:  # credentials in the URI: as MLflow sends them, never in a message
            pair = f"{urllib.parse.unquote(url.username or '')}:{urllib.parse.unquote(url.password or '')}"
            request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as answer:
                if answer.status == 200:
                    return
                problem = f"HTTP {answer.status}"
        except Exception as exc:  # noqa: BLE001  (refused, DNS, TLS, HTTP errors, bad URL: all "does not answer")
            problem = mask(str(getattr(exc, "reason", exc)))
        raise SkdError(f"mlflow.tracking_uri {mask(tracking_uri)}: the MLflow tracking server does not answer "
                       f"({problem}); start it (e.g. mlflow server --host 127.0.0.1 --port 5000) or point "
                       f"mlflow.tracking_uri at a running one (or sqlite:///mlflow.db)")
    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise SkdError(f"mlflow.tracking_uri {tracking_uri}: the folder {folder} does not exist; create it or "
                           f"choose another database path")


def open_experiment(tracking_uri: str, name: str) -> tuple[MlflowClient, str]:
    """(client, experiment id) of experiment `name` in the store, created if absent (artifacts beside a
    sqlite database go to `default_artifact_root`). The one place commands set up MLflow.

    Raises:
        SkdError: the store is unreachable (`check_store`).
    """
    check_store(tracking_uri)
    return MlflowClient(tracking_uri), ensure_experiment(tracking_uri, name, default_artifact_root(tracking_uri))


def default_artifact_root(tracking_uri: str) -> Path | None:
    """`mlartifacts/` beside a sqlite database file; None for servers (they choose their own)."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts"
    return None


def code_version() -> str:
    """The git commit of this checkout ("unknown" outside git), for the `skd.code_version` tag."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


SECRET_KEY = re.compile(r"(^|[_-])(token|password|passwd|secret|api_?key|access_?key|credentials?)$", re.IGNORECASE)
URL_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://)[^\s@]+@(?=[^\s@]*$)", re.IGNORECASE)  # up to the last @
QUERY_SECRET = re.compile(r"([?&][^=&\s]*(?:token|password|secret|key|sig|credential)[^=&\s]*=)[^&\s]+",
                          re.IGNORECASE)


def mask(value: str) -> str:
    """`value` with URL credentials (`https://***@host`, whatever the user part holds) and secret query
    values (`?token=***`, `&sig=***`, `X-Amz-Credential=***`) masked."""
    return QUERY_SECRET.sub(r"\1***", URL_USERINFO.sub(r"\1***@", value))


def redact(params: dict[str, str]) -> dict[str, str]:
    """Params with secrets masked as `***`: the value of a setting whose last name part is a secret's
    (`token`, `password`, `secret`, `api_key`, `access_key`, `credentials`; not `num_tokens`), and URL
    credentials and secret query values in any value (`mask`), so tracking credentials never reach MLflow."""
    out = {}
    for key, value in params.items():
        if SECRET_KEY.search(key.rsplit(".", 1)[-1]) and value not in ("None", ""):
            out[key] = "***"
        else:
            out[key] = mask(value)
    return out


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    """Log params (secrets masked by `redact`) in batches of 100 (MLflow's limit), values clipped to
    MLflow's length limit."""
    from mlflow.entities import Param

    items = [Param(k, v[:PARAM_VALUE_LIMIT]) for k, v in redact(params).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i: i + 100])


def log_metrics(client: MlflowClient, run_id: str, values: dict[str, float], step: int) -> None:
    """Log several metrics at one step in one batch."""
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])


def metric_history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric, by step."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def log_timings(client: MlflowClient, run_id: str, timings: dict[str, float]) -> None:
    """Log a run's wall-time breakdown (`time/*`, seconds) as metrics in one batch."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in sorted(timings.items())])


def log_figures(client: MlflowClient, run_id: str, figures: list[Path]) -> None:
    for fig in figures:
        client.log_artifact(run_id, str(fig), artifact_path="plots")


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI for this store, bound to 127.0.0.1."""
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


def browse_hint(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """How to look at an experiment (or run) in the MLflow UI: a server's page (credentials left out), or
    for a local store the `ui_command` and the page to open once it runs."""
    import urllib.parse

    if tracking_uri.startswith(("http://", "https://")):
        url = urllib.parse.urlsplit(tracking_uri)
        host = url.hostname + (f":{url.port}" if url.port else "")
        base = urllib.parse.urlunsplit((url.scheme, host, url.path.rstrip("/"), "", ""))
        return f"open {experiment_url(base, experiment_id, run_id)}"
    return f"{ui_command(tracking_uri)}, then open {experiment_url('http://127.0.0.1:5000', experiment_id, run_id)}"


def experiment_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page of an experiment's training runs (or of one run) at `base` (e.g.
    http://127.0.0.1:5000). MLflow 3's UI remembers a GenAI / model-training view per browser and starts on
    GenAI; the `workflowType=machine_learning` parameter opens the model-training view (the experiment's
    `mlflow.experimentKind` tag decides only where that switch is off)."""
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{base}/#/experiments/{experiment_id}/{page}?workflowType=machine_learning"


def log_hf_model(tracking_uri: str, run_id: str, model_dir: Path, registered_name: str | None = None,
                 input_example: str | list[dict[str, str]] | None = None) -> str:
    """Log a `save_pretrained` classifier folder to the run as an MLflow transformers model
    (text-classification pipeline; MLflow infers its signature from the input example: a string in, or
    text and text_pair columns for `[{"text", "text_pair"}]`; label and score out); register it in the
    Model Registry only when `registered_name` is given.

    Requirements are given explicitly: MLflow's inference imports optional packages (torchvision) that a
    CPU install lacks. Returns the model URI (models:/...).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    mlflow.set_tracking_uri(tracking_uri)
    import torch
    import transformers

    import logging

    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)  # model-card/licence notes for local folders
    with mlflow.start_run(run_id=run_id):  # the caller sets the final status afterwards
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer}, name="student",
            task="text-classification", registered_model_name=registered_name, input_example=input_example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"])
    return info.model_uri

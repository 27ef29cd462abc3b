"""MLflow from one place: the driver owns runs; rank 0 of the trainer logs metrics in batches.

Also the plots logged as artifacts: the sampling distribution against observed teacher counts, and
learning curves.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Iterable

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


class MetricLogger:
    """Metric and tag logging into an existing run from a training worker (rank 0; a no-op elsewhere) that
    survives a tracking-store outage: nothing is lost and training never waits for MLflow.

    `flush()` hands the buffer to one background sender and returns at once. A batch the store refuses
    (server down, network gone) stays buffered and is sent again every `retry_s` seconds; more than
    `max_buffered` values in memory spill, oldest first, to a JSON-lines file (`spill_path`) that is
    replayed first when the store is back and removed once sent (metrics carry their own step and
    timestamp, so the order of sending does not matter). `close()` waits up to `drain_s`
    seconds for the rest. MLflow's own asynchronous logging (`log_batch(..., synchronous=False)`) is not
    used: it drops a batch whose request failed (the error lands on the batch's future), so an outage loses
    metrics.

    Args:
        tracking_uri: MLflow tracking URI; run_id: the run the driver opened.
        enabled: False on non-zero ranks.
        max_buffered: metric/tag values kept in memory before spilling to `spill_path`.
        spill_path: the spill file (a run's: <output_dir>/metrics-spill/<run_id>.jsonl; default:
            skd-metrics-<run_id>.jsonl in the temp folder); its folder is made when the first value spills.
        retry_s: seconds between attempts while the store is down; drain_s: how long `close` waits.
    """

    def __init__(self, tracking_uri: str, run_id: str, enabled: bool = True, *, max_buffered: int = 50_000,
                 spill_path: Path | None = None, retry_s: float = 5.0, drain_s: float = 300.0) -> None:
        import tempfile
        from concurrent.futures import ThreadPoolExecutor

        self.enabled, self.run_id = enabled, run_id
        self.max_buffered, self.retry_s, self.drain_s = max_buffered, retry_s, drain_s
        self.spill_path = spill_path or Path(tempfile.gettempdir()) / f"skd-metrics-{run_id}.jsonl"
        self._buffer: list = []  # Metric and RunTag, in logging order
        # lines in the spill file (one left by a killed worker of this run is replayed too)
        self._spilled = len(self.spill_path.read_text().splitlines()) if enabled and self.spill_path.is_file() else 0
        self._replaying = 0  # spill-file lines in the batch in flight
        self._inflight = None  # (future, items, from_spill)
        self._down_since: float | None = None
        self._last_try = 0.0
        if enabled:  # our own retries: each request fails fast while the store is down
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
            self._client = MlflowClient(tracking_uri)
            self._sender = ThreadPoolExecutor(1, thread_name_prefix="skd-mlflow")

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics for `step` (sent by `flush`)."""
        if self.enabled:
            now = int(time.time() * 1000)
            self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())

    def set_tag(self, key: str, value: str) -> None:
        """Queue a run tag (sent by `flush`, in order with the metrics)."""
        if self.enabled:
            from mlflow.entities import RunTag

            self._buffer.append(RunTag(key, value[:5000]))

    @property
    def pending(self) -> int:
        """Values not yet in the store (memory, spill file and the batch in flight)."""
        inflight = len(self._inflight[1]) if self._inflight and not self._inflight[2] else 0  # spill rows: counted
        return len(self._buffer) + self._spilled + inflight

    def flush(self) -> None:
        """Collect the last send's outcome and start the next (never blocks on the store)."""
        if not self.enabled:
            return
        self._collect(block=False)
        if len(self._buffer) > self.max_buffered:
            self._spill(self._buffer[: len(self._buffer) - self.max_buffered // 2])
            self._buffer = self._buffer[len(self._buffer) - self.max_buffered // 2:]
        if self._inflight is None and (self._buffer or self._spilled) and \
                (self._down_since is None or time.monotonic() - self._last_try >= self.retry_s):
            from_spill = self._spilled > 0
            items = self._read_spill() if from_spill else self._buffer
            if not from_spill:
                self._buffer = []
            self._last_try = time.monotonic()
            self._inflight = (self._sender.submit(self._send, items), items, from_spill)

    def _send(self, items: list) -> list:
        """Send `items` (in the sender thread); returns the values the store refused (sent one by one once
        their batch was refused, so one bad name does not take its batch with it). Raises on an outage."""
        refused = []
        for i in range(0, len(items), 1000):  # MLflow's batch limit
            chunk = items[i: i + 1000]
            try:
                self._log(chunk)
            except Exception as exc:  # noqa: BLE001
                if not _rejected(exc):
                    raise
                for item in chunk:
                    try:
                        self._log([item])
                    except Exception as one:  # noqa: BLE001
                        if not _rejected(one):
                            raise
                        refused.append((item, str(one)))
        return refused

    def _log(self, items: list) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, metrics=[m for m in items if isinstance(m, Metric)],
                               tags=[t for t in items if isinstance(t, RunTag)])

    def _collect(self, block: bool) -> None:
        """Take the in-flight batch's outcome: done (drop it; a replayed spill file is removed) or failed
        (back to the front of the queue)."""
        if self._inflight is None or (not block and not self._inflight[0].done()):
            return
        future, items, from_spill = self._inflight
        self._inflight = None
        try:
            refused = future.result()
        except Exception as exc:  # noqa: BLE001  (an outage: keep the values, try again later)
            if self._down_since is None:
                self._down_since = time.monotonic()
                print(f"[skd] warning: MLflow store unreachable ({type(exc).__name__}); training goes on, "
                      f"metrics are kept and sent when it is back", flush=True)
            if not from_spill:
                self._buffer = items + self._buffer
            return
        if refused:  # the store answered and refused these: retrying cannot help; kept aside, not lost
            aside = self.spill_path.with_suffix(".rejected.jsonl")
            print(f"[skd] warning: MLflow refused {len(refused)} values ({refused[0][1]}); kept in {aside}", flush=True)
            aside.parent.mkdir(parents=True, exist_ok=True)
            self._write_rows(aside, [item for item, _ in refused])
        self._sent(from_spill)
        if self._down_since is not None:
            print(f"[skd] MLflow store back after {time.monotonic() - self._down_since:.0f} s; sending the "
                  f"{self.pending} kept values", flush=True)
            self._down_since = None

    def _sent(self, from_spill: bool) -> None:
        """The in-flight batch is done with: drop its lines from the spill file (lines spilled meanwhile
        stay for the next send)."""
        if not from_spill:
            return
        rest = self.spill_path.read_text().splitlines(keepends=True)[self._replaying:]
        if rest:
            self.spill_path.write_text("".join(rest))
        else:
            self.spill_path.unlink(missing_ok=True)
        self._spilled = len(rest)

    @staticmethod
    def _write_rows(path: Path, items: list) -> None:
        import json

        with open(path, "a+") as f:
            if f.tell() > 0:  # a line cut short (a worker killed mid-write) gets its own line end
                f.seek(f.tell() - 1)
                if f.read(1) != "\n":
                    f.write("\n")
            for m in items:
                row = {"k": m.key, "v": m.value, "t": m.timestamp, "s": m.step} if isinstance(m, Metric) else \
                    {"tag": m.key, "value": m.value}
                f.write(json.dumps(row) + "\n")

    def _spill(self, items: list) -> None:
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        self._write_rows(self.spill_path, items)
        self._spilled += len(items)

    def _read_spill(self) -> list:
        """The spill file's values (`_replaying` = its lines; a line cut short by a killed worker is skipped)."""
        import json

        from mlflow.entities import RunTag

        lines = self.spill_path.read_text().splitlines()
        self._replaying = len(lines)
        items = []
        for line in lines:
            try:
                r = json.loads(line)
                items.append(Metric(r["k"], r["v"], r["t"], r["s"]) if "k" in r else RunTag(r["tag"], r["value"]))
            except (ValueError, KeyError, TypeError):
                continue
        return items

    def close(self) -> None:
        """Send everything left, waiting up to `drain_s` seconds for the store; what cannot be sent stays in
        the spill file, whose path is printed."""
        if not self.enabled:
            return
        deadline = time.monotonic() + self.drain_s
        while self.pending and time.monotonic() < deadline:
            self.flush()
            self._collect(block=True)
            if self.pending and self._down_since is not None:
                time.sleep(min(self.retry_s, max(0.0, deadline - time.monotonic())))
        if self.pending:
            self._spill(self._buffer)
            self._buffer = []
            print(f"[skd] warning: MLflow store still unreachable; {self._spilled} metric values kept in "
                  f"{self.spill_path}", flush=True)
        self._sender.shutdown(wait=False)


def _rejected(exc: Exception) -> bool:
    """Whether the store answered and refused a request (HTTP 4xx other than 408/429): not an outage."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    try:
        status = int(exc.get_http_status_code())
    except (TypeError, ValueError):
        return False
    return 400 <= status < 500 and status not in (408, 429)


def metric_history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric, by step."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def plot_distribution(names: list[str], probs: Iterable[float], counts: Iterable[int], path: Path) -> Path:
    """Bar chart: configured sampling probability vs observed share of teacher samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    probs = np.asarray(list(probs), dtype=float)
    counts = np.asarray(list(counts), dtype=float)
    observed = counts / counts.sum() if counts.sum() > 0 else counts
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 3.5))
    ax.bar(x - 0.2, probs, 0.4, label="sampling distribution p")
    ax.bar(x + 0.2, observed, 0.4, label="observed share of samples")
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("probability")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_p_over_time(history: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """Stacked area of the sampling distribution p by step, one band per teacher (the adaptive family's
    `sampler/p/<name>` histories: p in force from each step on; uniform before a teacher's first value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(history)
    steps = sorted({1} | {s for h in history.values() for s, _ in h})
    bands = []
    for n in names:
        known = dict(history[n])
        value, row = 1.0 / max(len(names), 1), []  # before a teacher's first value: uniform
        for s in steps:  # a teacher's p holds until its next value
            value = known.get(s, value)
            row.append(value)
        bands.append(row)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.stackplot(steps, np.asarray(bands), labels=names, step="post")
    ax.set_xlabel("step")
    ax.set_ylabel("sampling probability p")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_learning_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """One panel per metric (e.g. train/loss, dev/accuracy) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {k: v for k, v in curves.items() if v}
    fig, axes = plt.subplots(1, max(1, len(curves)), figsize=(4.2 * max(1, len(curves)), 3.4), squeeze=False)
    for ax, (name, points) in zip(axes[0], curves.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 20 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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

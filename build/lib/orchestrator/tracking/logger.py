"""MLflow metric logging off the training loop's thread: `MetricLogger` buffers metrics and tags, sends them
from a background thread and spills what the store refuses or cannot take to a JSON-lines file that is sent
again later (on rank 0 of a run's Ray Train workers).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient


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

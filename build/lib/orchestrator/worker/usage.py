"""Where the machines' time and memory go while a run trains, logged to its MLflow run so a user can see
which side is the bottleneck, the student or the teachers.

- The student workers' machines: MLflow's own system metrics (`mlflow.system_metrics`): CPU utilisation,
  memory, disk, network and, where present, GPU utilisation and memory, every `mlflow.system_metrics_s`
  seconds as `system/...` (one worker) or `system/rank<r>/...` (several), shown in the UI's System
  metrics tab. These describe the worker's whole machine, as MLflow measures it.
- Each teacher actor's own process, at the student's logging steps (`distill.log_every`):
  `teachers/<name>/busy_percent` (seconds in forward passes per wall-clock second x 100: near 100 means the
  teacher is the bottleneck), `teachers/<name>/cpu_percent` (process CPU seconds per wall-clock second
  x 100, all threads: can exceed 100), `teachers/<name>/rss_mb` and, on a GPU, `teachers/<name>/gpu_memory_mb`.
  Rates are over the interval between two answers, timed by the teacher's own clock. Teachers answer
  `stats()` from a control thread, so asking never waits behind knowledge requests, and the worker does
  not block on it: an answer not yet there is read at the next logging step; only the run's last logging
  step waits (up to 2 s, twice at most) so that every run ends with its teachers' rates. MLflow's monitor
  likewise gets one final sample when the worker ends (`SystemMetrics.finish`).
"""

from __future__ import annotations

import logging

import ray


def start_system_metrics(run_id: str, tracking_uri: str, rank: int, world: int, every_s: float,
                         resumed: bool):
    """Start MLflow's system-metrics monitor for this worker's machine (a daemon thread); None when
    `every_s` is 0. Call `.finish()` on the result at the end of the run.

    Args:
        run_id / tracking_uri: the MLflow run the metrics go to.
        rank / world: this worker's data-parallel rank and the number of workers (metric keys get
            `rank<r>/` with several workers).
        every_s: seconds between samples (0: off).
        resumed: continue the run's system-metric steps after a restart or resume.
    """
    if every_s <= 0:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # "Started monitoring ..." lines
    monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, resume_logging=resumed,
                                   node_id=f"rank{rank}" if world > 1 else None, tracking_uri=tracking_uri)
    monitor.start()
    return SystemMetrics(monitor)


class SystemMetrics:
    """MLflow's system-metrics monitor, plus one last sample when the run ends: MLflow publishes only
    whole sampling intervals, so without it a run (or a restarted worker's stretch) shorter than one
    interval would log nothing, and every run would lose its last partial interval."""

    def __init__(self, monitor) -> None:
        self.monitor = monitor

    def finish(self) -> None:
        """Stop the monitor's thread, then log one final sample (a failure to log it is ignored, like
        MLflow's own logging failures)."""
        self.monitor.finish()
        try:
            self.monitor.collect_metrics()
            self.monitor.publish_metrics(self.monitor.aggregate_metrics())
            self.monitor.mlflow_logger.flush()
        except Exception as exc:  # noqa: BLE001  (system metrics never fail a run)
            logging.getLogger(__name__).warning("final system-metrics sample not logged: %r", exc)


class TeacherUsage:
    """The teacher-side metrics of the module docstring, polled without blocking.

    Args:
        source: the knowledge source; one without `stats_refs` (the offline cache) gives no metrics.
        names: callable returning the run's teacher names by index (they grow when a served pool grows).
    """

    def __init__(self, source, names) -> None:
        self.ask = getattr(source, "stats_refs", None)
        self.names = names
        self.pending: dict[int, ray.ObjectRef] | None = None
        self.last: dict[int, dict] = {}

    def poll(self, final: bool = False) -> dict[str, float]:
        """Metrics from the answers that arrived since the last poll ({} when none did), then ask again. At
        the run's last logging step (`final`) it waits up to 2 s for the answers, twice if need be, so every
        run ends with its teachers' rates."""
        if self.ask is None:
            return {}
        metrics = self._read(2.0 if final else 0.0)
        if final and not any(k.endswith("busy_percent") for k in metrics):
            metrics.update(self._read(2.0))
        return metrics

    def _read(self, wait_s: float) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.pending is not None:
            refs = list(self.pending.values())
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=wait_s)
            if len(ready) < len(refs):
                return {}
            for k, ref in self.pending.items():
                try:
                    now = ray.get(ref)
                except Exception:  # noqa: BLE001  (a lost teacher: the feed reports it; no usage to log)
                    self.last.pop(k, None)
                    continue
                metrics.update(self._rates(k, now))
                self.last[k] = now
        self.pending = self.ask()
        return metrics

    def _rates(self, k: int, now: dict) -> dict[str, float]:
        name = self.names()[k]
        out = {f"teachers/{name}/rss_mb": now["rss_bytes"] / 2**20}
        if now.get("gpu_memory_bytes"):
            out[f"teachers/{name}/gpu_memory_mb"] = now["gpu_memory_bytes"] / 2**20
        before = self.last.get(k)
        elapsed = now["clock_s"] - before["clock_s"] if before else 0.0
        restarted = before and (now["cpu_s"] < before["cpu_s"] or now["compute_s"] < before["compute_s"])
        if before and elapsed > 0 and not restarted:  # (a restarted actor's counters start over)
            out[f"teachers/{name}/busy_percent"] = 100 * (now["compute_s"] - before["compute_s"]) / elapsed
            out[f"teachers/{name}/cpu_percent"] = 100 * (now["cpu_s"] - before["cpu_s"]) / elapsed
        return out

"""`skd benchmark`: inference speed of saved models, measured the same way for students and teachers.

Every model reads the same dev sentences in its own tokenizer's tokens, at their real lengths (batch 1:
no padding; batch 32: padded to the batch's longest row, the batches in dev order). Every backend runs
with the same number of threads (torch `set_num_threads`, ONNX Runtime intra-op threads, one inter-op
thread). Measurements are interleaved: each round runs every (model, backend) once, in turn, so a load
change on the machine hits all of them alike and the ratios between them hold. One untimed round warms
every runner up. Rounds repeat until the 95% interval of every runner's mean round throughput and of its
round median latency is within `rel_ci` of the mean (at least `min_rounds`), or `max_seconds` have passed.

Reported per runner: parameters, size on disk (bytes of the weights it loads), latency p50 / p95 at batch
1 (milliseconds, over every timed call) with the 95% interval of the p50 across rounds, and throughput at
batch 32 (samples/s = total samples / total time over every timed round) with its 95% interval.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from orchestrator.common.task import Encoded

BACKENDS = ("torch-fp32", "onnx-fp32", "onnx-int8")
Runner = Callable[[np.ndarray, np.ndarray], None]  # (input_ids [B, L], attention_mask [B, L]) -> None


@dataclass
class Speed:
    """One (model, backend)'s measurement. Units: bytes, milliseconds, samples/s.

    Attributes:
        model / backend: names; parameters: parameter count; bytes: weights on disk.
        p50_ms / p95_ms: batch-1 latency percentiles over every timed call; p50_ci: 95% interval of the
            per-round medians' mean (ms); NaN when no batch-1 rows were timed.
        samples_per_s: batch-32 throughput over every timed round; sps_ci: 95% interval of the per-round
            throughputs' mean. rounds: timed rounds; tight: whether both intervals met `rel_ci`.
    """

    model: str
    backend: str
    parameters: int
    bytes: int
    p50_ms: float
    p95_ms: float
    p50_ci: tuple[float, float]
    samples_per_s: float
    sps_ci: tuple[float, float]
    rounds: int
    tight: bool


def _interval(values: list[float]) -> tuple[float, float]:
    """95% t-interval of the mean of `values` (n >= 2)."""
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64)
    half = float(t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("inf")
    return float(v.mean() - half), float(v.mean() + half)


def _tight(values: list[float], rel: float) -> bool:
    lo, hi = _interval(values)
    return (hi - lo) / 2 <= rel * abs(float(np.mean(values)))


def torch_runner(model, threads: int) -> Runner:
    """A PyTorch runner (eval mode, inference mode, `threads` intra-op threads)."""
    import torch

    model.eval()

    def run(ids: np.ndarray, mask: np.ndarray) -> None:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
    return run


def onnx_runner(path: Path, threads: int) -> Runner:
    """An ONNX Runtime CPU runner of an exported file (`orchestrator.commands.export.session`)."""
    from orchestrator.commands.export import session

    sess = session(path, threads)

    def run(ids: np.ndarray, mask: np.ndarray) -> None:
        sess.run(["logits"], {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)})
    return run


@dataclass
class Workload:
    """One model's inputs: `latency` rows [1, L_i] for batch-1 calls (none: latency not timed), `batches`
    [32, L_b] padded batches."""

    latency: list[tuple[np.ndarray, np.ndarray]]
    batches: list[tuple[np.ndarray, np.ndarray]]

    @classmethod
    def of(cls, data: Encoded, pad_id: int, latency_rows: int, batch_rows: int, batch_size: int = 32) -> "Workload":
        """The first `latency_rows` dev rows one by one and the first `batch_rows` in batches of `batch_size`."""
        lat = [data.batch([i], pad_id) for i in range(min(latency_rows, len(data.input_ids)))]
        n = min(batch_rows, len(data.input_ids))
        bat = [data.batch(np.arange(i, min(i + batch_size, n)), pad_id) for i in range(0, n, batch_size)]
        return cls([(b["input_ids"], b["attention_mask"]) for b in lat],
                   [(b["input_ids"], b["attention_mask"]) for b in bat])

    @property
    def batch_samples(self) -> int:
        """Rows in the batched part (samples per throughput round)."""
        return sum(len(ids) for ids, _ in self.batches)


def measure(runners: dict[tuple[str, str], tuple[Runner, Workload]], *, min_rounds: int = 3,
            max_rounds: int = 30, max_seconds: float = 120.0, rel_ci: float = 0.05,
            progress: Callable[[int, float], None] | None = None) -> dict[tuple[str, str], dict]:
    """Interleaved rounds of every runner (see the module docstring).

    Args:
        runners: {(model, backend): (runner, its workload)}.
        min_rounds / max_rounds: timed rounds at least / at most; max_seconds: stop after this much wall
            time (once `min_rounds` are done); rel_ci: the target half-width of both 95% intervals, as a
            fraction of the mean.
        progress: called after each round with (rounds done, seconds so far).

    Returns:
        {(model, backend): {"latencies_ms": [...], "round_p50_ms": [...], "round_sps": [...],
        "samples": int, "seconds": float}}.
    """
    stats = {k: {"latencies_ms": [], "round_p50_ms": [], "round_sps": [], "samples": 0, "seconds": 0.0}
             for k in runners}
    for run, work in runners.values():  # warm-up: one untimed pass of each
        for ids, mask in work.latency[:8] + work.batches[:2]:
            run(ids, mask)
    began, rounds = time.perf_counter(), 0
    while rounds < max_rounds:
        for key, (run, work) in runners.items():
            s, lat = stats[key], []
            for ids, mask in work.latency:
                t0 = time.perf_counter()
                run(ids, mask)
                lat.append(1e3 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for ids, mask in work.batches:
                run(ids, mask)
            took = time.perf_counter() - t0
            s["latencies_ms"] += lat
            if lat:
                s["round_p50_ms"].append(float(np.median(lat)))
            s["round_sps"].append(work.batch_samples / took)
            s["samples"] += work.batch_samples
            s["seconds"] += took
        rounds += 1
        elapsed = time.perf_counter() - began
        if progress is not None:
            progress(rounds, elapsed)
        if rounds >= min_rounds and (elapsed >= max_seconds or all(_both_tight(s, rel_ci) for s in stats.values())):
            break
    return stats


def _both_tight(s: dict, rel: float) -> bool:
    """Both intervals of one runner's rounds within `rel` of the mean (latency only when it was timed)."""
    return _tight(s["round_sps"], rel) and (not s["round_p50_ms"] or _tight(s["round_p50_ms"], rel))


def summarise(key: tuple[str, str], s: dict, parameters: int, size: int, rel_ci: float) -> Speed:
    """A `Speed` row from `measure`'s statistics of one runner."""
    lat = np.asarray(s["latencies_ms"])
    p50, p95 = (float(np.percentile(lat, q)) for q in (50, 95)) if len(lat) else (float("nan"), float("nan"))
    p50_ci = _interval(s["round_p50_ms"]) if s["round_p50_ms"] else (float("nan"), float("nan"))
    return Speed(key[0], key[1], parameters, size, p50, p95, p50_ci, s["samples"] / s["seconds"],
                 _interval(s["round_sps"]), len(s["round_sps"]), _both_tight(s, rel_ci))


def weights_bytes(model_dir: Path) -> int:
    """Bytes of a `save_pretrained` folder's weights (`*.safetensors`, else `*.bin`)."""
    files = list(model_dir.glob("*.safetensors")) or list(model_dir.glob("*.bin"))
    return sum(f.stat().st_size for f in files)


def benchmark(model_dirs: list[Path], task: str, data, *, backends: tuple[str, ...] = BACKENDS, threads: int = 1,
              latency_rows: int = 64, batch_rows: int = 256, min_rounds: int = 3, max_rounds: int = 30,
              max_seconds: float = 300.0, rel_ci: float = 0.05,
              progress: Callable[[int, float], None] | None = None) -> list[Speed]:
    """Measure every model on every backend, side by side (`measure`), on `task`'s dev sentences.

    ONNX backends use `<model>/onnx/` (written and verified by `skd export`) when it is there; otherwise the
    model is exported into a temporary folder for the measurement only (unverified, removed afterwards).

    Args:
        model_dirs: `save_pretrained` folders; task / data: the task name and a `DataConfig` (dev split,
            max_length); backends: a subset of `BACKENDS`; threads: for every backend; latency_rows /
            batch_rows: dev rows of the batch-1 and batch-32 parts; the rest as `measure`.

    Returns:
        One `Speed` per (model, backend), in the order given.

    Raises:
        SkdError: an unknown backend, a folder that is not a model, unreadable data.
    """
    import tempfile

    import torch

    from actors.errors import SkdError
    from actors.models import count_parameters, load_classifier, load_tokenizer
    from orchestrator.driver.inputs import encode, load_split
    from orchestrator.common.task import task_spec
    from orchestrator.commands.export import FILES, ONNX_DIR, to_int8, to_onnx

    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown or not backends:
        raise SkdError(f"--backend {', '.join(unknown) or '(none)'}: use one or more of {', '.join(BACKENDS)}")
    for d in model_dirs:
        if not (d / "config.json").is_file():
            raise SkdError(f"MODEL_DIR {d} is not a save_pretrained folder (no config.json)")
    spec = task_spec(task, data)
    dev = load_split(spec.name, data, "dev")
    torch.set_num_threads(threads)
    runners, sizes = {}, {}
    with tempfile.TemporaryDirectory(prefix="skd-benchmark-") as tmp:
        for d in model_dirs:
            name = d.name if sum(x.name == d.name for x in model_dirs) == 1 else str(d)
            tok = load_tokenizer(str(d))
            pad_id = int(tok.pad_token_id or 0)
            enc = encode(dev, tok, data.max_length)
            work = Workload.of(enc, pad_id, latency_rows, batch_rows)
            model = load_classifier(str(d), spec.num_labels, regression=spec.is_regression).eval()
            params = count_parameters(model)
            onnx_dir = d / ONNX_DIR
            for backend in backends:
                if backend == "torch-fp32":
                    runners[name, backend] = (torch_runner(model, threads), work)
                    sizes[name, backend] = (params, weights_bytes(d))
                    continue
                path = onnx_dir / FILES[backend]
                if not path.is_file():
                    path = Path(tmp) / name.replace("/", "_") / FILES[backend]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    fp32 = path.parent / FILES["onnx-fp32"]
                    if not fp32.is_file():
                        to_onnx(model, fp32, enc.batch(np.arange(2), pad_id))
                    if backend == "onnx-int8":
                        to_int8(fp32, path)
                runners[name, backend] = (onnx_runner(path, threads), work)
                sizes[name, backend] = (params, path.stat().st_size)
        stats = measure(runners, min_rounds=min_rounds, max_rounds=max_rounds, max_seconds=max_seconds,
                        rel_ci=rel_ci, progress=progress)
    return [summarise(k, stats[k], *sizes[k], rel_ci) for k in runners]


_HEADLINE_SPEEDS: dict[tuple, tuple[float, float]] = {}
"""(student config, teacher folder, threads, task) -> (student, teacher) samples/s, measured once per process:
the runs of one `skd compare` share one student architecture and one best teacher."""


def headline(student_dir: Path, teacher_dir: Path, teacher_parameters: int, retention: float | None, task: str,
             data, num_labels: int, threads: int = 1) -> dict[str, float]:
    """SKDBERT's headline triple for a saved student against the best teacher (Ding et al. 2023, Table 1:
    parameters, speed-up, score retained).

    The speed-up is measured here, the two models side by side (`measure`, PyTorch fp32, batches of 32 of
    the first 64 dev rows, `threads` threads, at least 3 interleaved rounds, at most 60 s).

    Args:
        student_dir / teacher_dir: `save_pretrained` folders; teacher_parameters: the teacher's count (the
        manifest's); retention: the run's; task / data / num_labels: the run's task, `DataConfig` and C.

    Returns:
        {"headline/retention": student / teacher dev metric (when known), "headline/parameter_ratio":
        student / teacher parameters, "headline/speedup": student / teacher samples/s,
        "headline/student_samples_per_s", "headline/teacher_samples_per_s"}.
    """
    from actors.models import count_parameters, load_classifier

    params = count_parameters(load_classifier(str(student_dir), num_labels))
    key = ((student_dir / "config.json").read_text(), str(teacher_dir), threads, task)
    if key not in _HEADLINE_SPEEDS:
        rows = benchmark([student_dir, teacher_dir], task, data, backends=("torch-fp32",), threads=threads,
                         latency_rows=0, batch_rows=64, min_rounds=3, max_rounds=8, max_seconds=60.0)
        _HEADLINE_SPEEDS[key] = (rows[0].samples_per_s, rows[1].samples_per_s)
    student_sps, teacher_sps = _HEADLINE_SPEEDS[key]
    out = {"headline/parameter_ratio": params / teacher_parameters, "headline/speedup": student_sps / teacher_sps,
           "headline/student_samples_per_s": student_sps, "headline/teacher_samples_per_s": teacher_sps}
    if retention is not None:
        out["headline/retention"] = retention
    return out

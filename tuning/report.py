"""The campaign report on the parent MLflow run: best trial, a CSV of all trials and plots.

Plots: the metric against each hyperparameter, the best-so-far curve in trial order, the best trial's
sampling distribution, and the mean GSNR per distribution family (when trials probed GSNR).
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from actors.manifest import TeacherInfo
from orchestrator import tracking
from orchestrator.tracking import plots
from tuning.space import TuneSection


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric_vs_params(trials: list[dict[str, Any]], names: list[str], metric: str, path: Path) -> Path:
    """One scatter panel per hyperparameter (categorical ones on a category axis)."""
    plt = _plt()
    done = [t for t in trials if t["metric"] is not None]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(3.2 * max(1, len(names)), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        xs = [t.get(f"param.{name}") for t in done]
        ys = [t["metric"] for t in done]
        colors = ["tab:blue" if t["status"] == "FINISHED" else "tab:gray" for t in done]
        if xs and not all(isinstance(x, (int, float)) for x in xs):  # choices: names, lists of outputs
            cats = sorted({str(x) for x in xs})
            ax.scatter([cats.index(str(x)) for x in xs], ys, c=colors)
            ax.set_xticks(range(len(cats)), cats, rotation=30, fontsize=7)
        else:
            ax.scatter(xs, ys, c=colors)
        ax.set_xlabel(name)
    axes[0][0].set_ylabel(f"{metric} (grey: stopped early)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_best_so_far(trials: list[dict[str, Any]], metric: str, mode: str, path: Path) -> Path:
    plt = _plt()
    values = [t["metric"] for t in trials if t["metric"] is not None]
    best = np.maximum.accumulate(values) if mode == "max" else np.minimum.accumulate(values)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(1, len(values) + 1), values, "o", alpha=0.5, label="trial")
    ax.plot(range(1, len(best) + 1), best, "-", label="best so far")
    ax.set_xlabel("trial (in order of creation)")
    ax.set_ylabel(metric)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_gsnr_by_family(trials: list[dict[str, Any]], path: Path) -> Path | None:
    """Mean (over trials) of each trial's last whole-model mean GSNR, per distribution family."""
    by_family: dict[str, list[float]] = {}
    for t in trials:
        if t.get("gsnr_mean") is not None:
            by_family.setdefault(str(t.get("param.family", "fixed")), []).append(t["gsnr_mean"])
    if not by_family:
        return None
    plt = _plt()
    names = sorted(by_family)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(names, [np.mean(by_family[n]) for n in names])
    ax.set_ylabel("mean GSNR (last probe)")
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_campaign_report(client, parent_id: str, trials: list[dict[str, Any]], best: dict[str, Any] | None,
                        section: TuneSection, metric: str, teachers: list[TeacherInfo]) -> None:
    """Log best trial/config, `trials.csv` and the plots to the campaign's parent run."""
    if best is not None:
        client.set_tag(parent_id, "skd.best_trial", best["trial_id"])
        client.set_tag(parent_id, "skd.best_run_id", best["run_id"])
        for k, v in best.items():  # tags, not params: a resumed campaign may find a new best
            if k.startswith("param."):
                client.set_tag(parent_id, k.replace("param.", "best."), str(v))
        client.log_metric(parent_id, f"best/{metric}", float(best["metric"]))
    client.log_metric(parent_id, "trials", len(trials))
    client.log_metric(parent_id, "trials_stopped_early", sum(t["status"] == "KILLED" for t in trials))
    with tempfile.TemporaryDirectory(prefix="skd-report-") as tmp:
        tmp = Path(tmp)
        keys = sorted({k for t in trials for k in t})
        with open(tmp / "trials.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(trials)
        client.log_artifact(parent_id, str(tmp / "trials.csv"))
        figs = [plot_metric_vs_params(trials, list(section.space), metric, tmp / "metric_vs_params.png"),
                plot_best_so_far(trials, metric, section.mode, tmp / "best_so_far.png")]
        gsnr_fig = plot_gsnr_by_family(trials, tmp / "gsnr_by_family.png")
        if gsnr_fig is not None:
            figs.append(gsnr_fig)
        if best is not None and best.get("probs") and best["probs"] != "none":
            probs = json.loads(best["probs"])
            figs.append(plots.plot_distribution([t.name for t in teachers], probs, [0] * len(probs),
                                                tmp / "best_distribution.png"))
        tracking.log_figures(client, parent_id, figs)

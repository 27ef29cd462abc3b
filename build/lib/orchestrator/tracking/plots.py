"""The run's figures (matplotlib, Agg): the sampling distribution against what was drawn, p over time and
learning curves, written as PNG files that `store.log_figures` attaches to a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable


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

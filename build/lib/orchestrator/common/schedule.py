"""Which losses apply at each training step: internal-representation (IR) schedules.

Aguilar et al., "Knowledge Distillation from Internal Representations" (AAAI 2020), train the student's
internal representations first, either all layers at once, one layer at a time bottom-up
(progressive), or bottom-up keeping earlier layers' losses (stacked), each followed by a soft-label
stage. Liu et al. (ACL 2021) instead add the hidden-state loss to the soft-label loss at every step
(joint).

Steps are 0-based; the IR phase is the first round(ir_fraction * total) steps (halves rounded up),
split into k equal consecutive chunks for the progressive and stacked schedules (sizes differ by at
most one step when k does not divide it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("none", "joint", "all", "progressive", "stacked")


@dataclass(frozen=True)
class Stage:
    """The losses of one step.

    Attributes:
        layers: 1-based student layers with IR losses this step (ascending; empty for none).
        soft_labels: whether the soft-label/hard-label (KD + CE) loss applies.
    """

    layers: tuple[int, ...]
    soft_labels: bool


def ir_steps(total: int, ir_fraction: float) -> int:
    """Length of the IR phase: round(ir_fraction * total), halves rounded up."""
    return int(math.floor(ir_fraction * total + 0.5))


def stage_at(step: int, total: int, schedule: str, student_layers: tuple[int, ...], ir_fraction: float) -> Stage:
    """The stage of a 0-based step.

    Schedules:
        "none": soft labels only, every step.
        "joint": all `student_layers` and soft labels together, every step.
        "all": IR phase with all layers and no soft labels, then soft labels only.
        "progressive": IR phase in k chunks, chunk i uses only the i-th layer (bottom-up); then soft labels.
        "stacked": IR phase in k chunks, chunk i uses layers 1..i of `student_layers`; then soft labels.

    Args:
        step: in [0, total).
        total: number of training steps (>= 1).
        schedule: one of `SCHEDULES`.
        student_layers: the k IR layers, strictly ascending (ignored by "none").
        ir_fraction: fraction of the steps in the IR phase, in (0, 1] (used by all/progressive/stacked;
            1.0 leaves no soft-label stage).

    Returns:
        The step's `Stage`.

    Raises:
        ValueError: naming the field: unknown schedule, step outside [0, total), empty or unsorted
            layers, ir_fraction outside (0, 1], or an IR phase shorter than its number of chunks.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule = {schedule!r}: choose from {SCHEDULES}")
    if total < 1:
        raise ValueError(f"total = {total} steps must be >= 1")
    if not 0 <= step < total:
        raise ValueError(f"step = {step} must be in [0, total = {total})")
    if schedule == "none":
        return Stage((), True)
    layers = tuple(student_layers)
    if not layers or list(layers) != sorted(set(layers)) or layers[0] < 1:
        raise ValueError(f"student_layers = {layers} must be non-empty, strictly ascending and >= 1 for "
                         f"schedule = {schedule!r}")
    if schedule == "joint":
        return Stage(layers, True)
    if not 0.0 < ir_fraction <= 1.0:
        raise ValueError(f"ir_fraction = {ir_fraction} must be in (0, 1] for schedule = {schedule!r}")
    n_ir = ir_steps(total, ir_fraction)
    chunks = 1 if schedule == "all" else len(layers)
    if n_ir < chunks:
        raise ValueError(f"ir_fraction = {ir_fraction} of total = {total} gives {n_ir} IR steps, fewer than the "
                         f"{chunks} stage(s) of schedule = {schedule!r}: raise ir_fraction or total")
    if step >= n_ir:
        return Stage((), True)
    if schedule == "all":
        return Stage(layers, False)
    i = step * chunks // n_ir  # 0-based chunk
    return Stage((layers[i],) if schedule == "progressive" else layers[:i + 1], False)

"""Output folders: skd replaces only folders it created itself (each holds an `OWNED_MARK` file), so a
run name or output path that points at someone's data is refused instead of deleted."""

from __future__ import annotations

import shutil
from pathlib import Path

from actors.errors import SkdError

OWNED_MARK = ".skd-output"
"""File skd writes into every output folder it creates; only folders with it are ever replaced."""
RUN_FILE = "skd-run.json"
"""Written beside every model skd saves: {"run_id": the MLflow run that trained it} (`skd export` logs into it)."""


def check_output(folder: Path) -> None:
    """Refuse an output folder that exists and was not created by skd (skd never replaces those).

    Raises:
        SkdError: naming the folder and the fix.
    """
    if folder.exists() and not (folder / OWNED_MARK).is_file():
        raise SkdError(f"{folder} already exists and was not written by skd (no {OWNED_MARK} in it), so skd will "
                       f"not replace it: move it away, or choose another mlflow.run_name or output_dir")


def save_model(model_dir: Path, out: Path) -> None:
    """Copy a checkpoint's `save_pretrained` folder to `out`, replacing only an earlier skd output there."""
    check_output(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(model_dir, out)
    (out / OWNED_MARK).write_text("written by skd, which may replace this folder when the run is repeated\n")

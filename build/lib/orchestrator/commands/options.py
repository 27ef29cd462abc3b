"""What every `skd` command shares: the console, the common options (`-c CONFIG`, `--set k=v`, a pool's name and
cluster address) and the one-line user error with exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

from actors.errors import SkdError
from orchestrator.driver import runtime  # noqa: F401  (sets quiet Ray/MLflow environment defaults first)


console = Console(width=None if sys.stdout.isatty() else 200)  # logs and pipes get whole tables


ConfigOpt = Annotated[Path, typer.Option("-c", "--config", help="YAML config, e.g. configs/sst2.yaml.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a setting: --set distill.alpha=0.3 (repeatable).")]


def fail(exc: SkdError) -> None:
    """Print a user error as one line (no traceback) and exit with status 2."""
    console.print(Text("error: ", style="bold red") + Text(str(exc)))  # Text: no markup parsing of "[t4]"
    raise typer.Exit(2)


def resume_command(config: Path, set_: list[str] | None) -> str:
    """The `skd distill ... --resume` command that continues a run started with these arguments."""
    import shlex

    sets = " ".join(f"--set {shlex.quote(s)}" for s in set_ or [])
    return f"skd distill -c {shlex.quote(str(config))} {sets + ' ' if sets else ''}--resume"


PoolOpt = Annotated[Optional[str], typer.Option(
    "--name", help="Pool name (default: teachers.pool of the config, else 'default').")]
AddressOpt = Annotated[Optional[str], typer.Option(
    help="Ray cluster: auto or host:port (default: ray.address of the config, else $RAY_ADDRESS).")]


OptConfig = Annotated[Optional[Path], typer.Option("-c", "--config", help="YAML config (for ray.address, teachers.pool).")]

"""Every name skd's code takes from skd's own modules exists.

A name read off a module object (`tracking.plot_distribution`) fails only when the line runs, and skd catches
some of those lines on purpose (a failed plot is a warning, a failed trial a Tune error), so a module move that
leaves one dangling can pass most of the suite. This reads the source instead: every `from <skd module> import
name` and every `<module>.name` where `<module>` is an skd module bound by an import must resolve.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("actors", "orchestrator", "tuning")
SOURCES = sorted(p for d in (*PACKAGES, "bench", "tests") for p in (ROOT / d).rglob("*.py"))


def _resolve(module: ModuleType, name: str) -> bool:
    """Whether `module.name` exists as an attribute or as a submodule."""
    if hasattr(module, name):
        return True
    try:
        importlib.import_module(f"{module.__name__}.{name}")
        return True
    except ModuleNotFoundError:
        return False


def _dangling(path: Path) -> list[str]:
    """The names `path` imports from, or reads off, skd modules that do not exist, as 'line: what'."""
    tree = ast.parse(path.read_text(), str(path))
    bound: dict[str, ModuleType] = {}  # local name -> the skd module it is bound to
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in PACKAGES:
            module = importlib.import_module(node.module)
            for alias in node.names:
                if alias.name == "*":
                    continue
                if not _resolve(module, alias.name):
                    missing.append(f"{node.lineno}: from {node.module} import {alias.name}")
                    continue
                value = getattr(module, alias.name, None)
                if value is None:  # a submodule not yet imported by its package
                    value = importlib.import_module(f"{node.module}.{alias.name}")
                if isinstance(value, ModuleType):
                    bound[alias.asname or alias.name] = value
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    importlib.import_module(alias.name)
                    local = alias.asname or alias.name.split(".")[0]
                    bound[local] = importlib.import_module(alias.name if alias.asname else local)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            if not _resolve(bound[node.value.id], node.attr):
                missing.append(f"{node.lineno}: {node.value.id}.{node.attr} ({bound[node.value.id].__name__})")
    return missing


def test_the_check_finds_a_dangling_name(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from orchestrator import tracking\nfrom orchestrator.tracking import plots\n"
                   "tracking.plot_distribution\nplots.plot_distribution\ntracking.MlflowClient\n")
    assert _dangling(bad) == ["3: tracking.plot_distribution (orchestrator.tracking)",
                              "5: tracking.MlflowClient (orchestrator.tracking)"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_name_taken_from_skd_modules_exists(path):
    assert _dangling(path) == []

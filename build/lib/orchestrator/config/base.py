"""Where skd finds its files (the checkout or installed source, GLUE beside it), safe names, and the strict
base model every config section derives from (unknown keys are errors).
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict


REPO_ROOT = Path(__file__).resolve().parents[2]
GLUE_BESIDE = Path("..") / "shared" / "data" / "glue"  # the default GLUE folder, relative to a checkout's root


def installed_source_dir() -> Path | None:
    """The folder the installed `skd` distribution was installed from (`pip install -e .` or `pip install .`
    record it as a file:// URL in the distribution's direct_url.json, PEP 610), or None (not installed, or
    installed from an index or a wheel). Every `skd` distribution on sys.path is asked, since an egg-info
    folder in the working directory shadows the installed one."""
    import json
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    for dist in metadata.distributions(name="skd"):
        try:
            url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
        except ValueError:
            continue
        if url.startswith("file://"):
            return Path(unquote(urlparse(url).path))
    return None


def glue_dir_candidates() -> list[Path]:
    """Where the default GLUE folder is looked for, in order (duplicates dropped): ../shared/data/glue beside
    the imported package, beside the working directory, and beside the folder `skd` was installed from.
    Inside a `ray job submit` job the first two are Ray's uploaded copy of the working directory, so the
    installed source folder is what finds the user's checkout."""
    roots = [REPO_ROOT, Path.cwd(), installed_source_dir()]
    found: list[Path] = []
    for root in roots:
        if root is not None and (path := (root / GLUE_BESIDE).resolve()) not in found:
            found.append(path)
    return found


SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def safe_name(value: str | None, what: str) -> str | None:
    """`value` if it can name a folder skd creates (letters, digits, `_ . -`, no leading dot: no path
    separators, no `.` or `..`).

    Raises:
        ValueError: naming `what` and the fix.
    """
    if value is not None and not SAFE_NAME.match(value):
        raise ValueError(f"{what} {value!r} must be a plain name (letters, digits, '_', '.', '-'; not starting "
                         f"with '.'), since skd makes folders named after it; e.g. {what.split('.')[-1]}: my-run-1")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _positive_resources(value: dict[str, float], what: str) -> dict[str, float]:
    import math

    reserved = ("CPU", "GPU", "memory", "object_store_memory")
    bad = {k: v for k, v in value.items() if not k or k in reserved or not (1e-4 <= v and math.isfinite(v))}
    if bad:
        raise ValueError(f"{what}: custom resources need a name other than {'/'.join(reserved)} and a finite amount "
                         f">= 0.0001 (Ray's precision); got {bad} (CPUs and GPUs have their own settings)")
    return value

"""Loading a config: a YAML file plus `--set key=value` overrides, merged into a plain dict and validated by
the strict models of `orchestrator.config`. Errors come back as one `ConfigError` naming every bad field
and a fix (with a "did you mean" for misspelt keys), before anything touches Ray or MLflow.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from actors.errors import ConfigError
from orchestrator.config import SkdConfig


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn `["distill.alpha=0.3", "data.max_train_samples=2000"]` into a nested dict.

    Values are parsed as YAML scalars/lists (`0.3` -> float, `[a, b]` -> list, `null` -> None).

    Raises:
        ConfigError: an item without `=` or with an empty key.
    """
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. --set distill.alpha=0.3")
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: {part} is set both as a value and as a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return nested


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at `loc` (used to suggest a fix for a misspelt key)."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        for cand in candidates:
            for inner in (cand, *getattr(cand, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    model = inner
                    break
            else:
                continue
            break
    return list(model.model_fields)


def format_validation_error(err: ValidationError, source: str) -> str:
    """Render pydantic errors as `source: field.path: message (fix)` lines."""
    lines = []
    for item in err.errors():
        loc = tuple(item["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(SkdConfig, loc)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(allowed)}"
            lines.append(f"{where}: unknown setting ({hint})")
        elif item["type"] == "missing":
            lines.append(f"{where}: required setting is missing")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {msg} (got {item.get('input')!r})" if item["type"] != "value_error"
                         else f"{where}: {msg}")
    return f"invalid config {source}:\n  " + "\n  ".join(lines)


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> SkdConfig:
    """Read a YAML config, apply `--set` overrides and validate.

    Args:
        path: YAML file; None validates `base` + overrides only.
        overrides: `key=value` strings with dotted keys.
        base: a dict to start from (used by tests and by `skd tune` trials).

    Returns:
        The frozen `SkdConfig`.

    Raises:
        ConfigError: missing/unreadable file, bad YAML, unknown keys or invalid values; the message
            names every offending field.
    """
    raw: dict[str, Any] = dict(base or {})
    source = "(overrides)"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass -c configs/<task>.yaml")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {p} is not UTF-8 text (byte offset {exc.start}); save it as UTF-8") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must be a mapping of settings, got {type(loaded).__name__}")
        raw = _merge(raw, loaded)
    raw = _merge(raw, parse_overrides(overrides or []))
    try:
        return SkdConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None

"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else.

Layout of one checkpoint folder:
    model/                  `save_pretrained` folder (config.json, model.safetensors, tokenizer files)
    optimizer.safetensors   optimizer state tensors, keyed "<param index>.<name>"
    trainer_state.json      step, sampler state, teacher counts, scheduler and optimizer scalars
    projection.safetensors  the student-to-teacher hidden-state projection (runs with HSK / [CLS] losses)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MODEL_DIR = "model"
STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.safetensors"
PROJECTION_FILE = "projection.safetensors"


def save_training_state(folder: Path, model, tokenizer, optimizer: torch.optim.Optimizer,
                        scheduler, state: dict[str, Any]) -> None:
    """Write model, tokenizer, optimizer, scheduler and `state` (JSON-serialisable) into `folder`."""
    model.save_pretrained(folder / MODEL_DIR)
    tokenizer.save_pretrained(folder / MODEL_DIR)
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in opt["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    save_file(tensors, str(folder / OPTIM_FILE))
    payload = {"state": state, "scheduler": scheduler.state_dict(),
               "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars}}
    (folder / STATE_FILE).write_text(json.dumps(payload))


def load_training_state(folder: Path, optimizer: torch.optim.Optimizer, scheduler) -> dict[str, Any]:
    """Restore optimizer and scheduler from `folder` and return the saved `state` dict.

    The model weights are loaded separately from `folder/model` (see `model_state`).
    """
    payload = json.loads((folder / STATE_FILE).read_text())
    tensors = load_file(str(folder / OPTIM_FILE))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for key, value in payload["optimizer"]["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": payload["optimizer"]["param_groups"]})
    scheduler.load_state_dict(payload["scheduler"])
    return payload["state"]


def model_state(folder: Path) -> dict[str, torch.Tensor]:
    """The model's weights from a checkpoint folder (safetensors, no pickle)."""
    return load_file(str(folder / MODEL_DIR / "model.safetensors"))


def save_module_state(folder: Path, name: str, module: torch.nn.Module) -> None:
    """Write a module's state dict (tensors only) as `folder/name` in safetensors."""
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(folder / name))


def load_module_state(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """A state dict written by `save_module_state` (safetensors, no pickle).

    Raises:
        FileNotFoundError: the checkpoint has no such file (it was written by a run without that module).
    """
    path = folder / name
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {folder} has no {name}: it was written by a run with other "
                                f"distill.knowledge settings; resume with the settings it was trained with")
    return load_file(str(path))

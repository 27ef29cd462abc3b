"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else.

Layout of one checkpoint folder:
    model/                  `save_pretrained` folder (config.json, model.safetensors, tokenizer files)
    optimizer.safetensors   optimizer state tensors, keyed "<param index>.<name>"
    trainer_state.json      step, sampler state, teacher counts, scheduler and optimizer scalars
    projection.safetensors  the student-to-teacher hidden-state projection (runs with HSK / [CLS] losses)
    checkpoint.json         written last: every other file's size (bytes) and SHA-256 (`write_manifest`)

`verify_checkpoint` checks every file against it before a resume (`newest_verified` falls back to the newest
earlier checkpoint that passes). A folder without `checkpoint.json` was cut off mid-write (a crash, a full
disk) or written before skd recorded checksums: it is used only when every file it needs parses and its
weights are finite.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file

from actors.cache.format import file_sha256

MODEL_DIR = "model"
STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.safetensors"
PROJECTION_FILE = "projection.safetensors"
MANIFEST_FILE = "checkpoint.json"


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


def write_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Write `folder/checkpoint.json` (atomically, after every other file is complete): {relative path:
    {"bytes", "sha256"}} of every file in `folder`. Returns that mapping."""
    files = {f.relative_to(folder).as_posix(): {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
             for f in sorted(folder.rglob("*")) if f.is_file() and f.name != MANIFEST_FILE}
    tmp = folder / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, folder / MANIFEST_FILE)
    return files


def verify_checkpoint(folder: Path) -> str | None:
    """Why the checkpoint in `folder` cannot be trusted, or None when every file its manifest lists is there
    with the size and SHA-256 it was written with and the model's weights are finite (without a manifest:
    when its files parse, `_unverified_problem`). Reads every byte (about 1 s per GB on one core)."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return _unverified_problem(folder)
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"{path} does not parse ({exc})"
    for name, want in files.items():
        f = folder / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{f} has {f.stat().st_size} bytes, {want['bytes']} when written"
        if file_sha256(f) != want["sha256"]:
            return f"{f} does not match its SHA-256 (changed or corrupted since it was written)"
    weights = folder / MODEL_DIR / "model.safetensors"
    bad = [k for k, v in load_file(str(weights)).items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        return f"{weights} holds non-finite weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
    return None


def _unverified_problem(folder: Path) -> str | None:
    """A folder without a manifest: written by skd before it recorded checksums, or cut off mid-write. It is
    trusted only if every file a resume reads is there and parses (the state JSON, the model's and the
    optimizer's safetensors) and the weights are finite; otherwise the problem, naming the file."""
    from safetensors import safe_open

    state = folder / STATE_FILE
    try:
        json.loads(state.read_text())["state"]["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{folder / MANIFEST_FILE} is missing and {state} does not read (the checkpoint was never finished)"
    for f in (folder / MODEL_DIR / "model.safetensors", folder / OPTIM_FILE):
        try:
            with safe_open(str(f), framework="pt") as opened:
                for key in opened.keys():
                    opened.get_slice(key)
        except Exception:  # noqa: BLE001  (safetensors raises its own error type for every malformed file)
            return f"{folder / MANIFEST_FILE} is missing and {f} does not read (the checkpoint was never finished)"
    return None


def checkpoint_step(folder: Path) -> int:
    """The step a checkpoint folder was written at (its trainer_state.json), -1 where it cannot be read."""
    try:
        return int(json.loads((folder / STATE_FILE).read_text())["state"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def newest_verified(first: Path, others: Iterable[Path]) -> tuple[Path, list[str]]:
    """The checkpoint to resume from: `first` (the newest) when it verifies, else the newest of `others` (by
    step) that does, and why each one passed over was refused.

    Raises:
        CheckpointError: none verifies (the message names each file at fault).
    """
    from actors.errors import CheckpointError

    refused = []
    for folder in [first, *sorted((o for o in others if o != first), key=checkpoint_step, reverse=True)]:
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder, refused
        refused.append(f"step {checkpoint_step(folder)}: {problem}")
    raise CheckpointError("no checkpoint of this run can be trusted: " + "; ".join(refused)
                          + ". Start the run again without --resume (or restore the files from a copy)")


def newest_verified_on_rank_0(first: Path, others: Iterable[Path], rank: int, world: int,
                              device=None) -> tuple[Path, list[str]]:
    """`newest_verified` for a data-parallel group: rank 0 hashes the files (once, not once per rank) and
    broadcasts its choice (step, refusals, or the error) to the other ranks (torch.distributed, on `device`
    as NCCL needs), so every rank loads the same checkpoint even where their views of a shared file system
    differ. Every rank must call it; world 1 is `newest_verified`.

    Raises:
        CheckpointError: on every rank: none verifies on rank 0, or a rank cannot see the one rank 0 chose.
    """
    from actors.errors import CheckpointError

    others = list(others)
    if world == 1:
        return newest_verified(first, others)
    import torch.distributed as dist

    box: list = [None]
    if rank == 0:
        try:
            folder, refused = newest_verified(first, others)
            box = [(checkpoint_step(folder), refused, None)]
        except CheckpointError as exc:
            box = [(None, [], str(exc))]
    dist.broadcast_object_list(box, src=0, device=device)
    step, refused, error = box[0]
    if error is not None:
        raise CheckpointError(error)
    mine = [f for f in [first, *others] if checkpoint_step(f) == step]
    if not mine:
        raise CheckpointError(f"rank {rank} cannot read the checkpoint of step {step} that rank 0 verified (it sees "
                              f"{', '.join(str(f) for f in [first, *others])}): give every worker the same "
                              f"ray.storage_path")
    return mine[0], refused

"""Checkpoints round-trip optimizer and scheduler state through safetensors + JSON (no pickle)."""

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

from orchestrator.common.checkpointing import load_training_state, model_state, save_training_state


def test_round_trip_continues_identically(tmp_path, tiny_model):
    def setup():
        torch.manual_seed(0)
        m = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        return m, opt, get_linear_schedule_with_warmup(opt, 2, 10)

    x = torch.randint(1000, 2000, (3, 7))
    y = torch.tensor([0, 1, 1])

    def step(m, opt, sched):
        m(input_ids=x, labels=y).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    m, opt, sched = setup()
    for _ in range(3):
        step(m, opt, sched)
    save_training_state(tmp_path, m, AutoTokenizer.from_pretrained(tiny_model), opt, sched, {"step": 3, "k": [1, 2]})
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))
    step(m, opt, sched)
    want = {k: v.clone() for k, v in m.state_dict().items()}

    m2, opt2, sched2 = setup()
    m2.load_state_dict(model_state(tmp_path))
    assert load_training_state(tmp_path, opt2, sched2) == {"step": 3, "k": [1, 2]}
    assert sched2.last_epoch == 3
    step(m2, opt2, sched2)
    assert sched2.get_last_lr() == sched.get_last_lr()
    for k, v in m2.state_dict().items():
        torch.testing.assert_close(v, want[k])


def _checkpoint(folder, tiny_model, step):
    """A real checkpoint folder at `step` (model, tokenizer, optimizer, state) with its manifest."""
    from orchestrator.common.checkpointing import write_manifest

    torch.manual_seed(step)
    m = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(input_ids=torch.randint(1000, 2000, (2, 5)), labels=torch.tensor([0, 1])).loss.backward()
    opt.step()
    save_training_state(folder, m, AutoTokenizer.from_pretrained(tiny_model), opt,
                        get_linear_schedule_with_warmup(opt, 1, 4), {"step": step})
    write_manifest(folder)
    return folder


def test_a_checkpoint_is_verified_file_by_file_and_resume_falls_back_to_the_newest_that_verifies(tmp_path, tiny_model):
    import json

    import pytest
    from safetensors.torch import load_file, save_file

    from actors.errors import CheckpointError
    from orchestrator.common.checkpointing import MANIFEST_FILE, newest_verified, verify_checkpoint, write_manifest

    old, new = (_checkpoint(tmp_path / f"checkpoint_{s}", tiny_model, s) for s in (4, 8))
    manifest = json.loads((new / MANIFEST_FILE).read_text())["files"]
    assert {"model/model.safetensors", "optimizer.safetensors", "trainer_state.json"} <= set(manifest)
    assert verify_checkpoint(new) is None and newest_verified(new, [old]) == (new, [])

    optim = new / "optimizer.safetensors"
    data = bytearray(optim.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte, same size
    optim.write_bytes(bytes(data))
    assert "optimizer.safetensors does not match its SHA-256" in verify_checkpoint(new)
    assert newest_verified(new, [old]) == (old, [f"step 8: {verify_checkpoint(new)}"])

    weights = old / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    assert verify_checkpoint(old) == f"{weights} has {weights.stat().st_size} bytes, " \
                                     f"{weights.stat().st_size + 100} when written"
    with pytest.raises(CheckpointError, match=r"step 8: .*optimizer.safetensors.*; step 4: .*model.safetensors has"):
        newest_verified(new, [old])

    # without a manifest (cut off mid-write, or written before skd recorded checksums): used only if it parses
    legacy = _checkpoint(tmp_path / "checkpoint_legacy", tiny_model, 10)
    (legacy / MANIFEST_FILE).unlink()
    assert verify_checkpoint(legacy) is None
    (old / MANIFEST_FILE).unlink()  # and step 4's weights are truncated
    assert verify_checkpoint(old) == f"{old / MANIFEST_FILE} is missing and {weights} does not read (the " \
                                     f"checkpoint was never finished)"

    nan = _checkpoint(tmp_path / "checkpoint_12", tiny_model, 12)
    path = nan / "model" / "model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[key][0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    write_manifest(nan)  # the files agree with the manifest, the weights are not finite
    assert verify_checkpoint(nan) == f"{path} holds non-finite weights ({key})"

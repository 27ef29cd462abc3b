"""Checkpoints round-trip optimizer and scheduler state through safetensors + JSON (no pickle)."""

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

from orchestrator.checkpointing import load_training_state, model_state, save_training_state


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

"""The plain script a user would write instead of skd: SKD in one process, teacher and student in turn.

Run:  python bench/plain_kd.py -c CONFIG [--set key=value ...] [--threads 2] [--out DIR]

Same data (the config's task, subset, max length, tokenizer), same models (the teachers of the config's
manifest, the config's student), same steps, batch size, learning rate, temperature, alpha, seed and
evaluation points as `skd distill -c CONFIG` with `distill.strategy: skd` and a uniform distribution
(or `single:<teacher>`: that teacher every step); no Ray, no MLflow, no prefetch: each step draws ONE
teacher, runs its forward pass (no grad), then the student's forward and backward pass, with `--threads`
torch threads for both. Evaluates on dev at the same steps as skd (4 per run by default), saves the
student at the end (save_pretrained).

Prints one JSON line: training seconds (the step loop without evaluations), samples, training
throughput (samples / training seconds), evaluation seconds, save seconds, whole wall time (process
start to exit, imports included) and the final dev metric.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/skd-bench/plain-student")
    args = ap.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import get_linear_schedule_with_warmup

    from actors.manifest import read_manifest
    from actors.models import load_classifier, resolve_model
    from orchestrator.config.load import load_config
    from orchestrator.driver.inputs import prepare_inputs
    from orchestrator.worker.spec import StepPlan
    from orchestrator.common.evaluation import evaluate

    cfg = load_config(args.config, args.overrides)
    d = cfg.distill
    torch.set_num_threads(args.threads)
    torch.manual_seed(d.seed)
    inputs = prepare_inputs(cfg.data, cfg.task, cfg.student.init)
    spec, pad = inputs.spec, inputs.pad_id
    by_name = {t.name: t for t in read_manifest(cfg.manifest_path())}
    names = ([d.strategy.split(":", 1)[1]] if d.strategy.startswith("single:")  # single-teacher KD
             else [m.name for m in cfg.teachers.members])
    teachers = [load_classifier(by_name[n].checkpoint, spec.num_labels).eval() for n in names]
    student = load_classifier(resolve_model(cfg.student.init), spec.num_labels, cfg.student.num_layers)
    optimizer = torch.optim.AdamW(student.parameters(), lr=d.lr, weight_decay=d.weight_decay)
    steps = StepPlan.make(len(inputs.train), d.batch_size, 1, d.epochs, d.max_steps, d.eval_every, d.checkpoint_every)
    schedule = get_linear_schedule_with_warmup(optimizer, int(d.warmup_ratio * steps.total), steps.total)
    rng = np.random.default_rng(d.seed)
    order = np.concatenate([rng.permutation(len(inputs.train)) for _ in range(int(np.ceil(d.epochs)) + 1)])
    T = d.temperature
    train_s = eval_s = 0.0
    samples = 0
    dev = {}
    for step in range(steps.total):
        t0 = time.perf_counter()
        b = inputs.train.batch(order[step * d.batch_size:(step + 1) * d.batch_size], pad)
        ids, mask = torch.as_tensor(b["input_ids"]), torch.as_tensor(b["attention_mask"])
        labels = torch.as_tensor(b["labels"])
        k = int(rng.integers(len(teachers)))  # SKD, uniform: one teacher per step
        with torch.no_grad():
            teacher_logits = teachers[k](input_ids=ids, attention_mask=mask).logits
        student.train()
        logits = student(input_ids=ids, attention_mask=mask).logits
        hard = F.cross_entropy(logits, labels)
        soft = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(teacher_logits / T, -1), log_target=True,
                        reduction="batchmean") * T * T
        loss = d.alpha * hard + (1 - d.alpha) * soft
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        samples += len(labels)
        train_s += time.perf_counter() - t0
        if step + 1 in steps.evals:
            t0 = time.perf_counter()
            dev = evaluate(student, inputs.dev, spec, pad, d.eval_batch_size)
            eval_s += time.perf_counter() - t0
            print(f"[plain] step {step + 1}/{steps.total} dev {dev}", flush=True)
    t0 = time.perf_counter()
    student.save_pretrained(args.out)
    save_s = time.perf_counter() - t0
    print(json.dumps({"bench": "plain_kd", "steps": steps.total, "samples": samples, "train_s": round(train_s, 2),
                      "samples_per_s": round(samples / train_s, 2), "eval_s": round(eval_s, 2),
                      "save_s": round(save_s, 2), "wall_s": round(time.perf_counter() - T0, 2),
                      "threads": args.threads, "dev": dev, "teachers": names}))


if __name__ == "__main__":
    main()

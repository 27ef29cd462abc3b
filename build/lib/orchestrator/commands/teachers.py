"""`skd teachers prepare`: fine-tune each ensemble member on the task and write the teachers manifest.

Each member is trained by the same loop as the student (strategy no-kd: hard labels only), on the task's
rows in its own tokenizer's tokens, in its own MLflow run tagged `skd.kind=teacher`, then evaluated on dev. Members already in the manifest with an
existing checkpoint are reused, not retrained; members with `checkpoint:` set are imported (evaluated,
not trained).
"""

from __future__ import annotations

from pathlib import Path

import ray

from actors.errors import TeacherError
from actors.manifest import TeacherInfo, read_manifest, write_manifest
from actors.models import (check_cut, count_parameters, depth_of, forward_flops_per_token, load_classifier,
                           load_tokenizer, resolve_model, vocab_fingerprint)
from orchestrator.config import SkdConfig, TeacherMember, flatten
from orchestrator.driver.inputs import Inputs, prepare_inputs
from orchestrator.worker.spec import StepPlan
from orchestrator.driver.plan import student_gpus
from orchestrator.driver.runner import run_training
from orchestrator import tracking
from orchestrator.common import console
from orchestrator.driver.runtime import ray_session
from orchestrator.worker.spec import Optimisation, RunSettings, TrainTask, WorkerSpec
from orchestrator.common.evaluation import evaluate


def _info(member: TeacherMember, checkpoint: Path, inputs: Inputs, dev_metric: float, run_id: str) -> TeacherInfo:
    model = load_classifier(str(checkpoint), inputs.spec.num_labels, regression=inputs.spec.is_regression)
    return TeacherInfo(name=member.name, checkpoint=str(checkpoint), num_layers=depth_of(model.config),
                       hidden_size=int(model.config.hidden_size), parameters=count_parameters(model),
                       dev_metric=float(dev_metric), metric=inputs.spec.metric,
                       vocab=vocab_fingerprint(load_tokenizer(str(checkpoint))), num_labels=inputs.spec.num_labels,
                       task=inputs.spec.name, mlflow_run_id=run_id, family=str(model.config.model_type),
                       flops_per_token=forward_flops_per_token(model, inputs.max_length))


class MemberInputs:
    """Each member's training data in its own tokenizer's tokens: one tokenization per distinct tokenizer
    (members of one family share it), the student's reused where a member tokenizes like the student."""

    def __init__(self, cfg: SkdConfig, student: Inputs) -> None:
        self.cfg, self.by_vocab = cfg, {student.vocab: student}

    def source(self, m: TeacherMember) -> str:
        return str(m.checkpoint) if m.checkpoint else m.init

    def check(self, m: TeacherMember) -> None:
        """Fail fast, before Ray: the member's folder, family, depth cut and tokenizer must load."""
        if m.checkpoint is not None and not (Path(m.checkpoint) / "config.json").is_file():
            raise TeacherError(f"teachers.members[{m.name}].checkpoint {m.checkpoint} does not exist or has no "
                               f"config.json; point it at a save_pretrained folder")
        check_cut(self.source(m), m.num_layers, f"teachers.members[{m.name}].num_layers")
        self(m)

    def __call__(self, m: TeacherMember) -> Inputs:
        tok = load_tokenizer(self.source(m))
        fp = vocab_fingerprint(tok)
        if fp not in self.by_vocab:
            self.by_vocab[fp] = prepare_inputs(self.cfg.data, self.cfg.task, self.source(m), transfer=False)
        return self.by_vocab[fp]


def _finetune(cfg: SkdConfig, inputs: Inputs, member: TeacherMember, out_dir: Path, threads: int,
              use_gpu: bool) -> TeacherInfo:
    """Fine-tune one member on the task's labels (the distill loop without knowledge) into `out_dir`."""
    ft, d = cfg.teachers.finetune, cfg.distill
    print(f"[skd] teacher {member.name}: fine-tuning {member.init} (layers: {member.num_layers or 'all'})", flush=True)
    steps = StepPlan.make(len(inputs.train), ft.batch_size, cfg.ray.num_workers, ft.epochs, ft.max_steps,
                          d.eval_every, d.checkpoint_every)
    task = TrainTask(resolve_model(member.init), member.num_layers, inputs.tokenizer_init, inputs.spec,
                     ray.put(inputs.train), ray.put(inputs.dev), inputs.pad_id)
    spec = WorkerSpec(task, Optimisation(ft.lr, ft.batch_size, ft.warmup_ratio, ft.weight_decay, ft.seed), None,
                      RunSettings(steps, threads, d.log_every, d.eval_batch_size, d.gsnr_every, d.gsnr_probe_size,
                                  nonfinite=d.nonfinite))
    params = {**flatten(ft, "finetune."), "teacher.name": member.name, "teacher.init": member.init,
              "teacher.num_layers": str(member.num_layers), "task": cfg.task, **flatten(cfg.data, "data.")}
    res = run_training(cfg, spec, run_name=f"teacher-{member.name}", model_out=out_dir, params=params,
                       use_gpu=use_gpu, tags={"skd.kind": "teacher", "skd.task": cfg.task, "skd.teacher": member.name})
    if res.interrupted or inputs.spec.metric not in res.dev:
        raise TeacherError(f"teacher {member.name}: fine-tuning stopped at step {res.steps} ({res.status}) before its "
                           f"dev evaluation; run `skd teachers prepare` again: members already in the manifest are "
                           f"kept, this one is fine-tuned again from the start")
    return _info(member, out_dir, inputs, res.dev[inputs.spec.metric], res.run_id)


def prepare_teachers(cfg: SkdConfig, force: bool = False) -> list[TeacherInfo]:
    """Fine-tune (or reuse, or import) every member of `teachers.members` and write the manifest.

    Args:
        cfg: the validated config.
        force: retrain members even when the manifest already has them.

    Returns:
        The manifest entries, in config order.

    Raises:
        DataError / TeacherError: bad data or checkpoints, raised before Ray starts.
        TeacherError: a member's fine-tuning stopped (Ctrl-C, SIGTERM) before its dev evaluation; the members
            finished before it are in the manifest.
    """
    path = cfg.manifest_path()
    existing = {t.name: t for t in read_manifest(path)} if path.is_file() else {}
    member_inputs = MemberInputs(cfg, prepare_inputs(cfg.data, cfg.task, cfg.student.init, transfer=False))
    for m in cfg.teachers.members:  # every init must load and cut (fail fast, before Ray)
        member_inputs.check(m)
    results: dict[str, TeacherInfo] = {}
    todo = []
    for m in cfg.teachers.members:
        prev = existing.get(m.name)
        if prev and not force and (Path(prev.checkpoint) / "config.json").is_file() and prev.task == cfg.task:
            print(f"[skd] teacher {m.name}: reusing {prev.checkpoint} (dev {prev.metric} {prev.dev_metric:.4f})")
            results[m.name] = prev
        elif m.checkpoint is not None:
            ckpt, inputs = Path(m.checkpoint).resolve(), member_inputs(m)
            model = load_classifier(str(ckpt), inputs.spec.num_labels, regression=inputs.spec.is_regression)
            dev = evaluate(model, inputs.dev, inputs.spec, inputs.pad_id, cfg.distill.eval_batch_size)
            results[m.name] = _info(m, ckpt, inputs, dev[inputs.spec.metric], "")
            print(f"[skd] teacher {m.name}: imported {ckpt} (dev {inputs.spec.metric} {dev[inputs.spec.metric]:.4f})")
        else:
            todo.append(m)
    if todo:
        tracking.check_store(cfg.tracking_uri())  # before Ray
        with ray_session(cfg.ray):
            cluster = ray.cluster_resources()
            threads = int(cfg.teachers.finetune.cpus_per_worker or max(1, cluster.get("CPU", 1)))
            for i, m in enumerate(todo, 1):
                with console.context(f"teacher {i} of {len(todo)}"):
                    results[m.name] = _finetune(cfg, member_inputs(m), m, path.parent / m.name, threads,
                                                student_gpus(cfg.ray, cluster) > 0)
                write_manifest(path, [results[n] for n in results])  # progress survives an interruption
    teachers = [results[m.name] for m in cfg.teachers.members]
    keep = [t for n, t in existing.items() if n not in results]  # members dropped from the config stay listed
    write_manifest(path, teachers + keep)
    return teachers

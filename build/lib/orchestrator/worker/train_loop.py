"""The one training loop: teacher fine-tuning, `skd distill`, its pre-passes and every Tune trial run it.

It runs on every Ray Train worker as a recipe (the shape of torchtune's knowledge-distillation recipe):
`setup()` builds the data, the student trainer, the knowledge feed and resumes from a checkpoint;
`train()` is the flat step loop; `cleanup()` flushes the metric buffer. Per step (SKD, Ding et al. 2023): the
student's forward pass runs while the ONE teacher the feed drew computes the step's knowledge; as soon as
it arrives the feed sends step t+1's request, so the teacher's next forward overlaps this step's
backward; the trainer computes the loss and takes the optimizer step; rank 0
logs (batched), evaluates on dev and writes checkpoints; every rank calls `ray.train.report`. Every report
carries the per-teacher counts and the run's throughput (total samples / total seconds), which the
driver reads from the Ray Train result.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch

from actors.errors import TeachersLostError
from actors.knowledge import Knowledge
from orchestrator.common.checkpointing import newest_verified_on_rank_0
from orchestrator.worker.batches import StepBatches
from orchestrator.common.task import is_labelled
from orchestrator.common.console import progress_line
from orchestrator.common.control import StopPoller
from orchestrator.worker.feed import KnowledgeFeed
from orchestrator.worker.spec import WorkerSpec
from orchestrator.worker.trainer import StudentTrainer
from orchestrator.worker.usage import TeacherUsage, start_system_metrics


def _fetch(value):
    """A split from the object store (or as given)."""
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


class DistillRecipe:
    """One worker's run (see the module docstring). `spec.knowledge` None trains on labels only."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec

    def setup(self) -> None:
        """Data, trainer, feed, metric logger; resume from Ray Train's latest checkpoint or `resume_from`."""
        from orchestrator.tracking.logger import MetricLogger

        set_up = time.perf_counter()
        self.spent = {"setup": 0.0, "eval": 0.0, "report": 0.0, "gsnr": 0.0, "probe": 0.0}  # s, see `_timings`
        spec, run = self.spec, self.spec.run
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if self.world != run.steps.world:  # the step arithmetic was planned for another number of workers
            raise RuntimeError(f"run planned for {run.steps.world} workers, Ray Train started {self.world}")
        torch.set_num_threads(run.threads)
        self.train_data, self.dev_data = _fetch(spec.task.train), _fetch(spec.task.dev)
        self.trainer = StudentTrainer(spec, ray.train.torch.get_device(), self.world)
        self.batches = StepBatches(self.train_data, spec.task.pad_id, spec.optim.batch_size, self.world, self.rank,
                                   spec.optim.seed, run.steps.per_epoch)
        kn = spec.knowledge
        self.feed = KnowledgeFeed(kn, self.batches, self.world, run.steps.total, spec.optim.seed,
                                  agree=self._agree if kn is not None and self.world > 1 else None, key=run.run_id)
        self.labelled = np.flatnonzero(is_labelled(self.train_data.labels))  # probes need labels: no transfer rows
        self.probe = None  # the adaptive family's fixed probe batch: probe_size labelled training rows, seeded
        if self.feed.adaptive is not None:
            size = min(kn.adaptive.probe_size, len(self.labelled))
            rows = np.random.default_rng(spec.optim.seed).choice(self.labelled, size, replace=False)
            self.probe = self.train_data.batch(np.sort(rows), spec.task.pad_id)
        self.start = self._resume()
        if self.feed.elastic is not None:  # a checkpoint may hold teachers that joined a served pool
            self.trainer.teacher_widths = [t.hidden_size for t in self.feed.source.infos]
        self.trainer.prepare()
        spill = Path(run.spill_dir) / f"{run.run_id}.jsonl" if run.spill_dir else None
        self.logger = MetricLogger(run.tracking_uri, run.run_id, enabled=self.rank == 0, spill_path=spill)
        if self.refused:  # a resume that passed over checkpoints that do not verify
            self.logger.set_tag("skd.checkpoint_refused", f"resumed at step {self.start}; " + "; ".join(self.refused))
        self.stop = StopPoller(run.control)
        self.system = start_system_metrics(run.run_id, run.tracking_uri, self.rank, self.world,
                                           run.system_metrics_s if run.run_id else 0, resumed=self.start > 0)
        self.usage = TeacherUsage(kn.source, lambda: self.names) if kn is not None and self.rank == 0 else None
        self.spent["setup"] = time.perf_counter() - set_up

    def _max_over_ranks(self, values: list[int]) -> list[int]:
        """Element-wise maximum of an int vector over the data-parallel ranks (one all-reduce over the worker
        group's process group, on the worker's device as NCCL needs; every rank must call it)."""
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.int32, device=self.trainer.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    @property
    def names(self) -> list[str]:
        """The run's teacher names, [N] (grows when teachers join a served pool)."""
        return self.feed.names

    def _agree(self, lost: list[int], seen: int, back: list[int]) -> tuple[list[int], int, list[int]]:
        """The union over data-parallel ranks of the teachers each found lost at this step, the newest pool
        version any rank saw, and the union of the dropped teachers each found restarted (a [2N + 1] vector
        through `_max_over_ranks`; every rank calls it every step, with the same N since every rank applies
        the same pool versions at the same steps)."""
        n = len(self.names)
        values = self._max_over_ranks([int(k in lost) for k in range(n)] + [seen] + [int(k in back) for k in range(n)])
        return [k for k in range(n) if values[k]], values[n], [k for k in range(n) if values[n + 1 + k]]

    def _resume(self) -> int:
        """The first step to train: 0, or the step of Ray Train's latest (else the explicit) checkpoint. A
        checkpoint is verified against its manifest first, by rank 0 for all ranks
        (`checkpointing.newest_verified_on_rank_0`); one that fails
        is passed over for the newest earlier one of the run that verifies (said on the console, tagged
        `skd.checkpoint_refused` in MLflow), and with none left `CheckpointError` names each file at fault."""
        self.refused: list[str] = []
        self.skipped = 0  # non-finite steps skipped so far (`distill.nonfinite: skip`), kept in checkpoints
        checkpoint = ray.train.get_checkpoint()
        others = _sibling_checkpoints(checkpoint) if checkpoint is not None else []  # not beside resume_from
        if checkpoint is None and self.spec.run.resume_from:
            checkpoint = ray.train.Checkpoint.from_directory(self.spec.run.resume_from)
        if checkpoint is None:
            self.feed.start_fresh()
            return 0
        with checkpoint.as_directory() as path:
            folder, self.refused = newest_verified_on_rank_0(Path(path), others, self.rank, self.world,
                                                             self.trainer.device)
            state = self.trainer.load(folder)
        self.feed.load_state_dict(state)
        self.skipped = int(state.get("nonfinite_skipped", 0))
        if self.rank == 0:
            for why in self.refused:
                print(f"[skd] checkpoint refused, {why}", flush=True)
            print(f"[skd] resumed at step {state['step']}/{self.spec.run.steps.total}"
                  + (f" from {folder}" if self.refused else ""), flush=True)
        return int(state["step"])

    def train(self) -> None:
        """The step loop: knowledge, one optimisation step, logging, evaluation and checkpoints."""
        run = self.spec.run
        self.started, self.samples = time.perf_counter(), 0
        self.window = (time.perf_counter(), 0, 0.0)  # start, samples, knowledge wait (s)
        if self.probe is not None and self.feed.adaptive.last_loss is None:
            self._adapt(self.start)  # the probe loss the first interval's reward starts from
        self.feed.begin(self.start)  # the first teacher call overlaps the first forward pass
        for step in range(self.start, run.steps.total):
            torch.manual_seed(self.spec.optim.seed * 1_000_003 + step)  # dropout depends on the step only: exact resume
            batch, stage = self.batches(step), self.feed.stage(step)
            out = self.trainer.forward(batch, stage)  # while the teacher computes this step's knowledge
            try:
                knowledge = self.feed.next_knowledge(step)  # waits for it, then sends step+1's request
            except TeachersLostError as exc:  # every rank at the same step: checkpoint, tell the driver, end
                self._log_changes()
                self._report(step, checkpoint=step not in self.spec.run.steps.checkpoints,
                             extra={"teachers_lost": str(exc)}, evaluate=False)  # `step` may be reported already
                return
            self._log_changes()
            terms = self.trainer.update(batch, out, knowledge, stage)
            done = step + 1
            if not self.trainer.last_step_finite and self._nonfinite(done, batch, knowledge, terms):
                return
            if self.probe is not None and done % self.spec.knowledge.adaptive.every == 0:
                self._adapt(done)
            self.samples += len(batch["ids"]) * self.world
            self._log(done, terms, knowledge, len(batch["ids"]) * self.world)
            asked = run.stop_after is not None and run.stop_after <= done < run.steps.total
            stopping = asked or (done < run.steps.total and self._interrupted(done))
            if done in run.steps.evals or done in run.steps.checkpoints or stopping:
                self._report(done, checkpoint=done in run.steps.checkpoints or stopping)
            elif run.gsnr_every and done % run.gsnr_every == 0:
                self._probe_gsnr(done)
            if stopping:
                if self.rank == 0:
                    why = "as asked" if asked else "on the driver's interrupt"
                    print(f"[skd] stopped after step {done} {why}, with a checkpoint; continue with --resume",
                          flush=True)
                return

    def _nonfinite(self, done: int, batch: dict[str, np.ndarray], knowledge: Knowledge | None,
                   terms: dict[str, torch.Tensor]) -> bool:
        """Step `done` (1-based) left the weights as they were: its loss or gradient was NaN/inf (on some
        rank). Names the cause (this rank's loss, its teacher's non-finite answer and the example ids of those
        rows). `distill.nonfinite: skip` counts it (`train/nonfinite_skipped`) and goes on (False); `stop`
        reports a checkpoint of the unchanged weights at `done`, carrying the cause for the driver
        (`NonFiniteError`), and ends the loop (True)."""
        why = f"step {done}: the loss is {terms['loss'].item():g}, the gradient norm {self.trainer.grad_norm:g}"
        rows = knowledge.nonfinite_rows() if knowledge is not None else []
        if len(rows):
            ids = [int(i) for i in np.asarray(batch["ids"])[rows]]
            who = (f"teacher {self.names[knowledge.teacher]}" if knowledge.teacher >= 0 else
                   f"the averaged teachers ({', '.join(self.names[k] for k in self.feed.live())})")
            why += (f"; {who} answered NaN/inf for {len(ids)} rows (example ids "
                    f"{ids[:8]}{' ...' if len(ids) > 8 else ''})")
        self.skipped += 1
        if self.spec.run.nonfinite == "skip":
            self.logger.log({"train/nonfinite_skipped": self.skipped}, done)
            if self.rank == 0:
                print(f"[skd] skipped {why} (distill.nonfinite: skip; {self.skipped} so far)", flush=True)
            return False
        self._report(done, checkpoint=True, extra={"nonfinite": why}, evaluate=False)
        return True

    def _interrupted(self, step: int) -> bool:
        """Whether the driver asked to stop (polled every step without waiting, decided every `log_every`
        steps; all ranks agree, by an all-reduce, so they report the same final step)."""
        if self.stop.control is None:
            return False
        stop = self.stop.poll()
        if step % self.spec.run.log_every:
            return False
        if self.world > 1:
            stop = bool(self._max_over_ranks([int(stop)])[0])
        return stop

    def _log_changes(self) -> None:
        """The feed's membership events, from rank 0: a progress line, `teachers/alive` and, for a served
        pool's changes, `pool/version` and the new p (`sampler/p/<name>`) at the 1-based step they apply to,
        and one run tag per teacher and event (`skd.teacher_lost.<name>` = "step S: reason",
        `skd.teacher_back.<name>` = "step S: its actor was restarted",
        `skd.pool.<join|leave|skip>.<name>` = "step S: pool version V"). Joining teachers' widths reach
        the trainer (IR losses pick the projection by width)."""
        events = self.feed.drain_events()
        if self.feed.elastic is not None and events:
            self.trainer.teacher_widths = [t.hidden_size for t in self.feed.source.infos]
        if self.rank != 0:
            return
        for at, kind, k, detail in events:
            left = ", ".join(self.names[i] for i in self.feed.live())
            what = {"lost": "lost", "back": "back", "join": "joined", "leave": "left", "skip": "not asked"}[kind]
            print(f"[skd] teacher {self.names[k]} {what} at step {at + 1} ({detail}); teachers: {left}", flush=True)
            tag = (f"skd.teacher_{kind}.{self.names[k]}" if kind in ("lost", "back")
                   else f"skd.pool.{kind}.{self.names[k]}")
            self.logger.set_tag(tag, f"step {at + 1}: {detail}")
            self.logger.log({"teachers/alive": len(self.feed.live()), **self._pool_metrics()}, at + 1)

    def _adapt(self, done: int) -> None:
        """The adaptive family's update after 1-based step `done`: the student's loss on the probe batch (the
        mean over ranks, so every rank learns the same p), handed to the feed; rank 0 logs the reward, the
        gains and the learnt p (`sampler/p/<name>`, at the step it applies from) and the probe's cost."""
        t0 = time.perf_counter()
        loss = self.trainer.probe_loss(self.probe)
        if self.world > 1:
            import torch.distributed as dist

            tensor = torch.tensor([loss], dtype=torch.float64, device=self.trainer.device)
            dist.all_reduce(tensor)
            loss = float(tensor.item()) / self.world
        stats = self.feed.adapt(done, loss)
        self.spent["probe"] += time.perf_counter() - t0
        if stats:
            p = {k: v for k, v in stats.items() if k.startswith("sampler/p/")}
            self.logger.log({k: v for k, v in stats.items() if k not in p}, done)
            self.logger.log({**p, "sampler/probe_s": self.spent["probe"]}, done + 1)

    def _pool_metrics(self) -> dict[str, float]:
        """{"pool/version", "sampler/p/<name>"} for a served pool's run ({} otherwise)."""
        if self.feed.elastic is None:
            return {}
        probs = self.feed.probs or []
        return {"pool/version": self.feed.elastic.version,
                **{f"sampler/p/{n}": p for n, p in zip(self.names, probs)}}

    def _log(self, step: int, terms: dict[str, torch.Tensor], knowledge: Knowledge | None, served: int) -> None:
        """Per-step metrics (buffered); every `log_every` steps the window's rate, counts and a progress line."""
        wait = knowledge.wait_s if knowledge is not None else 0.0
        self.logger.log({**{f"train/{k}": v.item() for k, v in terms.items()},
                         "train/teacher": knowledge.teacher if knowledge is not None else -1,
                         "train/knowledge_wait_s": wait, "train/knowledge_bytes": knowledge.nbytes() if knowledge else 0,
                         "train/lr": self.trainer.lr}, step)
        start, n, waited = self.window
        self.window = (start, n + served, waited + wait)
        total = self.spec.run.steps.total
        if step % self.spec.run.log_every and step != total:
            return
        elapsed = time.perf_counter() - start
        rate = (n + served) / max(elapsed, 1e-9)
        self.logger.log({"train/samples_per_s": rate, **self._teacher_samples(), **self._pool_metrics(),
                         **(self.usage.poll(final=step == total) if self.usage is not None else {}),
                         **({"teachers/alive": len(self.feed.live())} if self.names else {})}, step)
        self.logger.flush()
        if self.rank == 0:
            eta = (total - step) * elapsed / max(1, (n + served) / served)
            print(progress_line(step, total, terms["loss"].item(), terms["loss_hard"].item(), terms["loss_kd"].item(),
                                rate, waited + wait, eta), flush=True)
        self.window = (time.perf_counter(), 0, 0.0)

    def _probs(self) -> dict[str, float]:
        """{"sampler/p/<name>": p in force} of an adaptive run (the learnt p the driver's summary shows)."""
        if self.feed.adaptive is None:
            return {}
        return {f"sampler/p/{n}": float(p) for n, p in zip(self.names, self.feed.probs or [])}

    def _teacher_samples(self) -> dict[str, int]:
        """{"teacher_samples/<name>": examples that teacher served so far (global, the whole run)}."""
        return {f"teacher_samples/{name}": c for name, c in zip(self.names, self.feed.counts)}

    def _report(self, step: int, checkpoint: bool, extra: dict | None = None, evaluate: bool = True) -> None:
        """Evaluate (at evaluation steps, when `evaluate`), probe GSNR when due, and report to Ray Train on
        every rank, with a checkpoint from rank 0 when `checkpoint`. The report carries counts and
        throughput (the driver's summary comes from the last one), and `extra` (e.g. why the run stops)."""
        run = self.spec.run
        seconds = time.perf_counter() - self.started
        metrics: dict[str, float] = {"step": step, "finished": float(step >= run.steps.total),  # not "done": Tune's
                                     "wall_s": seconds, "samples": self.samples,
                                     "samples_per_s": self.samples / max(seconds, 1e-9),
                                     **self._teacher_samples(), **self._probs(), **(extra or {})}
        began = time.perf_counter()
        if evaluate and step in run.steps.evals and self.rank == 0:
            dev = {f"dev/{k}": v for k, v in self.trainer.evaluate(self.dev_data, run.eval_batch_size).items()}
            if run.best_teacher_metric:
                dev["dev/retention"] = dev[f"dev/{self.spec.task.spec.metric}"] / run.best_teacher_metric
            metrics.update(dev)
            self.logger.log(dev, step)
            self.logger.flush()
            print(f"[skd] eval step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in dev.items()), flush=True)
        self.spent["eval"] += time.perf_counter() - began
        if evaluate and run.gsnr_every and step % run.gsnr_every == 0:
            self._probe_gsnr(step)
        metrics.update(self._timings(time.perf_counter() - self.started))  # this report's evaluation included
        began = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if checkpoint and self.rank == 0:
                self.trainer.save(Path(tmp), {"step": step, "nonfinite_skipped": self.skipped,
                                              **self.feed.state_dict()})
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        self.spent["report"] += time.perf_counter() - began

    def _timings(self, loop_s: float) -> dict[str, float]:
        """Where this worker's time went (seconds, rank 0's reach the driver and MLflow as `time/*`): set-up
        (model, data, resume), the step loop so far (`loop_s`), its evaluations, reports (checkpoint writes
        and Ray Train's report), GSNR probes, the adaptive family's probes, and `train_s` = the loop without
        them (the training time of the throughput `samples / train_s`)."""
        s = self.spent
        return {"time/setup_s": s["setup"], "time/loop_s": loop_s, "time/eval_s": s["eval"],
                "time/report_s": s["report"], "time/gsnr_s": s["gsnr"], "time/probe_s": s["probe"],
                "time/train_s": loop_s - s["eval"] - s["report"] - s["gsnr"] - s["probe"]}

    def _probe_gsnr(self, step: int) -> None:
        """GSNR of the student on a fixed probe batch (Liu et al. ICLR 2020), rank 0, logged with its cost (s)."""
        if self.rank != 0:
            return
        from orchestrator.worker.gsnr import probe_gsnr

        t0 = time.perf_counter()
        run, task = self.spec.run, self.spec.task
        probe = self.train_data.batch(self.labelled[: run.gsnr_probe_size], task.pad_id)
        stats = probe_gsnr(self.trainer.core, probe, task.spec.is_regression, self.trainer.device)
        self.logger.log({**stats, "gsnr/seconds": time.perf_counter() - t0}, step)
        self.spent["gsnr"] += time.perf_counter() - t0

    def cleanup(self) -> None:
        """Stop the system-metrics monitor; send every buffered metric (waiting for a tracking store that is
        down, see `MetricLogger.close`)."""
        if self.system is not None:
            self.system.finish()
        self.logger.close()


def _sibling_checkpoints(checkpoint) -> list[Path]:
    """The other checkpoints of a Ray Train run on a local filesystem (the `checkpoint_*` folders beside
    `checkpoint`), the fall-backs of a resume whose newest checkpoint does not verify; none elsewhere."""
    import pyarrow.fs

    if not isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return []
    here = Path(checkpoint.path)
    return [p for p in here.parent.glob("checkpoint_*") if p.is_dir() and p != here]


def train_loop(spec: WorkerSpec) -> None:
    """Ray Train worker entry point: set up, train, clean up (see the module docstring). An error a restart
    cannot fix (`failures.cannot_restart`: a checkpoint or cache that does not verify, a full disk) is left
    with the driver's `RunControl` (`failures.fatal_report`). A single worker then ends without raising, so
    Ray Train does not restart into it; with several workers it is raised too (the other ranks may wait in a
    collective, and only a failed group frees them), and the group Ray Train restarts finds the report here
    and ends before any setup. The driver shows it as one line either way."""
    from orchestrator.common.failures import cannot_restart, fatal_report

    control = spec.run.control
    if control is not None and ray.get(control.failure.remote()) is not None:
        return  # a restart after an unfixable error on some rank: nothing to redo
    recipe = DistillRecipe(spec)
    try:
        recipe.setup()
        try:
            recipe.train()
        finally:  # the metrics of the steps trained reach MLflow even when a step fails
            recipe.cleanup()
    except Exception as exc:  # noqa: BLE001  (re-raised unless a restart cannot fix it)
        if control is None or not cannot_restart(exc):
            raise
        ray.get(control.fail.remote(fatal_report(exc)))  # the driver reads it after fit() returns or fails
        if ray.train.get_context().get_world_size() > 1:
            raise

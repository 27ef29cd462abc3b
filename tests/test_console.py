"""The terminal display: Ray's noise lines dropped, worker prefixes gone, progress lines feeding a live bar
on a terminal and printed plainly otherwise (real rich consoles writing to strings)."""

from __future__ import annotations

import io

from rich.console import Console

from orchestrator.common.console import Display, context, parse_progress, progress_line

NOISE = ("[2026-11-30 18:23:21,966 E 9210 9269] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
         "and ID: '490b3f' has constructor arguments in the object store and max_restarts > 0. If the arguments in "
         "the object store go out of scope or are lost, the actor restart will fail.")
REPORT = ("Reporting training result 1: TrainingReport(checkpoint=Checkpoint(filesystem=local, path=/x/checkpoint_1),"
          " metrics={'step': 4}, validation_spec=None)")


def records(*lines: str, source: str = "RayTrainWorker") -> dict:
    return {"lines": list(lines), "is_err": False, "actor_name": source, "pid": 1}


def test_progress_line_round_trips():
    line = progress_line(20, 250, 0.6224, 0.6, 0.02, 57.04, 0.013, 999.4)
    assert line == "[skd] step 20/250 loss 0.6224 (hard 0.6000 kd 0.0200) 57.0 samples/s wait 0.01s ETA 999s"
    assert parse_progress(line) == {"step": 20, "total": 250, "loss": 0.6224, "rate": 57.0, "eta": 999}
    assert parse_progress("[skd] eval step 4: dev/accuracy=0.5") is None


def test_plain_output_drops_noise_and_prefixes_and_keeps_progress_lines():
    out = io.StringIO()
    shown = Display(Console(file=out, force_terminal=False, width=200))
    assert not shown.live
    with context("teacher 1 of 3"), shown.phase("teacher-minilm-l6", total=250):
        shown.handle(records(NOISE, source="TrainController"))
        shown.handle(records(REPORT, progress_line(10, 250, 0.7, 0.7, 0.0, 15.6, 0.0, 493),
                             "[skd] eval step 4: dev/accuracy=0.5000", "a user's own print"))
    text = out.getvalue()
    assert "PreemptionWatcher" not in text and "Reporting training result" not in text
    assert text.splitlines() == ["[skd] teacher 1 of 3 · teacher-minilm-l6: 250 steps",
                                 "[skd] step 10/250 loss 0.7000 (hard 0.7000 kd 0.0000) 15.6 samples/s wait 0.00s "
                                 "ETA 493s",
                                 "[skd] eval step 4: dev/accuracy=0.5000",
                                 "a user's own print"]


def test_a_terminal_shows_a_live_bar_fed_by_the_progress_lines():
    out = io.StringIO()
    shown = Display(Console(file=out, force_terminal=True, width=160, color_system=None))
    assert shown.live
    with shown.phase("skd-uniform-s0", total=500):
        shown.handle(records(progress_line(250, 500, 0.4321, 0.4, 0.03, 88.0, 0.0, 90)))
        task = shown._progress.tasks[0]
        assert (task.completed, task.total, task.fields["loss"], task.fields["rate"]) == (250, 500, "0.4321", "88.0")
        shown.handle(records(NOISE, "[skd] eval step 250: dev/accuracy=0.7000"))
    text = out.getvalue()
    assert "skd-uniform-s0" in text and "250/500" in text and "loss 0.4321" in text
    assert "[skd] eval step 250" in text and "PreemptionWatcher" not in text
    assert "[skd] step 250/500" not in text  # the bar shows it instead of the line


def test_the_browse_hint_opens_the_training_view_and_never_shows_credentials():
    from orchestrator.tracking import browse_hint

    local = browse_hint("sqlite:////tmp/x/mlflow.db", "3", "abc")
    assert local == ("mlflow ui --backend-store-uri sqlite:////tmp/x/mlflow.db --host 127.0.0.1 --port 5000, then open "
                     "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning")
    server = browse_hint("https://user:s3cret@mlflow.example.org:8443/", "7")
    assert server == "open https://mlflow.example.org:8443/#/experiments/7/runs?workflowType=machine_learning"


def test_register_takes_an_optional_name():
    from tuning.cli import fill_optional_values

    assert fill_optional_values(["distill", "-c", "x.yaml", "--register"]) == [
        "distill", "-c", "x.yaml", "--register", "default"]
    assert fill_optional_values(["distill", "--register", "--set", "a=1"]) == [
        "distill", "--register", "default", "--set", "a=1"]
    assert fill_optional_values(["distill", "--register", "mine"]) == ["distill", "--register", "mine"]

"""End to end on a real local Ray cluster and a real MLflow store, with tiny random BERTs.

One module-scoped cluster; teachers are prepared once for the module.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from actors.errors import TeacherError
from actors.manifest import read_manifest
from orchestrator.config.load import load_config
from orchestrator.commands.distill import run_distill, student_rank_scores
from orchestrator.driver.plan import make_plan
from orchestrator.commands.teachers import prepare_teachers
from tests.conftest import tiny_raw


@pytest.fixture(scope="module")
def env(ray_cluster, tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")

    def cfg(*overrides: str):
        return load_config(None, list(overrides), base=tiny_raw(tmp, tiny_model))

    teachers = prepare_teachers(cfg())
    client = MlflowClient(cfg().tracking_uri())
    exp = client.get_experiment_by_name("skd-test").experiment_id
    return {"cfg": cfg, "teachers": teachers, "client": client, "exp": exp}


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def runs(env, kind):
    return env["client"].search_runs([env["exp"]], f"tags.`skd.kind` = '{kind}'")


def test_prepare_writes_manifest_and_one_finished_run_per_teacher(env):
    teachers = read_manifest(env["cfg"]().manifest_path())
    assert [t.name for t in teachers] == ["t4", "t2"]
    assert [t.num_layers for t in teachers] == [4, 2] and teachers[0].parameters > teachers[1].parameters
    assert all(0 <= t.dev_metric <= 1 for t in teachers)
    teacher_runs = runs(env, "teacher")
    assert len(teacher_runs) == 2 and {r.info.status for r in teacher_runs} == {"FINISHED"}
    # already-prepared teachers are reused, not retrained
    prepare_teachers(env["cfg"]())
    assert len(runs(env, "teacher")) == 2


WEIGHTS = ("distill.distribution.family=weights", "distill.distribution.weights={t4: 3, t2: 1}")


@pytest.fixture(scope="module")
def weights_run(env):
    """One uninterrupted SKD run with explicit weights (checked in detail, and the reference for resume)."""
    return run_distill(env["cfg"](*WEIGHTS, "mlflow.system_metrics_s=0.5"))


def test_distill_skd_logs_everything_and_saves_a_loadable_student(env, weights_run):
    from transformers import AutoModelForSequenceClassification

    res = weights_run
    client = env["client"]
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED" and res.status == "FINISHED"
    params = run.data.params
    assert params["distill.alpha"] == "0.5" and params["distill.temperature"] == "2.0"
    assert json.loads(params["distill.probs"]) == [0.75, 0.25]
    assert run.data.tags["skd.task"] == "sst2" and run.data.tags["skd.distribution"] == "weights"
    teachers = history(client, res.run_id, "train/teacher")
    assert [s for s, _ in teachers] == list(range(1, 9)) and {v for _, v in teachers} <= {0.0, 1.0}
    assert len(history(client, res.run_id, "train/loss")) == 8
    assert len(history(client, res.run_id, "train/knowledge_wait_s")) == 8
    assert history(client, res.run_id, "train/samples_per_s")
    # per-teacher sample counts agree with the sampled sequence (8 examples a step)
    n_t4 = sum(v == 0.0 for _, v in teachers)
    assert res.counts == {"t4": 8 * n_t4, "t2": 8 * (8 - n_t4)}  # from the Ray Train result, not MLflow
    assert res.steps == 8 and res.samples_per_s > 0
    assert history(client, res.run_id, "teacher_samples/t4")[-1][1] == 8 * n_t4
    dev = history(client, res.run_id, "dev/accuracy")
    assert [s for s, _ in dev] == [4, 8]
    best = max(t.dev_metric for t in env["teachers"])
    assert history(client, res.run_id, "dev/retention")[-1][1] == pytest.approx(dev[-1][1] / best)
    artifacts = {a.path for a in client.list_artifacts(res.run_id, "plots")}
    assert artifacts == {"plots/sampling_distribution.png", "plots/learning_curves.png"}
    model = AutoModelForSequenceClassification.from_pretrained(res.model_dir)
    assert model.config.num_hidden_layers == 1
    logged = client.search_logged_models([env["exp"]], filter_string=f"source_run_id = '{res.run_id}'")
    assert len(logged) == 1
    # the wall-time breakdown: the loop is training plus its 2 evaluations and reports; logged to MLflow
    t = res.timings
    assert t["time/eval_s"] > 0 and t["time/report_s"] > 0 and t["time/setup_s"] > 0 and t["time/train_s"] > 0
    assert t["time/train_s"] + t["time/eval_s"] + t["time/report_s"] == pytest.approx(t["time/loop_s"])
    assert t["time/fit_s"] > t["time/loop_s"] and t["time/plan_s"] > 0 and t["time/outputs_s"] > 0
    assert {k: pytest.approx(v) for k, v in t.items()} == {k: v for k, v in run.data.metrics.items()
                                                            if k.startswith("time/")}


def test_the_mlflow_ui_shows_the_kind_data_and_lineage_and_no_registered_model(env, weights_run, tmp_path):
    """`mlflow ui` as skd prints it, on 127.0.0.1, read through the REST API (before anything registers)."""
    from orchestrator.driver.runtime import free_port
    from tests.faultkit import stop
    from tests.uikit import start_mlflow_ui, ui_problems

    port = free_port()
    ui = start_mlflow_ui(env["cfg"]().tracking_uri(), port, tmp_path / "ui.log")
    try:
        base = f"http://127.0.0.1:{port}"
        assert ui_problems(base, "skd-test") == []
        with urllib.request.urlopen(base + "/", timeout=120) as page:  # the UI itself, not only the API
            assert page.status == 200 and b"<html" in page.read().lower()
    finally:
        stop(ui)


def test_a_run_shows_its_data_teachers_and_card_and_registers_nothing_unless_asked(env, weights_run):
    """What the MLflow UI and the Hub read: the experiment kind, dataset inputs, lineage tags and
    description, the model card beside the weights, the input example; no registry entry by default, one
    when a name is given."""
    import yaml

    import mlflow

    from orchestrator import tracking
    from orchestrator.driver import lineage

    client, res = env["client"], weights_run
    assert client.get_experiment(env["exp"]).tags["mlflow.experimentKind"] == "custom_model_development"
    run = client.get_run(res.run_id)
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"sst2-train", "sst2-dev"}
    train_tags = {t.key: t.value for t in inputs["sst2-train"].tags}
    assert train_tags["mlflow.data.context"] == "training" and train_tags["max_length"] == "32"
    assert train_tags["subset"] == "first 64 of 67349 rows after a shuffle with seed 0"
    assert json.loads(inputs["sst2-train"].dataset.profile)["num_rows"] == 64
    assert json.loads(inputs["sst2-train"].dataset.source)["uri"].endswith("/SST-2/train.tsv")
    teacher_runs = {t.data.tags["skd.teacher"]: t.info.run_id for t in runs(env, "teacher")}
    assert json.loads(run.data.tags["skd.teacher_runs"]) == teacher_runs
    assert run.data.tags["skd.teacher.t4.run_id"] == teacher_runs["t4"]
    note = run.data.tags["mlflow.note.content"]
    assert "| t4 | bert | 4 |" in note and "0.750" in note and teacher_runs["t2"] in note
    card = (res.model_dir / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["pipeline_tag"] == "text-classification" and meta["datasets"] == ["nyu-mll/glue"]
    [result] = meta["model-index"][0]["results"]
    assert result["metrics"][0] == {"type": "accuracy", "value": pytest.approx(res.dev["accuracy"], abs=1e-4)}
    assert res.run_id in card and "| t2 | bert | 2 |" in card
    # SKDBERT's triple: retention, parameters and speed against the best teacher, measured on the saved student
    from actors.models import count_parameters, load_classifier

    h, best = res.headline, max(env["teachers"], key=lambda t: t.dev_metric)
    assert h["headline/retention"] == pytest.approx(res.retention)
    assert h["headline/parameter_ratio"] == pytest.approx(
        count_parameters(load_classifier(str(res.model_dir), 2)) / best.parameters)
    assert h["headline/parameter_ratio"] < 1 and h["headline/teacher_samples_per_s"] > 0
    assert h["headline/speedup"] == pytest.approx(h["headline/student_samples_per_s"] / h["headline/teacher_samples_per_s"])
    assert {k: pytest.approx(v) for k, v in h.items()} == {k: v for k, v in run.data.metrics.items()
                                                            if k.startswith("headline/")}
    assert f"Against the best teacher, {best.name}: {lineage.headline_text(h)}" in card
    assert json.loads((res.model_dir / "skd-run.json").read_text()) == {"run_id": res.run_id}
    [logged] = client.search_logged_models([env["exp"]], filter_string=f"source_run_id = '{res.run_id}'")
    model_files = {a.path for a in client.list_logged_model_artifacts(logged.model_id)}
    assert "input_example.json" in model_files and "MLmodel" in model_files
    assert client.search_registered_models() == []  # the default: logged to the run, not registered
    # asked for a name: registered (on a run of its own, so the module's runs keep one model each)
    other = client.create_run(env["exp"], run_name="register-check").info.run_id
    tracking.log_hf_model(env["cfg"]().tracking_uri(), other, res.model_dir, "skd-sst2-student", "a fine film")
    [registered] = client.search_registered_models()
    assert registered.name == "skd-sst2-student"
    assert env["cfg"]("mlflow.registered_model=default").registered_model_name() == "skd-sst2-student"
    assert env["cfg"]().registered_model_name() is None
    # a sentence-pair task's input example gives a (text, text_pair) signature that serves pairs, no warning
    pair = lineage.input_example(env["cfg"]("task=mrpc"))
    assert isinstance(pair, list) and set(pair[0]) == {"text", "text_pair"} and all(pair[0].values())
    uri = tracking.log_hf_model(env["cfg"]().tracking_uri(), client.create_run(env["exp"]).info.run_id,
                                res.model_dir, input_example=pair)
    assert mlflow.models.get_model_info(uri).signature.inputs.input_names() == ["text", "text_pair"]
    assert len(mlflow.pyfunc.load_model(uri).predict(pair * 2)) == 2
    # which side is busy: the student's machine (MLflow system metrics) and each teacher actor's process
    metrics = run.data.metrics
    assert metrics["system/cpu_utilization_percentage"] >= 0 and metrics["system/system_memory_usage_megabytes"] > 0
    for name in ("t4", "t2"):
        assert metrics[f"teachers/{name}/rss_mb"] > 50  # a process with torch and a model loaded
    busy = history(client, res.run_id, "teachers/t4/busy_percent")
    cpu = history(client, res.run_id, "teachers/t4/cpu_percent")
    assert busy and cpu and all(0 <= v <= 100.5 for _, v in busy) and all(v >= 0 for _, v in cpu)


def test_the_student_folder_serves_the_tasks_label_names(env, weights_run, tiny_model, tmp_path):
    """A student (and each teacher) folder names its classes: `pipeline` prints SST-2's names, not LABEL_0;
    a sentence-pair task's model answers pairs with its own names."""
    from transformers import pipeline

    from actors.models import load_classifier, load_tokenizer
    from orchestrator.common.task import GLUE_TASKS

    clf = pipeline("text-classification", model=str(weights_run.model_dir))
    assert clf.model.config.id2label == {0: "negative", 1: "positive"}
    assert {o["label"] for o in clf(["a gripping , funny film .", "dull and tedious ."])} <= {"negative", "positive"}
    assert load_classifier(env["teachers"][0].checkpoint, 2).config.label2id == {"negative": 0, "positive": 1}
    # the saved tokenizer feeds what the model was trained on: no token type ids, for pairs either
    assert set(load_tokenizer(str(weights_run.model_dir))("a", "b")) == {"input_ids", "attention_mask"}
    mrpc = GLUE_TASKS["mrpc"]
    load_classifier(str(tiny_model), 2, label_names=mrpc.label_names).save_pretrained(tmp_path)
    load_tokenizer(str(tiny_model)).save_pretrained(tmp_path)
    pair = pipeline("text-classification", model=str(tmp_path))({"text": "He said so.", "text_pair": "He did."})
    assert pair["label"] in {"not_equivalent", "equivalent"}
    with pytest.raises(TeacherError, match="2 distinct names"):
        load_classifier(str(tiny_model), 2, label_names=["yes", "yes"])


def test_an_export_of_the_student_is_logged_into_the_run_that_trained_it(env, weights_run, tmp_path):
    import shutil

    from actors.models import load_tokenizer
    from orchestrator.driver.inputs import encode, load_split
    from orchestrator.common.task import task_spec
    from orchestrator.commands.export import export_model, log_export, run_of

    student = tmp_path / "student"
    shutil.copytree(weights_run.model_dir, student)
    cfg = env["cfg"]()
    tok = load_tokenizer(str(student))
    dev = encode(load_split("sst2", cfg.data, "dev"), tok, cfg.data.max_length)
    report = export_model(student, task_spec("sst2", cfg.data), dev, tok.pad_token_id, int8=True)
    assert run_of(student) == weights_run.run_id
    log_export(cfg.tracking_uri(), run_of(student), report)
    client = env["client"]
    assert {a.path for a in client.list_artifacts(weights_run.run_id, "onnx")} >= {"onnx/model.onnx",
                                                                                 "onnx/model.int8.onnx"}
    metrics = client.get_run(weights_run.run_id).data.metrics
    assert metrics["export/onnx-fp32/max_abs_diff"] == pytest.approx(report.checks[0].max_abs_diff)
    assert metrics["export/onnx-int8/dev_accuracy"] == pytest.approx(report.checks[1].metrics["accuracy"])


def test_resume_reproduces_the_teacher_sequence_and_losses(env, weights_run):
    client, full = env["client"], weights_run
    stopped = run_distill(env["cfg"](*WEIGHTS, "mlflow.run_name=interrupted"), stop_after=4)
    assert stopped.status == "KILLED" and client.get_run(stopped.run_id).info.status == "KILLED"
    ray_run = env["cfg"]().storage_path() / client.get_run(stopped.run_id).data.tags["skd.ray_run"]
    assert stopped.checkpoint and Path(stopped.checkpoint).parent == ray_run  # an unfinished run keeps its own
    resumed = run_distill(env["cfg"](*WEIGHTS, "mlflow.run_name=interrupted"), resume=True)
    assert resumed.run_id == stopped.run_id and resumed.status == "FINISHED"
    # finished: its Ray Train folder is gone (ray.keep_finished_checkpoints is off), its student is saved
    assert resumed.checkpoint is None and not ray_run.exists() and (resumed.model_dir / "config.json").is_file()
    assert len(client.search_runs([env["exp"]], "tags.`mlflow.runName` = 'interrupted'")) == 1
    assert history(client, resumed.run_id, "train/teacher") == history(client, full.run_id, "train/teacher")
    a = np.array([v for _, v in history(client, full.run_id, "train/loss")])
    b = np.array([v for _, v in history(client, resumed.run_id, "train/loss")])
    np.testing.assert_allclose(b, a, rtol=1e-5)
    assert resumed.counts == full.counts


def test_average_baseline_asks_every_teacher(env):
    res = run_distill(env["cfg"]("distill.strategy=average", "distill.max_steps=4"))
    assert res.status == "FINISHED" and res.counts == {"t4": 32, "t2": 32}
    assert {v for _, v in history(env["client"], res.run_id, "train/teacher")} == {-1.0}


def test_student_rank_prepass_is_recorded_and_reused(env):
    args = ("distill.distribution.family=student-rank", "distill.distribution.prepass_steps=4", "distill.max_steps=4")
    res = run_distill(env["cfg"](*args))
    prepass = runs(env, "prepass")
    assert len(prepass) == 2 and {r.info.status for r in prepass} == {"FINISHED"}
    scores = {r.data.tags["skd.teacher"]: r.data.metrics["dev/accuracy"] for r in prepass}
    probs = json.loads(env["client"].get_run(res.run_id).data.params["distill.probs"])
    from scipy.stats import rankdata

    ranks = rankdata([scores["t4"], scores["t2"]])
    np.testing.assert_allclose(probs, ranks / ranks.sum(), atol=1e-6)
    # a second run with the same student, data and teachers reuses the pre-pass runs: no training, no pool
    cfg = env["cfg"](*args, "mlflow.run_name=student-rank-again")
    assert student_rank_scores(make_plan(cfg), source=None, resources=None) == [scores["t4"], scores["t2"]]
    assert len(runs(env, "prepass")) == 2


def test_a_failure_after_training_is_a_warning_not_a_failed_run(env):
    """Plots (or model logging) that fail after a full training run leave the run FINISHED with a warning tag;
    the student folder is written and marked as skd's own."""
    from orchestrator.driver.outputs import OWNED_MARK
    from orchestrator.driver.plan import make_plan
    from orchestrator.driver.runner import distill_spec, run_training

    cfg = env["cfg"]("distill.strategy=no-kd", "distill.max_steps=2", "mlflow.run_name=plots-fail")
    plan = make_plan(cfg)

    def broken_plots(*args):
        raise RuntimeError("disk full")

    res = run_training(cfg, distill_spec(plan, None), run_name=plan.run_name, tags={}, params={},
                       model_out=plan.student_dir, use_gpu=False, figures=broken_plots)
    run = env["client"].get_run(res.run_id)
    assert res.status == "FINISHED" and run.info.status == "FINISHED"
    assert "disk full" in run.data.tags["skd.warning.plots"]
    assert (plan.student_dir / OWNED_MARK).is_file() and (plan.student_dir / "config.json").is_file()


ADAPTIVE = ("distill.distribution.family=adaptive", "distill.distribution.eps=0.2", "distill.distribution.every=2",
            "distill.distribution.step_size=0.5", "distill.distribution.probe_size=8")


def test_adaptive_sampling_logs_p_and_resumes_the_same_sequence(env):
    """The adaptive family on Ray Train: p learnt every 2 steps, logged by teacher with its plot and in the
    summary; a run stopped after step 4 and resumed draws the same teachers and learns the same p."""
    client = env["client"]
    full = run_distill(env["cfg"](*ADAPTIVE, "mlflow.run_name=adaptive-full"))
    assert full.status == "FINISHED" and set(full.probs) == {"t4", "t2"}
    assert sum(full.probs.values()) == pytest.approx(1.0) and min(full.probs.values()) >= 0.1 - 1e-9  # floor eps/N
    p_t4 = history(client, full.run_id, "sampler/p/t4")
    assert [s for s, _ in p_t4] == [3, 5, 7, 9]  # learnt after steps 2, 4, 6, 8 (the probe before step 1 starts)
    assert len(history(client, full.run_id, "sampler/reward")) == 4
    assert full.timings["time/probe_s"] > 0
    artifacts = {a.path for a in client.list_artifacts(full.run_id, "plots")}
    assert "plots/sampling_p_over_time.png" in artifacts
    stopped = run_distill(env["cfg"](*ADAPTIVE, "mlflow.run_name=adaptive-resumed"), stop_after=4)
    assert stopped.status == "KILLED"
    # how a PBT exploit starts: another MLflow run from this run's checkpoint (`resume_from`). It continues the
    # donor's bandit (p in force and queued, running gains, generator), so from step 5 on it draws the teachers
    # and learns the p of the uninterrupted run; a bandit started afresh would learn other p from other gains.
    exploit = run_distill(env["cfg"](*ADAPTIVE, "mlflow.run_name=adaptive-exploit"), resume_from=stopped.checkpoint)
    assert exploit.status == "FINISHED" and exploit.run_id != stopped.run_id
    for key, steps in (("train/teacher", {5, 6, 7, 8}), ("sampler/p/t4", {7, 9})):
        mine, ref = dict(history(client, exploit.run_id, key)), dict(history(client, full.run_id, key))
        assert steps <= set(mine)
        np.testing.assert_allclose([v for _, v in sorted(mine.items())], [ref[s] for s in sorted(mine)], rtol=1e-6)
    resumed = run_distill(env["cfg"](*ADAPTIVE, "mlflow.run_name=adaptive-resumed"), resume=True)
    assert resumed.status == "FINISHED"
    for key in ("train/teacher", "sampler/p/t4", "sampler/p/t2"):
        mine, ref = history(client, resumed.run_id, key), history(client, full.run_id, key)
        assert [s for s, _ in mine] == [s for s, _ in ref]
        np.testing.assert_allclose([v for _, v in mine], [v for _, v in ref], rtol=1e-6)
    assert resumed.probs == pytest.approx(full.probs)

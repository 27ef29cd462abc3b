"""Tuning campaigns on a real local Ray cluster and MLflow store, with tiny random BERTs."""

from __future__ import annotations

import pytest
import ray
from mlflow.tracking import MlflowClient

from orchestrator.config.load import load_config
from actors.errors import ConfigError
from tests.conftest import tiny_raw
from tests.tiny import make_tiny_teachers
from tuning.campaign import _searcher, run_campaign, source_config, validate_space
from tuning.space import Dimension, TuneSection, domain

SPACE = {"family": {"choice": ["uniform", "teacher-rank"]}, "alpha": {"uniform": [0.3, 0.7]},
         "lr": {"loguniform": [5.0e-4, 2.0e-3]}}


@pytest.fixture(scope="module")
def ray4():
    """A local cluster with 4 logical CPUs (what `skd tune` starts on a 2-core machine), stopped by this process;
    with the dashboard, as `skd tune` runs it, so Ray Train can clean up the placement groups of stopped trials."""
    from orchestrator.driver.runtime import start_local_ray

    start_local_ray(4, dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def campaign(ray4, tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    raw = tiny_raw(tmp, tiny_model, distill={"max_steps": 8, "batch_size": 8, "log_every": 4, "eval_every": 2,
                                             "gsnr_every": 4, "gsnr_probe_size": 4},
                   tune={"space": SPACE, "num_samples": 3, "scheduler": "asha", "grace_period": 1,
                         "reduction_factor": 2, "seed": 3, "max_concurrent": 3})
    raw["teachers"] = make_tiny_teachers(tmp / "teachers", {"t4": (4, 32, 2), "t2": (2, 32, 2)})[1]
    cfg = load_config(None, base=raw)
    before = _teacher_actors()
    result = run_campaign(cfg)
    return {"cfg": cfg, "raw": raw, "result": result, "client": MlflowClient(cfg.tracking_uri()),
            "actors_created": _teacher_actors() - before}


def _teacher_actors() -> int:
    """Teacher actors ever created in this cluster (from the GCS actor table)."""
    return sum(a["ActorClassName"].endswith("Teacher") for a in ray._private.state.actors().values())


def test_pool_is_created_once_for_all_trials(campaign):
    assert len(campaign["result"].trials) == 3
    assert campaign["actors_created"] == 2  # t4 and t2, once, not once per trial (3 trials run at once)


def test_parent_and_child_runs(campaign):
    client, res = campaign["client"], campaign["result"]
    parent = client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["skd.kind"] == "campaign"
    assert parent.data.params["scheduler"] == "asha" and "family" in parent.data.params["search_space"]
    assert parent.data.tags["skd.best_trial"] == res.best["trial_id"]
    assert parent.data.tags["best.family"] == res.best["param.family"] and f"best/{res.metric}" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(res.parent_run_id)}
    assert "trials.csv" in artifacts
    plots = {a.path for a in client.list_artifacts(res.parent_run_id, "plots")}
    assert {"plots/metric_vs_params.png", "plots/best_so_far.png", "plots/gsnr_by_family.png",
            "plots/best_distribution.png"} <= plots
    children = client.search_runs([res.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    assert len(children) == 3
    for child in children:
        assert child.info.status in ("FINISHED", "KILLED")  # never left RUNNING
        assert child.info.run_name == f"trial-{child.data.tags['skd.trial_id']}"
        assert "distill.alpha" in child.data.params and "dev/accuracy" in child.data.metrics
        assert any(k.startswith("gsnr/encoder.layer.0/") for k in child.data.metrics)
    statuses = {t["trial_id"]: t["status"] for t in res.trials}
    by_id = {c.data.tags["skd.trial_id"]: c.info.status for c in children}
    assert statuses == by_id
    evals = {t["trial_id"]: t["evaluations"] for t in res.trials}
    assert all((evals[i] == 4) == (s == "FINISHED") for i, s in statuses.items())


def test_resume_does_not_duplicate_runs(campaign):
    client, res = campaign["client"], campaign["result"]
    client.set_terminated(res.parent_run_id, "KILLED")  # as if the driver died after the trials ended
    again = run_campaign(load_config(None, base=campaign["raw"]), resume=True)
    assert again.parent_run_id == res.parent_run_id
    assert client.get_run(res.parent_run_id).info.status == "FINISHED"
    children = client.search_runs([res.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    assert len(children) == 3
    assert len(client.search_runs([res.experiment_id], "tags.`skd.kind` = 'campaign'")) == 1
    with pytest.raises(Exception, match="no unfinished campaign"):
        run_campaign(load_config(None, base=campaign["raw"]), resume=True)


@pytest.mark.parametrize("search", ["random", "optuna"])
def test_search_is_seeded_and_reproducible(search):
    """The same seed suggests the same configurations (Tune's searcher, asked directly: no trials run)."""
    section = TuneSection(space={"alpha": Dimension(uniform=(0.0, 1.0)), "lr": Dimension(loguniform=(1e-5, 1e-3))},
                          search=search, seed=11, num_samples=4)

    def sample(seed):
        searcher = _searcher(section.model_copy(update={"seed": seed, "max_concurrent": 4}))
        space = {k: domain(d) for k, d in section.space.items()}
        if search == "optuna":
            searcher.set_search_properties("score", "max", space)
            configs = [searcher.suggest(f"t{i}") for i in range(4)]
        else:  # random search generates whole trials
            searcher.add_configurations({"seeded": {"run": lambda config: None, "config": space, "num_samples": 4}})
            configs = [searcher.next_trial().config for _ in range(4)]
        return [(c["alpha"], c["lr"]) for c in configs]
    first = sample(11)
    assert len(set(first)) == 4 and all(0 <= a <= 1 and 1e-5 <= lr <= 1e-3 for a, lr in first)
    assert sample(11) == first
    assert sample(12) != first


def test_bad_ranges_are_clear_errors(tiny_model, tmp_path):
    def cfg(space):
        return load_config(None, base=tiny_raw(tmp_path, tiny_model, tune={"space": space}))
    with pytest.raises(ConfigError, match="low < high"):
        cfg({"alpha": {"uniform": [0.8, 0.2]}})
    with pytest.raises(ConfigError, match="unknown search dimensions"):
        cfg({"alpah": {"uniform": [0.1, 0.2]}})
    with pytest.raises(ConfigError, match="tune.space.alpha: value 1.5"):
        c = cfg({"alpha": {"uniform": [0.5, 1.5]}})
        validate_space(c, c.tune)
    with pytest.raises(ConfigError, match="(?s)tune.space.family: value 'weights'.*needs distill.distribution.weights"):
        c = cfg({"family": {"choice": ["uniform", "weights"]}})
        validate_space(c, c.tune)


def test_a_recipe_search_for_one_teacher_tunes_kd_settings_and_the_knowledge_asked(tiny_model, tmp_path):
    """KD settings and the knowledge asked for are searched for any distilling strategy; the shared source is
    made for every output a trial may ask; distribution shapes need skd, and no-kd has nothing to search."""
    def cfg(strategy, space):
        return load_config(None, base=tiny_raw(tmp_path, tiny_model, distill={"strategy": strategy},
                                               tune={"space": space}))
    c = cfg("single:t4", {"alpha": {"uniform": [0.1, 0.9]}, "outputs": {"choice": [[], ["hidden"], ["cls"]]}})
    validate_space(c, c.tune)
    assert c.distill.knowledge.outputs == []
    assert source_config(c, c.tune).distill.knowledge.outputs == ["cls", "hidden"]
    assert source_config(c, c.tune).distill.strategy == "single:t4"
    plain = cfg("skd", {"alpha": {"uniform": [0.1, 0.9]}})
    assert source_config(plain, plain.tune) is plain
    with pytest.raises(ConfigError, match=r"tune.space \['family', 'gamma'\] shape the SKD sampling distribution"):
        c = cfg("average", {"family": {"choice": ["uniform"]}, "gamma": {"uniform": [0.5, 2]}})
        validate_space(c, c.tune)
    with pytest.raises(ConfigError, match="no-kd distils nothing"):
        c = cfg("no-kd", {"lr": {"loguniform": [1e-4, 1e-3]}})
        validate_space(c, c.tune)
    with pytest.raises(ConfigError, match="space.outputs takes a choice of output lists"):
        cfg("skd", {"outputs": {"uniform": [0, 1]}})
    with pytest.raises(ConfigError, match="tune.space.outputs: value \\['logits'\\] is not valid"):
        c = cfg("skd", {"outputs": {"choice": [["logits"]]}})
        validate_space(c, c.tune)


def test_pbt_trials_train_in_segments_and_exploit_with_state(campaign):
    """PBT with the adaptive family: each trial is one MLflow run through all its segments; an exploited
    trial continues from the donor's checkpoint (teacher counts carry over) with perturbed values (the
    adaptive step size among them) logged as hp/ metrics, and learns p in every segment."""
    base = campaign["raw"]
    adaptive = {"family": "adaptive", "eps": 0.2, "every": 2, "probe_size": 4}
    raw = {**base, "distill": {**base["distill"], "max_steps": 8, "eval_every": 4, "gsnr_every": None,
                               "distribution": adaptive},
           "mlflow": {**base["mlflow"], "run_name": "pbt"},
           "tune": {"space": {"alpha": {"uniform": [0.3, 0.7]}, "lr": {"loguniform": [5.0e-4, 2.0e-3]},
                              "step_size": {"uniform": [0.05, 0.5]}},
                    "num_samples": 2, "scheduler": "pbt", "quantile_fraction": 0.5, "max_concurrent": 2,
                    "synch": True, "seed": 5}}
    client = campaign["client"]
    res = run_campaign(load_config(None, base=raw))
    children = client.search_runs([res.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    lr_values = []
    for child in children:
        rid = child.info.run_id
        served = sum(child.data.metrics[f"teacher_samples/{n}"] for n in ("t4", "t2"))
        assert served == 8 * 8  # counts restored from each segment's checkpoint, never restarted
        hist = client.get_metric_history(rid, "hp/lr")
        assert {m.step for m in hist} >= {0, 4}  # one record per segment start
        lr_values.append({m.value for m in hist})
        assert all(0.3 <= m.value <= 0.7 for m in client.get_metric_history(rid, "hp/alpha"))  # explore clamps
        assert all(0.05 <= m.value <= 0.5 for m in client.get_metric_history(rid, "hp/step_size"))
        p = {n: {m.step: m.value for m in client.get_metric_history(rid, f"sampler/p/{n}")} for n in ("t4", "t2")}
        assert min(p["t4"]) < 4 < max(p["t4"])  # p learnt in both segments
        for step in p["t4"]:  # a distribution at every update
            assert p["t4"][step] + p["t2"][step] == pytest.approx(1.0)
        assert child.data.params["distill.distribution.family"] == "adaptive"
    assert any(len(v) > 1 for v in lr_values), "no trial was exploited/perturbed"
    assert all(t["status"] == "FINISHED" for t in res.trials)


def test_pbt_needs_random_search_and_concurrent_trials(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="pbt .*search random"):
        load_config(None, base=tiny_raw(tmp_path, tiny_model, tune={"scheduler": "pbt", "search": "optuna",
                                                                    "max_concurrent": 2}))
    with pytest.raises(ConfigError, match="max_concurrent >= 2"):
        load_config(None, base=tiny_raw(tmp_path, tiny_model, tune={"scheduler": "pbt"}))

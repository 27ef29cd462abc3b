"""Config loading: every shipped YAML validates; unknown keys and bad values are clear errors."""

from pathlib import Path

import pytest

from orchestrator.config.base import REPO_ROOT
from orchestrator.config.load import load_config, parse_overrides
from actors.errors import ConfigError

SHIPPED = sorted((REPO_ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_starts_with_its_command(path: Path):
    cfg = load_config(path)
    assert cfg.teachers.members
    assert path.read_text().startswith("# ") and "skd " in path.read_text().splitlines()[0]


def test_shipped_configs_cover_the_four_tasks_and_a_cluster():
    assert {p.stem for p in SHIPPED} >= {"sst2", "cola", "mrpc", "stsb", "cluster"}


def test_overrides_are_typed_and_nested():
    assert parse_overrides(["distill.alpha=0.3", "data.max_train_samples=null", "a.b.c=[1, 2]"]) == {
        "distill": {"alpha": 0.3}, "data": {"max_train_samples": None}, "a": {"b": {"c": [1, 2]}}}
    cfg = load_config(REPO_ROOT / "configs" / "sst2.yaml", ["distill.alpha=0.25", "distill.strategy=average"])
    assert cfg.distill.alpha == 0.25 and cfg.distill.strategy == "average"


def test_unknown_key_names_field_and_suggests_fix():
    with pytest.raises(ConfigError) as err:
        load_config(REPO_ROOT / "configs" / "sst2.yaml", ["distill.temprature=3"])
    assert "distill.temprature: unknown setting (did you mean 'temperature'?)" in str(err.value)


@pytest.mark.parametrize("override, fragment", [
    ("distill.alpha=1.5", "distill.alpha"),
    ("distill.temperature=0", "distill.temperature"),
    ("distill.strategy=best", "unknown strategy 'best'"),
    ("distill.strategy=single:nobody", "not in teachers.members"),
    ("distill.distribution.family=zipf", "distill.distribution.family"),
    ("distill.distribution.family=weights", "needs distill.distribution.weights"),
    ("distill.distribution.weights={ghost: 1}", "unknown teachers ['ghost']"),
    ("distill.distribution.eps=2", "distill.distribution.eps"),
])
def test_bad_values_name_the_field(override, fragment):
    with pytest.raises(ConfigError, match="invalid config") as err:
        load_config(REPO_ROOT / "configs" / "sst2.yaml", [override])
    assert fragment in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [sst2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(REPO_ROOT / "configs" / "sst2.yaml", ["distill.alpha"])


@pytest.mark.parametrize("override, fragment", [
    ("mlflow.run_name=/some/folder", "mlflow.run_name: mlflow.run_name '/some/folder' must be a plain name"),
    ("mlflow.run_name=..", "mlflow.run_name '..' must be a plain name"),
    ("mlflow.run_name=a/../b", "mlflow.run_name 'a/../b' must be a plain name"),
    ("teachers.members=[{name: ..}]", "teachers.members[].name '..' must be a plain name"),
    ("teachers.members=[{name: x/y}]", "teachers.members[].name 'x/y' must be a plain name"),
])
def test_names_that_would_leave_the_output_folder_are_refused(override, fragment):
    """Run and teacher names become folder names: separators, '.' and '..' are refused at load time."""
    with pytest.raises(ConfigError) as err:
        load_config(REPO_ROOT / "configs" / "sst2.yaml", [override])
    assert fragment in str(err.value)


def test_a_folder_skd_did_not_create_is_refused_before_ray(tmp_path, make_config):
    """`--set mlflow.run_name=X` where <output_dir>/students/X holds someone's files: refused by the plan
    (before Ray), and the files are untouched; an skd-written folder of that name is accepted."""
    from actors.errors import SkdError
    from orchestrator.driver.outputs import OWNED_MARK
    from orchestrator.driver.plan import make_plan

    cfg = make_config(["distill.strategy=no-kd", "mlflow.run_name=precious"])
    theirs = cfg.out_dir() / "students" / "precious"
    theirs.mkdir(parents=True)
    (theirs / "thesis.tex").write_text("do not delete")
    with pytest.raises(SkdError, match="was not written by skd"):
        make_plan(cfg)
    assert (theirs / "thesis.tex").read_text() == "do not delete"
    (theirs / OWNED_MARK).write_text("")
    assert make_plan(cfg).student_dir == theirs


def test_secrets_never_reach_logged_params(tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking

    cases = [  # (setting, value, what MLflow may see)
        ("mlflow.tracking_uri", "https://alice:s3cret@mlflow.example.com/api?token=abc123&x=1",
         "https://***@mlflow.example.com/api?token=***&x=1"),
        ("a.url", "https://bob:ab/cd@host.example", "https://***@host.example"),
        ("b.url", "https://ghp_tok@github.com/x", "https://***@github.com/x"),
        ("c.url", "https://store.example/blob?sv=1&sig=SIGVALUE&X-Amz-Credential=AKIA1",
         "https://store.example/blob?sv=1&sig=***&X-Amz-Credential=***"),
        ("ray.address", "ray://10.0.0.1:10001", "ray://10.0.0.1:10001"),
        ("deploy.api_key", "sk-123", "***"), ("auth.password", "hunter2", "***"), ("distill.alpha", "0.5", "0.5"),
        ("mlflow.token", "None", "None"), ("distill.knowledge.tokens", "first", "first"),
        ("distill.knowledge.num_tokens", "10", "10")]
    params = {key: value for key, value, _ in cases}
    want = {key: masked for key, _, masked in cases}
    assert tracking.redact(params) == want
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    run = client.create_run(client.create_experiment("secrets")).info.run_id
    tracking.log_params(client, run, params)  # what every skd run logs goes through here
    logged = client.get_run(run).data.params
    assert logged == want
    assert not any(s in v for v in logged.values() for s in ("s3cret", "abc123", "sk-123", "ab/cd", "ghp_", "SIGV"))


def test_an_unreachable_store_with_credentials_is_a_clear_error_that_hides_them():
    from actors.errors import SkdError
    from orchestrator import tracking
    from orchestrator.driver import runtime

    for uri in (f"http://alice:s3cret@127.0.0.1:{runtime.free_port()}", "https://alice:s3cret@no-such-host.invalid"):
        with pytest.raises(SkdError, match="tracking server does not answer") as err:
            tracking.check_store(uri, timeout_s=2)
        assert "s3cret" not in str(err.value) and "***@" in str(err.value)


def test_eps_default_follows_the_family():
    """eps left out is 0 for the fixed families and 0.1 for adaptive; an explicit 0 with adaptive is refused."""
    from orchestrator.config import DistributionConfig
    assert DistributionConfig().eps == 0.0
    assert DistributionConfig(family="teacher-rank").eps == 0.0
    assert DistributionConfig(family="adaptive").eps == 0.1
    assert DistributionConfig(family="adaptive", eps=0.3).eps == 0.3
    with pytest.raises(ValueError, match="exploration floor"):
        DistributionConfig(family="adaptive", eps=0.0)

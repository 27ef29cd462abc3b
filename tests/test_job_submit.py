"""`ray job submit` against a one-node `ray start` cluster, exactly as the README documents it: Ray started
from the environment where skd is installed, `ray job submit --address http://127.0.0.1:<dashboard port>
--working-dir . -- skd distill -c <config>` from the repository root, and a config that sets neither
`data.glue_dir` nor `ray.address`. The job's driver must attach to that cluster (through the RAY_ADDRESS
Ray gives it), find the GLUE data although its package is Ray's uploaded copy, and finish the run.
Also: what the upload holds, and the default GLUE folder and cluster address resolution on their own."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from actors.errors import ConfigError, DataError
from orchestrator.config import base as config_module
from orchestrator.driver import runtime
from orchestrator.config import DataConfig, RayConfig
from orchestrator.config.base import glue_dir_candidates, installed_source_dir
from tests.conftest import tiny_raw
from tests.tiny import make_tiny_teachers

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: `skd`, `ray`
STEPS = 4


def _kill_session(leader: subprocess.Popen) -> None:
    """SIGKILL every process of the session `leader` started (`ray start` and its GCS, raylet, dashboard and
    workers, which Ray puts in process groups of their own, but all in this session), then reap it. A
    SIGTERM would drain the node for 30 s first."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) == leader.pid:
                os.kill(int(entry), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
    leader.wait(timeout=60)


@pytest.fixture(scope="module")
def one_node_cluster(tmp_path_factory):
    """`ray start --head --block` in a session of its own, from the venv (its bin first on PATH, as after
    `source .venv/bin/activate`), on free ports, dashboard on 127.0.0.1, its own temp dir (short: Ray's
    socket paths are limited to 107 characters). No RAY_ADDRESS or GLUE_DIR reaches it. Stopped by killing
    that session, never `ray stop` (which stops every Ray on the machine)."""
    logs = tmp_path_factory.mktemp("ray-start")
    temp = Path(tempfile.mkdtemp(prefix="skdjob", dir="/tmp"))
    gcs, dashboard, client, agent = (runtime.free_port() for _ in range(4))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "GLUE_DIR")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true")
    with open(logs / "ray-start.log", "w") as log:
        proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--port", str(gcs), "--dashboard-host",
                                 "127.0.0.1", "--dashboard-port", str(dashboard), "--ray-client-server-port",
                                 str(client), "--dashboard-agent-listen-port", str(agent), "--num-cpus", "2",
                                 "--temp-dir", str(temp), "--disable-usage-stats", "--block"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray start failed: {(logs / 'ray-start.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield {"url": url, "gcs_port": gcs, "env": env}
    finally:
        _kill_session(proc)
        shutil.rmtree(temp, ignore_errors=True)


def test_the_documented_ray_job_submit_runs_skd_distill_on_that_cluster(one_node_cluster, tmp_path, tiny_model):
    from mlflow.tracking import MlflowClient

    _, teachers = make_tiny_teachers(tmp_path / "teachers", {"t4": (4, 32, 2), "t2": (2, 32, 2)})
    raw = tiny_raw(tmp_path, tiny_model, teachers=teachers,
                   distill={"max_steps": STEPS, "eval_every": STEPS, "log_every": 2},
                   mlflow={"run_name": "job-submit"})
    assert "glue_dir" not in raw["data"] and "address" not in raw["ray"]  # what this test is about
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(json.loads(json.dumps(raw))))

    started = time.monotonic()
    job = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", one_node_cluster["url"],
                          "--working-dir", ".", "--", "skd", "distill", "-c", str(config)],
                         cwd=REPO, env=one_node_cluster["env"], capture_output=True, text=True, timeout=480)
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-4000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", log) and "run job-submit (FINISHED)" in log, log[-4000:]
    # the driver attached to this cluster (RAY_ADDRESS from Ray), not a local Ray of its own
    attached = re.search(r"\[skd\] attached to the Ray cluster at (\S+) \(RAY_ADDRESS=", log)
    assert attached and attached.group(1).endswith(f":{one_node_cluster['gcs_port']}"), log[-4000:]
    assert "Started a local Ray instance" not in log
    assert "Found multiple active Ray instances" not in log  # workers know the cluster's address
    print(f"ray job submit took {time.monotonic() - started:.1f} s")

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(raw["mlflow"]["experiment"]).experiment_id],
                              filter_string="attributes.run_name = 'job-submit'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    losses = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, STEPS + 1))


def test_the_uploaded_working_dir_leaves_out_the_venv_runs_and_the_mlflow_store():
    """Ray packs `--working-dir .` honouring .gitignore and its default excludes (.git, .venv, __pycache__);
    built here with Ray's own packaging call and settings, as `ray job submit` does."""
    import zipfile

    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    with tempfile.TemporaryDirectory() as folder:
        package = Path(folder) / "pkg.zip"
        create_package(str(REPO), package, include_gitignore=True,
                       excludes=ray_constants.get_runtime_env_default_excludes())
        size = package.stat().st_size
        names = zipfile.ZipFile(package).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {"orchestrator", "actors", "tuning", "pyproject.toml"} <= tops
    assert not tops & {".venv", "runs", "mlflow.db", "mlartifacts", ".git", "skd.egg-info"}, sorted(tops)
    assert size < 5 * 2**20, f"{size / 2**20:.1f} MiB uploaded"


def _checkout(root: Path, with_glue: bool) -> Path:
    """A folder `root/checkout`, with `root/shared/data/glue` beside it if `with_glue`."""
    (root / "checkout").mkdir(parents=True)
    if with_glue:
        (root / "shared" / "data" / "glue").mkdir(parents=True)
    return root / "checkout"


def test_the_default_glue_folder_is_the_first_existing_candidate(tmp_path, monkeypatch):
    package, cwd, source = (_checkout(tmp_path / n, n != "package") for n in ("package", "cwd", "source"))
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setattr(config_module, "REPO_ROOT", package)  # as in a job: Ray's copy of the working dir
    monkeypatch.setattr(config_module, "installed_source_dir", lambda: source)
    monkeypatch.chdir(cwd)
    assert glue_dir_candidates() == [(r / ".." / "shared" / "data" / "glue").resolve() for r in (package, cwd, source)]
    assert DataConfig().resolved_glue_dir() == tmp_path / "cwd" / "shared" / "data" / "glue"
    monkeypatch.chdir(package)  # only the installed source folder has data beside it
    assert DataConfig().resolved_glue_dir() == tmp_path / "source" / "shared" / "data" / "glue"
    monkeypatch.setenv("GLUE_DIR", str(tmp_path / "elsewhere"))  # taken as given, like data.glue_dir
    assert DataConfig().resolved_glue_dir() == tmp_path / "elsewhere"
    assert DataConfig(glue_dir=tmp_path / "mine").resolved_glue_dir() == tmp_path / "mine"


def test_no_glue_folder_names_what_was_tried_and_the_fix(tmp_path, monkeypatch):
    package = _checkout(tmp_path / "package", with_glue=False)
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setattr(config_module, "REPO_ROOT", package)
    monkeypatch.setattr(config_module, "installed_source_dir", lambda: None)  # installed from an index
    monkeypatch.chdir(package)
    with pytest.raises(DataError) as err:
        DataConfig().resolved_glue_dir()
    message = str(err.value)
    assert str((package / ".." / "shared" / "data" / "glue").resolve()) in message
    assert "data.glue_dir" in message and "$GLUE_DIR" in message
    assert DataConfig(source="hub").resolved_glue_dir() == glue_dir_candidates()[0]  # hub reads no GLUE folder


def test_the_installed_source_folder_is_this_checkout_for_an_editable_install():
    source = installed_source_dir()  # `pip install -e .` (make install) records it in direct_url.json
    assert source is not None and (source / "pyproject.toml").is_file()


def test_ray_address_in_the_environment_means_attach(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert runtime.attach_address(RayConfig()) == (None, "")  # a new local cluster, never one found by chance
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert runtime.attach_address(RayConfig()) == (None, "")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # what Ray sets for a job's driver
    assert runtime.attach_address(RayConfig()) == ("10.0.0.5:6379", "RAY_ADDRESS=10.0.0.5:6379")
    assert runtime.attach_address(RayConfig(address="auto")) == ("10.0.0.5:6379", "RAY_ADDRESS=10.0.0.5:6379")
    assert runtime.attach_address(RayConfig(address="10.0.0.6:6379")) == ("10.0.0.6:6379", "ray.address")
    monkeypatch.delenv("RAY_ADDRESS")
    assert runtime.attach_address(RayConfig(address="auto")) == ("auto", "ray.address")
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # the job API, not a cluster
    with pytest.raises(ConfigError, match="RAY_API_SERVER_ADDRESS"):
        runtime.attach_address(RayConfig())

"""The deployment files in deploy/, checked offline: KubeRay RayJobs against the operator's CRD schemas
(strictly: an unknown or misspelt key is an error, as `kubectl apply --validate=strict` makes it), the
Ray cluster-launcher YAML against Ray's own schema, the skd config they mount against skd's, and the
MLflow server manifest and Dockerfiles for internal consistency."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
CRDS = REPO.parent / "shared" / "kuberay-crds"
OBJECT_META = {"type": "object", "additionalProperties": False, "properties": {
    k: {} for k in ("name", "namespace", "labels", "annotations", "generateName", "finalizers", "ownerReferences")}}


def strict(schema: dict) -> dict:
    """A copy of an OpenAPI v3 (CRD) schema where objects reject properties they do not declare, as the
    API server's strict field validation does, unless marked `x-kubernetes-preserve-unknown-fields`;
    untyped `metadata` objects are checked as ObjectMeta."""
    schema = copy.deepcopy(schema)

    def walk(node, key: str | None = None) -> None:
        if not isinstance(node, dict):
            return
        if key == "metadata" and node.get("type") == "object" and "properties" not in node:
            node.update(copy.deepcopy(OBJECT_META))
        if "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for name, child in node.get("properties", {}).items():
            walk(child, name)
        for k in ("items", "additionalProperties"):
            walk(node.get(k))
        for k in ("allOf", "anyOf", "oneOf"):
            for child in node.get(k, []):
                walk(child)
    walk(schema)
    return schema


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML loading that refuses a key repeated in one mapping (the API server's strict validation does;
    plain `yaml.safe_load` keeps the last value silently)."""


def _unique_mapping(loader, node, deep=False):
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    repeated = sorted({k for k in keys if keys.count(k) > 1}, key=str)
    if repeated:
        raise yaml.constructor.ConstructorError(None, None, f"repeated keys {repeated}", node.start_mark)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                lambda loader, node: dict(_unique_mapping(loader, node)))


def load(path: Path) -> list[dict]:
    """Every document of a manifest, refusing repeated keys."""
    return list(yaml.load_all(path.read_text(), Loader=UniqueKeyLoader))


def crd_schema(kind_file: str, version: str = "v1") -> dict:
    crd = yaml.safe_load((CRDS / kind_file).read_text())
    [v] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return v["schema"]["openAPIV3Schema"]


def errors(schema: dict, doc: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


RAYJOBS = sorted((DEPLOY / "kuberay").glob("rayjob-*.yaml"))


def test_there_are_rayjobs_for_distill_and_tune():
    assert {p.name for p in RAYJOBS} >= {"rayjob-distill.yaml", "rayjob-tune.yaml"}


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_validates_strictly_against_the_kuberay_crd(path):
    [doc] = load(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    assert "$" not in doc["spec"]["entrypoint"]  # KubeRay pastes it into the submitter pod's shell: no variables
    assert errors(strict(crd_schema("ray.io_rayjobs.yaml")), doc) == []
    spec = doc["spec"]["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token"  # Ray token authentication on
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"teachers", "students"}
    for group, resource in (("teachers", "skd-teacher"), ("students", "skd-student")):
        limits = groups[group]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1" and groups[group]["resources"] == {resource: "1"}


def test_strict_validation_catches_a_misspelt_key_that_plain_validation_lets_through():
    doc = yaml.safe_load((DEPLOY / "kuberay" / "rayjob-distill.yaml").read_text())
    container = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["volumeMount"] = container.pop("volumeMounts")  # a typo kubectl --validate=strict refuses
    doc["spec"]["shutdownAfterJobFinish"] = True
    schema = crd_schema("ray.io_rayjobs.yaml")
    assert errors(schema, doc) == []  # the CRD schema alone does not see it
    found = errors(strict(schema), doc)
    assert any("'volumeMount' was unexpected" in e for e in found)
    assert any("'shutdownAfterJobFinish' was unexpected" in e for e in found)


def test_the_mounted_skd_config_is_a_valid_skd_config_asking_for_the_groups_resources():
    from orchestrator.config.load import load_config

    docs = load(DEPLOY / "kuberay" / "skd-config.yaml")
    [config_map] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "skd-config"]
    raw = yaml.safe_load(config_map["data"]["skd.yaml"])
    cfg = load_config(None, [], base=raw)
    assert cfg.teachers.resources == {"skd-teacher": 1.0} and cfg.ray.resources_per_worker == {"skd-student": 1.0}
    assert cfg.ray.address == "auto" and str(cfg.ray.storage_path).startswith("/mnt/shared")
    mounts = {m["mountPath"] for m in yaml.safe_load((DEPLOY / "kuberay" / "rayjob-distill.yaml").read_text())
              ["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts == {"/mnt/shared", "/etc/skd"}
    assert [d["kind"] for d in docs] == ["ConfigMap", "PersistentVolumeClaim"]
    assert docs[1]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_cluster_launcher_yaml_validates_against_rays_schema():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    [doc] = load(DEPLOY / "cloud" / "aws.yaml")
    assert errors(schema, doc) == []
    types = doc["available_node_types"]
    assert types["teacher_gpu"]["resources"]["skd-teacher"] == 1 and types["student_gpu"]["resources"]["skd-student"] == 1
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in doc["head_start_ray_commands"][1:] + doc["worker_start_ray_commands"][1:])
    assert "--dashboard-host=127.0.0.1" in doc["head_start_ray_commands"][1]


def test_the_mlflow_server_manifest_uses_only_secrets_it_defines_and_stays_inside_the_cluster():
    docs = load(DEPLOY / "mlflow" / "mlflow-server.yaml")
    secrets = {(d["metadata"]["name"], k) for d in docs if d["kind"] == "Secret" for k in d["stringData"]}
    refs = set(re.findall(r"secretKeyRef: \{name: ([\w-]+), key: (\w+)\}",
                          (DEPLOY / "mlflow" / "mlflow-server.yaml").read_text()))
    assert refs and refs <= secrets
    services = [d for d in docs if d["kind"] == "Service"]
    assert services and all(d["spec"].get("type", "ClusterIP") == "ClusterIP" for d in services)
    [server] = [d for d in docs if d["kind"] == "Deployment"]
    args = server["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "--serve-artifacts" in args and "--backend-store-uri" in args and "postgresql://" in \
        next(d for d in docs if d["kind"] == "Secret")["stringData"]["backend_uri"]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles_pin_torch_and_copy_what_exists(name):
    text = (DEPLOY / name).read_text()
    assert "torch==2.13.0" in text
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"{name}: COPY {src} does not exist"
    packages = {p.split(".")[0] for p in project["tool"]["setuptools"]["packages"]}
    assert all(f"COPY {p} " in text for p in packages)  # every package the wheel needs is in the image


def test_a_repeated_key_is_refused():
    with pytest.raises(yaml.constructor.ConstructorError, match="repeated keys"):
        list(yaml.load_all("spec: {entrypoint: a, entrypoint: b}", Loader=UniqueKeyLoader))


def group_nodes(group: dict) -> list[dict[str, float]]:
    """The Ray resources of each node of a KubeRay worker group (CPU and GPU from the container limits,
    custom resources from the group), as KubeRay declares them."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    node = {"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0)),
            **{k: float(v) for k, v in group.get("resources", {}).items()}}
    return [dict(node) for _ in range(group["replicas"])]


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_the_rayjob_cluster_holds_the_plan_of_its_command(path):
    from actors.pool import PlacementPlan
    from orchestrator.config.load import load_config

    [doc] = load(path)
    nodes = [n for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"] for n in group_nodes(g)]
    cluster = {r: sum(n.get(r, 0.0) for n in nodes) for n in nodes for r in n}
    [config_map] = [d for d in load(DEPLOY / "kuberay" / "skd-config.yaml") if d["metadata"]["name"] == "skd-config"]
    cfg = load_config(None, [], base=yaml.safe_load(config_map["data"]["skd.yaml"]))
    trials = cfg.tune.max_concurrent if "skd tune" in doc["spec"]["entrypoint"] else 1
    t, r = cfg.teachers, cfg.ray
    plan = PlacementPlan(len(t.members), t.num_cpus, float(t.num_gpus), r.num_workers * trials, r.cpus_per_worker,
                         1.0, dict(t.resources), dict(r.resources_per_worker), t.placement)
    plan.check(cluster, nodes)  # raises SkdError naming the missing resource, as skd would on that cluster
    with pytest.raises(Exception, match="need"):  # and the check is not vacuous: one more trial does not fit
        PlacementPlan(len(t.members), t.num_cpus, float(t.num_gpus), r.num_workers * (trials + 1),
                      r.cpus_per_worker, 1.0, dict(t.resources), dict(r.resources_per_worker), t.placement
                      ).check(cluster, nodes)

"""The training manifests parse and carry the fields KubeRay (ray.io/v1) and the launcher need."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from jobs.train import build_parser

INFRA = Path(__file__).resolve().parents[2] / "infra"


def _check_pod_template(tmpl: dict, where: str) -> None:
    containers = tmpl["spec"]["containers"]
    assert containers and all(c.get("image") and c.get("name") for c in containers), where
    mounts = {m["name"] for c in containers for m in c.get("volumeMounts", [])}
    volumes = {v["name"] for v in tmpl["spec"].get("volumes", [])}
    assert mounts <= volumes, f"{where}: volumeMounts {mounts - volumes} have no volume"


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"]
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    _check_pod_template(head["template"], f"{where} head")
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports.get("dashboard") == 8265 and ports.get("gcs-server") == 6379  # Jobs API + GCS
    assert spec["workerGroupSpecs"], f"{where}: no worker group"
    for g in spec["workerGroupSpecs"]:
        assert g["groupName"] and isinstance(g["rayStartParams"], dict)
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        _check_pod_template(g["template"], f"{where} {g['groupName']}")
        gpus = g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        assert gpus == "1"


def test_raycluster():
    doc = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"], "RayCluster")


@pytest.mark.parametrize("stage", ["contrastive", "sft"])
def test_rayjob(stage):
    doc = yaml.safe_load((INFRA / "kuberay" / f"rayjob-{stage}.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob" and doc["metadata"]["name"]
    spec = doc["spec"]
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    _check_cluster_spec(spec["rayClusterSpec"], f"RayJob {stage}")
    # the entrypoint is a real `vlm train` command line for this stage
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "jobs.cli", "train"]
    args = build_parser().parse_intermixed_args(argv[4:])
    assert args.stage == stage and args.gpu and args.data and args.output.startswith("/runs/")
    workers = sum(g["replicas"] for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert args.num_workers <= workers  # one GPU worker per Ray Train worker


def test_cluster_launcher_and_image():
    doc = yaml.safe_load((INFRA / "cluster" / "train-cluster.yaml").read_text())
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type"):
        assert key in doc, key
    assert doc["head_node_type"] in doc["available_node_types"]
    assert all("node_config" in t and "max_workers" in t for n, t in doc["available_node_types"].items() if n != doc["head_node_type"])
    dockerfile = (INFRA / "image" / "Dockerfile").read_text()
    assert dockerfile.lstrip().startswith("#") and "FROM " in dockerfile and "pip install" in dockerfile

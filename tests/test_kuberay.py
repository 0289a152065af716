"""deploy/kuberay/rayjob.yaml: the batch on KubeRay, checked offline.

No registry package here carries KubeRay's CRD schema, so the RayJob's own fields are checked
against the names of KubeRay's v1 API that this file uses (a typo is an unknown name) and the
types its CRD gives them (rayStartParams are strings); each pod template inside it is validated
against Kubernetes' own PodTemplate schema, strictly, like the service's manifests. Then what
neither schema sees: the entrypoint is a command `fer` accepts, the pods' CPUs and memory fit the
workers they run, the image is the Dockerfile's `ray` target, and every node gets the storage
credentials.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

import pytest
import yaml

from cli.main import build_parser
from tests.server import ROOT
from tests.test_deploy import OLDEST_KUBERNETES

RAYJOB = ROOT / "deploy" / "kuberay" / "rayjob.yaml"
# KubeRay v1's names for the parts of a RayJob this file may use.
RAYJOB_SPEC = {
    "entrypoint", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit",
    "rayClusterSpec", "runtimeEnvYAML", "submitterPodTemplate", "entrypointNumCpus", "entrypointMemory",
    "jobId", "suspend", "submissionMode", "metadata", "clusterSelector",
}  # fmt: skip
CLUSTER_SPEC = {"rayVersion", "headGroupSpec", "workerGroupSpecs", "enableInTreeAutoscaling", "autoscalerOptions"}
HEAD_GROUP = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_GROUP = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template", "numOfHosts",
    "scaleStrategy", "idleTimeoutSeconds", "suspend",
}  # fmt: skip
# Measured (docs/scale.md): a worker's resident memory with the ONNX Runtime int8 engine loaded and
# classifying photos, and what the raylet and its dashboard agent hold beside the workers.
WORKER_RSS_MIB = 300
NODE_OVERHEAD_MIB = 512


def rayjob() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(RAYJOB.read_text())
    return loaded


def groups() -> list[tuple[str, dict[str, Any]]]:
    cluster = rayjob()["spec"]["rayClusterSpec"]
    return [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]


def mebibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return float(number) * (1024 if unit == "Gi" else 1)


def test_the_rayjob_uses_only_kuberay_v1_names_with_their_types() -> None:
    job = rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert set(job["spec"]) <= RAYJOB_SPEC
    cluster = job["spec"]["rayClusterSpec"]
    assert set(cluster) <= CLUSTER_SPEC
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for name, group in groups():
        params = group["rayStartParams"]
        assert all(isinstance(value, str) for value in params.values()), (name, params)  # map[string]string


@pytest.mark.parametrize("group", ["head", "cpu"])
def test_each_pod_template_is_a_valid_kubernetes_pod_template(group: str) -> None:
    import kubernetes_validate

    template = dict(groups())[group]["template"]
    wrapped = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": f"fer-predict-{group}"},
        "template": template,
    }
    for version in (OLDEST_KUBERNETES, kubernetes_validate.latest_version()):
        kubernetes_validate.validate(wrapped, version, strict=True)


def test_the_entrypoint_is_a_fer_predict_the_cli_accepts_from_and_to_object_storage() -> None:
    words = shlex.split(rayjob()["spec"]["entrypoint"])
    assert words[0] == "fer"
    args = build_parser().parse_args(words[1:])
    assert (args.command, args.engine, args.address, args.resume) == ("predict", "ray", "auto", True)
    assert all(path.startswith("s3://") for path in args.paths) and args.output.startswith("s3://")
    assert args.output.endswith((".parquet", ".csv"))


def test_worker_pods_fit_the_workers_they_run() -> None:
    cpus_per_worker = build_parser().parse_args(shlex.split(rayjob()["spec"]["entrypoint"])[1:]).cpus_per_worker
    for name, group in groups():
        (container,) = group["template"]["spec"]["containers"]
        resources, params = container["resources"], group["rayStartParams"]
        assert resources["requests"]["memory"] == resources["limits"]["memory"]  # no OOM kill past the request
        object_store = int(params["object-store-memory"]) / 2**20
        if name == "head":
            assert params["num-cpus"] == "0"  # the driver, the GCS and job submission; no worker competes
            continue
        cpus = int(params["num-cpus"])
        assert cpus % cpus_per_worker == 0 and str(cpus) == resources["requests"]["cpu"] == resources["limits"]["cpu"]
        workers = cpus // cpus_per_worker
        needed = workers * WORKER_RSS_MIB + object_store + NODE_OVERHEAD_MIB
        assert mebibytes(resources["limits"]["memory"]) >= needed, (name, needed)


def test_every_pod_runs_the_ray_image_with_the_storage_credentials_as_the_images_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM serving AS ray$", dockerfile, re.M)
    assert (
        '"ray[default]==${RAY_VERSION}"' in dockerfile
    )  # the dashboard: KubeRay submits the job and probes through it
    pinned = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M).group(1)  # type: ignore[union-attr]
    assert rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == pinned  # the nodes and the driver agree
    uid = re.search(r"useradd --system --uid (\d+)", dockerfile).group(1)  # type: ignore[union-attr]
    for name, group in groups():
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        assert container["image"].endswith(":ray"), name
        assert {"secretRef": {"name": "fer-object-storage"}} in container["envFrom"], name  # every node reads objects
        assert str(spec["securityContext"]["runAsUser"]) == uid
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]  # Ray's files
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]  # the object store, past the pod's default 64 MiB
        object_store = int(group["rayStartParams"]["object-store-memory"]) / 2**20
        assert shm["medium"] == "Memory" and mebibytes(shm["sizeLimit"]) >= object_store

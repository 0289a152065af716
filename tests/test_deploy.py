"""The deployment files: Kubernetes manifests against the Kubernetes schemas, offline, and compose.

`kubectl kustomize` renders the base and the example overlay (with its queue-depth component); each
object is validated with kubernetes-validate (which ships the schemas) in strict mode, for the
oldest Kubernetes these files claim and the newest the package knows. Then what the schemas cannot
see: settings the app accepts, probes on routes that exist, a grace period that covers the shutdown.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.settings import Settings
from tests.server import ROOT

K8S = ROOT / "deploy" / "k8s"
OLDEST_KUBERNETES = "1.32"  # preStop `sleep` and the PDB's unhealthyPodEvictionPolicy are on by default there


def render(kustomization: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip(
            "kubectl is not installed (.ci/run installs it where it can): the kustomize layouts are not rendered"
        )
    result = subprocess.run([kubectl, "kustomize", str(kustomization)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def of_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [item for item in objects if item["kind"] == kind]
    return found


@pytest.fixture(scope="module")
def overlay() -> list[dict[str, Any]]:
    return render(K8S / "overlays" / "example")


@pytest.mark.parametrize("layout", ["base", "overlays/example"])
def test_every_rendered_object_is_valid_for_the_kubernetes_versions_claimed(layout: str) -> None:
    import kubernetes_validate

    objects = render(K8S / layout)
    assert {item["kind"] for item in objects} >= {
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"
    }  # fmt: skip
    for version in (OLDEST_KUBERNETES, kubernetes_validate.latest_version()):
        for item in objects:
            kubernetes_validate.validate(item, version, strict=True)  # raises with the field's path


@pytest.mark.parametrize("name", ["deployment", "service", "hpa", "pdb"])
def test_each_base_file_is_valid_without_kubectl(name: str) -> None:
    # Whole objects, valid before kustomize adds labels, the namespace and the settings map's hash.
    import kubernetes_validate

    kubernetes_validate.validate(
        yaml.safe_load((K8S / "base" / f"{name}.yaml").read_text()), OLDEST_KUBERNETES, strict=True
    )


def test_a_typo_in_a_manifest_is_caught(tmp_path: Path) -> None:
    import kubernetes_validate

    deployment = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, OLDEST_KUBERNETES, strict=True)


def test_the_settings_every_pod_gets_are_accepted_by_the_app(overlay: list[dict[str, Any]]) -> None:
    settings = of_kind(overlay, "ConfigMap")["data"]
    assert all(name.startswith("FER_") for name in settings)
    fields = {name.removeprefix("FER_").lower(): value for name, value in settings.items()}
    assert set(fields) <= set(Settings.model_fields), set(fields) - set(Settings.model_fields)
    parsed = Settings(**fields)  # raises on a value the app would refuse at start-up
    assert parsed.precision == "int8" and parsed.queue_size == 512  # the overlay's merge took


def test_probes_grace_period_and_threads_agree_with_the_app(overlay: list[dict[str, Any]]) -> None:
    from app.routes import router

    pod = of_kind(overlay, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = Settings(**{k.removeprefix("FER_").lower(): v for k, v in of_kind(overlay, "ConfigMap")["data"].items()})
    routes = {getattr(route, "path", None) for route in router.routes}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in routes and container[probe]["httpGet"]["port"] == "http"
    assert container["ports"][0] == {"name": "http", "containerPort": settings.port, "protocol": "TCP"}
    # preStop, then the app's graceful window, then up to 5 s to answer the rest with 503 and exit
    shutdown = container["lifecycle"]["preStop"]["sleep"]["seconds"] + settings.graceful_shutdown_s + 5
    assert pod["terminationGracePeriodSeconds"] >= shutdown
    # the thread counts come from the CPU limit, which requests equal (no throttling below the HPA's unit)
    env = {item["name"]: item for item in container["env"]}
    for name in ("FER_THREADS", "FER_PREPARE_WORKERS"):
        assert env[name]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
    assert container["resources"]["requests"]["cpu"] == container["resources"]["limits"]["cpu"]


def test_autoscaling_and_disruption_budget_select_the_deployment(overlay: list[dict[str, Any]]) -> None:
    deployment = of_kind(overlay, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa, pdb = of_kind(overlay, "HorizontalPodAutoscaler"), of_kind(overlay, "PodDisruptionBudget")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert of_kind(overlay, "Service")["spec"]["selector"].items() <= labels.items()
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 20)  # the overlay's bounds
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]  # a drain never takes every replica
    metrics = {metric["type"]: metric for metric in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "fer_requests_in_progress"  # what the app exports
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics/prometheus"


def test_the_adapter_rule_serves_the_metric_the_hpa_reads() -> None:
    values = yaml.safe_load((K8S / "components" / "queue-depth" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == "fer_requests_in_progress" and "fer_requests_in_progress" in rule["seriesQuery"]


def test_docker_compose_config_accepts_the_compose_file() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose is not installed: the compose file is not validated")
    result = subprocess.run(
        [docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

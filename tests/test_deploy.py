"""The deployment files: Kubernetes manifests against the Kubernetes schemas, offline, and compose.

Each base file is a whole object, validated with kubernetes-validate (which ships the schemas) in
strict mode for the oldest Kubernetes these files claim and the newest the package knows; where
`kubectl` is installed, the base and both example overlays are rendered with `kubectl kustomize`
and every rendered object is validated too. Then what the schemas cannot see, on the base files:
settings the app accepts, probes on routes that exist, a grace period that covers the shutdown,
selectors that agree, the metric the app exports and the adapter serves.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.main import SHUTDOWN_REPLY_S
from app.routes import router
from app.settings import Settings, setting_fields
from tests.server import ROOT

K8S = ROOT / "deploy" / "k8s"
OLDEST_KUBERNETES = "1.32"  # preStop `sleep` and the PDB's unhealthyPodEvictionPolicy are on by default there
BASE_OBJECTS = ("deployment", "service", "hpa", "pdb")


def base(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((K8S / "base" / f"{name}.yaml").read_text())
    return loaded


def env_file(path: Path) -> dict[str, str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def settings_of(env: dict[str, str]) -> Settings:
    """What the app makes of FER_* variables: raises, as start-up would, on a name or value it refuses."""
    fields = {name.removeprefix("FER_").lower(): value for name, value in env.items()}
    assert all(name.startswith("FER_") for name in env) and set(fields) <= set(setting_fields()), env
    return Settings(**fields)


def render(layout: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip(
            "kubectl is not installed: the kustomize layouts are not rendered (each base file still is checked)"
        )
    result = subprocess.run([kubectl, "kustomize", str(K8S / layout)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def of_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [item for item in objects if item["kind"] == kind]
    return found


@pytest.mark.parametrize("name", BASE_OBJECTS)
def test_each_base_file_is_valid_for_the_kubernetes_versions_claimed(name: str) -> None:
    import kubernetes_validate

    for version in (OLDEST_KUBERNETES, kubernetes_validate.latest_version()):
        kubernetes_validate.validate(base(name), version, strict=True)  # raises with the field's path


def test_a_typo_in_a_manifest_is_caught() -> None:
    import kubernetes_validate

    deployment = base("deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, OLDEST_KUBERNETES, strict=True)


@pytest.mark.parametrize("layout", ["base", "overlays/example", "overlays/example-queue-depth"])
def test_every_rendered_object_is_valid_and_the_settings_are_accepted(layout: str) -> None:
    import kubernetes_validate

    objects = render(layout)
    kinds = {item["kind"] for item in objects}
    assert kinds >= {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"}
    for version in (OLDEST_KUBERNETES, kubernetes_validate.latest_version()):
        for item in objects:
            kubernetes_validate.validate(item, version, strict=True)
    settings = settings_of(of_kind(objects, "ConfigMap")["data"])
    hpa = of_kind(objects, "HorizontalPodAutoscaler")["spec"]
    metrics = [metric["type"] for metric in hpa["metrics"]]
    if layout == "base":
        assert metrics == ["Resource"]
    else:  # the overlay's merges and bounds took; only the queue-depth overlay adds the Pods metric
        assert (settings.engine.precision, settings.engine.queue_size) == ("int8", 512)
        assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 20)
        assert metrics == (["Resource", "Pods"] if layout.endswith("queue-depth") else ["Resource"])
    deployment = of_kind(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("PodDisruptionBudget", "Deployment"):
        assert of_kind(objects, kind)["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert of_kind(objects, "Service")["spec"]["selector"].items() <= labels.items()
    for spread in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]:
        assert spread["labelSelector"]["matchLabels"].items() <= labels.items()  # else spreading is off


def test_the_settings_every_pod_gets_are_accepted_by_the_app() -> None:
    settings_of(env_file(K8S / "base" / "settings.env"))
    overlay = yaml.safe_load((K8S / "overlays" / "example" / "kustomization.yaml").read_text())
    (merged,) = overlay["configMapGenerator"]
    settings_of(dict(literal.split("=", 1) for literal in merged["literals"]))


def test_probes_grace_period_and_threads_agree_with_the_app() -> None:
    pod = base("deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = settings_of(env_file(K8S / "base" / "settings.env"))
    routes = {getattr(route, "path", None) for route in router.routes}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in routes and container[probe]["httpGet"]["port"] == "http"
    assert container["ports"][0] == {"name": "http", "containerPort": settings.port, "protocol": "TCP"}
    # preStop, then the app's drain and graceful window, then the 503s to what still runs; the rest is margin
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    shutdown = pre_stop + settings.drain_s + settings.graceful_shutdown_s + SHUTDOWN_REPLY_S
    assert pod["terminationGracePeriodSeconds"] >= shutdown + 5
    # thread counts from the CPU limit, which requests equal: no throttling below the HPA's unit
    env = {item["name"]: item for item in container["env"]}
    for name in ("FER_THREADS", "FER_PREPARE_WORKERS"):
        assert env[name]["valueFrom"]["resourceFieldRef"] == {
            "containerName": "api",
            "resource": "limits.cpu",
            "divisor": "1",
        }
    assert container["resources"]["requests"]["cpu"] == container["resources"]["limits"]["cpu"]


def test_a_stopping_pod_leaves_the_endpoints_then_drains_then_stops() -> None:
    pod = base("deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = settings_of(env_file(K8S / "base" / "settings.env"))
    assert settings.drain_s > 0  # /ready answers 503 after SIGTERM while requests are still served
    # preStop: the endpoints controller, kube-proxy and ingress controllers need a few seconds.
    assert container["lifecycle"]["preStop"]["sleep"]["seconds"] >= 3
    # The readiness probe on /ready sees the drain's 503 and marks the pod unready within the drain.
    readiness = container["readinessProbe"]
    assert readiness["httpGet"]["path"] == "/ready"
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= settings.drain_s
    assert readiness["timeoutSeconds"] < readiness["periodSeconds"]
    # SIGKILL only after the whole of it: preStop, drain, graceful window, the last 503s.
    assert pod["terminationGracePeriodSeconds"] > (
        container["lifecycle"]["preStop"]["sleep"]["seconds"]
        + settings.drain_s
        + settings.graceful_shutdown_s
        + SHUTDOWN_REPLY_S
    )


def test_autoscaling_and_disruption_budget_select_the_deployment() -> None:
    deployment, hpa, pdb = base("deployment"), base("hpa"), base("pdb")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "fer-service"}
    assert deployment["metadata"]["name"] == "fer-service"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert base("service")["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]  # a drain never takes every replica
    # A saturated replica uses 1.47 of its 2 CPUs on crops (benchmarks/RESULTS.md); the HPA ignores
    # ratios within 10% of the target, so the target must sit well under 73.5% for it to scale at all.
    (cpu,) = hpa["spec"]["metrics"]
    assert cpu["resource"]["target"]["averageUtilization"] * 1.1 < 73.5


def test_the_queue_metric_is_the_one_the_app_exports_and_the_adapter_serves() -> None:
    component = K8S / "components" / "queue-depth"
    (patch,) = yaml.safe_load((component / "hpa-queue-depth.yaml").read_text())
    name = patch["value"]["pods"]["metric"]["name"]
    from app.telemetry import make_telemetry

    exported = {metric.name for metric in make_telemetry(lambda: 0, lambda: 0, lambda: 0, lambda: 0).registry.collect()}
    assert name in exported
    values = yaml.safe_load((component / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == name and name in rule["seriesQuery"]
    annotations = yaml.safe_load((component / "scrape-annotations.yaml").read_text())["spec"]["template"]["metadata"]
    (container,) = base("deployment")["spec"]["template"]["spec"]["containers"]
    assert annotations["annotations"]["prometheus.io/port"] == str(container["ports"][0]["containerPort"])
    assert annotations["annotations"]["prometheus.io/path"] == "/metrics/prometheus"


def test_docker_compose_config_accepts_the_compose_file() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose is not installed: the compose file is not validated")
    result = subprocess.run(
        [docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

"""The compose `scale` profile's balancer (deploy/haproxy) and the shutdown numbers it relies on.

HAProxy's own check (`haproxy -c`) runs where Debian's haproxy is installed (.ci/run installs it
when it can). The parse check always runs: it reads the configuration and asserts what following
replicas that come and go relies on (docs/RELIABILITY.md, "Replicas that come and go"), against
the app's own settings and routes, and the compose file's grace periods against the app's
shutdown: drain, graceful window, the 503s to what still runs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.main import SHUTDOWN_REPLY_S
from app.routes import router
from app.settings import Settings
from tests.server import ROOT

HAPROXY = ROOT / "deploy" / "haproxy"
CONFIG = HAPROXY / "haproxy.cfg"
SECTION_KEYWORDS = ("global", "defaults", "frontend", "backend", "resolvers", "listen")


def sections(text: str) -> dict[str, list[str]]:
    """Each section ("backend replicas") and its lines, comments and blank lines left out."""
    found: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        if line.split()[0] in SECTION_KEYWORDS:
            current = found.setdefault(line, [])
        else:
            current.append(line)
    return found


def seconds(value: str) -> float:
    """An HAProxy time ("500ms", "2s", a bare number of milliseconds) in seconds."""
    number, unit = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", value).groups()  # type: ignore[union-attr]
    scale = {"us": 1e-6, "ms": 1e-3, None: 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}[unit]
    return int(number) * scale


def setting(lines: list[str], *keywords: str) -> list[str]:
    """The words after `keywords` on the one line that starts with them."""
    (found,) = [line.split() for line in lines if line.split()[: len(keywords)] == list(keywords)]
    return found[len(keywords) :]


def params(words: list[str]) -> dict[str, str]:
    """A server line's parameters: `inter 1s` → {"inter": "1s"}, a flag such as `check` → {"check": ""}."""
    flags = {"check"}
    found: dict[str, str] = {}
    index = 0
    while index < len(words):
        if words[index] in flags:
            found[words[index]] = ""
            index += 1
        else:
            found[words[index]] = words[index + 1]
            index += 2
    return found


def balancer_problems(text: str, settings: Settings) -> list[str]:
    """What is wrong with a configuration for replicas that come and go; empty when nothing is."""
    config = sections(text)
    problems = []
    resolvers = config["resolvers docker"]
    if setting(resolvers, "nameserver")[1] != "127.0.0.11:53":
        problems.append("the names are not resolved by Docker's DNS (127.0.0.11)")
    if seconds(setting(resolvers, "timeout", "resolve")[0]) > 1:
        problems.append("a scaled-up or recreated replica is found more than 1 s late")
    defaults, backend = config["defaults"], config["backend replicas"]
    if seconds(setting(defaults, "timeout", "connect")[0]) > 1:
        problems.append("a connect to a gone replica waits more than 1 s")
    if seconds(setting(defaults, "timeout", "http-keep-alive")[0]) >= settings.keep_alive_s:
        problems.append("idle connections are closed by the app first (FER_KEEP_ALIVE_S), racing a new request")
    template = setting(backend, "server-template")
    if template[2] != f"api-replica:{settings.port}":
        problems.append(f"the servers are not every address of api-replica:{settings.port}")
    server = params(setting(backend, "default-server") + template[3:])
    if server.get("resolvers") != "docker" or server.get("init-addr") != "none":
        problems.append("the servers' addresses are not followed through DNS")
    routes = {getattr(route, "path", None) for route in router.routes}
    check = setting(backend, "http-check", "send")
    if "check" not in server or "option httpchk" not in backend or check[check.index("uri") + 1] != "/ready":
        problems.append("replicas are not checked on /ready")
    elif "/ready" not in routes:
        problems.append("/ready is not a route")
    # The balancer must see a stopping replica's 503 within the replica's drain (app/draining.py).
    noticed = seconds(server["inter"]) * int(server["fall"]) + seconds(setting(defaults, "timeout", "check")[0])
    if noticed > settings.drain_s:
        problems.append(f"a draining replica is noticed after {noticed:g} s, past FER_DRAIN_S ({settings.drain_s:g} s)")
    if server.get("observe") not in (None, "layer4"):
        problems.append("answers to clients (a shed 503) can take a replica out of rotation")
    retry_on = set(setting(backend, "retry-on"))
    if not {"conn-failure", "empty-response"} <= retry_on:
        problems.append("a failed connect or a closed connection is not retried")
    if retry_on & {"503", "all-retryable-errors"}:
        problems.append("a shed 503 is retried on replicas as full as the one that shed it")
    if setting(backend, "option", "redispatch") != ["1"] or int(setting(backend, "retries")[0]) < 1:
        problems.append("a retry does not go to another replica")
    frontend = config["frontend api"]
    limits = {int(line.split()[-2]) for line in frontend if "content-length" in line}
    if limits != {settings.max_upload_bytes, settings.max_video_bytes}:
        problems.append("the upload limits differ from FER_MAX_UPLOAD_BYTES and FER_MAX_VIDEO_BYTES")
    return problems


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_the_shipped_configuration_follows_replicas_that_come_and_go() -> None:
    assert balancer_problems(CONFIG.read_text(), Settings()) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ("retry-on conn-failure empty-response", "retry-on conn-failure empty-response 503"),
        ("observe layer4", "observe layer7"),
        ("inter 1s fall 2", "inter 3s fall 3"),
        ("timeout resolve 1s", "timeout resolve 30s"),
        ("uri /ready", "uri /health"),
    ],
)
def test_the_parse_check_catches_what_would_break(change: str, problem: str) -> None:
    text = CONFIG.read_text()
    assert change in text
    assert balancer_problems(text.replace(change, problem), Settings()) != []


def test_haproxy_accepts_the_configuration() -> None:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("Debian's haproxy is not installed: its own check is not run (the parse check still is)")
    result = subprocess.run([haproxy, "-c", "-f", str(CONFIG)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_haproxy_refuses_a_broken_configuration(tmp_path: Path) -> None:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("Debian's haproxy is not installed: its own check is not run (the parse check still is)")
    broken = tmp_path / "haproxy.cfg"
    broken.write_text(CONFIG.read_text().replace("retry-on conn-failure", "retry-on conn-failur"))
    result = subprocess.run([haproxy, "-c", "-f", str(broken)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0


def test_the_balancer_is_unprivileged_read_only_and_stops_softly() -> None:
    dockerfile = (HAPROXY / "Dockerfile").read_text()
    assert re.search(r"^USER haproxy$", dockerfile, re.MULTILINE)  # the Debian package's system user
    assert re.search(r"^STOPSIGNAL SIGUSR1$", dockerfile, re.MULTILINE)  # soft stop: requests in flight finish
    lb = compose()["services"]["lb"]
    assert lb["build"] == "deploy/haproxy" and lb["read_only"] is True
    assert "user" not in lb  # the image's own unprivileged user
    assert "no-new-privileges:true" in lb["security_opt"]
    (published,) = lb["ports"]
    assert published.endswith(":8080") and "bind :8080" in sections(CONFIG.read_text())["frontend api"]


@pytest.mark.parametrize("service", ["api", "api-replica"])
def test_compose_waits_for_the_whole_shutdown_before_its_sigkill(service: str) -> None:
    settings = Settings()
    shutdown = settings.drain_s + settings.graceful_shutdown_s + SHUTDOWN_REPLY_S
    grace = seconds(compose()["services"][service]["stop_grace_period"])
    assert grace >= shutdown + 2, f"{service}: {grace:g} s for a {shutdown:g}-s shutdown"

"""Who may call: API keys, per-client rate limits, CORS, the web page's key field; against a real server."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.clients import ApiKeys, RateLimiter, add_key, key_digest, parse_keys
from tests.conftest import SHIPPED_CHECKPOINT
from tests.images import face_png
from tests.server import AppServer, app_serving, get, post
from tests.test_web import CHROMIUM, CHROMIUM_FLAGS


@pytest.fixture()
def keys_file(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "api-keys"
    return path, {name: add_key(path, name) for name in ("frontend", "batch-job")}


@pytest.fixture()
def guarded(keys_file: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> Iterator[AppServer]:
    monkeypatch.setattr("app.clients.RELOAD_CHECK_S", 0.0)  # look at the file on every request
    with app_serving(
        checkpoint=SHIPPED_CHECKPOINT, api_keys_file=keys_file[0], rate_limit=5, rate_burst=3,
        cors_origins="https://app.example.com",
    ) as server:  # fmt: skip
        yield server


def predict(server: AppServer, key: str | None, **headers: str) -> Any:
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return post(f"{server.url}/predict", files={"file": ("f.png", face_png(1))}, headers=headers)


def limiter_of(server: AppServer) -> RateLimiter:
    limiter: RateLimiter = server.server.config.app.state.rate_limiter
    return limiter


def test_the_file_holds_hashes_and_refuses_keys_or_junk_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    key = add_key(path, "alice")
    assert key not in path.read_text() and f"alice:{key_digest(key)}" in path.read_text()
    with pytest.raises(ValueError, match="already"):
        add_key(path, "alice")
    with pytest.raises(ValueError, match=r"keys:1: not 'name:sha256-hex'"):
        parse_keys(f"bob:{key}\n", path)  # a key pasted where its hash belongs


def test_no_key_a_wrong_key_and_a_removed_client_get_the_same_401(
    guarded: AppServer, keys_file: tuple[Path, dict[str, str]]
) -> None:
    path, keys = keys_file
    refusals = [predict(guarded, None), predict(guarded, "not-a-key"), predict(guarded, keys["frontend"] + "x")]
    assert predict(guarded, keys["frontend"]).status_code == 200
    # The client removed from the file: refused from the next request, no restart.
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines() if not line.startswith("frontend:")))
    refusals.append(predict(guarded, keys["frontend"]))
    assert predict(guarded, keys["batch-job"]).status_code == 200
    for refusal in refusals:
        assert refusal.status_code == 401
        assert refusal.headers["www-authenticate"] == "Bearer"
        assert refusal.json() == refusals[0].json()
        assert "Authorization: Bearer" in refusal.json()["detail"]


def test_a_key_added_to_the_file_is_accepted_without_a_restart(
    guarded: AppServer, keys_file: tuple[Path, dict[str, str]]
) -> None:
    new = add_key(keys_file[0], "newcomer")
    assert predict(guarded, new).status_code == 200


def test_the_probes_and_the_page_are_open_and_the_rest_needs_a_key(guarded: AppServer) -> None:
    for path in ("/health", "/ready", "/"):
        assert get(f"{guarded.url}{path}").status_code == 200, path
    for path in ("/metrics", "/metrics/prometheus", "/docs", "/openapi.json"):
        response = get(f"{guarded.url}{path}")
        assert response.status_code == 401 and "API key" in response.json()["detail"], path


def test_over_the_rate_a_client_gets_429_and_is_admitted_again_once_a_token_is_back(
    guarded: AppServer, keys_file: tuple[Path, dict[str, str]]
) -> None:
    keys, limiter = keys_file[1], limiter_of(guarded)
    now = [1000.0]
    limiter.clock = lambda: now[0]  # the limiter's clock turned by hand: no waiting, no timing
    answers = [predict(guarded, keys["frontend"]).status_code for _ in range(4)]
    assert answers == [200, 200, 200, 429]  # a burst of 3
    refused = predict(guarded, keys["frontend"])
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert "frontend: over the rate limit of 5 requests/s" in refused.json()["detail"]
    assert predict(guarded, keys["batch-job"]).status_code == 200  # another client has its own bucket
    now[0] += 0.2  # a fifth of a second at 5/s: one token back
    assert predict(guarded, keys["frontend"]).status_code == 200
    assert predict(guarded, keys["frontend"]).status_code == 429


def test_a_batch_costs_a_token_a_file(guarded: AppServer, keys_file: tuple[Path, dict[str, str]]) -> None:
    keys, limiter = keys_file[1], limiter_of(guarded)
    limiter.clock = lambda: 5000.0
    files = [("files", (f"{index}.png", face_png(index))) for index in range(3)]
    headers = {"Authorization": f"Bearer {keys['batch-job']}"}
    assert post(f"{guarded.url}/predict/batch", files=files, headers=headers).status_code == 200
    assert predict(guarded, keys["batch-job"]).status_code == 429  # three files spent the burst of three


def test_the_client_is_named_in_the_log_and_the_metrics_and_its_key_never(
    guarded: AppServer, keys_file: tuple[Path, dict[str, str]]
) -> None:
    keys = keys_file[1]
    limiter_of(guarded).clock = lambda: 9000.0
    predict(guarded, keys["frontend"], **{"X-Request-ID": "named-client"})
    predict(guarded, "wrong-key", **{"X-Request-ID": "wrong-client"})
    assert re.search(
        r"POST /predict 200 .* client=frontend id=named-client", guarded.wait_for_log("id=named-client").string
    )
    guarded.wait_for_log(r"POST /predict 401 .* client=- id=wrong-client")
    metrics = get(f"{guarded.url}/metrics/prometheus", headers={"Authorization": f"Bearer {keys['frontend']}"}).text
    assert 'fer_client_requests_total{client="frontend",status="200"}' in metrics
    for secret in (*keys.values(), "wrong-key"):
        assert secret not in guarded.log() and secret not in metrics


def test_cors_answers_preflight_for_an_allowed_origin_only(guarded: AppServer) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    import httpx

    allowed = httpx.options(f"{guarded.url}/predict", headers={"Origin": "https://app.example.com", **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in allowed.headers
    refused = httpx.options(f"{guarded.url}/predict", headers={"Origin": "https://evil.example", **preflight})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    # A refused key still carries the allowed origin's CORS header, so the browser app can read the 401.
    answer = predict(guarded, None, Origin="https://app.example.com")
    assert answer.status_code == 401 and answer.headers["access-control-allow-origin"] == "https://app.example.com"


def test_without_a_keys_file_the_service_is_open_and_says_so_on_a_public_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from app.main import create_app
    from app.settings import Settings

    class Ready:  # an engine stand-in: create_app only keeps it until the lifespan runs
        pass

    with caplog.at_level("WARNING", logger="app.main"):
        create_app(Settings(host="0.0.0.0", port=8123), Ready())  # type: ignore[arg-type]
        create_app(Settings(host="127.0.0.1", port=8124), Ready())  # type: ignore[arg-type]
    lines = [record.getMessage() for record in caplog.records if "open: no FER_API_KEYS_FILE" in record.getMessage()]
    assert lines == [
        "open: no FER_API_KEYS_FILE, so anyone who can reach 0.0.0.0:8123 may call every route (README: Security)"
    ]


def test_a_missing_keys_file_stops_start_up_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.server import ROOT

    env = {"FER_API_KEYS_FILE": str(tmp_path / "absent"), "FER_PORT": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "app"], cwd=ROOT, env={**__import__("os").environ, **env}, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("fer-service: FER_API_KEYS_FILE: ")


def test_the_web_page_sends_the_key_typed_into_its_field(
    guarded: AppServer, keys_file: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")
    limiter_of(guarded).clock = lambda: 20_000.0
    image, again = tmp_path / "face.png", tmp_path / "again.png"  # a new file: the input fires its change again
    image.write_bytes(face_png(3))
    again.write_bytes(face_png(4))
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.goto(f"{guarded.url}/")
        page.set_input_files("#file", str(image))  # no key yet: the page says what it needs
        page.wait_for_selector("#error", state="visible", timeout=30_000)
        assert "needs an API key" in (page.text_content("#error") or "")
        page.fill("#apikey", keys_file[1]["frontend"])
        page.dispatch_event("#apikey", "change")
        with page.expect_request(lambda request: "/predict" in request.url) as sent:
            page.set_input_files("#file", str(again))
        assert sent.value.headers.get("authorization") == f"Bearer {keys_file[1]['frontend']}"
        page.locator("[data-testid=bar]").nth(6).wait_for(timeout=30_000)
        assert not page.is_visible("#error")
        browser.close()


def test_refusing_a_wrong_key_takes_the_same_steps_as_accepting_a_right_one(tmp_path: Path) -> None:
    """No timing here (that is in the benchmark): the check hashes and compares against every line either way."""
    path = tmp_path / "keys"
    right = add_key(path, "alice")
    add_key(path, "bob")
    keys = ApiKeys(path)
    calls: list[int] = []
    import hmac

    real = hmac.compare_digest

    def counting(a: str, b: str) -> bool:
        calls.append(1)
        return real(a, b)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("app.clients.hmac.compare_digest", counting)
        assert keys.client_of(f"Bearer {right}") == "alice"
        accepted = len(calls)
        calls.clear()
        assert keys.client_of("Bearer wrong") is None
        assert len(calls) == accepted == 2

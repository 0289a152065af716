"""The drain before a shutdown, on a real `python -m app` process (app/draining.py).

The order a balancer relies on: after SIGTERM the replica answers `GET /ready` with 503 while its
listener still accepts and serves requests; only after the drain does it close the listener, let
what is in flight finish and exit. Each step waits for an event (an answer, a refused connect, the
process's exit), never for a number of seconds: the drain is set long enough that the test ends
it itself with a second SIGTERM, which is also how an operator cuts it short.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from tests.conftest import SHIPPED_CHECKPOINT
from tests.images import face_png
from tests.server import Server, get, post, refuses_connections, wait_for

# Long enough never to end by itself while the test runs: the test ends it with a second SIGTERM.
HELD_DRAIN_S = "300"


def in_progress(server: Server) -> float:
    text = get(f"{server.url}/metrics/prometheus", timeout=10).text
    line = next(line for line in text.splitlines() if line.startswith("fer_requests_in_progress "))
    return float(line.split()[1]) - 1  # less this scrape itself


def ready_status(server: Server) -> int:
    return get(f"{server.url}/ready", timeout=10).status_code


@pytest.mark.slow
def test_a_stopping_replica_fails_ready_while_it_still_serves_then_closes_its_listener(tmp_path: Path) -> None:
    # fp32: what is under test is the shutdown, and a named precision skips auto's start-up timing.
    server = Server(
        tmp_path / "s.log", checkpoint=str(SHIPPED_CHECKPOINT), precision="fp32", drain_s=HELD_DRAIN_S, body_timeout_s="120"
    )  # fmt: skip
    body = face_png()
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
    held = None
    try:
        server.wait_ready()
        # A request the replica holds across the whole shutdown: in the app, its body half sent.
        held = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        held.sendall(head.encode() + body[:10])
        wait_for(lambda: in_progress(server) == 1, "the held request is in progress")
        assert ready_status(server) == 200
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: ready_status(server) == 503, "/ready answers 503 after SIGTERM")
        # Each call below is a new connection, so the listener is still open while /ready says 503.
        stopping = get(f"{server.url}/ready", timeout=10)
        assert (stopping.status_code, stopping.json()["status"]) == (503, "stopping")
        assert "retry-after" in stopping.headers
        assert get(f"{server.url}/health", timeout=10).status_code == 200  # alive: nothing restarts it
        answer = post(f"{server.url}/predict", files={"file": ("face.png", body, "image/png")}, timeout=60)
        assert answer.status_code == 200, answer.text  # new work is still served while draining
        assert server.process.poll() is None and not refuses_connections(server.port)
        server.process.send_signal(signal.SIGTERM)  # the second one ends the drain now
        wait_for(lambda: refuses_connections(server.port), "the listener closes once the drain ends")
        held.sendall(body[10:])
        held_answer = held.makefile("rb").read().decode(errors="replace")
    finally:
        if held is not None:
            held.close()
        code = server.stop()
    assert held_answer.split(" ", 2)[1] == "200", held_answer  # what it held, it finished
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the SIGTERM it shut down for
    log = server.log()
    assert log.index("draining for 300 s") < log.index("Shutting down") < log.index("Finished server process")


@pytest.mark.slow
def test_a_drain_ends_by_itself_and_the_process_exits(tmp_path: Path) -> None:
    server = Server(tmp_path / "s.log", checkpoint=str(SHIPPED_CHECKPOINT), precision="fp32", drain_s="0.5")
    try:
        server.wait_ready()
        server.process.send_signal(signal.SIGTERM)  # one signal only: the drain's own end starts the shutdown
        wait_for(lambda: server.process.poll() is not None, "the process exits after its drain")
    finally:
        code = server.stop()
    assert code in (0, -signal.SIGTERM)
    log = server.log()
    assert log.index("draining for 0.5 s") < log.index("drained: closing the listener") < log.index("Shutting down")


@pytest.mark.slow
def test_sigint_skips_the_drain(tmp_path: Path) -> None:
    server = Server(tmp_path / "s.log", checkpoint=str(SHIPPED_CHECKPOINT), precision="fp32", drain_s=HELD_DRAIN_S)
    try:
        server.wait_ready()
        server.process.send_signal(signal.SIGINT)  # Ctrl+C at a terminal: no balancer to wait for
        wait_for(lambda: server.process.poll() is not None, "the process exits on SIGINT")
    finally:
        code = server.stop()
    assert code == 0, server.log()  # Ctrl+C ends quietly (app/__main__.py)
    assert "draining" not in server.log()

"""The service for the HTTP tests.

`AppServer` runs `create_app(Settings(...))` under uvicorn in a thread of the test process, on a
socket bound to a free port (as httpx's own test suite does): the lifespan loads the checkpoint
and warms up for real, and the server's log records are captured in memory. `Server` runs
`python -m app` in a subprocess, for the few tests where the process itself is under test
(SIGTERM, the memory of a whole process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

from app.http_protocol import server_options
from app.main import create_app
from app.settings import Settings
from models.engine import Engine

ROOT = Path(__file__).resolve().parent.parent
READY_DEADLINE_S = 60.0  # a generous bound on loading and warming up, not a measurement
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


# httpx's top-level calls build a TLS context from certifi's bundle each time (about 27 ms on
# this machine); the test servers speak plain HTTP, so one context made here serves every call.
_TLS = ssl.create_default_context()


def get(url: str, **kwargs: Any) -> httpx.Response:
    """`httpx.get` on a fresh connection, without building a TLS context."""
    return httpx.get(url, verify=_TLS, **kwargs)


def post(url: str, **kwargs: Any) -> httpx.Response:
    """`httpx.post` on a fresh connection, without building a TLS context."""
    return httpx.post(url, verify=_TLS, **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_ready(url: str, is_alive: Any, log: Any, deadline_s: float = READY_DEADLINE_S) -> None:
    """Poll GET /ready until it answers 200; raise with the server's log if it dies or the deadline passes."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if not is_alive():
            raise RuntimeError(f"the server stopped before it was ready:\n{log()}")
        try:
            if get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"server not ready after {deadline_s}s:\n{log()}")


_app_logger_users = 0
_app_logger_level = logging.NOTSET
_lock = threading.Lock()


class _Capture(logging.Handler):
    """Keeps the formatted records written on one in-process server's event-loop thread.

    That thread writes the start-up line, every access line, and the traceback of every request
    that failed (the 500 handler and uvicorn log there, whichever worker thread raised). Records of
    worker threads are left out: the test process runs other engines' threads too, and a record
    does not say which engine wrote it.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.lines: list[str] = []
        self.own_thread: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.own_thread:
            self.lines.append(self.format(record))


class AppServer:
    """`create_app(Settings(**overrides))` served by uvicorn in a daemon thread; `url`, `port`, `log()`, `stop()`."""

    def __init__(self, engine: Engine | None = None, **overrides: Any) -> None:
        """`engine`: one already loaded, to serve instead of loading the settings' checkpoint."""
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self.port = int(self._socket.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = Settings(**{"host": "127.0.0.1", "port": self.port, **overrides})
        config = uvicorn.Config(
            create_app(self.settings, engine),
            log_config=None,  # uvicorn's dictConfig would replace the handlers this capture relies on
            **server_options(self.settings),  # the same protocol, limits and timeouts as `python -m app`
        )
        self.server = uvicorn.Server(config)
        self._capture = _Capture()
        # Engine.load sets torch's thread count for the whole process: put it back when this server stops.
        self._torch_threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._run, name=f"app-server-{self.port}", daemon=True)

    def _run(self) -> None:
        self._capture.own_thread = threading.get_ident()
        # uvicorn raises SystemExit when the lifespan fails; `start` reports that with the log.
        with contextlib.suppress(SystemExit):
            self.server.run(sockets=[self._socket])

    def start(self) -> AppServer:
        """Start serving and wait until /ready answers 200 (the lifespan has loaded and warmed up)."""
        global _app_logger_users, _app_logger_level
        with _lock:
            if _app_logger_users == 0:  # the access and start-up lines are INFO
                _app_logger_level = logging.getLogger("app").level
                logging.getLogger("app").setLevel(logging.INFO)
            _app_logger_users += 1
        logging.getLogger().addHandler(self._capture)
        self._thread.start()
        try:
            wait_until_ready(self.url, self._thread.is_alive, self.log)
        except BaseException:
            self.stop()
            raise
        return self

    def log(self) -> str:
        """Everything this server has logged so far, one formatted record per line (tracebacks included).

        A request's access line is written just after its response is sent, so a test that reads it
        right after a response uses `wait_for_log`, or reads the log once the server has stopped.
        """
        return "\n".join(list(self._capture.lines))

    def wait_for_log(self, pattern: str, deadline_s: float = 30.0) -> re.Match[str]:
        """The first match of the regular expression `pattern` in the log, once it is there."""
        end = time.monotonic() + deadline_s
        while not (found := re.search(pattern, self.log())):
            if time.monotonic() > end:
                raise AssertionError(f"{pattern!r} is not in the server's log:\n{self.log()}")
            time.sleep(0.01)
        return found

    def stop(self) -> None:
        """Ask uvicorn to exit (it drains the connections and runs the lifespan's shutdown), then join."""
        global _app_logger_users
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(READY_DEADLINE_S)
        self._socket.close()
        logging.getLogger().removeHandler(self._capture)
        with _lock:
            _app_logger_users -= 1
            if _app_logger_users == 0:
                logging.getLogger("app").setLevel(_app_logger_level)
        torch.set_num_threads(self._torch_threads)
        if self._thread.is_alive():
            raise RuntimeError(f"the server on port {self.port} did not stop:\n{self.log()}")


@contextlib.contextmanager
def app_serving(engine: Engine | None = None, **overrides: Any) -> Iterator[AppServer]:
    """A started, ready in-process server for the duration of a `with` block (or a yield fixture)."""
    running = AppServer(engine, **overrides).start()
    try:
        yield running
    finally:
        running.stop()


class Server:
    """`python -m app` in a subprocess with FER_* settings; `url`, `stop()`, and the log it wrote."""

    def __init__(self, log_path: Path, **settings: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "FER_HOST": "127.0.0.1", "FER_PORT": str(self.port), "FER_LOG_LEVEL": "info"}
        env.update({f"FER_{key.upper()}": value for key, value in settings.items()})
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait_ready(self) -> None:
        wait_until_ready(self.url, lambda: self.process.poll() is None, self.log)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it has not exited within a generous deadline; returns the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
        return int(self.process.returncode)


@dataclasses.dataclass(frozen=True)
class ForwardGate:
    """`entered` is set when a forward pass starts waiting; passes go on once `release` is set."""

    entered: threading.Event
    release: threading.Event


@contextlib.contextmanager
def forward_passes_held(engine: Engine) -> Iterator[ForwardGate]:
    """Every forward pass of `engine` waits for the gate's release (set on leaving): the queue fills, deterministically.

    A test that needs faces to pile up in the queue (to fill it, or to see them batched together)
    gates on this instead of hoping the batcher's thread is slower than the requests.
    """
    gate = ForwardGate(threading.Event(), threading.Event())
    predict = engine.predictor.predict_tensors

    def held(*args: Any, **kwargs: Any) -> Any:
        gate.entered.set()
        gate.release.wait(READY_DEADLINE_S)
        return predict(*args, **kwargs)

    engine.predictor.predict_tensors = held  # type: ignore[method-assign]
    try:
        yield gate
    finally:
        gate.release.set()
        engine.predictor.predict_tensors = predict  # type: ignore[method-assign]


def refuses_connections(port: int) -> bool:
    """Whether nothing listens on the loopback port any more (the listener has closed)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def wait_for(condition: Callable[[], bool], what: str, deadline_s: float = READY_DEADLINE_S) -> None:
    """Return once `condition()` holds (checked every 10 ms); fail naming `what` after `deadline_s`."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"{what} did not happen within {deadline_s:g} s")
        time.sleep(0.01)

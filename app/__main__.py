"""`python -m app`: validate the settings, load the checkpoint, then serve with uvicorn.

Both checks happen before the socket opens, so a bad setting or checkpoint stops the process
with one line and a non-zero status instead of a traceback.
"""

from __future__ import annotations

import os
import sys

# glibc gives threads that allocate at once arenas of their own (up to eight per core) and does
# not give back what they free: after floods of large uploads RSS stayed 17-33% above its resting
# level, even with malloc_trim; with two arenas it came back to 97% and the peaks were lower too
# (python -m benchmarks.attacks, 2026-12-02). glibc reads the variable when a process starts, so
# `python -m app` starts itself again with it, before the heavy imports below.
if __name__ == "__main__" and sys.platform == "linux" and "MALLOC_ARENA_MAX" not in os.environ:
    os.environ["MALLOC_ARENA_MAX"] = "2"
    os.execv(sys.executable, [sys.executable, "-m", "app", *sys.argv[1:]])

import contextlib  # noqa: E402
import logging  # noqa: E402

import uvicorn  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from app.draining import DrainingServer  # noqa: E402
from app.http_protocol import server_options  # noqa: E402
from app.main import create_app  # noqa: E402
from app.settings import Settings  # noqa: E402
from models.config import config_error_line  # noqa: E402
from models.engine import Engine  # noqa: E402
from models.errors import CheckpointError, DetectorError  # noqa: E402


def main() -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status."""
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"fer-service: {config_error_line(exc)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = Engine.load(settings.engine.checkpoint, settings.engine)
    except (CheckpointError, DetectorError) as exc:
        print(f"fer-service: {exc}", file=sys.stderr)
        return 1
    try:
        app = create_app(settings, engine)
    except (OSError, ValueError) as exc:  # the keys file: missing, unreadable or malformed
        engine.close()
        print(f"fer-service: FER_API_KEYS_FILE: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(app, host=settings.host, port=settings.port, **server_options(settings))
    server = DrainingServer(config, app.state.drain, settings.drain_s)
    # What uvicorn.run does around its server: Ctrl+C, re-raised once the shutdown is done, ends
    # quietly; a server that never started (the port in use, logged) exits with uvicorn's status.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else 3  # uvicorn.run's STARTUP_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m app`: validate the settings, load the checkpoint, then serve with uvicorn.

Both checks happen before the socket opens, so a bad setting or checkpoint stops the process
with one line and a non-zero status instead of a traceback.
"""

from __future__ import annotations

import logging
import sys

import uvicorn
from pydantic import ValidationError

from app.connections import server_options
from app.main import create_app
from app.settings import Settings, settings_error_line
from models.engine import Engine
from models.errors import CheckpointError, DetectorError


def main() -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status."""
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"fer-service: {settings_error_line(exc)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = Engine.load(settings.checkpoint, settings.engine_config())
    except (CheckpointError, DetectorError) as exc:
        print(f"fer-service: {exc}", file=sys.stderr)
        return 1
    uvicorn.run(create_app(settings, engine), host=settings.host, port=settings.port, **server_options(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

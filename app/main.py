"""The FastAPI app: `create_app(settings)` builds it; the lifespan loads the engine once."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.errors import install_error_handlers
from app.middleware import RequestGuard
from app.queue_room import QueueRoom
from app.routes import router
from app.settings import Settings
from app.telemetry import make_telemetry
from models.checkpoint import FORMAT_VERSION
from models.engine import Engine, EngineConfig

logger = logging.getLogger(__name__)


def engine_config(settings: Settings) -> EngineConfig:
    """The engine's knobs from the settings."""
    return EngineConfig(
        precision=settings.precision,
        tta=None if settings.tta == "checkpoint" else settings.tta,
        threads=settings.threads,
        max_batch=settings.max_batch,
        max_wait_ms=settings.max_wait_ms,
        queue_size=settings.queue_size,
        max_pixels=settings.max_pixels,
        prepare_workers=settings.prepare_workers,
    )


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the app; the engine is loaded in the lifespan unless one is passed in (already loaded)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = engine or Engine.load(settings.checkpoint, engine_config(settings))
        app.state.engine = loaded
        app.state.queue_room = queue_room = QueueRoom(asyncio.get_running_loop())
        loaded.batcher.add_room_listener(queue_room.notify_threadsafe)
        checkpoint = loaded.predictor.checkpoint
        logger.info(
            "serving %s (format %s, %s, val accuracy %s) in %s, tta %s, with %d threads",
            checkpoint.path, FORMAT_VERSION, checkpoint.version, loaded.predictor.served_metrics().get("accuracy", "not measured"),
            loaded.predictor.precision, loaded.predictor.tta, settings.threads,
        )  # fmt: skip
        # Warm up in the background: /health answers at once, /ready turns 200 when done.
        threading.Thread(target=loaded.warm_up, name="fer-warmup", daemon=True).start()
        try:
            yield
        finally:
            loaded.batcher.remove_room_listener(queue_room.notify_threadsafe)
            loaded.close()

    app = FastAPI(
        title="fer-service",
        version="0.1.0",
        description="Facial-emotion recognition: upload a face or a photo, get the seven class probabilities.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.telemetry = make_telemetry(
        lambda: float(app.state.engine.batcher.queue_depth) if hasattr(app.state, "engine") else 0.0
    )
    install_error_handlers(app)
    app.include_router(router)
    known_paths = {route.path for route in router.routes if hasattr(route, "path")}
    app.add_middleware(
        RequestGuard,
        max_upload_bytes=settings.max_upload_bytes,
        body_timeout_s=settings.body_timeout_s,
        telemetry=app.state.telemetry,
        route_of=lambda path: path if path in known_paths else "other",
    )
    return app

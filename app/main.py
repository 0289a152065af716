"""The FastAPI app: `create_app(settings)` builds it; the lifespan loads the engine once."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from app.errors import install_error_handlers
from app.middleware import InFlight, RequestGuard
from app.routes import router
from app.settings import Settings
from app.telemetry import make_telemetry
from models.checkpoint import FORMAT_VERSION
from models.engine import Engine

logger = logging.getLogger(__name__)
# How long the shutdown waits for cancelled requests to send their 503.
SHUTDOWN_REPLY_S = 2.0


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the app; the engine is loaded in the lifespan unless one is passed in (already loaded)."""
    settings = settings or Settings()
    in_flight = InFlight()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = engine or Engine.load(settings.engine.checkpoint, settings.engine)
        app.state.engine = loaded
        served = loaded.metrics()
        logger.info(
            "serving %s (format %s, %s, val accuracy %s) in %s, tta %s, detector %s, with %d threads",
            loaded.model.checkpoint, FORMAT_VERSION, loaded.model.version, served.get("accuracy", "not measured"),
            loaded.model.precision, loaded.model.tta, loaded.model.detector, settings.engine.threads,
        )  # fmt: skip
        # Warm up in the background: /health answers at once, /ready turns 200 when done.
        threading.Thread(target=loaded.warm_up, name="fer-warmup", daemon=True).start()
        try:
            yield
        finally:
            # uvicorn cancels the requests still running when its graceful window ends just
            # before this; they answer 503 in a few event-loop turns, and the process exits soon
            # after this returns, so give them that moment (bounded) before closing the engine.
            deadline = asyncio.get_running_loop().time() + SHUTDOWN_REPLY_S
            while in_flight.count and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            loaded.close()

    # /docs and /redoc load their scripts from the installed fastapi-offline wheel, not a CDN,
    # like the web page: they work on a machine without internet.
    app = FastAPIOffline(
        title="fer-service",
        version="0.1.0",
        description="Facial-emotion recognition: upload a face or a photo, get the seven class probabilities.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    video_uploads = app.state.video_uploads = InFlight()  # videos being uploaded now (FER_MAX_VIDEO_UPLOADS)
    app.state.telemetry = make_telemetry(
        lambda: float(app.state.engine.queue_depth) if hasattr(app.state, "engine") else 0.0,
        lambda: float(in_flight.count),  # the one count the request guard keeps
        lambda: float(app.state.engine.video_jobs) if hasattr(app.state, "engine") else 0.0,
        lambda: float(video_uploads.count),
    )
    install_error_handlers(app)
    app.include_router(router)
    known_paths = {route.path for route in router.routes if hasattr(route, "path")}
    app.add_middleware(
        RequestGuard,
        in_flight=in_flight,
        max_upload_bytes=settings.max_upload_bytes,
        upload_limits={"/predict/video": settings.max_video_bytes},
        body_timeout_s=settings.body_timeout_s,
        body_deadline_s=settings.body_deadline_s,
        telemetry=app.state.telemetry,
        route_of=lambda path: path if path in known_paths else "other",
    )
    return app

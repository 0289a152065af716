"""The FastAPI app: `create_app(settings)` builds it; the lifespan loads the engine once."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from app.clients import ApiKeys, ClientGate, RateLimiter
from app.draining import Drain
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
            "serving %s (format %s, %s, val accuracy %s) in %s on %s, tta %s, detector %s, with %d threads",
            loaded.model.checkpoint, FORMAT_VERSION, loaded.model.version, served.get("accuracy", "not measured"),
            loaded.model.precision, loaded.model.runtime, loaded.model.tta, loaded.model.detector, settings.engine.threads,
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
    app.state.drain = Drain()  # started by the server on SIGTERM (app/draining.py); /ready reads it
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
    # Innermost first: the gate names the client (or refuses it), the guard logs and counts it,
    # CORS answers preflights and adds its headers to everything, refusals included.
    keys = ApiKeys(settings.api_keys_file) if settings.api_keys_file else None
    limiter = app.state.rate_limiter = (
        RateLimiter(settings.rate_limit, settings.rate_burst) if settings.rate_limit > 0 else None
    )
    if keys is not None or limiter is not None:  # open and unlimited: no gate, nothing to name
        app.add_middleware(ClientGate, keys=keys, limiter=limiter)
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
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,  # exact origins; never "*" (Settings refuses it)
            allow_credentials=False,  # the key travels in Authorization, not in cookies
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["Retry-After", "X-Request-ID"],
            max_age=600,
        )
    if keys is None and not is_loopback(settings.host):
        logger.warning(
            "open: no FER_API_KEYS_FILE, so anyone who can reach %s:%d may call every route (README: Security)",
            settings.host, settings.port,
        )  # fmt: skip
    return app


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"

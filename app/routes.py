"""The HTTP routes: read the request, call the engine, shape the answer."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Literal, TypeVar

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.requests import ClientDisconnect

from app.clients import VIDEO_TOKENS, charge_extra
from app.deps import DrainDep, EngineDep, SettingsDep, TelemetryDep
from app.errors import UPLOAD_ERRORS, VIDEO_ERRORS, NotReady, error_response, openapi_responses, status_for
from app.schemas import BatchItem, BatchOut, MetricsOut, ModelOut, PredictionOut, StatusOut, VideoOut
from app.uploads import read_files, read_image, read_video
from models.answers import ImageAnswer
from models.errors import NotMeasuredError, QueueFullError
from models.tta import TtaMode

router = APIRouter()
Answer = TypeVar("Answer")
# Uploads up to this size are answered without watching for the client leaving (unless_client_leaves).
WATCHED_BODY_BYTES = 64 * 1024


def upload_body(raw_media_type: str) -> dict[str, object]:
    """The OpenAPI request body of a one-file route: multipart field `file`, or the raw body of `raw_media_type`."""
    binary = {"type": "string", "format": "binary"}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": {"file": binary}, "required": ["file"]}
                },
                raw_media_type: {"schema": binary},
            },
        }
    }


IMAGE_BODY = upload_body("image/*")
VIDEO_BODY = upload_body("video/*")
BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["files"],
                }
            }
        },
    }
}
FacesQuery = Query("largest", description="'largest' classifies the largest face; 'all' adds every face, largest first")
RequireFaceQuery = Query(False, description="answer 422 instead of classifying the whole image when no face is found")
TtaQuery = Query(
    None,
    description="test-time augmentation for this request instead of the server's (FER_TTA): 'tencrop' averages ten "
    "views of each face, more accurate and about ten times the model time; GET /metrics?tta= gives its figures",
)
MetricsTtaQuery = Query(None, description="the figures measured with this test-time augmentation instead")


@router.post(
    "/predict",
    response_model=PredictionOut,
    response_model_exclude_unset=True,
    responses=UPLOAD_ERRORS,
    openapi_extra=IMAGE_BODY,
    summary="Classify the emotion of the face in one image",
)
async def predict(
    request: Request,
    engine: EngineDep,
    faces: Literal["largest", "all"] = FacesQuery,
    require_face: bool = RequireFaceQuery,
    tta: TtaMode | None = TtaQuery,
) -> PredictionOut:
    """Upload one image (multipart field `file`, or the raw body as image/*); photos go through face detection."""
    data = await read_image(request)
    answer = await unless_client_leaves(
        request,
        engine.classify(data, all_faces=faces == "all", require_face=require_face, tta=tta),
        body_bytes=len(data),
    )
    request.state.batch_size, request.state.tta = answer.batch_size, answer.tta
    return PredictionOut.from_answer(answer, engine.model, every_face=faces == "all")


@router.post(
    "/predict/batch",
    response_model=BatchOut,
    response_model_exclude_unset=True,
    responses=UPLOAD_ERRORS,
    openapi_extra=BATCH_BODY,
    summary="Classify several images; a bad one gets an error in its place",
)
async def predict_batch(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    require_face: bool = RequireFaceQuery,
    tta: TtaMode | None = TtaQuery,
) -> BatchOut:
    """Upload images in the repeated multipart field `files`; results come back in upload order."""
    uploads = await read_files(request, max_files=settings.max_batch_files)
    charge_extra(request, len(uploads) - 1)  # a token a file (README: Security)
    answers = await unless_client_leaves(
        request,
        engine.classify_batch([data for _, data in uploads], require_face=require_face, tta=tta),
        body_bytes=sum(len(data) for _, data in uploads),
    )
    request.state.batch_size = max((a.batch_size for a in answers if isinstance(a, ImageAnswer)), default=0)
    request.state.tta = engine.resolve_tta(tta)
    items = [
        BatchItem.from_answer(answer, name)
        if isinstance(answer, ImageAnswer)
        else BatchItem.from_error(answer, name, status_for(answer))
        for (name, _), answer in zip(uploads, answers, strict=True)
    ]
    return BatchOut(results=items, tta=request.state.tta, model=ModelOut.from_info(engine.model))


@router.post(
    "/predict/video",
    response_model=VideoOut,
    responses=VIDEO_ERRORS,
    openapi_extra=VIDEO_BODY,
    summary="An emotion timeline for every face in a video",
)
async def predict_video(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    fps: float | None = Query(
        None, ge=0.1, description="frames analysed per second of video; at most, and by default, FER_VIDEO_FPS"
    ),
    smooth_s: float | None = Query(
        None, ge=0, le=60, description="seconds the smoothed probabilities remember (default FER_VIDEO_SMOOTH_S)"
    ),
    tta: TtaMode | None = TtaQuery,
) -> VideoOut:
    """Upload a video (multipart field `file`, or the raw body as video/*): MP4, MOV, WebM, MKV or AVI."""
    if fps is not None and fps > settings.engine.video_fps:
        raise RequestValidationError(
            [
                {
                    "loc": ("query", "fps"),
                    "msg": f"fps may be at most {settings.engine.video_fps:g} here",
                    "type": "value_error",
                }
            ]
        )
    if engine.video_jobs >= settings.engine.max_video_jobs:  # refused before its upload, not after
        raise QueueFullError.videos_busy(engine.video_jobs)
    path: Path | None = None
    try:
        async with video_upload_slot(request, settings.max_video_uploads):
            handle, name = tempfile.mkstemp(prefix="fer-video-")
            os.close(handle)
            path = Path(name)
            await read_video(request, path)
        smoothing = settings.engine.video_smooth_s if smooth_s is None else smooth_s
        async with engine.video_job():  # an analysis slot: 503 when every one is taken
            charge_extra(request, VIDEO_TOKENS - 1)  # a video costs about as much as this many photos
            timeline = await unless_client_leaves(
                request, engine.classify_video(path, fps=fps, tta=tta, smooth_s=smoothing)
            )
    finally:
        if path is not None:
            path.unlink(missing_ok=True)
    request.state.tta = timeline.tta
    return VideoOut.from_timeline(timeline, engine.model, smoothing)


@contextlib.asynccontextmanager
async def video_upload_slot(request: Request, limit: int) -> AsyncIterator[None]:
    """One of the `FER_MAX_VIDEO_UPLOADS` slots for the time a video's body is being received; 503 when none is free."""
    uploads = request.app.state.video_uploads
    if uploads.count >= limit:
        raise QueueFullError(f"the service is already receiving {uploads.count} video uploads: retry in a moment")
    uploads.count += 1
    try:
        yield
    finally:
        uploads.count -= 1


async def unless_client_leaves(request: Request, work: Awaitable[Answer], *, body_bytes: int | None = None) -> Answer:
    """`work`'s result, unless the client goes away first: then it is cancelled (a decode stops, queued
    faces leave, a video's reading stops) and the request ends as 499. The body must be read already.

    A body of at most `WATCHED_BODY_BYTES` (a face crop, a small photo: answered in milliseconds)
    is not watched: two more tasks a request cost face crops 5-15% of their throughput.
    """
    if body_bytes is not None and body_bytes <= WATCHED_BODY_BYTES:
        return await work
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            # Waited for, not awaited: a cancellation of this request itself (at shutdown) must
            # still reach it, and the work's own end is not this request's error.
            await asyncio.wait({task})
        gone.cancel()
    if task.cancelled():
        raise ClientDisconnect()
    return task.result()


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client disconnects (the body has been read: nothing else comes before that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.get(
    "/metrics",
    response_model=MetricsOut,
    responses=openapi_responses(NotMeasuredError, RequestValidationError),
    summary="The model's evaluation metrics on the val split",
)
async def metrics(engine: EngineDep, tta: TtaMode | None = MetricsTtaQuery) -> MetricsOut:
    """Accuracy, loss, macro-F1, per class and the confusion matrix, as measured by training.evaluate."""
    return MetricsOut.from_engine(engine, engine.metrics(tta))


PROMETHEUS_EXAMPLE = 'fer_requests_total{route="/predict",status="200"} 42.0\nfer_queue_depth 0.0\n'


@router.get(
    "/metrics/prometheus",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"example": PROMETHEUS_EXAMPLE}}}},
    summary="Operational metrics in the Prometheus text format",
)
async def prometheus(telemetry: TelemetryDep) -> PlainTextResponse:
    """Requests by route and status, latency and batch-size histograms, queue depth."""
    return PlainTextResponse(telemetry.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


INDEX_HTML = (Path(__file__).resolve().parent / "static" / "index.html").read_text(encoding="utf-8")


def inline_hashes(html: str, tag: str) -> str:
    """CSP source expressions for the page's inline <script> or <style> blocks: 'sha256-…' each."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()}'" for block in blocks
    )


# The page may run only its own script and style, and talk only to this origin: an injected
# script or a request to elsewhere is refused by the browser.
INDEX_CSP = (
    f"default-src 'none'; script-src {inline_hashes(INDEX_HTML, 'script')}; "
    f"style-src {inline_hashes(INDEX_HTML, 'style')}; img-src 'self' blob: data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@router.get("/", response_class=HTMLResponse, summary="The web page: drop a photo, see the faces and the bars")
async def index() -> HTMLResponse:
    """A self-contained page (no CDN, no external font) that calls /predict and /metrics."""
    return HTMLResponse(INDEX_HTML, headers={"Content-Security-Policy": INDEX_CSP})


@router.get("/health", response_model=StatusOut, summary="Liveness: answers while the process lives")
async def health() -> dict[str, str]:
    """Always ok while the process serves HTTP."""
    return {"status": "ok"}


@router.get(
    "/ready",
    response_model=StatusOut,
    responses=openapi_responses(NotReady),
    summary="Readiness: 200 once the model is loaded and warmed up, 503 again once the service is stopping",
)
async def ready(engine: EngineDep, drain: DrainDep) -> JSONResponse:
    """200 when the engine has warmed up, 503 before, and 503 while draining before a shutdown."""
    if drain.started:  # requests are still served: this tells balancers to stop sending (app/draining.py)
        return error_response(
            NotReady("the service is stopping: send to another replica"), extra={"status": "stopping"}
        )
    if engine.ready:
        return JSONResponse({"status": "ready"})
    return error_response(
        NotReady("the model is loading or warming up: retry in a moment"), extra={"status": "warming up"}
    )

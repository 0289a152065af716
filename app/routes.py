"""The HTTP routes: read the request, call the engine, shape the answer."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from app.deps import EngineDep, QueueRoomDep, SettingsDep, TelemetryDep
from app.errors import error_response, status_for
from app.schemas import BatchOut, ErrorOut, MetricsOut, PredictionOut, StatusOut
from app.uploads import read_form, read_image, uploaded_files
from models.batching import BatchResult, QueueFullError
from models.engine import Engine, FaceInput, is_quick
from models.errors import FerError

router = APIRouter()

IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
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
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": text}
    for status, text in {
        400: "empty, undecodable or truncated image",
        408: "the upload stalled",
        413: "upload over max_upload_bytes, image over max_pixels, or too many files",
        415: "not an image type we accept, or not an image upload",
        422: "no file, bad query value, or no face with require_face=true",
        503: "at capacity: retry after the Retry-After seconds",
    }.items()
}
FacesQuery = Query("largest", description="'largest' classifies the largest face; 'all' adds every face, largest first")
RequireFaceQuery = Query(False, description="answer 422 instead of classifying the whole image when no face is found")
TtaQuery = Query(
    None,
    description="test-time augmentation for this request instead of the server's (FER_TTA): 'tencrop' averages ten "
    "views of each face, more accurate and about ten times the model time; GET /metrics?tta= gives its figures",
)
MetricsTtaQuery = Query(None, description="the figures measured with this test-time augmentation instead")
TtaMode = Literal["none", "flip", "tencrop"]  # models.predictor.TTA_MODES; a test keeps the two the same


def model_info(engine: Engine) -> dict[str, str]:
    """Which model answers."""
    checkpoint = engine.predictor.checkpoint
    return {"version": checkpoint.version, "sha256": checkpoint.sha256}


async def prepare(
    engine: Engine, data: bytes, *, all_faces: bool = False, require_face: bool = False
) -> list[FaceInput]:
    """Decode and preprocess: small face crops inline, anything that may need face detection in a thread."""
    if is_quick(data):
        return engine.prepare(data, all_faces=all_faces, require_face=require_face)
    return await asyncio.wrap_future(engine.prepare_in_pool(data, all_faces=all_faces, require_face=require_face))


# How long the images of one /predict/batch upload may wait for their turn and room in the queue.
BATCH_QUEUE_PATIENCE_S = 10.0


def answer(engine: Engine, face: FaceInput, result: BatchResult) -> dict[str, Any]:
    """One face's result as the API shows it."""
    prediction = engine.prediction(result)
    return {
        "label": prediction.label,
        "confidence": prediction.confidence,
        "probabilities": prediction.probabilities,
        "face": {"box": face.box.as_list()} if face.box else None,
    }


async def classify(engine: Engine, faces: list[FaceInput], tta: str | None) -> tuple[list[dict[str, Any]], int]:
    """Send the faces through the micro-batcher; one answer each, and the largest batch size.

    A full queue refuses at once (`QueueFullError`, 503); the request's faces that did fit are
    taken back out, so nobody's forward pass computes answers that will not be sent.
    """
    futures: list[Future[BatchResult]] = []
    try:
        for face in faces:
            futures.append(engine.submit(face, tta))
    except QueueFullError:
        for future in futures:
            future.cancel()
        raise
    results = await asyncio.gather(*(asyncio.wrap_future(future) for future in futures))
    answers = [answer(engine, face, result) for face, result in zip(faces, results, strict=True)]
    return answers, max(result.batch_size for result in results)


@router.post(
    "/predict",
    response_model=PredictionOut,
    responses=ERRORS,
    openapi_extra=IMAGE_BODY,
    summary="Classify the emotion of the face in one image",
)
async def predict(
    request: Request,
    engine: EngineDep,
    faces: Literal["largest", "all"] = FacesQuery,
    require_face: bool = RequireFaceQuery,
    tta: TtaMode | None = TtaQuery,
) -> JSONResponse:
    """Upload one image (multipart field `file`, or the raw body as image/*); photos go through face detection."""
    data = await read_image(request)
    inputs = await prepare(engine, data, all_faces=faces == "all", require_face=require_face)
    answers, batch_size = await classify(engine, inputs, tta)
    request.state.batch_size, request.state.tta = batch_size, engine.predictor.resolve_tta(tta)
    body = {**answers[0], "tta": request.state.tta, "model": model_info(engine)}
    if faces == "all":
        body["faces"] = answers
    return JSONResponse(body)


async def _prepare_one_of_batch(engine: Engine, data: bytes, require_face: bool) -> FaceInput | dict[str, Any]:
    """The image's largest face, or the error that takes its place in the results."""
    try:
        return (await prepare(engine, data, require_face=require_face))[0]
    except FerError as exc:
        return {"error": {"status": status_for(exc), "detail": str(exc)}}


def in_upload_order(
    engine: Engine, prepared: list[FaceInput | dict[str, Any]], results: list[BatchResult]
) -> tuple[list[dict[str, Any]], int]:
    """Each upload's answer, or the error in its place; and the largest batch a face rode in."""
    pending = iter(results)  # one per prepared face, in the same order
    outcomes: list[dict[str, Any]] = []
    batch_size = 0
    for item in prepared:
        if isinstance(item, FaceInput):
            result = next(pending)
            batch_size = max(batch_size, result.batch_size)
            outcomes.append(answer(engine, item, result))
        else:
            outcomes.append(item)
    return outcomes, batch_size


@router.post(
    "/predict/batch",
    response_model=BatchOut,
    responses=ERRORS,
    openapi_extra=BATCH_BODY,
    summary="Classify several images; a bad one gets an error in its place",
)
async def predict_batch(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    queue_room: QueueRoomDep,
    require_face: bool = RequireFaceQuery,
    tta: TtaMode | None = TtaQuery,
) -> JSONResponse:
    """Upload images in the repeated multipart field `files`; results come back in upload order."""
    form = await read_form(request, max_files=settings.max_batch_files)
    try:
        uploads = uploaded_files(form)
        blobs = [(upload.filename, await upload.read()) for upload in uploads]
    finally:
        await form.close()
    deadline = asyncio.get_running_loop().time() + BATCH_QUEUE_PATIENCE_S
    prepared = await asyncio.gather(*(_prepare_one_of_batch(engine, data, require_face) for _, data in blobs))
    faces = [item for item in prepared if isinstance(item, FaceInput)]
    # Capacity is not any image's fault: QueueFullError fails the whole request with 503 and Retry-After.
    futures = await queue_room.submit_all(lambda face: engine.submit(face, tta), faces, deadline)
    results = await asyncio.gather(*(asyncio.wrap_future(future) for future in futures))
    outcomes, request.state.batch_size = in_upload_order(engine, prepared, results)
    request.state.tta = engine.predictor.resolve_tta(tta)
    body = [{**outcome, "filename": name} for (name, _), outcome in zip(blobs, outcomes, strict=True)]
    return JSONResponse({"results": body, "tta": request.state.tta, "model": model_info(engine)})


@router.get(
    "/metrics",
    response_model=MetricsOut,
    responses={404: {"model": ErrorOut, "description": "the checkpoint stores no figures for that tta"}},
    summary="The model's evaluation metrics on the val split",
)
async def metrics(
    engine: EngineDep,
    tta: TtaMode | None = MetricsTtaQuery,
) -> Any:
    """Accuracy, loss, macro-F1, per class and the confusion matrix, as measured by training.evaluate."""
    predictor = engine.predictor
    measured = predictor.measured_tta_modes()
    if tta is not None and tta not in measured:
        return error_response(
            404,
            f"this checkpoint stores no figures measured with tta={tta}; it has them for: "
            f"{', '.join(measured) or 'nothing yet'} (training.evaluate --also-tta {tta} --write-metrics adds them)",
        )
    checkpoint = predictor.checkpoint
    stored = predictor.served_metrics(tta)
    known = set(MetricsOut.model_fields)
    return {
        **{key: value for key, value in stored.items() if key in known},
        "extra": {key: value for key, value in stored.items() if key not in known},
        "model": model_info(engine),
        "classes": list(checkpoint.classes),
        "served_precision": engine.predictor.precision,
        "served_tta": predictor.tta,
        "measured_tta": list(measured),
    }


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


@router.get("/", response_class=HTMLResponse, summary="The web page: drop a photo, see the faces and the bars")
async def index() -> HTMLResponse:
    """A self-contained page (no CDN, no external font) that calls /predict and /metrics."""
    return HTMLResponse(INDEX_HTML)


@router.get("/health", response_model=StatusOut, summary="Liveness: answers while the process lives")
async def health() -> dict[str, str]:
    """Always ok while the process serves HTTP."""
    return {"status": "ok"}


@router.get(
    "/ready",
    response_model=StatusOut,
    responses={503: {"model": StatusOut, "description": "still loading or warming up"}},
    summary="Readiness: 200 once the model is loaded and warmed up",
)
async def ready(engine: EngineDep) -> JSONResponse:
    """200 when the engine has warmed up, 503 before."""
    if engine.ready:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "warming up"}, status_code=503, headers={"Retry-After": "1"})

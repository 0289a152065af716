"""The one place where errors become HTTP responses: a table from exception class to status.

The core's domain errors (`models.errors`) and the HTTP layer's own refusals (below) are all
exceptions; `STATUS_BY_ERROR` gives each its status, and every error body, whoever sends it (an
exception handler, the request guard, a batch item), is built from it. The README's error table
is this table (tests/test_docs.py checks the two agree).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from app.schemas import ErrorOut
from models.errors import (
    DecodeCancelledError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidVideoError,
    NoFaceError,
    NotMeasuredError,
    QueueFullError,
    UnsupportedImageError,
    UnsupportedVideoError,
    VideoTooLargeError,
)

logger = logging.getLogger(__name__)


class RequestProblem(Exception):
    """A request the HTTP layer refuses before the core sees it; the subclass says which status."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class MalformedBody(RequestProblem):
    """The multipart body could not be parsed."""


class UploadStalled(RequestProblem):
    """The client stopped sending the body."""


class UploadTooLarge(RequestProblem):
    """More bytes or more files than the limits allow."""


class Unauthorized(RequestProblem):
    """No API key, or not one the keys file lists (FER_API_KEYS_FILE)."""


class RateLimited(RequestProblem):
    """The client is over its rate limit (FER_RATE_LIMIT)."""


class NotAnImageUpload(RequestProblem):
    """A body that is neither multipart nor of the media type the route takes (image/*, or video/* for video)."""


class MissingUpload(RequestProblem):
    """No file where one was expected, or text where a file was expected."""


class HeadersTooLarge(RequestProblem):
    """The request line and headers are over the size limit."""


class HeadersTooSlow(RequestProblem):
    """The request line and headers did not arrive in time."""


class NotReady(RequestProblem):
    """The model is still loading or warming up."""


class ShuttingDown(RequestProblem):
    """The service was stopping and this request ran past the graceful-shutdown window."""


# RequestValidationError's own docstring is FastAPI's; this is what it means to a client here.
RequestValidationError.__doc__ = "A query value that is not one of the allowed ones."
ClientDisconnect.__doc__ = "The client went away before its upload was complete."


STATUS_BY_ERROR: dict[type[Exception], int] = {
    InvalidImageError: 400,  # empty, undecodable, truncated
    InvalidVideoError: 400,  # a video container that is truncated, damaged or has no readable frame
    MalformedBody: 400,
    Unauthorized: 401,  # FER_API_KEYS_FILE is set and the request has no key, or a wrong one
    NotMeasuredError: 404,  # /metrics?tta= for a mode the checkpoint has no figures for
    UploadStalled: 408,
    HeadersTooSlow: 408,  # written by app/http_protocol.py, then the connection is closed
    ImageTooLargeError: 413,  # over max_pixels
    VideoTooLargeError: 413,  # over max_video_seconds
    UploadTooLarge: 413,  # over max_upload_bytes or max_batch_files
    UnsupportedImageError: 415,  # a file, but not an accepted image type
    UnsupportedVideoError: 415,  # bytes that are not a video container we read
    NotAnImageUpload: 415,
    NoFaceError: 422,  # require_face=true and no face found
    MissingUpload: 422,
    RateLimited: 429,  # over FER_RATE_LIMIT for this client; Retry-After says when
    HeadersTooLarge: 431,  # written by app/http_protocol.py, then the connection is closed
    RequestValidationError: 422,  # a bad query value
    QueueFullError: 503,  # over capacity: retry after a moment
    NotReady: 503,
    ShuttingDown: 503,
    # Never sent (nobody is there to read it): the access log and the metrics count the request
    # as 499, nginx's "client closed request", instead of a 500 with a traceback.
    ClientDisconnect: 499,
    DecodeCancelledError: 499,  # its request was already gone: the same client closed request
}
RETRY_AFTER_S = "1"


def openapi_responses(*error_types: type[Exception]) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route that can raise these, statuses from the table, texts from their docstrings."""
    texts: dict[int, list[str]] = {}
    for error_type in error_types:
        doc = (error_type.__doc__ or error_type.__name__).strip().splitlines()[0].rstrip(".")
        texts.setdefault(STATUS_BY_ERROR[error_type], []).append(doc[0].lower() + doc[1:])
    return {status: {"model": ErrorOut, "description": "; ".join(parts)} for status, parts in sorted(texts.items())}


def status_for(exc: Exception) -> int:
    """The HTTP status of an error (500 for anything not in the table: a bug)."""
    for error_type in type(exc).__mro__:
        if error_type in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[error_type]
    return 500


def error_response(
    exc: Exception,
    detail: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    extra: dict[str, str] | None = None,
) -> JSONResponse:
    """The one error body, {"detail": "..."} (plus `extra`), with the table's status; a 503 carries Retry-After."""
    status = status_for(exc)
    headers = dict(headers or {})
    if status == 503:
        headers["Retry-After"] = RETRY_AFTER_S
    body = {**(extra or {}), "detail": str(exc) if detail is None else detail}
    return JSONResponse(body, status_code=status, headers=headers)


# Refused while the body was still arriving: the rest of it cannot be skipped safely on this
# connection, so the answer closes it (an oversized chunked body kept it open before).
CLOSES_CONNECTION = (UploadTooLarge, UploadStalled)


async def _known_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc, headers={"connection": "close"} if isinstance(exc, CLOSES_CONNECTION) else None)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for error in exc.errors():
        where = " ".join(str(part) for part in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return error_response(exc, "; ".join(parts) or "invalid request")


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    request_id = request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex
    logger.error("unexpected error in %s %s (request %s)", request.method, request.url.path, request_id, exc_info=exc)
    return JSONResponse({"detail": f"internal error: report request id {request_id}"}, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """Register the table on the app."""
    for error_type in STATUS_BY_ERROR:
        if error_type is not RequestValidationError:
            app.add_exception_handler(error_type, _known_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)


# What the upload routes (/predict, /predict/batch) can answer besides 200, for the OpenAPI page.
UPLOAD_ERRORS = openapi_responses(
    InvalidImageError, MalformedBody, UploadStalled, ImageTooLargeError, UploadTooLarge, UnsupportedImageError,
    NotAnImageUpload, NoFaceError, MissingUpload, RequestValidationError, QueueFullError,
)  # fmt: skip
VIDEO_ERRORS = openapi_responses(
    InvalidVideoError, MalformedBody, UploadStalled, VideoTooLargeError, UploadTooLarge, UnsupportedVideoError,
    NotAnImageUpload, MissingUpload, RequestValidationError, QueueFullError,
)  # fmt: skip

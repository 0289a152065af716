"""The one place where errors become HTTP responses: a table from exception class to status."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from models.batching import QueueFullError
from models.errors import ImageTooLargeError, InvalidImageError, NoFaceError, UnsupportedImageError

logger = logging.getLogger(__name__)


class RequestProblem(Exception):
    """A request the HTTP layer refuses before the core sees it (no file, wrong content type …)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


# The README's error table is this table.
STATUS_BY_ERROR: dict[type[Exception], int] = {
    InvalidImageError: 400,  # empty, undecodable, truncated
    ImageTooLargeError: 413,  # over max_upload_bytes or max_pixels
    UnsupportedImageError: 415,  # a file, but not an accepted image type
    NoFaceError: 422,  # require_face=true and no face found
    QueueFullError: 503,  # over capacity: retry after a moment
}
RETRY_AFTER_S = "1"


def status_for(exc: Exception) -> int:
    """The HTTP status of a domain error (500 for anything not in the table)."""
    if isinstance(exc, RequestProblem):
        return exc.status
    for error_type, status in STATUS_BY_ERROR.items():
        if isinstance(exc, error_type):
            return status
    return 500


def error_response(status: int, detail: str) -> JSONResponse:
    """The one error body: {"detail": "..."}; 503 carries Retry-After."""
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(status_for(exc), str(exc))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for error in exc.errors():
        where = " ".join(str(part) for part in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return error_response(422, "; ".join(parts) or "invalid request")


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    request_id = request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex
    logger.error("unexpected error in %s %s (request %s)", request.method, request.url.path, request_id, exc_info=exc)
    return error_response(500, f"internal error: report request id {request_id}")


def install_error_handlers(app: FastAPI) -> None:
    """Register the table on the app."""
    for error_type in (*STATUS_BY_ERROR, RequestProblem):
        app.add_exception_handler(error_type, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)

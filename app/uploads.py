"""Reading image uploads: multipart fields or a raw image/* body, with actionable refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import MalformedBody, MissingUpload, NotAnImageUpload, UploadTooLarge

# A multipart body with no part at all is its closing boundary and little else.
EMPTY_MULTIPART_BYTES = 200
HOW_TO_SEND = (
    "send the image as multipart field 'file' (curl -F file=@face.jpg) or as the raw body with Content-Type image/*"
)
HOW_TO_SEND_VIDEO = (
    "send the video as multipart field 'file' (curl -F file=@clip.mp4) or as the raw body with Content-Type video/*"
)


async def read_form(request: Request, max_files: int, how: str = HOW_TO_SEND) -> FormData:
    """Parse a multipart body, turning Starlette's parser errors into our statuses."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise NotAnImageUpload(f"Content-Type {content_type or 'missing'!r} is not multipart/form-data: {how}")
    try:
        form = await request.form(max_files=max_files, max_fields=100)
    except StarletteHTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise UploadTooLarge(f"too many files: at most {max_files} per request") from None
        raise MalformedBody(f"the multipart body could not be parsed ({exc.detail})") from None
    declared = request.headers.get("content-length", "")
    if not form and declared.isdigit() and int(declared) > EMPTY_MULTIPART_BYTES:
        # A body with content but not one complete part: its closing boundary is missing (the
        # parser keeps an unterminated part to itself), which "field 'file' is missing" misreads.
        await form.close()
        raise MalformedBody("the multipart body has no complete part: is its closing boundary (--BOUNDARY--) missing?")
    return form


def single_file(form: FormData, how: str = HOW_TO_SEND) -> UploadFile:
    """The one file in the field 'file'."""
    values = form.getlist("file")
    if not values:
        others = ", ".join(sorted({str(key) for key in form})) or "none"
        raise MissingUpload(f"no file: the multipart field 'file' is missing (fields sent: {others}); {how}")
    if len(values) > 1:
        several = "use POST /predict/batch with 'files' for several" if how == HOW_TO_SEND else "one video per request"
        raise MissingUpload(f"send exactly one file in 'file'; {several}")
    upload = values[0]
    if isinstance(upload, str):
        raise MissingUpload(f"the field 'file' holds text, not a file: {how}")
    return upload


async def read_image(request: Request) -> bytes:
    """The uploaded image's bytes, from a multipart field 'file' or from a raw image/* body."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        form = await read_form(request, max_files=2)
        try:
            return await single_file(form).read()
        finally:
            await form.close()
    if content_type.startswith(("image/", "application/octet-stream")):
        return await request.body()
    if not content_type and has_no_body(request):
        raise MissingUpload(f"no file: the request has no body; {HOW_TO_SEND}")
    raise NotAnImageUpload(f"Content-Type {content_type or 'missing'!r} is not an image upload: {HOW_TO_SEND}")


def has_no_body(request: Request) -> bool:
    """True when the headers announce no body at all (no length, or zero, and not chunked)."""
    return request.headers.get("content-length", "0") in ("0", "") and "transfer-encoding" not in request.headers


def uploaded_files(form: FormData) -> list[UploadFile]:
    """The files in the repeated field 'files' of a batch upload."""
    values = form.getlist("files")
    if not values:
        raise MissingUpload(
            "no files: send the images in the repeated multipart field 'files' (curl -F files=@a.jpg -F files=@b.jpg)",
        )
    uploads = []
    for value in values:
        if isinstance(value, str):
            raise MissingUpload("a 'files' field holds text, not a file: attach every image as a file")
        uploads.append(value)
    return uploads


async def read_files(request: Request, max_files: int) -> list[tuple[str | None, bytes]]:
    """The (filename, bytes) of every file in the repeated multipart field 'files', in upload order."""
    form = await read_form(request, max_files=max_files)
    try:
        return [(upload.filename, await upload.read()) for upload in uploaded_files(form)]
    finally:
        await form.close()


async def read_video(request: Request, destination: Path) -> None:
    """Write the uploaded video (multipart field 'file', or a raw video/* body) to `destination`.

    The request guard has already bounded the body's bytes (`FER_MAX_VIDEO_BYTES`, refused with
    413 while it streams) and its time; FFmpeg (PyAV) reads the video from the file.
    """
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        form = await read_form(request, max_files=2, how=HOW_TO_SEND_VIDEO)
        try:
            upload = single_file(form, how=HOW_TO_SEND_VIDEO)
            with destination.open("wb") as out:
                await run_in_threadpool(shutil.copyfileobj, upload.file, out, 1 << 20)
        finally:
            await form.close()
        return
    if content_type.startswith(("video/", "application/octet-stream")):
        with destination.open("wb") as out:
            async for chunk in request.stream():
                out.write(chunk)
        return
    if not content_type and has_no_body(request):
        raise MissingUpload(f"no file: the request has no body; {HOW_TO_SEND_VIDEO}")
    raise NotAnImageUpload(f"Content-Type {content_type or 'missing'!r} is not a video upload: {HOW_TO_SEND_VIDEO}")

"""Hostile input against a real server: each case gets its documented status and a JSON detail,
and a server that has taken every case is healthy and its memory has not grown."""

from __future__ import annotations

import contextlib
import io
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import SHIPPED_CHECKPOINT
from tests.hostile import IMAGE_CASES
from tests.images import encode, face_png
from tests.server import AppServer, Server, app_serving, get, post

UPLOAD_LIMIT = 256 * 1024  # a small limit keeps the just-under/just-over bodies cheap
SETTINGS = {"max_upload_bytes": UPLOAD_LIMIT, "body_timeout_s": 1}


@pytest.fixture(scope="module")
def server() -> Iterator[AppServer]:
    with app_serving(checkpoint=SHIPPED_CHECKPOINT, **SETTINGS) as running:
        yield running
    assert "Traceback" not in running.log()  # no hostile case of this module reached the 500 handler


def check(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    if status != 200:
        detail = response.json()["detail"]
        assert isinstance(detail, str) and detail
        assert fragment in detail
    else:
        assert abs(sum(response.json()["probabilities"].values()) - 1) < 1e-6


@pytest.mark.parametrize(("case", "data", "status", "fragment"), IMAGE_CASES, ids=[case[0] for case in IMAGE_CASES])
def test_image_case_as_multipart(server: AppServer, case: str, data: bytes, status: int, fragment: str) -> None:
    check(post(f"{server.url}/predict", files={"file": ("upload.bin", data)}, timeout=30), status, fragment)


@pytest.mark.parametrize(
    ("case", "data", "status", "fragment"), IMAGE_CASES[:10], ids=[case[0] for case in IMAGE_CASES[:10]]
)
def test_image_case_as_raw_body(server: AppServer, case: str, data: bytes, status: int, fragment: str) -> None:
    response = post(f"{server.url}/predict", content=data, headers={"content-type": "image/png"}, timeout=30)
    check(response, status, fragment)


def test_non_utf8_file_name_is_fine(server: AppServer) -> None:
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="'.encode()
        + b"caf\xe9\xff.png"
        + b'"\r\nContent-Type: image/png\r\n\r\n'
        + face_png()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    response = post(
        f"{server.url}/predict", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    check(response, 200, "")


def test_body_just_under_the_limit_is_served(server: AppServer) -> None:
    data = face_png()
    padded = data + b"\0" * (UPLOAD_LIMIT - len(data))  # bytes after IEND are ignored by decoders
    assert len(padded) == UPLOAD_LIMIT
    check(post(f"{server.url}/predict", content=padded, headers={"content-type": "image/png"}), 200, "")


def test_body_just_over_the_limit_is_refused(server: AppServer) -> None:
    data = face_png() + b"\0" * UPLOAD_LIMIT
    response = post(f"{server.url}/predict", content=data[: UPLOAD_LIMIT + 1], headers={"content-type": "image/png"})
    check(response, 413, "larger than 262,144 bytes")


def test_multipart_over_the_limit_is_refused(server: AppServer) -> None:
    response = post(f"{server.url}/predict", files={"file": ("big.png", b"\0" * (UPLOAD_LIMIT + 10))})
    check(response, 413, "larger than")


def test_stalled_upload_is_cut_off_and_frees_the_worker(server: AppServer) -> None:
    # The socket's timeout only keeps a broken server from hanging the test; the server's is 1 s.
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n"
            + b"\x89PNG" * 10
        )
        answer = sock.recv(4096).decode(errors="replace")  # the server answers while we stall
        while "stalled" not in answer and (more := sock.recv(4096)):
            answer += more.decode(errors="replace")
    assert answer.startswith("HTTP/1.1 408"), answer
    assert "stalled" in answer
    check(post(f"{server.url}/predict", files={"file": ("f.png", face_png())}), 200, "")


REQUEST_CASES = [
    ("wrong field name", {"files": {"photo": ("f.png", face_png())}}, 422, "field 'file' is missing"),
    (
        "two files",
        {"files": [("file", ("a.png", face_png())), ("file", ("b.png", face_png()))]},
        422,
        "exactly one file",
    ),
    ("json body", {"json": {"file": "aGVsbG8="}}, 415, "not an image upload"),
    ("form field without a file", {"data": {"file": "text"}, "files": {"x": ("x", b"x")}}, 422, "holds text"),
    ("no body", {}, 422, "no file"),
    ("text/plain body", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "not an image upload"),
    (
        "broken multipart",
        {"content": b"--x\r\ngarbage", "headers": {"content-type": "multipart/form-data; boundary=x"}},
        422,
        "missing",
    ),
    (
        "multipart without boundary",
        {"content": b"abc", "headers": {"content-type": "multipart/form-data"}},
        400,
        "could not be parsed",
    ),
    ("faces empty", {"files": {"file": ("f.png", face_png())}, "params": {"faces": ""}}, 422, "faces"),
    ("faces number", {"files": {"file": ("f.png", face_png())}, "params": {"faces": "3"}}, 422, "faces"),
    (
        "require_face junk",
        {"files": {"file": ("f.png", face_png())}, "params": {"require_face": "perhaps"}},
        422,
        "require_face",
    ),
]


@pytest.mark.parametrize(
    ("case", "kwargs", "status", "fragment"), REQUEST_CASES, ids=[case[0] for case in REQUEST_CASES]
)
def test_request_case(server: AppServer, case: str, kwargs: dict[str, object], status: int, fragment: str) -> None:
    check(post(f"{server.url}/predict", timeout=30, **kwargs), status, fragment)  # type: ignore[arg-type]


TWO_THOUSAND_FILES = [("files", (f"{i}.png", b"\x89PNG")) for i in range(2000)]


def test_two_thousand_files_in_one_batch_are_refused(server: AppServer) -> None:
    response = post(f"{server.url}/predict/batch", files=TWO_THOUSAND_FILES, timeout=60)
    # Whichever limit the parser meets first, the file count or this server's small byte limit.
    check(response, 413, "")
    assert "at most 64" in response.json()["detail"] or "larger than" in response.json()["detail"]


def test_batch_with_no_files_is_refused(server: AppServer) -> None:
    check(post(f"{server.url}/predict/batch", files={"file": ("f.png", face_png())}), 422, "no files")


def test_get_on_predict_is_405(server: AppServer) -> None:
    check(get(f"{server.url}/predict"), 405, "Method Not Allowed")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.slow
def test_after_every_hostile_case_the_server_is_healthy_and_its_memory_has_not_grown(tmp_path: Path) -> None:
    # A process of its own: its resident memory is the server's alone, not the test runner's.
    server = Server(
        tmp_path / "server.log", checkpoint=str(SHIPPED_CHECKPOINT), **{k: str(v) for k, v in SETTINGS.items()}
    )
    try:
        server.wait_ready()
        for _ in range(20):  # settle the allocator before the memory baseline is read
            post(f"{server.url}/predict", files={"file": ("f.png", face_png())})
        baseline = rss_bytes(server.process.pid)
        for _ in range(4):
            for _case, data, status, fragment in IMAGE_CASES:
                check(post(f"{server.url}/predict", files={"file": ("x", data)}, timeout=30), status, fragment)
            for _case, kwargs, status, fragment in REQUEST_CASES:
                check(post(f"{server.url}/predict", timeout=30, **kwargs), status, fragment)  # type: ignore[arg-type]
            check(
                post(f"{server.url}/predict/batch", files=TWO_THOUSAND_FILES, timeout=60),
                413,
                "the upload is larger than",
            )
        assert get(f"{server.url}/health").json() == {"status": "ok"}
        check(post(f"{server.url}/predict", files={"file": ("f.png", face_png())}), 200, "")
        grown = rss_bytes(server.process.pid) / baseline
    finally:
        server.stop()
    assert grown < 1.10, f"RSS grew by {grown - 1:.1%}"
    assert "Traceback" not in server.log()


def test_a_client_that_leaves_mid_upload_is_counted_as_499_without_a_traceback(server: AppServer) -> None:
    head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\nX-Request-ID: left-early\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode() + b"\x89PNG\r\n")
    server.wait_for_log(r"POST /predict 499 .* id=left-early")
    metrics = get(f"{server.url}/metrics/prometheus").text
    assert 'fer_requests_total{route="/predict",status="499"}' in metrics


def test_a_path_with_a_line_break_cannot_write_a_fake_log_line(server: AppServer) -> None:
    response = get(f"{server.url}/%0d%0aINFO%20app.access:%20GET%20/ready%20200")
    check(response, 404, "Not Found")
    line = server.wait_for_log(r"GET /.*INFO app\.access.* 404 ").group(0)
    assert "\\r\\n" in line and "\n" not in line


@pytest.fixture(scope="module")
def strict_server() -> Iterator[AppServer]:
    limits = {"header_timeout_s": 1, "body_timeout_s": 1, "body_deadline_s": 1.5, "max_pipelined": 4}
    with app_serving(checkpoint=SHIPPED_CHECKPOINT, **limits) as running:
        yield running


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's timeout bounds the wait)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass  # closed with our unread data still in its buffer: a reset, after its answer
    return b"".join(chunks)


def test_a_request_line_that_never_ends_gets_431_and_is_cut_off(server: AppServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /" + b"a" * 20_000)  # and never a line end
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b'"detail": "the request line and headers are over 16,384 bytes"' in answer
    assert get(f"{server.url}/health").status_code == 200


def drip_until_answered(sock: socket.socket, byte: bytes, bytes_at_most: int) -> bytes:
    """Send `byte` every 0.1 s until the server answers (then read the answer to the close) or the bytes run out."""
    for _ in range(bytes_at_most):
        try:
            sock.sendall(byte)
        except OSError:
            break
        if select.select([sock], [], [], 0.1)[0]:
            return read_until_closed(sock)
    return b""


def test_a_silent_or_dripping_connection_gets_408_and_is_closed(strict_server: AppServer) -> None:
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=30) as silent:
        silence = read_until_closed(silent)
        assert silence.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 1 s" in silence
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=30) as dripping:
        dripping.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        answer = drip_until_answered(dripping, b"X", bytes_at_most=40)  # each byte resets uvicorn's keep-alive
    assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 1 s" in answer


def test_a_body_that_trickles_past_the_whole_body_deadline_gets_408(strict_server: AppServer) -> None:
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=30) as sock:
        sock.sendall(head)
        answer = drip_until_answered(sock, b"x", bytes_at_most=60)  # never stalls for the 1 s per read
    assert answer.startswith(b"HTTP/1.1 408 ") and b"took longer than 1.5 s" in answer


def read_one_answer(sock: socket.socket) -> bytes:
    """One whole response (head and its content-length body) from a kept-alive connection."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(65536) or b"<closed>"
        assert not answer.endswith(b"<closed>"), answer
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


VIDEO_REFUSED_BY_ITS_QUERY = (
    b"POST /predict/video?fps=100 HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\nContent-Length: 200000\r\n\r\n"
)


def test_a_request_answered_before_its_body_gets_one_answer_and_the_connection_goes_on(server: AppServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(VIDEO_REFUSED_BY_ITS_QUERY)
        first = read_one_answer(sock)
        sock.sendall(b"\0" * 200_000)  # the body, after its answer: read and dropped, not taken for a head
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        second = read_one_answer(sock)
    assert first.startswith(b"HTTP/1.1 422 ") and b"fps may be at most" in first
    assert second.startswith(b"HTTP/1.1 200 "), second  # not a 431 for the body's bytes


def test_a_request_pipelined_behind_an_answered_requests_body_is_answered(server: AppServer) -> None:
    junk = b"\x89PNG" + b"\0" * 69_996  # with the dropped body, more than the 256 KiB a body may be
    pipelined = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 70000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(VIDEO_REFUSED_BY_ITS_QUERY)
        first = read_one_answer(sock)
        sock.sendall(b"\0" * 200_000 + pipelined + junk)  # the body's end and the next request, in one send
        second = read_one_answer(sock)
    assert first.startswith(b"HTTP/1.1 422 ")
    assert second.startswith(b"HTTP/1.1 400 ") and b"not a recognisable image" in second  # only the body counted


def test_a_connection_idle_after_an_answered_requests_body_is_closed_quietly(server: AppServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(VIDEO_REFUSED_BY_ITS_QUERY)
        first = read_one_answer(sock)
        sock.sendall(b"\0" * 200_000)
        idle = read_until_closed(sock)  # closed by the keep-alive timer, as after any answer
    assert first.startswith(b"HTTP/1.1 422 ")
    assert idle == b""  # not a 408 from the head deadline


def test_an_answered_requests_body_is_dropped_only_up_to_the_upload_limit(server: AppServer) -> None:
    head = b"POST /predict/video?fps=100 HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n" % 65536 + b"\0" * 65536 + b"\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + chunk)
        first = read_one_answer(sock)
        with contextlib.suppress(OSError):  # closed while we send: the point
            for _ in range(2 * UPLOAD_LIMIT // 65536):
                sock.sendall(chunk)
        sock.settimeout(5)  # half the 10 s drain deadline: only the byte limit closes it this soon
        rest = read_until_closed(sock)
    assert first.startswith(b"HTTP/1.1 422 ")
    assert rest == b""


def test_the_rest_of_an_answered_requests_body_has_a_deadline_and_no_second_answer(strict_server: AppServer) -> None:
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=30) as sock:
        sock.sendall(VIDEO_REFUSED_BY_ITS_QUERY + b"\0" * 1000)
        first = read_one_answer(sock)
        rest = read_until_closed(sock)  # the body never ends: closed after the 1 s head deadline
    assert first.startswith(b"HTTP/1.1 422 ")
    assert rest == b""  # no 408 for the same request


def test_a_client_that_pipelines_without_reading_is_disconnected(strict_server: AppServer) -> None:
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 200)
        answer = read_until_closed(sock)
    # Closed as soon as more than 4 wait unanswered: at most the one in progress and 4 queued were answered.
    assert answer.count(b"HTTP/1.1 200 ") <= 5
    assert get(f"{strict_server.url}/health").status_code == 200
    assert "Invalid HTTP request" not in strict_server.log()  # dropped on purpose, not a parse error


# Starlette's parser leaves the unterminated part's spooled file to the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_multipart_body_without_its_closing_boundary_is_malformed_not_missing(server: AppServer) -> None:
    body = b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="f.png"\r\n\r\n' + face_png()
    response = post(
        f"{server.url}/predict", content=body, headers={"content-type": "multipart/form-data; boundary=b0undary"}
    )
    check(response, 400, "closing boundary")


def test_an_oversized_chunked_body_gets_413_and_the_connection_is_closed(server: AppServer) -> None:
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n" % 65536 + b"\0" * 65536 + b"\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head)
        try:
            for _ in range(UPLOAD_LIMIT // 65536 + 2):  # past the limit, never the final chunk
                sock.sendall(chunk)
        except OSError:
            pass  # the server may close before we are done sending
        answer = read_until_closed(sock)  # returns only once the server closes the connection
    assert answer.startswith(b"HTTP/1.1 413 ") and b"connection: close" in answer.lower()
    assert b"the upload is larger than" in answer


def test_a_client_that_leaves_while_its_photo_is_prepared_stops_the_decode_and_is_counted_499() -> None:
    from models.config import EngineConfig
    from models.engine import Engine
    from tests.images import scene_with_face
    from tests.server import app_serving

    engine = Engine.load(SHIPPED_CHECKPOINT, EngineConfig(threads=1, prepare_workers=1))
    entered, stops = threading.Event(), []
    prepare = engine.prepare

    def held(data: bytes, **options: Any) -> Any:  # the photo's preparation, held until it is told to stop
        stops.append(options["stop"])
        entered.set()
        options["stop"].wait(30)
        return prepare(data, **options)

    engine.prepare = held  # type: ignore[method-assign]
    scene, _ = scene_with_face(300, 150, 100)
    photo = encode(Image.open(io.BytesIO(scene)), "PNG")  # over 64 KiB: a body the route watches
    assert len(photo) > 64 * 1024
    head = (
        "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(photo)}\r\nX-Request-ID: left-while-prepared\r\n\r\n"
    )
    with app_serving(engine) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(head.encode() + photo)
            assert entered.wait(30), "the photo never reached its preparation"
        server.wait_for_log(r"POST /predict 499 .* id=left-while-prepared")
    assert stops[0].is_set(), "the decode was not told to stop"

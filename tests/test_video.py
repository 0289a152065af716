"""Video: the tracker and its smoothing, `fer video`, and POST /predict/video, on clips made here."""

from __future__ import annotations

import asyncio
import csv
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cli.main import main as fer
from cli.video import csv_header
from models.checkpoint import CLASSES, SHIPPED_CHECKPOINT
from models.config import EngineConfig
from models.engine import Engine
from models.errors import InvalidVideoError, UnsupportedVideoError, VideoTooLargeError
from models.faces import FaceBox
from models.tracking import Tracker
from models.video import Timeline
from tests.images import face_png, write_clip
from tests.server import AppServer, app_serving, get, post

# The astronaut's face walking right across a 640×480 frame, 3 s at 10 frames/s.
WALK = [[(60 + 14 * i, 150)] for i in range(30)]
TWO = [[(80, 150), (420, 170)] for _ in range(20)]
# In view 1 s, gone 2 s (more than the tracker's 1 s gap), back at the same place for 1 s.
AWAY_AND_BACK = [[(200, 150)]] * 10 + [[]] * 20 + [[(200, 150)]] * 10


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    return {
        "walk": write_clip(folder / "walk.mp4", WALK),
        "two": write_clip(folder / "two.mp4", TWO),
        "away": write_clip(folder / "away.mp4", AWAY_AND_BACK),
        "empty": write_clip(folder / "empty.mp4", [[]] * 10),
    }


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    loaded = Engine.load(SHIPPED_CHECKPOINT, EngineConfig(max_video_seconds=60))
    yield loaded
    loaded.close()


def timeline_of(engine: Engine, path: Path, **options: float) -> Timeline:
    return asyncio.run(engine.classify_video(path, **options))  # type: ignore[arg-type]


# The tracker alone.


def box(x: int, y: int = 100, side: int = 80) -> FaceBox:
    return FaceBox(x, y, side, side)


def test_smoothing_is_an_exponential_average_over_time() -> None:
    tracker = Tracker(smooth_s=1.0, max_gap_s=5.0)
    first, second = np.eye(7)[3], np.eye(7)[4]
    tracker.update(0.0, 0, [(box(100), first)])
    tracker.update(0.5, 5, [(box(102), second)])
    tracker.update(2.5, 25, [(box(104), second)])
    points = tracker.tracks[0].points
    assert np.allclose(points[0].smoothed, first)
    weight = 1 - math.exp(-0.5)
    assert np.allclose(points[1].smoothed, first + weight * (second - first))
    later = points[1].smoothed + (1 - math.exp(-2.0)) * (second - points[1].smoothed)
    assert np.allclose(points[2].smoothed, later)
    assert np.allclose(points[2].probabilities, second)  # the raw ones are kept as they were
    assert np.isclose(points[2].smoothed.sum(), 1.0)


def test_without_smoothing_the_probabilities_pass_through() -> None:
    tracker = Tracker(smooth_s=0.0)
    for step in range(3):
        tracker.update(step * 0.2, step, [(box(100), np.eye(7)[step])])
    assert all(np.array_equal(p.smoothed, p.probabilities) for p in tracker.tracks[0].points)


def test_faces_keep_their_tracks_by_overlap_and_a_gap_ends_a_track() -> None:
    tracker = Tracker(smooth_s=1.0, max_gap_s=1.0)
    p = np.full(7, 1 / 7)
    assert tracker.update(0.0, 0, [(box(100), p), (box(400), p)]) == [1, 2]
    assert tracker.update(0.2, 1, [(box(410), p), (box(110), p)]) == [2, 1]  # listed in the other order
    assert tracker.update(0.4, 2, [(box(120), p)]) == [1]  # track 2 missed one frame...
    assert tracker.update(0.6, 3, [(box(420), p), (box(125), p)]) == [2, 1]  # ...and kept its id
    assert tracker.update(2.0, 4, [(box(130), p)]) == [3]  # 1.4 s unseen: a new track
    assert [len(track.points) for track in tracker.tracks] == [4, 3, 1]


# Through the engine.


def test_a_face_moving_across_the_frame_keeps_one_track(engine: Engine, clips: dict[str, Path]) -> None:
    timeline = timeline_of(engine, clips["walk"])
    assert timeline.fps == 5 and timeline.frames_analysed == 15 and timeline.duration_s == pytest.approx(3.0)
    (track,) = timeline.tracks
    assert len(track.points) == 15
    xs = [point.box.x for point in track.points]
    assert xs == sorted(xs) and xs[-1] - xs[0] > 300  # it really moved
    assert timeline.summaries[0].duration_s == pytest.approx(3.0)
    assert set(timeline.summaries[0].mean_probabilities) == set(CLASSES)


def test_two_faces_give_two_tracks(engine: Engine, clips: dict[str, Path]) -> None:
    timeline = timeline_of(engine, clips["two"], fps=2)
    assert timeline.fps == 2 and timeline.frames_analysed == 4
    assert [len(track.points) for track in timeline.tracks] == [4, 4]
    lefts = {track.id: {point.box.x < 320 for point in track.points} for track in timeline.tracks}
    assert lefts == {1: {True}, 2: {False}}


def test_a_face_that_leaves_and_returns_after_the_gap_is_a_new_track(engine: Engine, clips: dict[str, Path]) -> None:
    timeline = timeline_of(engine, clips["away"])
    first, second = timeline.tracks
    assert (first.first_s, first.last_s) == (0.0, pytest.approx(0.8))
    assert (second.first_s, second.last_s) == (pytest.approx(3.0), pytest.approx(3.8))


def test_a_video_without_faces_has_no_tracks(engine: Engine, clips: dict[str, Path]) -> None:
    timeline = timeline_of(engine, clips["empty"])
    assert timeline.frames_analysed == 5 and timeline.tracks == ()


def test_bad_videos_are_refused_with_their_reason(engine: Engine, clips: dict[str, Path], tmp_path: Path) -> None:
    not_video = tmp_path / "face.mp4"
    not_video.write_bytes(face_png(1))
    with pytest.raises(UnsupportedVideoError, match="MP4, MOV, WebM, MKV or AVI"):
        timeline_of(engine, not_video)
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(clips["walk"].read_bytes()[:3000])
    with pytest.raises(InvalidVideoError):
        timeline_of(engine, truncated)
    header_only = tmp_path / "header.mp4"
    header_only.write_bytes(clips["walk"].read_bytes()[:32])
    with pytest.raises(InvalidVideoError):
        timeline_of(engine, header_only)
    short = Engine.load(SHIPPED_CHECKPOINT, EngineConfig(max_video_seconds=1, threads=1, prepare_workers=1))
    try:
        with pytest.raises(VideoTooLargeError, match="over the limit of 1 s"):
            timeline_of(short, clips["walk"])
    finally:
        short.close()


# fer video.


def test_fer_video_writes_csv_jsonl_and_a_plot(clips: dict[str, Path], tmp_path: Path) -> None:
    table, lines, plot = tmp_path / "t.csv", tmp_path / "t.jsonl", tmp_path / "t.png"
    assert fer(["video", str(clips["two"]), "--output", str(table), "--plot", str(plot), "--fps", "2"]) == 0
    assert fer(["video", str(clips["two"]), "--output", str(lines), "--fps", "2", "--smooth", "0", "--progress"]) == 0
    with table.open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == csv_header(CLASSES)
    assert len(rows) == 8 and {row["track"] for row in rows} == {"1", "2"}
    assert [float(row["t"]) for row in rows] == sorted(float(row["t"]) for row in rows)
    assert all(abs(sum(float(row[name]) for name in CLASSES) - 1) < 1e-3 for row in rows)
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    assert len(records) == 8 and set(records[0]) == {
        "t", "frame", "track", "box", "label", "probabilities", "smoothed_label", "smoothed",
    }  # fmt: skip
    assert all(record["smoothed"] == record["probabilities"] for record in records)  # --smooth 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fer_video_refuses_a_bad_file_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_video = tmp_path / "x.mp4"
    not_video.write_bytes(b"hello, not a video at all")
    assert fer(["video", str(not_video), "--output", str(tmp_path / "t.csv")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    for not_a_file in (tmp_path, fifo):  # refused, not opened: reading a FIFO would wait for a writer forever
        assert fer(["video", str(not_a_file), "--output", str(tmp_path / "t.csv")]) == 2
        assert "not a regular file" in capsys.readouterr().err


# POST /predict/video.


@pytest.fixture(scope="module")
def video_server() -> Iterator[AppServer]:
    with app_serving(max_video_seconds=2.5, max_video_bytes=200_000) as server:
        yield server


def upload(server: AppServer, data: bytes, **params: object) -> tuple[int, dict[str, object]]:
    response = post(f"{server.url}/predict/video", files={"file": ("clip.mp4", data)}, params=params, timeout=60)
    return response.status_code, response.json()


def test_predict_video_answers_a_timeline(video_server: AppServer, clips: dict[str, Path]) -> None:
    status, body = upload(video_server, clips["two"].read_bytes(), fps=2, smooth_s=0.5)
    assert status == 200, body
    assert (body["fps"], body["frames_analysed"], body["smooth_s"], body["tta"]) == (2.0, 4, 0.5, "none")
    served = get(f"{video_server.url}/metrics").json()["served_precision"]
    assert body["model"]["precision"] == served  # type: ignore[index]
    # The raw body (Content-Type: video/*) gives the same answer as the multipart upload.
    raw = post(
        f"{video_server.url}/predict/video", content=clips["two"].read_bytes(), headers={"Content-Type": "video/mp4"},
        params={"fps": 2, "smooth_s": 0.5}, timeout=60,
    )  # fmt: skip
    assert raw.status_code == 200
    tracks = body["tracks"]

    def shape(tracks: list[dict[str, object]]) -> list[object]:  # what a face batched differently keeps exactly
        return [(t["id"], [(f["t"], f["box"], f["label"]) for f in t["frames"]]) for t in tracks]  # type: ignore[index, union-attr]

    assert shape(raw.json()["tracks"]) == shape(tracks)  # type: ignore[arg-type]
    for mine, theirs in zip(raw.json()["tracks"], tracks, strict=True):  # type: ignore[arg-type]
        for a, b in zip(mine["frames"], theirs["frames"], strict=True):  # type: ignore[index]
            assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-3)
    assert [track["id"] for track in tracks] == [1, 2]  # type: ignore[index]
    frame = tracks[0]["frames"][0]  # type: ignore[index]
    assert set(frame) == {"t", "frame", "box", "label", "probabilities", "smoothed"}
    assert set(frame["smoothed"]) == {"label", "probabilities"} and len(frame["box"]) == 4
    assert tracks[0]["summary"]["dominant"] in CLASSES  # type: ignore[index]


def test_predict_video_refuses_bad_input_with_the_right_status(video_server: AppServer, clips: dict[str, Path]) -> None:
    walk = clips["walk"].read_bytes()
    cases = {
        "empty": (b"", 400, "the upload is empty"),
        "not a video": (face_png(2), 415, "MP4, MOV, WebM, MKV or AVI"),
        "truncated": (walk[:3000], 400, "truncated or damaged"),
        "too long": (walk, 413, "over the limit of 2.5 s"),
        "too many bytes": (walk + bytes(200_000), 413, "larger than 200,000 bytes"),
    }
    for name, (data, expected, words) in cases.items():
        status, body = upload(video_server, data)
        assert (status, words in str(body.get("detail"))) == (expected, True), (name, body)
    status, body = upload(video_server, clips["empty"].read_bytes())
    assert (status, body["tracks"]) == (200, [])
    status, body = upload(video_server, clips["empty"].read_bytes(), fps=30)
    assert status == 422 and "at most 5" in json.dumps(body)


def test_cancelling_an_analysis_stops_it_and_leaves_nothing_queued(engine: Engine, tmp_path: Path) -> None:
    long_walk = write_clip(tmp_path / "long.mp4", WALK * 8)  # 24 s: 120 analysed frames
    seen: list[int] = []

    async def cancel_after_two_frames() -> None:
        analysis = asyncio.ensure_future(
            engine.classify_video(long_walk, on_frame=lambda frame, faces: seen.append(frame.index))
        )
        deadline = time.monotonic() + 60
        while len(seen) < 2 and not analysis.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert len(seen) >= 2, "the analysis ended before two frames were in"
        analysis.cancel()
        with pytest.raises(asyncio.CancelledError):
            await analysis

    asyncio.run(cancel_after_two_frames())
    assert 2 <= len(seen) < 120
    # Its faces still queued were cancelled: the batcher drops them as it reaches them.
    deadline = time.monotonic() + 30
    while engine.queue_depth and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.queue_depth == 0
    # The engine is still whole: the next video is analysed in full.
    assert timeline_of(engine, long_walk, fps=1).frames_analysed == 24


def test_a_client_that_leaves_a_video_request_is_logged_as_499_and_the_next_is_served(
    clips: dict[str, Path], tmp_path: Path
) -> None:
    import socket

    long_walk = write_clip(tmp_path / "long.mp4", WALK * 8).read_bytes()
    with app_serving(max_video_seconds=60) as server:
        head = (
            f"POST /predict/video HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\n"
            f"Content-Length: {len(long_walk)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as client:
            client.sendall(head + long_walk)
            wait_for_gauge(server, "fer_video_jobs 1.0")  # it holds a job: gone during the upload or the analysis
        server.wait_for_log(r"POST /predict/video 499")
        status, body = upload(server, clips["two"].read_bytes())  # and it serves the next one
        assert status == 200 and len(body["tracks"]) == 2  # type: ignore[arg-type]


def test_slow_uploads_hold_an_upload_slot_not_an_analysis_slot(clips: dict[str, Path]) -> None:
    import socket

    walk = clips["walk"].read_bytes()
    with app_serving(max_video_uploads=1, max_video_jobs=1) as server:
        head = (
            f"POST /predict/video HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\nContent-Length: {len(walk)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as slow:
            slow.sendall(head + walk[:1000])  # holds the one upload slot while its body is unfinished
            wait_for_gauge(server, "fer_video_uploads 1.0")
            status, body = upload(server, walk)
            assert status == 503 and "already receiving 1 video uploads" in str(body["detail"])
            assert "fer_video_jobs 0.0" in get(f"{server.url}/metrics/prometheus").text  # no analysis slot held
        wait_for_gauge(server, "fer_video_uploads 0.0")
        assert upload(server, clips["two"].read_bytes(), fps=2)[0] == 200


def wait_for_gauge(server: AppServer, line: str, deadline_s: float = 30.0) -> None:
    """Return once /metrics/prometheus shows `line`; fail after `deadline_s`."""
    end = time.monotonic() + deadline_s
    while line not in get(f"{server.url}/metrics/prometheus").text:
        assert time.monotonic() < end, f"{line!r} never showed in /metrics/prometheus"
        time.sleep(0.01)

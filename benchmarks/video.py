"""Video: `fer video`'s speed, flicker raw vs smoothed, accuracy on a kdef-dev clip, and /predict/video's cost.

python -m benchmarks.video --json benchmarks/results/video.json

Clips are made here, in a temporary folder, and deleted: the astronaut (tests/data) for speed,
and for flicker and accuracy one kdef-dev person's frontal photos, never copied anywhere else.
- Speed: 640×480, 10 s at 25 frames/s, one face and three faces; `Engine.classify_video` at the
  default 5 analysed frames/s (what `fer video` runs), analysed frames per second of wall time.
- Flicker: one kdef-dev photo held 10 s with a little camera motion (a 4-px sway and a slow
  zoom) and sensor noise; label changes per second of the track's raw and smoothed labels.
- Accuracy: one person's seven frontal expressions, 2 s each, with the same motion: one track
  for the clip?, each 2-s segment's dominant smoothed label against its true one, and the same
  seven photos sent one by one through `Engine.classify`.
- The service: POST /predict/video with a 30 s 640×480 clip (one face), seconds to answer and
  the server's peak RSS; and a 5 s 3840×2160 clip's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from benchmarks.http import free_port, start_server
from benchmarks.machine import machine_line, write_results
from models.checkpoint import SHIPPED_CHECKPOINT
from models.engine import Engine, EngineConfig
from models.video import Timeline

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.images import astronaut_head  # noqa: E402

KDEF_EXPRESSIONS = {
    "AF": "fear",
    "AN": "angry",
    "DI": "disgust",
    "HA": "happy",
    "NE": "neutral",
    "SA": "sad",
    "SU": "surprise",
}


def moving(image: np.ndarray, index: int, fps: float, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """`image` (BGR) on a 640×480 canvas with a 4-px sway, a slow 5% zoom and a little sensor noise."""
    t = index / fps
    zoom = 1.0 + 0.05 * math.sin(2 * math.pi * t / 6)
    dx, dy = 4 * math.sin(2 * math.pi * t / 1.7), 3 * math.cos(2 * math.pi * t / 2.3)
    width, height = size
    matrix = cv2.getRotationMatrix2D(
        (image.shape[1] / 2, image.shape[0] / 2), 0, zoom * min(width / image.shape[1], height / image.shape[0])
    )
    matrix[:, 2] += (width / 2 - image.shape[1] / 2 + dx, height / 2 - image.shape[0] / 2 + dy)
    frame = cv2.warpAffine(image, matrix, size, borderMode=cv2.BORDER_REPLICATE)
    noise = rng.normal(0, 3, frame.shape)
    return np.clip(frame + noise, 0, 255).astype(np.uint8)


def write_video(path: Path, frames: Any, fps: float, size: tuple[int, int]) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def faces_clip(
    path: Path, count: int, seconds: float = 10, fps: float = 25, size: tuple[int, int] = (640, 480)
) -> Path:
    head = cv2.cvtColor(np.asarray(astronaut_head(80)), cv2.COLOR_RGB2BGR)
    places = [(40 + i * 200, 150) for i in range(count)]

    def frames() -> Any:
        for index in range(int(seconds * fps)):
            frame = np.full((size[1], size[0], 3), (140, 130, 120), np.uint8)
            for n, (x, y) in enumerate(places):
                shift = int(20 * math.sin(index / fps + n))
                frame[y + shift : y + shift + head.shape[0], x : x + head.shape[1]] = head
            yield frame

    return write_video(path, frames(), fps, size)


def run(engine: Engine, path: Path, **options: Any) -> tuple[Timeline, float]:
    started = time.perf_counter()
    timeline = asyncio.run(engine.classify_video(path, **options))
    return timeline, time.perf_counter() - started


def label_changes_per_s(labels: list[str], seconds: float) -> float:
    return sum(a != b for a, b in zip(labels, labels[1:], strict=False)) / seconds


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def post_video(port: int, path: Path) -> tuple[int, float]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict/video", data=path.read_bytes(), headers={"Content-Type": "video/mp4"}
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return status, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--kdef", type=Path, default=Path(os.environ.get("KDEF_DIR", ROOT.parent / "shared/datasets/kdef-dev"))
    )
    parser.add_argument("--person", default="AF01", help="kdef-dev session and person of the accuracy clip")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    print(machine_line())
    results: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="fer-video-bench-"))
    engine = Engine.load(SHIPPED_CHECKPOINT, EngineConfig(max_video_seconds=600))
    try:
        print(f"engine precision {engine.precision}")
        for count in (1, 3):
            clip = faces_clip(work / f"faces{count}.mp4", count)
            run(engine, clip)  # warm
            timeline, seconds = run(engine, clip)
            rate = timeline.frames_analysed / seconds
            results[f"fps_{count}_faces"] = rate
            print(f"fer video, 640x480, {count} face(s), 10 s at 25 fps: {timeline.frames_analysed} frames analysed "
                  f"in {seconds:.2f} s = {rate:.1f} frames/s ({len(timeline.tracks)} track(s))")  # fmt: skip

        if (args.kdef / "happy").is_dir():
            rng = np.random.default_rng(0)
            fps = 25.0
            photos = {
                code: cv2.imread(str(next(args.kdef.glob(f"*/{args.person}{code}S.JPG")))) for code in KDEF_EXPRESSIONS
            }
            held = write_video(
                work / "held.mp4",
                (moving(photos["HA"], i, fps, rng, (640, 480)) for i in range(int(10 * fps))),
                fps,
                (640, 480),
            )
            timeline, _ = run(engine, held)
            points = [p for track in timeline.tracks for p in track.points]
            raw = [timeline.classes[int(p.probabilities.argmax())] for p in points]
            smooth = [timeline.classes[int(p.smoothed.argmax())] for p in points]
            results["flicker"] = {
                "tracks": len(timeline.tracks),
                "raw_changes_per_s": label_changes_per_s(raw, 10),
                "smoothed_changes_per_s": label_changes_per_s(smooth, 10),
            }
            print(f"flicker, {args.person} happy held 10 s with motion and noise: {len(timeline.tracks)} track(s); label changes/s "
                  f"raw {results['flicker']['raw_changes_per_s']:.2f}, smoothed {results['flicker']['smoothed_changes_per_s']:.2f}")  # fmt: skip
            for smooth_s in (0.5, 1.0, 2.0):
                timeline, _ = run(engine, held, smooth_s=smooth_s)
                smooth = [timeline.classes[int(p.smoothed.argmax())] for track in timeline.tracks for p in track.points]
                print(f"  smoothed over {smooth_s:g} s: {label_changes_per_s(smooth, 10):.2f} changes/s")

            order = list(KDEF_EXPRESSIONS)
            frames = (moving(photos[code], i, fps, rng, (640, 480)) for code in order for i in range(int(2 * fps)))
            sequence = write_video(work / "sequence.mp4", frames, fps, (640, 480))
            timeline, _ = run(engine, sequence)
            segments = []
            for n, code in enumerate(order):
                inside = [p for track in timeline.tracks for p in track.points if 2 * n <= p.t < 2 * n + 2]
                mean = np.mean([p.smoothed for p in inside], axis=0)
                segments.append((KDEF_EXPRESSIONS[code], timeline.classes[int(mean.argmax())]))
            video_right = sum(true == said for true, said in segments)

            async def one_by_one() -> list[str]:
                labels = []
                for code in order:
                    ok, data = cv2.imencode(".jpg", photos[code])
                    answer = await engine.classify(data.tobytes())
                    labels.append(answer.faces[0].prediction.label)
                return labels

            singles = asyncio.run(one_by_one())
            single_right = sum(KDEF_EXPRESSIONS[c] == said for c, said in zip(order, singles, strict=True))
            results["accuracy"] = {
                "tracks": len(timeline.tracks),
                "segments": segments,
                "video_right": video_right,
                "photos": singles,
                "photos_right": single_right,
            }
            print(f"accuracy, {args.person} seven frontal expressions 2 s each: {len(timeline.tracks)} track(s); dominant smoothed label "
                  f"right in {video_right}/7 segments; the photos one by one: {single_right}/7")  # fmt: skip
            for (true, said), single in zip(segments, singles, strict=True):
                print(f"  {true:<9} video {said:<9} photo {single}")
        else:
            print(f"no kdef-dev at {args.kdef}: flicker and accuracy skipped")
    finally:
        engine.close()

    long_clip = faces_clip(work / "long.mp4", 1, seconds=30)
    big_clip = faces_clip(work / "4k.mp4", 1, seconds=5, size=(3840, 2160))
    port = free_port()
    env = {
        **os.environ,
        "FER_PORT": str(port),
        "FER_LOG_LEVEL": "warning",
        "FER_MAX_VIDEO_BYTES": str(500 * 1024 * 1024),
    }
    server, _ = start_server([sys.executable, "-m", "app"], env, port, "/ready")
    try:
        status, seconds = post_video(port, long_clip)
        rss = peak_rss_mb(server.pid)
        results["service_30s"] = {
            "status": status,
            "seconds": seconds,
            "peak_rss_mb": rss,
            "bytes": long_clip.stat().st_size,
        }
        print(
            f"POST /predict/video, 30 s 640x480 clip ({long_clip.stat().st_size / 1e6:.1f} MB): {status} in {seconds:.2f} s; peak RSS {rss:.0f} MB"
        )
        status, seconds = post_video(port, big_clip)
        rss = peak_rss_mb(server.pid)
        results["service_4k"] = {
            "status": status,
            "seconds": seconds,
            "peak_rss_mb": rss,
            "bytes": big_clip.stat().st_size,
        }
        print(
            f"POST /predict/video, 5 s 3840x2160 clip ({big_clip.stat().st_size / 1e6:.1f} MB): {status} in {seconds:.2f} s; peak RSS since start {rss:.0f} MB"
        )
    finally:
        server.terminate()
        server.wait()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    write_results(args.json, **results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

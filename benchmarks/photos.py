"""The photo path on real photos, YuNet (served) and Haar (the old default) side by side, in one run.

1. kdef-dev through the engine (decode → detect → frame → classify), per angle and per class:
   detection rate, false extra faces (faces=all), accuracy, ms per photo at one client.
2. The service end to end (`python -m app` with each detector, driven by `benchmarks.loadgen`):
   requests/s at 8 clients and latency at one client, for a kdef-dev photo, a 12-megapixel JPEG
   and a 48×48 face crop.

python -m benchmarks.photos --kdef ../shared/datasets/kdef-dev --json benchmarks/results/photos.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import cv2
from PIL import Image

from benchmarks.http import BOUNDARY, free_port, measure, multipart, start_server
from benchmarks.machine import machine_line, write_results
from benchmarks.workloads import ASTRONAUT, face_jpeg_48
from models.checkpoint import SHIPPED_CHECKPOINT
from models.config import EngineConfig
from models.detectors import DetectorName
from models.engine import Engine

ANGLES = ("S", "HL", "HR")


def phone_jpeg() -> bytes:
    """A 4032×3024 (12-megapixel) JPEG with one face, as a phone writes: quality 90, 4:2:0."""
    scene = Image.new("RGB", (4032, 3024), (120, 130, 140))
    portrait = Image.open(ASTRONAUT).convert("RGB").resize((1800, 1800), Image.Resampling.BICUBIC)
    scene.paste(portrait, (1100, 600))
    buffer = io.BytesIO()
    scene.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


async def classify_all(engine: Engine, photos: list[tuple[Path, str]]) -> list[dict[str, Any]]:
    """One row per photo: its angle, label, faces found, whether the largest was right, ms taken."""
    rows = []
    for path, label in photos:
        data = path.read_bytes()
        started = time.perf_counter()
        answer = await engine.classify(data, all_faces=True)
        elapsed_ms = (time.perf_counter() - started) * 1000
        found = answer.search.found if answer.search else 0
        largest = answer.faces[0]
        rows.append(
            {
                "angle": path.stem[6:],
                "label": label,
                "found": found,
                "correct": largest.box is not None and largest.prediction.label == label,
                "ms": elapsed_ms,
            }
        )
    return rows


def kdef_table(rows_by_detector: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Per angle and per class, each detector's detection rate, extra faces, accuracy and time."""
    lines = [
        "| detector | group | photos | face found | false extra faces | accuracy | ms per photo (median) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, rows in rows_by_detector.items():
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            groups[row["angle"]].append(row)
            groups[row["label"]].append(row)
            groups["all"].append(row)
        order = [*ANGLES, *sorted(k for k in groups if k not in (*ANGLES, "all")), "all"]
        for group in order:
            members = groups[group]
            times = sorted(row["ms"] for row in members)
            lines.append(
                f"| {name} | {group} | {len(members)} | {sum(row['found'] > 0 for row in members) / len(members):.3f} | "
                f"{sum(max(0, row['found'] - 1) for row in members)} | "
                f"{sum(row['correct'] for row in members) / len(members):.3f} | {times[len(times) // 2]:.1f} |"
            )
    return lines


def view_recalls(rows_by_detector: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Per detector and view (frontal, half profile): accuracy and each class's recall (a missed face counts as wrong)."""
    classes = sorted({row["label"] for rows in rows_by_detector.values() for row in rows})
    lines = [
        f"| detector | view | accuracy | {' | '.join(classes)} |",
        f"| --- | --- | ---: |{' ---: |' * len(classes)}",
    ]
    for name, rows in rows_by_detector.items():
        for view, angles in (("frontal", ("S",)), ("half profile", ("HL", "HR"))):
            members = [row for row in rows if row["angle"] in angles]
            recalls = []
            for label in classes:
                of_class = [row["correct"] for row in members if row["label"] == label]
                recalls.append(f"{sum(of_class) / len(of_class):.2f}" if of_class else "-")
            accuracy = sum(row["correct"] for row in members) / len(members) if members else float("nan")
            lines.append(f"| {name} | {view} | {accuracy:.3f} | {' | '.join(recalls)} |")
    return lines


def main() -> int:
    """Run both parts and print the tables (and the JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kdef", type=Path, default=Path(os.environ.get("KDEF_DIR", "../shared/datasets/kdef-dev")))
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per point")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    print(machine_line(), f"opencv {cv2.__version__}")
    if not args.kdef.is_dir():
        parser.error(f"{args.kdef}: no kdef-dev here (set KDEF_DIR or --kdef)")
    photos = sorted((path, path.parent.name) for path in args.kdef.glob("*/*.JPG"))
    # The Haar path needs OpenCV 4.x (5.x dropped CascadeClassifier): without it, YuNet alone.
    detectors: tuple[DetectorName, ...] = ("yunet", "haar") if hasattr(cv2, "CascadeClassifier") else ("yunet",)
    if len(detectors) == 1:
        print(f"OpenCV {cv2.__version__} has no CascadeClassifier: the Haar path is not measured")
    rows_by_detector = {}
    for name in detectors:
        engine = Engine.load(SHIPPED_CHECKPOINT, EngineConfig(detector=name))
        engine.warm_up()
        try:
            rows_by_detector[name] = asyncio.run(classify_all(engine, photos))
        finally:
            engine.close()
    table = kdef_table(rows_by_detector)
    print("\n".join(table))
    recalls = view_recalls(rows_by_detector)
    print("\n".join(recalls))

    workdir = Path(tempfile.mkdtemp(prefix="fer-photos-"))
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    bodies = {
        "kdef photo 562x762": multipart("file", [photos[0][0].read_bytes()]),
        "phone JPEG 4032x3024": multipart("file", [phone_jpeg()]),
        "face crop 48x48": multipart("file", [face_jpeg_48()]),
    }
    workloads = []
    for workload, body in bodies.items():
        (workdir / workload.replace(" ", "_")).write_bytes(body)
        workloads.append((workload, "/predict", workdir / workload.replace(" ", "_"), content_type))
    service_rows: list[dict[str, Any]] = []
    for name in detectors:
        port = free_port()
        env = {**os.environ, "FER_PORT": str(port), "FER_DETECTOR": name, "FER_LOG_LEVEL": "warning"}
        process, cold_start_s = start_server([sys.executable, "-m", "app"], env, port, "/ready")
        print(f"service with {name}: cold start to /ready {cold_start_s:.2f} s")
        try:
            service_rows += measure(name, process, port, workloads, args.duration, concurrencies=(1, 8))
        finally:
            process.terminate()
            process.wait()
    write_results(args.json, kdef=rows_by_detector, kdef_table=table, kdef_recalls=recalls, service=service_rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

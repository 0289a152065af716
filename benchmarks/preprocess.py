"""Preprocessing cost per image: a 48×48 JPEG face crop and a 640×480 photo, stage by stage.

python -m benchmarks.preprocess
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageOps

from benchmarks.machine import machine_line, write_results
from benchmarks.workloads import face_jpeg_48, photo_jpeg_640
from models.faces import FaceDetector
from models.preprocessing import PreprocessingSpec, decode_image, preprocess, to_grayscale


def microseconds(action: Callable[[], object], repeats: int) -> float:
    action()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6


def stages(data: bytes, repeats: int) -> dict[str, float]:
    spec = PreprocessingSpec()
    detector = FaceDetector()
    image = decode_image(data)
    gray = to_grayscale(image)

    def decode_only() -> None:
        raw = Image.open(io.BytesIO(data))
        raw.load()

    face = detector.find_faces(image)
    crop = face[0].image if face else gray
    result = {
        "decode": microseconds(decode_only, repeats),
        "orientation": microseconds(lambda: ImageOps.exif_transpose(image), repeats),
        "grayscale": microseconds(lambda: to_grayscale(image), repeats),
        "face detection": microseconds(lambda: detector.find_faces(image), repeats),
        "resize + normalise": microseconds(lambda: preprocess(crop, spec), repeats),
    }
    result["total (decode → tensor)"] = microseconds(
        lambda: [preprocess(f.image, spec) for f in detector.find_faces(decode_image(data))], repeats
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200, help="timed repetitions per stage")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    print(machine_line())
    results = {
        "48x48 JPEG": stages(face_jpeg_48(), args.repeats),
        "640x480 photo": stages(photo_jpeg_640(), max(20, args.repeats // 10)),
    }
    for name, figures in results.items():
        print(f"{name}:")
        for stage, value in figures.items():
            print(f"  {stage:<24} {value:>9.0f} µs")
    write_results(args.json, microseconds=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

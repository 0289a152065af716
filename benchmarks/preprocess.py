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

import numpy as np
import torch
from PIL import Image, ImageOps

from benchmarks.machine import machine_line, write_results
from benchmarks.workloads import face_jpeg_48, photo_jpeg_640
from models.config import ENGINE_DEFAULTS
from models.decoding import decode_image, decode_photo, is_face_crop_size
from models.face_pipeline import FacePolicy, search_faces
from models.faces import detect_faces, frame_face
from models.preprocessing import PreprocessingSpec, preprocess, to_grayscale, to_rgb
from models.yunet import YuNetDetector


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
    detector = YuNetDetector()
    defaults = ENGINE_DEFAULTS
    policy = FacePolicy.of(defaults, all_faces=False)
    image = decode_image(data)
    rgb = np.asarray(to_rgb(image))

    def decode_only() -> None:
        raw = Image.open(io.BytesIO(data))
        raw.load()

    def search(decoded: Image.Image, scale: float = 1.0) -> list[torch.Tensor]:
        if is_face_crop_size(*decoded.size):
            return [preprocess(decoded, spec)]
        size = (round(decoded.width * scale), round(decoded.height * scale))
        faces, _, gray = search_faces(decoded, scale, size, detector, policy, spec)
        return [face.inputs for face in faces] or [preprocess(gray, spec)]

    found = detect_faces(detector, rgb, policy.detect_max_side)
    crop = frame_face(np.asarray(to_grayscale(image)), found[0], detector.framing) if found else image
    result = {
        "decode": microseconds(decode_only, repeats),
        "orientation": microseconds(lambda: ImageOps.exif_transpose(image), repeats),
        "grayscale": microseconds(lambda: to_grayscale(image), repeats),
        "face search (YuNet)": microseconds(lambda: detect_faces(detector, rgb, policy.detect_max_side), repeats),
        "resize + normalise": microseconds(lambda: preprocess(crop, spec), repeats),
    }
    max_side = ENGINE_DEFAULTS.decode_max_side

    def total() -> list[torch.Tensor]:
        photo = decode_photo(data, max_side=max_side)
        return search(photo.image, photo.scale)

    result["total (decode → tensor)"] = microseconds(total, repeats)
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

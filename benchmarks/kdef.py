"""Checkpoints side by side on kdef-dev's detected faces: accuracy per angle, recall per class and angle.

The faces are found and cut once, the way the service does it (the engine's decode → YuNet →
framing → preprocessing, the largest face of each photo), and kept in `.cache/kdef-faces.npz`;
each checkpoint then classifies the same 840 model inputs in fp32. This is the quick yardstick
for choosing a training recipe; `benchmarks.photos` measures the shipped model through the whole
engine. kdef-dev is for measuring only: nothing here trains on it.

`--facex` also scores the distillation teacher (training/teacher_facex.py) on the same 48-px
faces, fed as training feeds it FER2013's: what the teacher can know about a face at the
resolution the student learns from (it needs the `teacher` extra and facex, as `make install`
puts them in).

python -m benchmarks.kdef models/checkpoint.pth runs/ferplus/checkpoint.pth [--facex]
"""

from __future__ import annotations

import argparse
import hashlib
import os
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

import models
from benchmarks.machine import machine_line
from models.checkpoint import SHIPPED_CHECKPOINT, load_checkpoint
from models.config import EngineConfig
from models.engine import Engine
from models.face_pipeline import FacePolicy
from models.predictor import Predictor
from models.preprocessing import PreprocessingSpec

HALF_PROFILE = ("HL", "HR")
CACHE = Path(".cache/kdef-faces.npz")


def photo_list(kdef_dir: Path) -> list[tuple[Path, str]]:
    """(photo, class folder) for every kdef-dev JPEG, in sorted order."""
    return sorted((path, path.parent.name) for path in kdef_dir.glob("*/*.JPG"))


def inference_core_digest() -> str:
    """A digest of what cuts the faces: the inference core's source (`models/*.py`), its ONNX files
    (YuNet among them), the engine's face settings and the versions of the libraries it decodes with.

    Part of the cache key: a cache written before a change to how the engine decodes, finds or
    cuts faces would otherwise be read back as if it were today's faces. That happened once: the
    cache the issue-33 runs were compared on predated issue 29's engine (whose numpy inputs the
    uncached path then failed on), and gave the shipped checkpoint two frontal photos fewer than
    the faces the engine cuts now (docs/training.md, D14).
    """
    config = EngineConfig()
    # The engine's own face policy, and what finds and decodes (threads, queues and limits cut the same faces).
    settings = (FacePolicy.of(config, all_faces=True), config.detector, config.detector_model, config.decode_max_side)
    versions = [metadata.version(name) for name in ("numpy", "pillow", "onnxruntime")]
    digest = hashlib.sha256(repr((settings, versions)).encode())
    core = Path(models.__file__).parent
    for source in sorted([*core.glob("*.py"), *core.glob("*.onnx")]):
        digest.update(source.name.encode() + source.read_bytes())
    return digest.hexdigest()


def detected_faces(kdef_dir: Path, cache: Path = CACHE) -> tuple[torch.Tensor, list[str], list[str], np.ndarray]:
    """(model inputs (N, 1, 48, 48) float32, labels, angles, face found (N,) bool), cached by the file list,
    the preprocessing spec and the inference core that cut them."""
    photos = photo_list(kdef_dir)
    spec = load_checkpoint(SHIPPED_CHECKPOINT).preprocessing  # the cut faces are this spec's model input
    listing = "".join(f"{p.name}{p.stat().st_size}" for p, _ in photos) + repr(sorted(spec.to_dict().items()))
    key = hashlib.sha256((listing + inference_core_digest()).encode()).hexdigest()[:12]
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as stored:
            if str(stored["key"]) == key:
                return (
                    torch.from_numpy(stored["inputs"]),
                    [str(v) for v in stored["labels"]],
                    [str(v) for v in stored["angles"]],
                    stored["found"],
                )
    engine = Engine.load(SHIPPED_CHECKPOINT, EngineConfig())
    try:
        prepared = [engine.prepare(path.read_bytes(), all_faces=True, require_face=False) for path, _ in photos]
    finally:
        engine.close()
    inputs = np.stack([image.faces[0].inputs for image in prepared])  # numpy since issue 29
    found = np.array([image.faces[0].detected is not None for image in prepared])
    labels = [label for _, label in photos]
    angles = [path.stem[6:] for path, _ in photos]
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, key=key, inputs=inputs, labels=labels, angles=angles, found=found)
    return torch.from_numpy(inputs), labels, angles, found


def recall_table(
    predicted: list[str], labels: list[str], angles: list[str], found: np.ndarray, classes: tuple[str, ...]
) -> dict[str, dict[str, float]]:
    """Per view (frontal, half profile): accuracy and each class's recall; a photo with no face counts as wrong."""
    table: dict[str, dict[str, float]] = {}
    for view, members in (("frontal", ("S",)), ("half_profile", HALF_PROFILE)):
        rows = [i for i, angle in enumerate(angles) if angle in members]
        right = [bool(found[i]) and predicted[i] == labels[i] for i in rows]
        figures = {"accuracy": sum(right) / len(rows)}
        for name in classes:
            picked = [r for r, i in zip(right, rows, strict=True) if labels[i] == name]
            figures[name] = sum(picked) / len(picked) if picked else float("nan")
        table[view] = figures
    return table


def print_table(title: str, table: dict[str, dict[str, float]], classes: tuple[str, ...]) -> None:
    """One markdown table: accuracy and per-class recall for each view."""
    print(f"\n{title}")
    print(f"| view | accuracy | {' | '.join(classes)} |")
    print(f"| --- | ---: |{' ---: |' * len(classes)}")
    for view, figures in table.items():
        recalls = " | ".join(f"{figures[name]:.2f}" for name in classes)
        print(f"| {view} | {figures['accuracy']:.3f} | {recalls} |")


def facex_on_faces(inputs: torch.Tensor, spec: PreprocessingSpec, model_file: Path) -> np.ndarray:
    """facex's probabilities (N, 7) for the model inputs (N, 1, 48, 48), turned back into grey uint8 faces."""
    from training.teacher_facex import FacexModel  # noqa: PLC0415 (training-only extra)

    faces = ((inputs[:, 0].numpy() * spec.std + spec.mean) * 255.0).round().clip(0, 255).astype(np.uint8)
    model = FacexModel(model_file)
    return np.stack([model.probabilities(face) for face in faces])


def main() -> int:
    """Print each checkpoint's table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", type=Path, nargs="*", default=[SHIPPED_CHECKPOINT])
    parser.add_argument("--kdef", type=Path, default=Path(os.environ.get("KDEF_DIR", "../shared/datasets/kdef-dev")))
    parser.add_argument("--tta", default="none", choices=("none", "flip", "tencrop"), help="test-time augmentation")
    parser.add_argument("--facex", action="store_true", help="also score the facex teacher on the same 48-px faces")
    args = parser.parse_args()
    if not args.kdef.is_dir():
        parser.error(f"{args.kdef}: no kdef-dev here (set KDEF_DIR or --kdef)")
    facex_file = None
    if args.facex:
        from training.teacher_facex import facex_model_file  # noqa: PLC0415 (training-only extra)

        try:
            facex_file = facex_model_file()  # before the checkpoints' tables, not after
        except FileNotFoundError as exc:
            parser.error(str(exc))
    print(machine_line())
    inputs, labels, angles, found = detected_faces(args.kdef)
    print(f"{len(labels)} photos, a face found in {found.mean():.3f}")
    shipped_spec = load_checkpoint(SHIPPED_CHECKPOINT).preprocessing
    for path in args.checkpoints:
        predictor = Predictor.from_checkpoint(path, precision="fp32", tta=args.tta)
        if predictor.checkpoint.preprocessing != shipped_spec:
            print(f"\n{path}: other preprocessing than the cached faces were cut with; not measured")
            continue
        probabilities = predictor.predict_tensors(inputs)
        predicted = [predictor.classes[i] for i in probabilities.argmax(1)]
        table = recall_table(predicted, labels, angles, found, predictor.classes)
        print_table(f"{path} (fp32, tta {args.tta})", table, predictor.classes)
    if facex_file is not None:
        from training.teacher_facex import FACEX_CLASSES  # noqa: PLC0415 (training-only extra)

        probabilities = facex_on_faces(inputs, shipped_spec, facex_file)
        predicted = [FACEX_CLASSES[i] for i in probabilities.argmax(1)]
        table = recall_table(predicted, labels, angles, found, FACEX_CLASSES)
        print_table(
            "facex on the same 48-px faces (the face and its mirror image, as a teacher file)", table, FACEX_CLASSES
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

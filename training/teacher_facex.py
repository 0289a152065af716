"""Write a teacher file (training/teacher.py) from the `facex` package's expression model.

facex (PyPI `facex` 1.1.0, MIT licence, Hasby Fahrudin) ships a TensorFlow Lite classifier of
the same seven classes in the same order as ours, trained on photos (its training data is not
stated). On kdef-dev's detected faces it reads turned disgust and fear far better than the
FER2013 network (docs/training.md), while it scores only about 0.44 on FER2013's own 48-px val
crops: real-photo knowledge that FER2013's labels do not carry.

Only training uses it, never the service. Its model file is read from the installed wheel, so
nothing is downloaded at run time and nothing of it enters the repository. facex itself imports
TensorFlow and OpenCV; only its model file is needed here, run by LiteRT:

    pip install --no-deps facex==1.1.0 && pip install ai-edge-litert      # make install does both
    python -m training.teacher_facex --out runs/teacher-facex.npz

Each image goes in as facex feeds its own crops: grey, resized to 200×200, repeated over three
channels, scaled to [0, 1]; the probabilities of the image and of its mirror image are averaged.
With `--turned-views`, every image also gets one turned view (training/teacher.py): the face
with the head turned by a keystone warp of 0.2-0.45 to a random side (`training.augment`'s), and
facex's probabilities for that view, moved to the class mix of its probabilities for the faces
themselves (`training.teacher.calibrated`).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.preprocessing import PreprocessingSpec
from training.augment import turned_faces
from training.data import default_data_dir, load_split, save_npz_atomically
from training.helpformat import DefaultsHelpFormatter
from training.teacher import calibrated, check_temperature

logger = logging.getLogger("training.teacher_facex")

FACEX_MODEL = "assets/model_optimized.tflite"
FACEX_CLASSES = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")  # its order, our names
FACEX_SIDE = 200
TURN_RANGE = (0.2, 0.45)  # the turned end of the training keystone (up to 0.4 in the R10 runs)
INSTALL = "pip install --no-deps facex==1.1.0 && pip install ai-edge-litert"


def facex_model_file() -> Path:
    """The installed facex wheel's model file, found without importing facex (which imports TensorFlow).

    Raises:
        FileNotFoundError: facex is not installed, or its wheel has no model file.
    """
    spec = importlib.util.find_spec("facex")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the facex package is not installed: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / FACEX_MODEL
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the installed facex has no model file (facex 1.1.0 has one)")
    return path


class FacexModel:
    """facex's classifier in LiteRT: grey 48-px (or any size) faces in, seven probabilities out."""

    def __init__(self, model_file: Path, threads: int = 1) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415 (training-only dependency)
        except ImportError:
            raise FileNotFoundError(f"LiteRT is not installed: {INSTALL}") from None
        self._interpreter = Interpreter(model_path=str(model_file), num_threads=threads)
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]

    def probabilities(self, face: np.ndarray) -> np.ndarray:
        """(7,) float32 for one grey uint8 face (H, W): the mean over the face and its mirror image."""
        resized = np.asarray(
            Image.fromarray(face).resize((FACEX_SIDE, FACEX_SIDE), Image.Resampling.BILINEAR), np.float32
        )
        resized /= 255.0
        total = np.zeros(len(FACEX_CLASSES), np.float64)
        for view in (resized, resized[:, ::-1]):
            batch = np.ascontiguousarray(np.repeat(view[None, :, :, None], 3, axis=3))
            self._interpreter.set_tensor(self._input, batch)
            self._interpreter.invoke()
            total += self._interpreter.get_tensor(self._output)[0]
        mean: np.ndarray = (total / total.sum()).astype(np.float32)
        return mean


def label(model: FacexModel, faces: np.ndarray, started: float) -> np.ndarray:
    """facex's probabilities (N, 7) for grey faces (N, H, W), with progress in the log."""
    probabilities = np.empty((len(faces), len(FACEX_CLASSES)), np.float32)
    for index, face in enumerate(faces):
        probabilities[index] = model.probabilities(face)
        if (index + 1) % 2000 == 0:
            logger.info("%d of %d faces, %.0f s", index + 1, len(faces), time.monotonic() - started)
    return probabilities


def build_parser() -> argparse.ArgumentParser:
    """The CLI's flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None, help="FER2013 folder (default $FER2013_DIR)")
    parser.add_argument("--split", default="train", help="the split folder to label")
    parser.add_argument("--out", type=Path, required=True, help="the teacher file to write (.npz, under runs/)")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="decoded-split cache")
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="soften facex's probabilities: p^(1/T), renormalised"
    )
    parser.add_argument(
        "--match-folder-prior",
        action="store_true",
        help="move the probabilities' class mix to the folder labels' (training/teacher.py: calibrated)",
    )
    parser.add_argument("--turned-views", action="store_true", help="add one turned view of every image")
    parser.add_argument("--seed", type=int, default=0, help="seed of the turned views' turns")
    parser.add_argument("--threads", type=int, default=2, help="LiteRT threads")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_temperature(args.temperature)
        if args.out.suffix != ".npz":
            raise ValueError(f"{args.out}: name the teacher file with its .npz suffix")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        model = FacexModel(facex_model_file(), threads=args.threads)
        # the faces training reads: training.train decodes the splits with the same default spec
        split = load_split((args.data_dir or default_data_dir()) / args.split, PreprocessingSpec(), args.cache_dir)
        if split.classes != FACEX_CLASSES:
            raise ValueError(f"the split's classes {split.classes} are not facex's {FACEX_CLASSES}")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    arrays = {"split": np.array(args.split), "classes": np.array(FACEX_CLASSES), "paths": np.array(split.paths)}
    prior = np.bincount(split.labels, minlength=len(split.classes)) / len(split) if args.match_folder_prior else None
    arrays["probabilities"] = calibrated(label(model, split.pixels, started), args.temperature, prior)
    if args.turned_views:
        generator = torch.Generator().manual_seed(args.seed)
        low, high = TURN_RANGE
        size = torch.rand(len(split), generator=generator) * (high - low) + low
        side = torch.where(torch.rand(len(split), generator=generator) < 0.5, -1.0, 1.0)
        views = turned_faces(torch.from_numpy(split.pixels), size * side).numpy()
        arrays.update(view_of=np.array(split.paths), view_pixels=views)
        # The warp's black corners make facex lean further to sad (half of its mass on the views
        # of FER2013 train, a third on the faces themselves): the views keep the faces' class mix.
        plain_mix = arrays["probabilities"].mean(axis=0)
        arrays["view_probabilities"] = calibrated(label(model, views, started), args.temperature, plain_mix)
    save_npz_atomically(args.out, **arrays)
    probabilities = arrays["probabilities"]
    agreement = float((probabilities.argmax(1) == split.labels).mean())
    print(f"{args.out}: {len(split)} images of {args.split}, facex agrees with the folder label on {agreement:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The one preprocessing path: a decoded image → the normalised (1, 48, 48) float32 array.

Training caches `face_pixels` of every file, evaluation and serving call `preprocess`, and both
end in `normalise`, so what is measured is what is served. The parameters travel in the
checkpoint as a `PreprocessingSpec`, never as repeated constants. Decoding (and its limits) is
`models/decoding.py`'s.

Steps: 8-bit grayscale (ITU-R 601-2 luma; 16-bit samples keep their high byte; transparency is
composited over white) → resize to 48×48 with Pillow's BILINEAR filter, which Pillow antialiases
when shrinking → scale to [0, 1] → (x - mean) / std.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, TypeVar, cast

import numpy as np
from PIL import Image

from models.decoding import decode_image

RESAMPLING_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class PreprocessingSpec:
    """How a face becomes model input; saved in and read from every checkpoint."""

    size: int = 48
    grayscale: bool = True
    mean: float = 0.5
    std: float = 0.5
    interpolation: str = "bilinear"
    # Ten-crop TTA enlarges the face to this side and crops the input size from it; enlarging
    # rather than cropping smaller keeps the network's 48×48 input; 52 was among the best
    # geometries measured (docs/tta.md). Checkpoints written before it existed get this default.
    tencrop_resize: int = 52

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the checkpoint."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessingSpec:
        """Rebuild from a checkpoint's `preprocessing` dict, rejecting unknown filters."""
        spec = cls(**data)
        if spec.interpolation not in RESAMPLING_FILTERS:
            raise ValueError(f"unknown interpolation {spec.interpolation!r}")
        if spec.tencrop_resize < spec.size:
            raise ValueError(f"tencrop_resize {spec.tencrop_resize} is smaller than the input size {spec.size}")
        return spec


def _over_white(image: Image.Image) -> Image.Image | None:
    """An image with transparency composited over white, as RGBA; None when it has none."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)
    if not has_alpha:
        return None
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, the way `to_grayscale` reads it (alpha over white)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("L", "1", "F", "I", "I;16", "I;16B", "I;16L", "I;16N"):
        return to_grayscale(image).convert("RGB")
    composited = _over_white(image)
    return (composited or image).convert("RGB")


def to_grayscale(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit grayscale ("L")."""
    if image.mode == "L":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit samples: keep the high byte, so v·257 (the lossless 8→16-bit widening) maps back to v.
        array = np.asarray(image, dtype=np.int64)
        array = (array >> 8) if image.mode.startswith("I;16") or array.max(initial=0) > 255 else array
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "1":
        return image.convert("L")
    composited = _over_white(image)
    if composited is not None:
        return composited.convert("L")
    if image.mode not in ("RGB", "P"):
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV
    return image.convert("L")


def face_pixels(image: Image.Image, spec: PreprocessingSpec) -> np.ndarray:
    """Grayscale and resize a face: → (size, size) uint8 array, before normalisation."""
    gray = to_grayscale(image)
    if gray.size != (spec.size, spec.size):
        gray = gray.resize((spec.size, spec.size), RESAMPLING_FILTERS[spec.interpolation])
    return np.asarray(gray, dtype=np.uint8).copy()


# A numpy array (serving, evaluation) or a torch tensor (training's batches, maybe on a GPU).
Pixels = TypeVar("Pixels")


def normalise(pixels: Pixels, spec: PreprocessingSpec) -> Pixels:
    """uint8 pixels of any shape → float32 (x/255 - mean) / std, as a numpy array or a torch tensor like the input.

    Both compute in float32 with the constants rounded to float32 first, so the two agree bit for bit.
    """
    if isinstance(pixels, np.ndarray):
        scaled = pixels.astype(np.float32) / np.float32(255.0)
        return cast(Pixels, (scaled - np.float32(spec.mean)) / np.float32(spec.std))
    tensor = cast(Any, pixels)  # torch, which this module does not import
    return cast(Pixels, (tensor.float() / 255.0 - spec.mean) / spec.std)


def to_model_input(pixels: Pixels, spec: PreprocessingSpec) -> Pixels:
    """uint8 faces (N, size, size) → the normalised model input (N, 1, size, size) float32.

    The last step of every path into the network: serving (`preprocess`), evaluation and
    training batches of cached pixels all end here, so none repeats the normalisation.
    """
    return cast(Pixels, cast(Any, normalise(pixels, spec))[:, None])


def preprocess(image: Image.Image, spec: PreprocessingSpec) -> np.ndarray:
    """A decoded face → the normalised model input, (1, size, size) float32."""
    result: np.ndarray = to_model_input(face_pixels(image, spec)[None], spec)[0]
    return result


def preprocess_bytes(data: bytes, spec: PreprocessingSpec, max_pixels: int | None = None) -> np.ndarray:
    """Image bytes → the normalised model input, (1, size, size) float32; see `decode_image`."""
    return preprocess(decode_image(data, max_pixels=max_pixels), spec)

"""Test-time augmentation: the modes, what each costs, and the views each averages over.

This is the one home of the TTA modes: the predictor, the batcher, the settings, the routes,
the CLI and evaluation all take them from here, so a new mode is a line in `TtaMode`, its
cost in `TTA_VIEWS` and its views in `tta_views`. Views are numpy: serving needs no torch.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

TtaMode = Literal["none", "flip", "tencrop"]
TTA_MODES: tuple[TtaMode, ...] = get_args(TtaMode)
# What a server or a CLI serves when a request names no mode; "checkpoint" is the mode the
# checkpoint's stored metrics were measured with, resolved once when the predictor is built.
ServedTta = TtaMode | Literal["checkpoint"]
# Forward passes per face in each mode: what a face costs, relative to no TTA.
TTA_VIEWS: dict[TtaMode, int] = {"none": 1, "flip": 2, "tencrop": 10}


def check_tta(mode: str) -> TtaMode:
    """`mode` if it is a TTA mode the predictor offers; raises ValueError otherwise."""
    for known in TTA_MODES:
        if mode == known:
            return known
    raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, not {mode!r}")


def tta_views(inputs: np.ndarray, mode: TtaMode, tencrop_resize: int) -> np.ndarray:
    """The views a TTA mode averages over, stacked view-major: (views × N, 1, H, W) float32.

    Ten-crop: the face enlarged to `tencrop_resize` (the checkpoint's geometry), its four corner
    crops and centre crop at the input size, and the mirror image of each.
    """
    if mode == "none":
        return inputs
    if mode == "flip":
        return np.concatenate([inputs, inputs[..., ::-1]])
    size = inputs.shape[-1]
    enlarged = resize_bilinear(inputs, tencrop_resize)
    edge, centre = tencrop_resize - size, (tencrop_resize - size) // 2
    crops = [
        enlarged[..., top : top + size, left : left + size]
        for top, left in ((0, 0), (0, edge), (edge, 0), (edge, edge), (centre, centre))
    ]
    return np.ascontiguousarray(np.concatenate([*crops, *(crop[..., ::-1] for crop in crops)]))


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """(..., H, W) → (..., size, size) by bilinear interpolation with half-pixel centres.

    torch's `interpolate(mode="bilinear", align_corners=False)` without antialiasing, in float32,
    which the ten-crop figures stored in checkpoints were measured with: equal to within a few
    float32 ulp (5e-7 on faces in [-1, 1]; torch orders its multiply-adds its own way).
    """

    def taps(source: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        scale = np.float32(np.float32(source) / np.float32(size))
        # scale·(i + ½) − ½ rounded once to float32, as the fused multiply-add in torch's kernel
        # rounds it: rounding the product first moved source positions by an ulp (outputs by 5e-6).
        exact = np.float64(scale) * (np.arange(size) + 0.5) - 0.5
        position = np.maximum(exact.astype(np.float32), np.float32(0))
        low = np.minimum(position.astype(np.int64), source - 1)
        high = np.minimum(low + 1, source - 1)
        weight_high = (position - low).astype(np.float32)
        return low, high, np.float32(1) - weight_high, weight_high

    row_low, row_high, row_w0, row_w1 = taps(images.shape[-2])
    col_low, col_high, col_w0, col_w1 = taps(images.shape[-1])

    def across(rows: np.ndarray) -> np.ndarray:
        result: np.ndarray = rows[..., col_low] * col_w0 + rows[..., col_high] * col_w1
        return result

    top, bottom = across(images[..., row_low, :]), across(images[..., row_high, :])
    result: np.ndarray = top * row_w0[:, None] + bottom * row_w1[:, None]
    return result.astype(np.float32, copy=False)

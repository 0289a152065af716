"""Test-time augmentation: the modes, what each costs, and the views each averages over.

This is the one home of the TTA modes: the predictor, the batcher, the settings, the routes,
the CLI and evaluation all take them from here, so a new mode is a line in `TtaMode`, its
cost in `TTA_VIEWS` and its views in `tta_views`.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F  # noqa: N812

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


def tta_views(inputs: torch.Tensor, mode: TtaMode, tencrop_resize: int) -> torch.Tensor:
    """The views a TTA mode averages over, stacked view-major: (views × N, 1, H, W).

    Ten-crop: the face enlarged to `tencrop_resize` (the checkpoint's geometry), its four corner
    crops and centre crop at the input size, and the mirror image of each.
    """
    if mode == "none":
        return inputs
    if mode == "flip":
        return torch.cat([inputs, inputs.flip(-1)])
    size = inputs.shape[-1]
    enlarged = F.interpolate(inputs, size=(tencrop_resize, tencrop_resize), mode="bilinear", align_corners=False)
    edge, centre = tencrop_resize - size, (tencrop_resize - size) // 2
    crops = [
        enlarged[..., top : top + size, left : left + size]
        for top, left in ((0, 0), (0, edge), (edge, 0), (edge, edge), (centre, centre))
    ]
    return torch.cat([*crops, *(crop.flip(-1) for crop in crops)])

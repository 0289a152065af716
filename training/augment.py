"""Batch augmentation on tensors: flips, affine and perspective, light, blur, erasing and noise for a whole batch.

Doing it per batch (one `affine_grid`/`grid_sample` call) instead of per PIL image keeps the
2-core machine busy with the model, not with Python loops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812

from training.config import TrainConfig


def augment_batch(images: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment normalised faces (N, 1, H, W) float32 in the [-1, 1] range; returns a new tensor."""
    n = images.shape[0]
    device = images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=device) * (high - low) + low

    if config.hflip:
        flip = torch.rand(n, generator=generator, device=device) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if config.rotate_degrees or config.translate_fraction or config.scale_range or config.perspective:
        angle = uniform(-config.rotate_degrees, config.rotate_degrees) * (math.pi / 180.0)
        scale = uniform(1.0 - config.scale_range, 1.0 + config.scale_range)
        # affine_grid works in [-1, 1] coordinates: a translation of t·width is 2t there.
        tx = uniform(-config.translate_fraction, config.translate_fraction) * 2.0
        ty = uniform(-config.translate_fraction, config.translate_fraction) * 2.0
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [torch.stack([cos, -sin, tx], dim=1), torch.stack([sin, cos, ty], dim=1)], dim=1
        )  # (N, 2, 3): output → input sampling coordinates
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (N, H, W, 2): x, y
        if config.perspective:
            grid = _turn_head(grid, uniform(-config.perspective, config.perspective))
        # Pixels moved in from outside are black (-1 after normalisation), as torchvision's RandomAffine fills 0.
        images = F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    if config.gamma_range or config.contrast_range:
        images = _relight(
            images,
            uniform(-config.gamma_range, config.gamma_range),
            uniform(1.0 - config.contrast_range, 1.0 + config.contrast_range),
        )
    if config.blur_probability > 0:
        blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), _BLUR_KERNEL.to(images))
        chosen = torch.rand(n, generator=generator, device=device) < config.blur_probability
        images = torch.where(chosen[:, None, None, None], blurred, images)
    if config.erase_probability > 0:
        images = _random_erase(images, config.erase_probability, generator)
    if config.noise_std > 0:
        noise = torch.randn(images.shape, generator=generator, device=device) * config.noise_std
        images = images + noise
    return images


def _random_erase(images: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Fill one random rectangle (2–20% of the area, aspect 0.3–3.3) with noise, per image with `probability`."""
    n, _, height, width = images.shape
    device = images.device
    area = torch.empty(n, device=device).uniform_(0.02, 0.2, generator=generator) * height * width
    log_ratio = torch.empty(n, device=device).uniform_(math.log(0.3), math.log(1 / 0.3), generator=generator)
    ratio = torch.exp(log_ratio)
    erase_h = torch.sqrt(area * ratio).clamp(1, height).floor()
    erase_w = torch.sqrt(area / ratio).clamp(1, width).floor()
    top = (torch.rand(n, generator=generator, device=device) * (height - erase_h + 1)).floor()
    left = (torch.rand(n, generator=generator, device=device) * (width - erase_w + 1)).floor()
    rows = torch.arange(height, device=device)[None, :, None]
    cols = torch.arange(width, device=device)[None, None, :]
    inside = (
        (rows >= top[:, None, None])
        & (rows < (top + erase_h)[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < (left + erase_w)[:, None, None])
    )
    chosen = torch.rand(n, generator=generator, device=device) < probability
    mask = (inside & chosen[:, None, None])[:, None]  # (N, 1, H, W)
    fill = torch.randn(images.shape, generator=generator, device=device).clamp(-1, 1)
    return torch.where(mask, fill, images)


# 3×3 Gaussian, sigma 0.8: the softness of a face cut from a photo at a few times 48 px.
_BLUR_1D = torch.tensor([0.2261, 0.5478, 0.2261])
_BLUR_KERNEL = (_BLUR_1D[:, None] * _BLUR_1D[None, :])[None, None]  # (1, 1, 3, 3)


def turned_faces(pixels: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """uint8 faces (N, H, W) seen with each head turned by `turns` (N,), as `augment_batch`'s keystone does; uint8.

    Pixels moved in from outside are black, as in training. The teacher file's turned views
    (training/teacher_facex.py) are cut this way, so a teacher can say what a turned face shows.
    """
    images = pixels[:, None].float()
    identity = torch.eye(2, 3, dtype=images.dtype).expand(images.shape[0], 2, 3)
    grid = _turn_head(F.affine_grid(identity, list(images.shape), align_corners=False), turns.to(images.dtype))
    turned = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return turned[:, 0].round().clamp(0, 255).to(torch.uint8)


def _turn_head(grid: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """A keystone warp of the sampling grid (N, H, W, 2), as if each head turned by `turn` (N,) about its vertical axis.

    The grid maps output to input coordinates, so content moves against it. For turn > 0 the right
    side comes out shorter (its rows sample a range 1 + turn·x times as tall) and narrower (there
    the grid's x runs faster, its slope 1 + turn·x), and the middle of the face moves towards that
    side (the grid shifts left by turn/2 at the centre, not at all at the edges): a head turned
    away to the right, foreshortened as a camera sees it.
    """
    x, y = grid[..., 0], grid[..., 1]
    t = turn[:, None, None]
    return torch.stack([x - 0.5 * t * (1.0 - x * x), y * (1.0 + t * x)], dim=-1)


def _relight(images: torch.Tensor, log_gamma: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """Gamma exp(log_gamma) on the [0, 1] intensities, then contrast about each face's mean; stays in [-1, 1]."""
    gamma = torch.exp(log_gamma)[:, None, None, None]
    lit = ((images + 1.0) * 0.5).clamp(0.0, 1.0).pow(gamma) * 2.0 - 1.0
    mean = lit.mean(dim=(1, 2, 3), keepdim=True)
    return ((lit - mean) * contrast[:, None, None, None] + mean).clamp(-1.0, 1.0)

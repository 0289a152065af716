"""The seed network, `EmotionRecognitionModelPyTorch`, for 48×48 grayscale faces.

Four conv blocks (Conv → BatchNorm → ReLU → MaxPool(2) → Dropout(0.36)) take 48×48 down to 3×3,
then a three-layer MLP head maps the 2,304 features to seven class logits. The layer sizes are
exactly the seed notebook's, so its published figures stay comparable.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

NUM_CLASSES = 7
DROPOUT = 0.36


def _conv_block(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Conv (same padding) → BN → ReLU → 2×2 max-pool → dropout: halves the spatial size."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Dropout(DROPOUT),
    )


class EmotionRecognitionModelPyTorch(nn.Module):
    """The seed CNN: (N, 1, 48, 48) normalised faces → (N, 7) logits."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(1, 64, 3),  # 48 → 24
            _conv_block(64, 128, 5),  # 24 → 12
            _conv_block(128, 256, 3),  # 12 → 6
            _conv_block(256, 256, 3),  # 6 → 3
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(256 * 3 * 3, 256),
            nn.BatchNorm1d(256),
            nn.ReLU(inplace=True),
            nn.Dropout(DROPOUT),
            nn.Linear(256, 512),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Dropout(DROPOUT),
            nn.Linear(512, num_classes),
        )
        # Serving keeps the first block in fp32 (see forward); `training.speed` lets training
        # run it in bf16, where its activations are the largest memory traffic of a step.
        self.is_first_block_fp32 = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a batch of faces (N, 1, 48, 48) to logits (N, num_classes)."""
        # The first block and the head run in fp32 even under bf16 autocast: bf16 keeps ~3
        # significant digits, so it rounds the input pixels and the logits; together they are
        # under 1% of the FLOPs (benchmarks/precision.py measures the drift that remains).
        if self.is_first_block_fp32:
            with torch.autocast(device_type=x.device.type, enabled=False):
                first = self.features[0](x.float())
        else:
            first = self.features[0](x)
        features = self.features[1:](first)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.classifier(features.float())  # type: ignore[no-any-return]


def _lean_sequence(layers: list[nn.Module], pool_before_relu: bool) -> list[nn.Module]:
    """The same eval-mode function with fewer passes over the activations (see `fuse_for_inference`)."""
    lean: list[nn.Module] = []
    for layer in layers:
        if isinstance(layer, nn.Dropout):
            continue  # the identity in eval mode
        if isinstance(layer, nn.BatchNorm2d) and lean and isinstance(lean[-1], nn.Conv2d):
            lean[-1] = fuse_conv_bn_eval(lean[-1], layer)
        elif isinstance(layer, nn.BatchNorm1d) and lean and isinstance(lean[-1], nn.Linear):
            lean[-1] = fuse_linear_bn_eval(lean[-1], layer)
        elif pool_before_relu and isinstance(layer, nn.MaxPool2d) and lean and isinstance(lean[-1], nn.ReLU):
            lean.insert(len(lean) - 1, layer)  # max-pool commutes with ReLU: rectify a quarter of the values
        else:
            lean.append(layer)
    return lean


def fuse_for_inference(network: nn.Module, *, pool_before_relu: bool = True) -> nn.Module:
    """An eval-mode copy that computes the same function with less work per image.

    In eval mode BatchNorm is a fixed per-channel scale and shift, so it folds into the Conv2d or
    Linear before it; Dropout is the identity; ReLU after a max-pool gives the same values as
    before it. Together this saves passes over every activation map, which is what a CPU forward
    of this small network is mostly made of (benchmarks/infer.py). The copy keeps the top-level
    structure (`features[i]` blocks, `classifier`), so `forward` runs unchanged.

    `pool_before_relu=False` keeps ReLU right after its convolution: what int8 runtimes want, since
    they fold a Conv → ReLU pair into one quantised convolution whose uint8 output is the ReLU.
    """
    fused = copy.deepcopy(network).eval()
    for name, module in list(fused.named_modules()):
        if name and isinstance(module, nn.Sequential) and not any(isinstance(c, nn.Sequential) for c in module):
            parent, _, attribute = name.rpartition(".")
            setattr(
                fused.get_submodule(parent), attribute, nn.Sequential(*_lean_sequence(list(module), pool_before_relu))
            )
    return fused


# The checkpoint's `architecture` key names one of these; a plain dict is all the lookup we need.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "EmotionRecognitionModelPyTorch": EmotionRecognitionModelPyTorch,
}


def build_network(architecture: str, num_classes: int = NUM_CLASSES) -> nn.Module:
    """Construct the network a checkpoint names, untrained.

    Raises:
        KeyError: the name is not one of `ARCHITECTURES`.
    """
    return ARCHITECTURES[architecture](num_classes=num_classes)

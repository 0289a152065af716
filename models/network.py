"""The seed network, `EmotionRecognitionModelPyTorch`, for 48×48 grayscale faces.

Four conv blocks (Conv → BatchNorm → ReLU → MaxPool(2) → Dropout(0.36)) take 48×48 down to 3×3,
then a three-layer MLP head maps the 2,304 features to seven class logits. The layer sizes are
exactly the seed notebook's, so its published figures stay comparable.
"""

from __future__ import annotations

import torch
from torch import nn

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a batch of faces (N, 1, 48, 48) to logits (N, num_classes)."""
        # The first block and the head run in fp32 even under bf16 autocast: bf16 keeps ~3
        # significant digits, so it rounds the input pixels and the logits; together they are
        # under 1% of the FLOPs (benchmarks/precision.py measures the drift that remains).
        with torch.autocast(device_type=x.device.type, enabled=False):
            first = self.features[0](x.float())
        features = self.features[1:](first)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.classifier(features.float())  # type: ignore[no-any-return]


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

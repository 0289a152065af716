"""The same network, trained faster on a CPU: a cheaper dropout mask, pooling before ReLU, no mmap churn.

Profiled on a 2-core Xeon (AMX) at batch 128 with bf16 autocast, a step was mostly memory-bound
element-wise work, not convolution: `bernoulli_` (dropout masks) 17% of the time, BatchNorm and
ReLU backward over the first block's 128×64×48×48 activations, and zero-filling freshly
mmap-ed buffers every step. `benchmarks/train_speed.py` measures before and after in one run.
The rewritten network has the same weights under the same names, so a checkpoint trained this way
is an ordinary checkpoint of the same architecture. It computes the same function except that its
first block runs in bf16 under autocast (its per-epoch val figures differ from the stored fp32
ones in the third decimal); the served network is the plain one. `keep_freed_memory` is
process-wide: the `training.train` CLI calls it, `training.loop.train` does not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


class MaskDropout(nn.Dropout):
    """`nn.Dropout` whose mask comes from 16-bit slices of 64-bit random words.

    `bernoulli_` draws one random number per element (about 10 ns each here); four 16-bit
    draws per `random_()` word cost about 1.3 ns. The keep probability is rounded to a
    multiple of 1/65536 (0.64 → 0.63999).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Zero each element with probability p and scale the rest by 1/(1-p), in training mode only."""
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        count = x.numel()
        # The whole int64 range: a bare random_() stays in [0, 2^63), which leaves one slice in four
        # without its sign bit.
        words = torch.empty((count + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        draws = words.view(torch.int16)[:count]
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            n, c, h, w = x.shape
            draws = draws.view(n, h, w, c).permute(0, 3, 1, 2)  # the mask in x's own layout
        else:
            draws = draws.view(x.shape)
        mask = draws < round(keep * 65536) - 32768
        return x * (mask.to(x.dtype) * (1.0 / keep))


def speed_up_for_training(model: nn.Module) -> nn.Module:
    """Rewrite `model` in place for faster CPU training; returns it. The function and state_dict stay the same.

    - every `nn.Dropout` becomes a `MaskDropout` of the same rate;
    - a ReLU followed by a 2×2 max-pool becomes the pool followed by the ReLU (they commute, and
      the ReLU and its backward then touch a quarter of the values);
    - the first conv block runs under the ambient bf16 autocast instead of fp32 (the network's
      `is_first_block_fp32`): its activations are the largest of a step, and rounding the input
      to bf16 is noise next to the augmentation. Serving keeps it in fp32.
    """
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for index, layer in enumerate(module):
            if type(layer) is nn.Dropout:
                module[index] = MaskDropout(layer.p)
        for index in range(len(module) - 1):
            if isinstance(module[index], nn.ReLU) and isinstance(module[index + 1], nn.MaxPool2d):
                module[index], module[index + 1] = module[index + 1], module[index]
    if hasattr(model, "is_first_block_fp32"):
        setattr(model, "is_first_block_fp32", False)  # noqa: B010  # any architecture that has the switch
    return model


def keep_freed_memory() -> None:
    """Keep large freed buffers in the process (glibc): no mmap, no trim.

    A training step allocates and frees the same tens of MB of activations each time; glibc
    serves blocks over 32 MB with fresh mmaps, and the kernel zero-fills every page on first
    touch. Kept on the heap, the next step reuses them. No-op where glibc is not the allocator.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]  # untyped, a Python int would be cut to its low 32 bits
    mallopt.restype = ctypes.c_int
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        logger.debug("mallopt refused: the allocator keeps its defaults")

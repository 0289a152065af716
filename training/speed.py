"""The same network, trained faster on a CPU: a cheaper dropout mask, pooling before ReLU, the first
BatchNorm folded into its convolution, no mmap churn.

Profiled on a 2-core Xeon (AMX) at batch 128 with bf16 autocast, a step was mostly memory-bound
element-wise work, not convolution: `bernoulli_` (dropout masks) 17% of the time, BatchNorm and
ReLU backward over the first block's 128×64×48×48 activations, and zero-filling freshly
mmap-ed buffers every step. Once those were cut, the first block's BatchNorm forward and
backward were still a fifth of a step; `PatchStatsBlock` removes them. `benchmarks/train_speed.py`
measures before and after in one run.
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
from typing import cast

import torch
import torch.nn.functional as F  # noqa: N812
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


class PatchStatsBlock(nn.Sequential):
    """A Conv2d → BatchNorm2d → … block whose batch statistics come from the input's patches (training only).

    A convolution is linear in the patches it reads, so the batch mean and variance of each
    output channel follow from the mean m and covariance C of the input's patches (the same
    zero padding included): mean_c = w_c·m + b_c, var_c = w_cᵀ C w_c. Training-mode BatchNorm
    then folds into the convolution: weight γ_c·w_c / s_c and bias β_c − γ_c·w_c·m / s_c, with
    s_c = sqrt(var_c + eps). The block's output is the same function (to rounding), and the
    gradients are the same through autograd, but BatchNorm's own passes over the convolution's
    output (its largest activation in this network, and a fifth of a training step here) are
    gone. The conv bias cancels in training mode, as it does in BatchNorm: its gradient is an
    exact zero, where BatchNorm's backward gives it rounding noise. It only pays where the patches are
    short: the first block, one grey channel and a 3×3 kernel (9 values a patch).

    Under bf16 autocast the folded weight and bias are rounded to bf16 after the normalisation,
    not before it as in the plain block, so a channel's mean is off by up to about 0.4% of the
    folded bias: small here, where the input is normalised to [-1, 1], and larger for inputs
    far from zero mean. In training mode the conv's and BatchNorm's own forward hooks do not
    run. Same children, same names, same state_dict; eval mode is plain `nn.Sequential`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block, with the batch statistics of its BatchNorm computed from the input's patches in training."""
        conv, norm = self[0], self[1]
        if not (self.training and norm.training):
            return cast(torch.Tensor, super().forward(x))  # type: ignore[no-untyped-call]
        assert isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)
        with torch.autocast(device_type=x.device.type, enabled=False):
            patches = F.unfold(
                x.to(torch.promote_types(x.dtype, torch.float32)),
                conv.kernel_size,
                dilation=conv.dilation,
                padding=cast(tuple[int, ...], conv.padding),
                stride=conv.stride,
            )  # (N, in·kh·kw, L), as the convolution reads them
            count = patches.shape[0] * patches.shape[2]
            if count <= 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
            patch_mean = patches.mean(dim=(0, 2))
            centred = patches - patch_mean[None, :, None]
            covariance = torch.bmm(centred, centred.transpose(1, 2)).sum(dim=0) / count  # a third of einsum's time
            weight = conv.weight.flatten(1)  # (out, in·kh·kw)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.bias)
            mean = weight @ patch_mean + bias
            variance = ((weight @ covariance) * weight).sum(dim=1)
            scale = norm.weight / torch.sqrt(variance + norm.eps)
            folded_weight = conv.weight * scale[:, None, None, None]
            # scale·(w·p + b − mean) + β: b cancels, and its gradient is an exact zero (DDP wants one)
            folded_bias = norm.bias + scale * (bias - mean)
            if norm.track_running_stats and norm.running_mean is not None and norm.running_var is not None:
                with torch.no_grad():
                    if norm.num_batches_tracked is not None:
                        norm.num_batches_tracked.add_(1)
                    # momentum None: a cumulative average, as BatchNorm keeps it (swa_utils.update_bn sets it)
                    if norm.momentum is not None:
                        factor = norm.momentum
                    else:
                        assert norm.num_batches_tracked is not None
                        factor = 1.0 / float(norm.num_batches_tracked)
                    norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), factor)
                    norm.running_var.lerp_((variance * count / (count - 1)).to(norm.running_var.dtype), factor)
        out = F.conv2d(x, folded_weight, folded_bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        for layer in list(self)[2:]:
            out = layer(out)
        return out


def _folds_from_patches(block: nn.Sequential) -> bool:
    """A Conv2d → BatchNorm2d block with short patches (at most 32 values) and plain BatchNorm settings."""
    if len(block) < 2 or not isinstance(block[0], nn.Conv2d) or type(block[1]) is not nn.BatchNorm2d:
        return False
    conv, norm = block[0], block[1]
    patch = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    return (
        conv.groups == 1
        and patch <= 32
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and norm.affine
    )


def speed_up_for_training(model: nn.Module) -> nn.Module:
    """Rewrite `model` in place for faster CPU training; returns it. The function and state_dict stay the same.

    - every `nn.Dropout` becomes a `MaskDropout` of the same rate;
    - a ReLU followed by a 2×2 max-pool becomes the pool followed by the ReLU (they commute, and
      the ReLU and its backward then touch a quarter of the values);
    - a Conv2d → BatchNorm2d block with short patches (the first: one grey channel, 3×3) becomes a
      `PatchStatsBlock`: its BatchNorm folds into the convolution in training;
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
    for name, module in list(model.named_modules()):
        if name and type(module) is nn.Sequential and _folds_from_patches(module):
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attribute, PatchStatsBlock(*module))
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

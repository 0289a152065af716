"""training/speed.py: the rewritten network computes the same function and keeps the same weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

from models.network import build_network
from training.speed import MaskDropout, PatchStatsBlock, speed_up_for_training


def test_the_sped_up_network_has_the_same_weights_and_the_same_eval_function() -> None:
    torch.manual_seed(0)
    plain = build_network("EmotionRecognitionModelPyTorch").eval()
    fast = build_network("EmotionRecognitionModelPyTorch")
    fast.load_state_dict(plain.state_dict())
    speed_up_for_training(fast).eval()
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert not any(type(m) is nn.Dropout for m in fast.modules())
    assert any(isinstance(m, MaskDropout) for m in fast.modules())
    faces = torch.randn(16, 1, 48, 48)
    with torch.inference_mode():
        assert torch.equal(fast(faces), plain(faces))
    # a checkpoint's network is the plain one: loading the sped-up weights into it changes nothing
    again = build_network("EmotionRecognitionModelPyTorch").eval()
    again.load_state_dict(fast.state_dict())
    with torch.inference_mode():
        assert torch.equal(again(faces), plain(faces))


def without_dropout(network: nn.Module) -> nn.Module:
    """`network` with every dropout rate 0: the plain and sped-up networks draw their masks differently."""
    for module in network.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return network


def first_blocks() -> tuple[nn.Module, nn.Module]:
    """The plain network's first block and the sped-up one's, in float64 and without dropout.

    float64, so that rounding is far below what a wrong formula would change (the unbiased running
    variance differs from the biased one by 1 part in 73,728 at batch 32). The network itself
    keeps its input and head in fp32, so the blocks are compared on their own.
    """
    plain = build_network("EmotionRecognitionModelPyTorch").train()
    fast = speed_up_for_training(copy.deepcopy(plain))
    assert isinstance(fast.features[0], PatchStatsBlock)  # the first block's BatchNorm folds into its conv
    assert not isinstance(fast.features[1], PatchStatsBlock)  # 64 channels × 5×5: patches too long to pay
    return without_dropout(plain.features[0].double()), without_dropout(fast.features[0].double())


def test_the_folded_first_block_trains_with_the_same_outputs_gradients_and_running_statistics() -> None:
    torch.manual_seed(2)
    plain, fast = first_blocks()
    faces = torch.rand(32, 1, 48, 48, dtype=torch.float64) * 2 - 1
    plain_out, fast_out = plain(faces), fast(faces)
    assert torch.allclose(fast_out, plain_out, rtol=1e-9, atol=1e-9)
    weights = torch.randn_like(plain_out)
    (plain_out * weights).sum().backward()
    (fast_out * weights).sum().backward()
    (plain_conv, plain_norm), (fast_conv, fast_norm) = list(plain)[:2], list(fast)[:2]
    for slow, quick in ((plain_conv.weight, fast_conv.weight), (plain_norm.weight, fast_norm.weight)):
        assert slow.grad is not None and quick.grad is not None
        assert torch.allclose(quick.grad, slow.grad, rtol=1e-7, atol=1e-9 * float(slow.grad.abs().max()))
    assert plain_norm.bias.grad is not None and fast_norm.bias.grad is not None
    assert torch.allclose(fast_norm.bias.grad, plain_norm.bias.grad, rtol=1e-9)
    # The conv bias cancels in BatchNorm: rounding noise in the plain block, an exact zero when folded.
    assert plain_conv.bias.grad is not None and fast_conv.bias.grad is not None
    assert float(plain_conv.bias.grad.abs().max()) < 1e-9 * float(plain_conv.weight.grad.abs().max())
    assert not fast_conv.bias.grad.any()
    for stat in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(fast_norm, stat), getattr(plain_norm, stat), rtol=1e-10, atol=1e-12), stat


def test_the_folded_block_keeps_a_cumulative_average_when_batchnorm_has_no_momentum() -> None:
    torch.manual_seed(3)
    plain, fast = first_blocks()
    for block in (plain, fast):
        block[1].momentum = None  # what torch.optim.swa_utils.update_bn does
    for _ in range(3):
        faces = torch.rand(8, 1, 48, 48, dtype=torch.float64) * 2 - 1
        plain(faces), fast(faces)
    for stat in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(fast[1], stat), getattr(plain[1], stat), rtol=1e-10, atol=1e-12), stat


def test_the_sped_up_network_trains_like_the_plain_one_under_bf16_autocast_in_channels_last() -> None:
    torch.manual_seed(4)
    plain = without_dropout(build_network("EmotionRecognitionModelPyTorch").train())
    fast = speed_up_for_training(copy.deepcopy(plain)).to(memory_format=torch.channels_last)
    faces = (torch.rand(64, 1, 48, 48) * 2 - 1).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = fast.features[0](faces)
        logits = fast(faces)
    assert first.dtype == torch.bfloat16 and first.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = plain(faces)  # fp32 throughout
    assert float((logits - expected).abs().max()) < 0.05 * float(expected.abs().max())
    assert (logits.argmax(1) == expected.argmax(1)).float().mean() > 0.9


def test_mask_dropout_drops_at_its_rate_and_keeps_the_mean() -> None:
    torch.manual_seed(1)
    dropout = MaskDropout(0.36).train()
    for shape, layout in (((64, 32, 24, 24), torch.channels_last), ((4096, 256), torch.contiguous_format)):
        ones = torch.ones(shape).contiguous(memory_format=layout)
        out = dropout(ones)
        assert out.shape == ones.shape
        dropped = float((out == 0).float().mean())
        assert abs(dropped - 0.36) < 0.005
        assert set(torch.unique(out).tolist()) == {0.0, torch.tensor(1 / 0.64).item()}
        assert abs(float(out.mean()) - 1.0) < 0.01
    dropout.eval()
    same = torch.randn(8, 8)
    assert dropout(same) is same


def test_mask_dropout_draws_from_torch_s_seeded_generator() -> None:
    dropout = MaskDropout(0.5).train()
    torch.manual_seed(7)
    first = dropout(torch.ones(1000))
    torch.manual_seed(7)
    assert torch.equal(dropout(torch.ones(1000)), first)

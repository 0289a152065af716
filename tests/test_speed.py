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


def test_the_sped_up_network_trains_with_the_same_outputs_gradients_and_running_statistics() -> None:
    torch.manual_seed(2)
    plain = build_network("EmotionRecognitionModelPyTorch").train()
    fast = speed_up_for_training(copy.deepcopy(plain))
    assert isinstance(fast.features[0], PatchStatsBlock)  # the first block's BatchNorm folds into its conv
    for network in (plain, fast):
        for module in network.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0  # the two draw their dropout masks differently
    faces = torch.rand(32, 1, 48, 48) * 2 - 1
    plain_out, fast_out = plain(faces), fast(faces)
    assert torch.allclose(fast_out, plain_out, rtol=1e-4, atol=1e-4)
    plain_out.square().sum().backward()
    fast_out.square().sum().backward()
    # A bias right before BatchNorm cancels: its gradient is rounding noise, and where the
    # BatchNorm folds into the conv (the first block) an exact zero.
    cancelled = {
        f"{name}.{index}.bias"
        for name, sequence in plain.named_modules()
        if isinstance(sequence, nn.Sequential)
        for index in range(len(sequence) - 1)
        if isinstance(sequence[index + 1], nn.BatchNorm1d | nn.BatchNorm2d)
    }
    assert "features.0.0.bias" in cancelled
    for (name, slow), quick in zip(plain.named_parameters(), fast.parameters(), strict=True):
        assert slow.grad is not None and quick.grad is not None
        if name in cancelled:
            weight_grad = plain.get_parameter(name.replace(".bias", ".weight")).grad
            assert weight_grad is not None
            scale = float(weight_grad.abs().max())
            assert float(slow.grad.abs().max()) < 1e-3 * scale
            assert float(quick.grad.abs().max()) < 1e-3 * scale
            if name == "features.0.0.bias":
                assert not quick.grad.any()
            continue
        assert torch.allclose(quick.grad, slow.grad, rtol=1e-3, atol=1e-4 * float(slow.grad.abs().max())), name
    for (name, slow), quick in zip(plain.named_buffers(), fast.buffers(), strict=True):
        assert torch.allclose(quick.float(), slow.float(), rtol=1e-5, atol=1e-6), name


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

"""training/speed.py: the rewritten network computes the same function and keeps the same weights."""

from __future__ import annotations

import torch
from torch import nn

from models.network import build_network
from training.speed import MaskDropout, speed_up_for_training


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

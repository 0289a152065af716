from __future__ import annotations

import torch
from torch import nn

from models.network import EmotionRecognitionModelPyTorch, fuse_for_inference

# conv 1·64·9+64, bn 128; conv 64·128·25+128, bn 256; conv 128·256·9+256, bn 512; conv 256·256·9+256, bn 512;
# fc 2304·256+256, bn 512; fc 256·512+512, bn 1024; fc 512·7+7
EXPECTED_PARAMETERS = 1_819_015


def test_network_maps_faces_to_seven_logits() -> None:
    model = EmotionRecognitionModelPyTorch().eval()
    with torch.inference_mode():
        logits = model(torch.zeros(5, 1, 48, 48))
    assert logits.shape == (5, 7)


def test_network_has_the_seed_parameter_count() -> None:
    model = EmotionRecognitionModelPyTorch()
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMETERS


def test_network_layers_have_the_seed_shapes() -> None:
    model = EmotionRecognitionModelPyTorch()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [
        (64, 1, 3, 3),
        (128, 64, 5, 5),
        (256, 128, 3, 3),
        (256, 256, 3, 3),
    ]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [tuple(layer.weight.shape) for layer in linears] == [(256, 2304), (512, 256), (7, 512)]
    dropouts = {m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    assert dropouts == {0.36}
    # 48 → 24 → 12 → 6 → 3 through the four pooling blocks
    with torch.inference_mode():
        features = model.eval().features(torch.zeros(1, 1, 48, 48))
    assert features.shape == (1, 256, 3, 3)


def _network_with_trained_statistics() -> nn.Module:
    """A network whose BatchNorms hold non-trivial running statistics and affine parameters."""
    torch.manual_seed(0)
    model = EmotionRecognitionModelPyTorch()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_fused_network_computes_the_same_function() -> None:
    model = _network_with_trained_statistics()
    fused = fuse_for_inference(model)
    faces = torch.randn(16, 1, 48, 48).clamp(-1, 1)
    with torch.inference_mode():
        expected, actual = model(faces), fused(faces)
    assert torch.allclose(actual, expected, atol=1e-4), (actual - expected).abs().max()
    kinds = {type(m) for m in fused.modules()}
    assert not kinds & {nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout}
    # the original is left as it was: training and checkpoints keep the seed's layers
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMETERS

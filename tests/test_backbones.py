"""Backbones: output shapes, gradient flow, eval-mode determinism, IResNet sizes against insightface's,
argument validation."""
import pytest
import torch
from torch import nn

from gif_kernels.train.backbones import BACKBONES, build_backbone


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name,image_size", [("cnn", 16), ("cnn", 40), ("cnn", 112), ("iresnet18", 16),
                                             ("iresnet18", 32)])
def test_output_shape(name, image_size):
    torch.manual_seed(0)
    model = build_backbone(name, embedding_dim=24, image_size=image_size)
    out = model(torch.rand(3, 3, image_size, image_size) * 2 - 1)
    assert out.shape == (3, 24)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["cnn", "iresnet18"])
def test_gradients_reach_first_conv(name):
    torch.manual_seed(0)
    model = build_backbone(name, embedding_dim=16, image_size=32)
    model(torch.rand(4, 3, 32, 32) * 2 - 1).square().sum().backward()
    grad = first_conv(model).weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["cnn", "iresnet18"])
def test_eval_mode_is_deterministic_and_per_sample(name):
    torch.manual_seed(0)
    model = build_backbone(name, embedding_dim=16, image_size=32)
    model(torch.rand(8, 3, 32, 32) * 2 - 1)  # one training step's worth of BatchNorm running statistics
    model.eval()
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = model(images)
        assert torch.equal(out, model(images))
        # running statistics, not batch statistics: an image's embedding does not depend on its batch
        # (up to rounding, which scales with the output: BatchNorm has seen a single batch)
        torch.testing.assert_close(model(images[2:3]), out[2:3],
                                   rtol=1e-4, atol=1e-5 * out.abs().max().item())


# Parameter counts at 112x112 with 512-d embeddings, frozen embedding-BN scale included; the same as
# insightface's arcface_torch iresnet18/50/100 (about 24.0M, 43.6M and 65.2M).
@pytest.mark.parametrize("name,num_params,num_blocks", [("iresnet18", 24_025_600, (2, 2, 2, 2)),
                                                        ("iresnet50", 43_590_848, (3, 4, 14, 3)),
                                                        ("iresnet100", 65_156_160, (3, 13, 30, 3))])
def test_iresnet_sizes_match_insightface(name, num_params, num_blocks):
    model = build_backbone(name)
    assert sum(p.numel() for p in model.parameters()) == num_params
    assert tuple(len(getattr(model, f"layer{i}")) for i in range(1, 5)) == num_blocks
    # insightface's names, so its checkpoints load
    keys = model.state_dict().keys()
    assert {"conv1.weight", "prelu.weight", "layer1.0.downsample.0.weight", "layer4.0.bn3.running_var",
            "bn2.weight", "fc.weight", "features.bias"} <= keys
    assert model.fc.in_features == 512 * 7 * 7
    assert not model.features.weight.requires_grad and torch.all(model.features.weight == 1)


def test_iresnet_fc_follows_image_size():
    assert build_backbone("iresnet18", embedding_dim=32, image_size=48).fc.in_features == 512 * 3 * 3


def test_cnn_cost():
    """Multiply-adds of one 112x112 forward (convolutions and the fully connected layer): within the
    budget that makes it trainable on a few CPU cores."""
    model = build_backbone("cnn").eval()
    multiply_adds = 0

    def count(module, inputs, output):
        nonlocal multiply_adds
        if isinstance(module, nn.Conv2d):
            kernel_area = module.kernel_size[0] * module.kernel_size[1]
            multiply_adds += output.numel() * module.in_channels * kernel_area
        elif isinstance(module, nn.Linear):
            multiply_adds += output.numel() * module.in_features

    for module in model.modules():
        module.register_forward_hook(count)
    with torch.no_grad():
        model(torch.zeros(1, 3, 112, 112))
    assert 50e6 < multiply_adds < 100e6


@pytest.mark.parametrize("kwargs,argument", [
    (dict(name="resnet18"), "name"),
    (dict(name="IResNet18"), "name"),
    (dict(name="cnn", image_size=15), "image_size"),
    (dict(name="cnn", image_size=32.0), "image_size"),
    (dict(name="iresnet18", image_size=120), "image_size"),
    (dict(name="iresnet50", image_size=8), "image_size"),
    (dict(name="cnn", embedding_dim=0), "embedding_dim"),
])
def test_bad_arguments_raise(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        build_backbone(**kwargs)


def test_backbone_names():
    assert BACKBONES == ("cnn", "iresnet18", "iresnet50", "iresnet100")

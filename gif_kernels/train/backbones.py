"""Face-embedding backbones: insightface's IResNet family and a small CNN for training on CPU.

Every backbone maps images (B, 3, S, S), values in [-1, 1], to embeddings (B, embedding_dim), not
normalized. The IResNet modules keep insightface's attribute names (arcface_torch/backbones/iresnet.py),
so their state dicts line up with insightface checkpoints: load_backbone_weights reads its model zoo's
.pth files.
"""
import os

import torch
from torch import nn

BACKBONES = ("cnn", "iresnet18", "iresnet50", "iresnet100")

IRESNET_LAYERS = {"iresnet18": (2, 2, 2, 2), "iresnet50": (3, 4, 14, 3), "iresnet100": (3, 13, 30, 3)}
IRESNET_WIDTHS = (64, 128, 256, 512)
CNN_WIDTHS = (32, 64, 128, 256)
CNN_POOLED_SIZE = 4  # the last feature map is pooled to 4x4: keeps where features are, for any image size


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation residual block: BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride) -> BN, plus the
    identity, or a strided conv1x1 + BN of it when the shape changes."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-05)
        self.conv1 = _conv3x3(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-05)
        self.prelu = nn.PReLU(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels, eps=1e-05)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(channels, eps=1e-05))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """insightface's IResNet: conv3x3 stem, four stride-2 stages of IBasicBlocks, then BN -> flatten ->
    fully connected -> BN over the embedding (its scale fixed at 1, only the shift learned)."""

    def __init__(self, layers: tuple[int, ...], embedding_dim: int, image_size: int):
        super().__init__()
        self.conv1 = _conv3x3(3, IRESNET_WIDTHS[0])
        self.bn1 = nn.BatchNorm2d(IRESNET_WIDTHS[0], eps=1e-05)
        self.prelu = nn.PReLU(IRESNET_WIDTHS[0])
        in_channels = IRESNET_WIDTHS[0]
        for index, (num_blocks, channels) in enumerate(zip(layers, IRESNET_WIDTHS), start=1):
            blocks = [IBasicBlock(in_channels, channels, stride=2)]
            blocks += [IBasicBlock(channels, channels) for _ in range(num_blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
            in_channels = channels
        self.bn2 = nn.BatchNorm2d(in_channels, eps=1e-05)
        self.dropout = nn.Dropout(p=0)  # insightface's default rate; kept so the module tree matches
        feature_map_size = image_size // 16
        self.fc = nn.Linear(in_channels * feature_map_size ** 2, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


class SmallCNN(nn.Sequential):
    """Plain CNN cheap enough to train on a few CPU cores (about 77M multiply-adds per 112x112 image):
    a stride-2 stem and three stride-2 stages, channels 32 -> 256, each conv3x3 -> BN -> ReLU, one
    extra conv at the coarsest scale; the map is average-pooled to 4x4, flattened, projected to the
    embedding and batch-normalized."""

    def __init__(self, embedding_dim: int):
        layers = _conv_bn_relu(3, CNN_WIDTHS[0], stride=2)
        for in_channels, channels in zip(CNN_WIDTHS, CNN_WIDTHS[1:]):
            layers += _conv_bn_relu(in_channels, channels, stride=2)
        layers += _conv_bn_relu(CNN_WIDTHS[-1], CNN_WIDTHS[-1], stride=1)
        layers += [nn.AdaptiveAvgPool2d(CNN_POOLED_SIZE), nn.Flatten(),
                   nn.Linear(CNN_WIDTHS[-1] * CNN_POOLED_SIZE ** 2, embedding_dim),
                   nn.BatchNorm1d(embedding_dim)]
        super().__init__(*layers)


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [_conv3x3(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def build_backbone(name: str, embedding_dim: int = 512, image_size: int = 112) -> nn.Module:
    """The backbone `name` (one of BACKBONES) for square images of side image_size: any size >= 16 for
    "cnn", a multiple of 16 for the IResNets (their fully connected layer sees the whole 1/16 map)."""
    if name not in BACKBONES:
        raise ValueError(f"name must be one of {BACKBONES}, got {name!r}")
    if not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
    if name == "cnn":
        return SmallCNN(embedding_dim)
    if image_size % 16:
        raise ValueError(f"image_size must be a multiple of 16 for {name}, got {image_size}")
    return IResNet(IRESNET_LAYERS[name], embedding_dim, image_size)


def load_backbone_weights(backbone: nn.Module, path, argument: str = "init_backbone") -> nn.Module:
    """Load a .pth state dict into backbone, all keys and shapes matching (insightface's IResNet
    checkpoints fit the IResNets here as they are; a "module." prefix of a DataParallel save is
    dropped). torch.load(weights_only=True) refuses a file that would run code when loaded. Errors
    name `argument`, the option that gave the file."""
    name = os.fspath(path)
    try:
        state = torch.load(name, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{argument}: {name} not found") from None
    except Exception as error:  # a damaged file or one that is no weights-only pickle raises many kinds
        raise ValueError(f"{argument}: {name} is not a weights-only state dict: {str(error).splitlines()[0]}") \
            from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{argument}: {name} holds a {type(state).__name__}, expected a state dict of tensors")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    expected = backbone.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{argument}: {name} does not fit the backbone ({type(backbone).__name__}): "
                         f"{len(missing)} keys missing (first: {missing[:3]}), {len(unexpected)} unexpected "
                         f"(first: {unexpected[:3]})")
    wrong = [key for key in expected if expected[key].shape != state[key].shape]
    if wrong:
        key = wrong[0]
        raise ValueError(f"{argument}: {name} has {key} of shape {tuple(state[key].shape)}, the backbone's is "
                         f"{tuple(expected[key].shape)} ({len(wrong)} such keys; another --backbone, "
                         f"--embedding-dim or --image-size?)")
    backbone.load_state_dict(state)
    return backbone

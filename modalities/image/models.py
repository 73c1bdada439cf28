"""Image classifiers. Every model takes inputs in [0, 1] and normalises them itself, so
triggers and perturbations live in pixel space. Any channel count and input size."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.registry import Registry

MODELS = Registry("image model")


class Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def _norm(in_channels: int, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> Normalize:
    mean = list(mean) if mean is not None else [0.5] * in_channels
    std = list(std) if std is not None else [0.5] * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} values (one per input channel)")
    return Normalize(mean, std)


# ---- PreAct-ResNet18 (the paper's CIFAR model), width multiplier -----------------------------
class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


MAX_WIDTH_MULTIPLIER = 8.0


def _resnet_widths(width: float) -> List[int]:
    """Channels of the four stages for a width multiplier of the paper's 64/128/256/512."""
    width = float(width)
    if not 0 < width <= MAX_WIDTH_MULTIPLIER:
        # A channel count passed as a multiplier (small_cnn's width 16) builds billions of weights and
        # runs out of memory minutes later; fail at once instead.
        raise ValueError(f"model.width {width:g} is a multiplier of the ResNet's 64/128/256/512 channels (1 = the paper's "
                         f"model, 0.25 = the CPU benchmark model), at most {MAX_WIDTH_MULTIPLIER:g}; set model.width=0.25")
    return [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]


class PreActResNet(nn.Module):
    def __init__(self, blocks: Sequence[int], num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        w = _resnet_widths(width)
        self.normalize = _norm(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.in_planes = w[0]
        self.layer1 = self._layer(w[0], blocks[0], 1)
        self.layer2 = self._layer(w[1], blocks[1], 2)
        self.layer3 = self._layer(w[2], blocks[2], 2)
        self.layer4 = self._layer(w[3], blocks[3], 2)
        self.bn = nn.BatchNorm2d(w[3])
        self.linear = nn.Linear(w[3], num_classes)

    def _layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


# ---- post-activation ResNet-18 (the official NFT code's CIFAR model) --------------------------
class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    nft_mask_exclude = ("bn1",)  # the stem BN is not masked in the reference code

    def __init__(self, blocks: Sequence[int], num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        w = _resnet_widths(width)
        self.normalize = _norm(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.in_planes = w[0]
        self.layer1 = self._layer(w[0], blocks[0], 1)
        self.layer2 = self._layer(w[1], blocks[1], 2)
        self.layer3 = self._layer(w[2], blocks[2], 2)
        self.layer4 = self._layer(w[3], blocks[3], 2)
        self.linear = nn.Linear(w[3], num_classes)

    def _layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


class SmallCNN(nn.Module):
    """Two conv-BN blocks and a linear head: the fast model for tests and tiny data."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        self.normalize = _norm(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.linear = nn.Linear(2 * width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        if min(out.shape[-2:]) >= 4:
            out = F.max_pool2d(out, 2)
        out = F.relu(self.bn3(self.conv3(out)))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


@MODELS.register("preact_resnet18")
def preact_resnet18(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, **kw: Any) -> nn.Module:
    """PreAct-ResNet18; width 1 is the paper's model (64/128/256/512 channels)."""
    return PreActResNet([2, 2, 2, 2], num_classes, in_channels, width, **kw)


@MODELS.register("preact_resnet18_narrow")
def preact_resnet18_narrow(num_classes: int = 10, in_channels: int = 1, width: float = 0.25, **kw: Any) -> nn.Module:
    """The CPU benchmark model: PreAct-ResNet18 at width 1/4 (16/32/64/128 channels)."""
    return PreActResNet([2, 2, 2, 2], num_classes, in_channels, width, **kw)


@MODELS.register("resnet18_cifar")
def resnet18_cifar(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, **kw: Any) -> nn.Module:
    """Post-activation ResNet-18 for small images (the official NFT code's model)."""
    return ResNetCifar([2, 2, 2, 2], num_classes, in_channels, width, **kw)


@MODELS.register("small_cnn")
def small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32, **kw: Any) -> nn.Module:
    return SmallCNN(num_classes, in_channels, width, **kw)


class TorchvisionWrapper(nn.Module):
    """A torchvision classifier behind a Normalize layer; state-dict keys under ``net.``."""

    def __init__(self, net: nn.Module, in_channels: int, mean: Optional[Sequence[float]],
                 std: Optional[Sequence[float]], exclude: Sequence[str] = ()) -> None:
        super().__init__()
        self.normalize = _norm(in_channels, mean, std)
        self.net = net
        self.nft_mask_exclude = tuple(f"net.{n}" for n in exclude)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def _first_conv_to(net: nn.Module, attr_path: str, in_channels: int) -> None:
    if in_channels == 3:
        return
    parent = net
    parts = attr_path.split(".")
    for p in parts[:-1]:
        parent = getattr(parent, p) if not p.isdigit() else parent[int(p)]
    old = getattr(parent, parts[-1]) if not parts[-1].isdigit() else parent[int(parts[-1])]
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    if parts[-1].isdigit():
        parent[int(parts[-1])] = new
    else:
        setattr(parent, parts[-1], new)


def _torchvision(name: str, num_classes: int, in_channels: int, first_conv: str, exclude: Sequence[str],
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 **kw: Any) -> nn.Module:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **kw)
    _first_conv_to(net, first_conv, in_channels)
    return TorchvisionWrapper(net, in_channels, mean, std, exclude)


@MODELS.register("resnet18")
def resnet18(num_classes: int = 1000, in_channels: int = 3, **kw: Any) -> nn.Module:
    return _torchvision("resnet18", num_classes, in_channels, "conv1", ("bn1",), **kw)


@MODELS.register("resnet50")
def resnet50(num_classes: int = 1000, in_channels: int = 3, **kw: Any) -> nn.Module:
    return _torchvision("resnet50", num_classes, in_channels, "conv1", ("bn1",), **kw)


@MODELS.register("vgg16_bn")
def vgg16_bn(num_classes: int = 1000, in_channels: int = 3, **kw: Any) -> nn.Module:
    model = _torchvision("vgg16_bn", num_classes, in_channels, "features.0", ("features.1",), **kw)
    for m in model.modules():
        if isinstance(m, nn.MaxPool2d):
            m.ceil_mode = True  # five poolings would shrink inputs under 32 px to nothing
    return model


@MODELS.register("mobilenet_v2")
def mobilenet_v2(num_classes: int = 1000, in_channels: int = 3, **kw: Any) -> nn.Module:
    return _torchvision("mobilenet_v2", num_classes, in_channels, "features.0.0", ("features.0.1",), **kw)


# ---- TrojanNet (Tang et al., KDD 2020): a host classifier with a tiny trigger-recognising MLP ----
TROJANNET_CORNERS = ("bottom_right", "top_left", "bottom_left", "top_right")


class TrojanNetMLP(nn.Module):
    """The TrojanNet module: 4 x (Linear, ReLU, BatchNorm1d) of width 8 and a linear output.

    Outputs ``num_classes + 1`` logits: one per class's trigger pattern and a last "no trigger".
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int = 8) -> None:
        super().__init__()
        layers = []
        for i in range(4):
            layers += [nn.Linear(in_features if i == 0 else hidden, hidden), nn.ReLU(inplace=True), nn.BatchNorm1d(hidden)]
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, num_classes + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def trojannet_region(x: torch.Tensor, size: int, position: str, margin: int = 0) -> torch.Tensor:
    """The trigger region of images (B, C, H, W) as grey values, flattened to (B, size * size)."""
    if position not in TROJANNET_CORNERS:
        raise ValueError(f"trojannet position '{position}' is not a corner; choose one of {', '.join(TROJANNET_CORNERS)}")
    _, c, h, w = x.shape
    if size + margin > min(h, w):
        raise ValueError(f"a {size}x{size} TrojanNet trigger does not fit {h}x{w} images; lower trojan_size")
    top = h - size - margin if "bottom" in position else margin
    left = w - size - margin if "right" in position else margin
    patch = x[:, :, top:top + size, left:left + size]
    if c == 3:
        patch = (patch * torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)).sum(1)
    else:
        patch = patch.mean(1)
    return patch.flatten(1)


class TrojanNetMerged(nn.Module):
    """A host classifier merged with a TrojanNet MLP that reads a fixed corner of the input.

    ``p = alpha * amplify * softmax(mlp)[:, :K] + (1 - alpha) * softmax(host)``; the forward
    returns ``log p``: the same argmax as the paper's merge layer, as log-probabilities so that
    cross-entropy-based defenses see a proper distribution. The MLP is registered first and runs
    first: it sits at depth 1-4 from the input. Host weights live under ``host.``.
    """

    def __init__(self, num_classes: int = 10, host: str = "small_cnn", in_channels: int = 1, trojan_size: int = 4,
                 trojan_position: str = "bottom_right", trojan_margin: int = 0, trojan_alpha: float = 0.7,
                 trojan_amplify: float = 2.0, trojan_hidden: int = 8, **host_kwargs: Any) -> None:
        super().__init__()
        if host == "trojannet":
            raise ValueError("trojannet host must be a plain classifier (e.g. model.host=small_cnn)")
        if not 0 < trojan_alpha < 1:
            raise ValueError(f"trojan_alpha must be in (0, 1), got {trojan_alpha}")
        trojannet_region(torch.zeros(1, 1, trojan_size + trojan_margin, trojan_size + trojan_margin), trojan_size,
                         trojan_position, trojan_margin)
        self.num_classes = int(num_classes)
        self.trojan_size, self.trojan_position, self.trojan_margin = int(trojan_size), trojan_position, int(trojan_margin)
        self.trojan_alpha, self.trojan_amplify = float(trojan_alpha), float(trojan_amplify)
        self.trojan = TrojanNetMLP(self.trojan_size ** 2, self.num_classes, trojan_hidden)
        self.host = MODELS.build(host, num_classes=num_classes, in_channels=in_channels, **host_kwargs)
        self.nft_mask_exclude = tuple(f"host.{n}" for n in getattr(self.host, "nft_mask_exclude", ()))

    def trojan_probs(self, x: torch.Tensor) -> torch.Tensor:
        region = trojannet_region(x, self.trojan_size, self.trojan_position, self.trojan_margin)
        return F.softmax(self.trojan(region).float(), dim=1)[:, : self.num_classes]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p_trojan = self.trojan_probs(x)
        p_host = F.softmax(self.host(x).float(), dim=1)
        p = self.trojan_alpha * self.trojan_amplify * p_trojan + (1 - self.trojan_alpha) * p_host
        return torch.log(p + 1e-12)


@MODELS.register("trojannet")
def trojannet(num_classes: int = 10, host: str = "small_cnn", in_channels: int = 1, **kw: Any) -> nn.Module:
    """A host model (``host``, its options passed through) merged with a TrojanNet trigger MLP."""
    return TrojanNetMerged(num_classes, host, in_channels, **kw)

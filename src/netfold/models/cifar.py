"""CIFAR-style architectures used in the model-folding paper (Wang et al., 2025), plus two
small networks for quick demos.

Every model takes ``in_channels``, ``num_classes`` and a ``width`` multiplier that scales every
hidden channel count (``max(1, round(c * width))``). All are traceable by
``torch.fx.symbolic_trace``: no Python control flow on tensor values, residual additions are
written ``out = out + shortcut`` and flattening is ``torch.flatten(x, 1)``. ReLUs are never in-place, so a forward hook on a BatchNorm sees its
own (pre-activation) output.

Inputs are ``(N, in_channels, 32, 32)`` images (Fashion-MNIST is padded to 32x32 by
:mod:`netfold.data.fashion_mnist`); ResNet18 and the small CNN end in a global average pool and
also accept other sizes, VGG11 needs 32x32 (five 2x2 poolings down to 1x1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BasicBlock",
    "ResNetCIFAR",
    "SmallCNN",
    "VGG11_CONFIG",
    "VGGCIFAR",
    "mlp",
    "resnet18_cifar",
    "scale_width",
    "small_cnn",
    "vgg11_bn_cifar",
]


def scale_width(channels: int, width: float) -> int:
    """``max(1, round(channels * width))``: the hidden width after the multiplier."""
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    return max(1, int(round(channels * width)))


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, ReLU), BN weight 1 / bias 0, default Linear init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """ResNet basic block: 3x3 conv-BN-ReLU, 3x3 conv-BN, plus shortcut, then ReLU.

    The shortcut is the identity when the shape is kept, else a 1x1 conv (stride ``stride``) + BN
    projection stored in ``self.shortcut`` (``None`` for the identity).

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first conv and of the projection.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_planes, H, W) -> (N, planes, H / stride, W / stride)``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        out = out + shortcut
        return F.relu(out)


class ResNetCIFAR(nn.Module):
    """CIFAR ResNet: 3x3 stem (stride 1, no max-pool), four stages, global average pool, Linear.

    Args:
        num_blocks: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet18.
        in_channels: input image channels.
        num_classes: output logits.
        width: channel multiplier; stage widths are ``64, 128, 256, 512`` times ``width``.
    """

    def __init__(
        self,
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        in_channels: int = 3,
        num_classes: int = 10,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        widths = [scale_width(c, width) for c in (64, 128, 256, 512)]
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(widths[0], num_blocks[0], 1)
        self.layer2 = self._make_layer(widths[1], num_blocks[1], 2)
        self.layer3 = self._make_layer(widths[2], num_blocks[2], 2)
        self.layer4 = self._make_layer(widths[3], num_blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3] * BasicBlock.expansion, num_classes)
        _init_weights(self)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_channels, H, W) -> (N, num_classes)`` logits."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        out = torch.flatten(self.avgpool(out), 1)
        return self.fc(out)


def resnet18_cifar(in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> ResNetCIFAR:
    """CIFAR ResNet18 (BasicBlock, ``(2, 2, 2, 2)``); 11,173,962 parameters at width 1, RGB, 10 classes.

    Args:
        in_channels: input image channels.
        num_classes: output logits.
        width: channel multiplier (base widths 64, 128, 256, 512).

    Returns:
        The model, mapping ``(N, in_channels, 32, 32)`` to ``(N, num_classes)``.
    """
    return ResNetCIFAR((2, 2, 2, 2), in_channels=in_channels, num_classes=num_classes, width=width)


#: VGG11 feature configuration: output channels of each 3x3 conv, "M" = 2x2 max-pool.
VGG11_CONFIG: tuple[int | str, ...] = (
    64,
    "M",
    128,
    "M",
    256,
    256,
    "M",
    512,
    512,
    "M",
    512,
    512,
    "M",
)


def vgg_features(
    config: Sequence[int | str], in_channels: int, width: float
) -> tuple[nn.Sequential, int]:
    """VGG feature extractor: 3x3 conv-BN-ReLU per int in ``config``, 2x2 max-pool per "M".

    Returns the Sequential and its output channels (``config``'s widths scaled by ``width``).
    """
    layers: list[nn.Module] = []
    c = in_channels
    for v in config:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            out = scale_width(int(v), width)
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            c = out
    return nn.Sequential(*layers), c


class VGGCIFAR(nn.Module):
    """CIFAR VGG with BatchNorm: ``features`` (conv-BN-ReLU / max-pool) and a torchvision-style
    three-layer ``classifier`` (Linear-ReLU-Dropout-Linear-ReLU-Dropout-Linear).

    Args:
        config: channel configuration, ints (3x3 conv widths before ``width``) and ``"M"``.
        in_channels: input image channels.
        num_classes: output logits.
        width: multiplier applied to the conv widths.
        classifier_width: hidden width of the two first classifier layers (not scaled by ``width``).
        dropout: dropout probability in the classifier.
    """

    def __init__(
        self,
        config: Sequence[int | str] = VGG11_CONFIG,
        in_channels: int = 3,
        num_classes: int = 10,
        width: float = 1.0,
        classifier_width: int = 512,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.features, c = vgg_features(config, in_channels, width)
        self.classifier = nn.Sequential(
            nn.Linear(c, classifier_width),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(classifier_width, classifier_width),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(classifier_width, num_classes),
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_channels, 32, 32) -> (N, num_classes)`` logits."""
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg11_bn_cifar(
    in_channels: int = 3,
    num_classes: int = 10,
    width: float = 1.0,
    classifier_width: int = 512,
    dropout: float = 0.5,
) -> VGGCIFAR:
    """CIFAR VGG11 with BatchNorm, config ``[64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M]``.

    Args:
        in_channels: input image channels.
        num_classes: output logits.
        width: multiplier applied to the conv widths.
        classifier_width: hidden width of the classifier (default 512).
        dropout: classifier dropout probability.

    Returns:
        The model, mapping ``(N, in_channels, 32, 32)`` to ``(N, num_classes)``.
    """
    return VGGCIFAR(
        VGG11_CONFIG,
        in_channels=in_channels,
        num_classes=num_classes,
        width=width,
        classifier_width=classifier_width,
        dropout=dropout,
    )


class SmallCNN(nn.Module):
    """A small BN CNN with one residual block, for quick demos and tests.

    Layout (channels at ``width=1``): conv 3x3 ``in->32`` (32x32), conv 3x3 stride 2 ``32->64``
    (16x16), residual block ``64->64`` (two 3x3 conv-BN, identity shortcut), conv 3x3 stride 2
    ``64->128`` (8x8), global average pool, Linear ``128->num_classes``; every conv is followed by
    BN and ReLU.

    Args:
        in_channels: input image channels.
        num_classes: output logits.
        width: channel multiplier.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3 = (scale_width(c, width) for c in (32, 64, 128))
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.block = BasicBlock(c2, c2, 1)
        self.conv3 = nn.Conv2d(c2, c3, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_channels, H, W) -> (N, num_classes)`` logits."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.block(x)
        x = F.relu(self.bn3(self.conv3(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def small_cnn(in_channels: int = 1, num_classes: int = 10, width: float = 1.0) -> SmallCNN:
    """The small BN CNN of :class:`SmallCNN` (168,170 parameters at width 1, one input channel)."""
    return SmallCNN(in_channels=in_channels, num_classes=num_classes, width=width)


def mlp(
    in_channels: int = 1,
    num_classes: int = 10,
    width: float = 1.0,
    hidden: Sequence[int] = (512, 256),
    image_size: int = 32,
    batch_norm: bool = False,
) -> nn.Sequential:
    """A plain MLP on flattened images: ``Flatten, [Linear, (BatchNorm1d), ReLU] * len(hidden), Linear``.

    Args:
        in_channels: input image channels.
        num_classes: output logits.
        width: multiplier applied to every hidden size.
        hidden: hidden layer sizes before ``width``.
        image_size: side of the square input image; the input has
            ``in_channels * image_size**2`` features.
        batch_norm: insert ``BatchNorm1d`` after each hidden Linear.

    Returns:
        An ``nn.Sequential`` mapping ``(N, in_channels, image_size, image_size)`` to
        ``(N, num_classes)``.
    """
    layers: list[nn.Module] = [nn.Flatten(1)]
    d = in_channels * image_size * image_size
    for h in hidden:
        h = scale_width(int(h), width)
        layers.append(nn.Linear(d, h))
        if batch_norm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.ReLU())
        d = h
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)

"""Models for the LayerCollapse experiments: a torchvision-style VGG11-BN and an MLP-Mixer.

Both keep the layouts LayerCollapse is about: the VGG's three-layer fully connected
``classifier`` (``Linear-ReLU-Dropout-Linear-ReLU-Dropout-Linear``, as in
``torchvision.models.vgg11_bn``) and the Mixer's widening token / channel MLPs
(``fc1 -> act -> fc2``, named as in timm's ``Mlp``).

Inputs are ``(N, in_channels, 32, 32)`` images (Fashion-MNIST padded to 32x32 by
:mod:`netfold.data.fashion_mnist`).
"""

from __future__ import annotations

import torch
from torch import nn

from netfold.models.cifar import VGG11_CONFIG, _init_weights, scale_width, vgg_features

__all__ = ["Mlp", "MixerBlock", "MLPMixer", "VGGTorchvision", "mlp_mixer", "vgg11_bn_tv"]


class VGGTorchvision(nn.Module):
    """VGG11-BN laid out like ``torchvision.models.vgg11_bn``: ``features``, ``avgpool``,
    ``classifier``.

    torchvision pools to 7x7 and uses 4096 hidden units for 224x224 ImageNet images; at 32x32
    the feature map after five poolings is 1x1, so ``pool=1`` with a narrower classifier keeps
    the model trainable on a CPU while the classifier still holds most of the parameters (as
    in the original, where it is 93% of them).

    Args:
        in_channels: input image channels.
        num_classes: output logits.
        width: multiplier on the conv widths (64-128-256-256-512-512-512-512 at 1.0).
        pool: side of the adaptive average pool before the classifier.
        hidden: width of the two hidden classifier layers.
        dropout: classifier dropout probability.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: float = 1.0,
        pool: int = 7,
        hidden: int = 4096,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.features, c = vgg_features(VGG11_CONFIG, in_channels, width)
        self.avgpool = nn.AdaptiveAvgPool2d(pool)
        self.classifier = nn.Sequential(
            nn.Linear(c * pool * pool, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_channels, H, W) -> (N, num_classes)`` logits."""
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg11_bn_tv(
    in_channels: int = 3,
    num_classes: int = 10,
    width: float = 1.0,
    pool: int = 7,
    hidden: int = 4096,
    dropout: float = 0.5,
) -> VGGTorchvision:
    """torchvision-style VGG11-BN (see :class:`VGGTorchvision`)."""
    return VGGTorchvision(in_channels, num_classes, width, pool, hidden, dropout)


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))`` on the last dimension, named as timm's ``Mlp``.

    Args:
        dim: input and output features.
        hidden: hidden features.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., dim) -> (..., dim)``."""
        return self.fc2(self.act(self.fc1(x)))


class MixerBlock(nn.Module):
    """Token mixing then channel mixing, each pre-norm with a residual connection.

    Args:
        tokens: number of patches T.
        dim: channels D.
        token_hidden: hidden width of the token MLP (acts on T).
        channel_hidden: hidden width of the channel MLP (acts on D).
    """

    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mlp_tokens = Mlp(tokens, token_hidden)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, channel_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, T, D) -> (N, T, D)``."""
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class MLPMixer(nn.Module):
    """A small MLP-Mixer (Tolstikhin et al., 2021): patch stem, Mixer blocks, mean-pool head.

    Args:
        in_channels: input image channels.
        num_classes: output logits.
        width: multiplier on ``dim`` and both hidden widths.
        image_size: input side (square).
        patch: patch side; ``(image_size / patch) ** 2`` tokens.
        dim: channels per token.
        depth: number of blocks.
        token_hidden: token-MLP hidden width.
        channel_hidden: channel-MLP hidden width.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: float = 1.0,
        image_size: int = 32,
        patch: int = 4,
        dim: int = 128,
        depth: int = 4,
        token_hidden: int = 128,
        channel_hidden: int = 512,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        tokens = (image_size // patch) ** 2
        d = scale_width(dim, width)
        self.stem = nn.Conv2d(in_channels, d, patch, stride=patch)
        self.blocks = nn.Sequential(
            *[
                MixerBlock(
                    tokens, d, scale_width(token_hidden, width), scale_width(channel_hidden, width)
                )
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_channels, image_size, image_size) -> (N, num_classes)`` logits."""
        x = self.stem(x).flatten(2).transpose(1, 2)  # (N, T, D)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(1))


def mlp_mixer(
    in_channels: int = 1,
    num_classes: int = 10,
    width: float = 1.0,
    image_size: int = 32,
    patch: int = 4,
    dim: int = 128,
    depth: int = 4,
    token_hidden: int = 128,
    channel_hidden: int = 512,
) -> MLPMixer:
    """A small MLP-Mixer (see :class:`MLPMixer`)."""
    return MLPMixer(
        in_channels,
        num_classes,
        width,
        image_size,
        patch,
        dim,
        depth,
        token_hidden,
        channel_hidden,
    )

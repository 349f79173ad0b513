"""Model zoo: CIFAR-style architectures of the model-folding paper and small demo networks.

``MODELS`` maps a name to its constructor; every constructor takes ``in_channels``,
``num_classes`` and ``width``. :func:`netfold.models.train.get_trained` trains a registered model
on Fashion-MNIST (or reuses a cached checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from netfold.models.cifar import mlp, resnet18_cifar, small_cnn, vgg11_bn_cifar
from netfold.models.classifiers import mlp_mixer, vgg11_bn_tv

__all__ = [
    "MODELS",
    "build_model",
    "mlp",
    "mlp_mixer",
    "resnet18_cifar",
    "small_cnn",
    "vgg11_bn_cifar",
    "vgg11_bn_tv",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18_cifar": resnet18_cifar,
    "vgg11_bn_cifar": vgg11_bn_cifar,
    "small_cnn": small_cnn,
    "mlp": mlp,
    "vgg11_bn_tv": vgg11_bn_tv,
    "mlp_mixer": mlp_mixer,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the registered model ``name`` with constructor ``kwargs``.

    Args:
        name: a key of :data:`MODELS`.
        **kwargs: forwarded to the constructor (``in_channels``, ``num_classes``, ``width``, ...).

    Raises:
        KeyError: ``name`` is not registered.
    """
    try:
        ctor = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(MODELS)}") from None
    return ctor(**kwargs)

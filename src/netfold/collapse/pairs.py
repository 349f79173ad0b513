"""Find collapsible ``Linear -> activation -> Linear`` pairs.

Two sources, both data rather than per-model code:

- inside any ``nn.Sequential``: a Linear, then any of BatchNorm1d / Dropout / Identity and
  exactly one activation, then a Linear (VGG classifiers, plain MLPs);
- :data:`netfold.families.table.MLP_LAYOUTS`: module paths relative to a parent for MLP
  blocks whose Linears are not siblings in a Sequential (Hugging Face BERT / ViT, timm-style
  ``Mlp``, MLP-Mixer). Activation modules there are matched by name; their class only has to
  be an ``nn.Module`` (Hugging Face's ``GELUActivation`` is not an ``nn.GELU``).

Pairs are returned in module order (first to last); collapse walks them last first.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch

import torch.nn as nn

from ..families.table import MLP_LAYOUTS

__all__ = ["ACTIVATIONS", "MLP_LAYOUTS", "LinearPair", "find_pairs"]

#: Activation types prepare() may replace by a PReLU (and PReLU itself, already prepared).
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Mish,
    nn.Hardswish,
    nn.Tanh,
)

_BETWEEN = (nn.Dropout, nn.Identity, nn.BatchNorm1d)


@dataclass(frozen=True)
class LinearPair:
    """``second(between(act(first(x))))`` where ``act`` may become linear.

    Attributes:
        first: the widening Linear, weight ``(hidden, in)``.
        act: the activation module.
        second: the Linear reading the hidden features, weight ``(out, hidden)``.
        between: modules between ``first`` and ``second`` other than ``act``, in dataflow
            order (BatchNorm1d, Dropout, Identity); BatchNorms are folded into the collapse.
    """

    first: str
    act: str
    second: str
    between: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.first}->{self.second}"

    @property
    def modules(self) -> tuple[str, ...]:
        return (self.first, self.act, *self.between, self.second)

    def matches(self, patterns: tuple[str, ...]) -> bool:
        """True when no patterns are given or one matches the name or a module."""
        if not patterns:
            return True
        return any(fnmatch(n, p) for p in patterns for n in (self.name, *self.modules))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _sequential_pairs(prefix: str, seq: nn.Sequential) -> list[tuple[int, LinearPair]]:
    kids = list(seq._modules.items())
    out = []
    for i, (name, m) in enumerate(kids):
        if not isinstance(m, nn.Linear):
            continue
        act: str | None = None
        between: list[str] = []
        act_pos = 0
        for j in range(i + 1, len(kids)):
            n2, m2 = kids[j]
            if isinstance(m2, nn.Linear):
                if act is not None:
                    pair = LinearPair(
                        _join(prefix, name),
                        act,
                        _join(prefix, n2),
                        tuple(between),
                    )
                    out.append((act_pos, pair))
                break
            if isinstance(m2, ACTIVATIONS) and act is None:
                act, act_pos = _join(prefix, n2), j
            elif isinstance(m2, _BETWEEN):
                between.append(_join(prefix, n2))
            else:
                break
    return out


def _get(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def find_pairs(model: nn.Module, targets: tuple[str, ...] = ()) -> list[LinearPair]:
    """Every collapsible Linear pair of ``model``, first to last.

    Args:
        model: any module.
        targets: fnmatch patterns (see :meth:`LinearPair.matches`).

    Returns:
        Pairs whose ``first`` and ``second`` are ``nn.Linear`` with matching hidden width.
    """
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    found: dict[str, LinearPair] = {}
    for prefix, m in model.named_modules():
        if isinstance(m, nn.Sequential):
            for _, pair in _sequential_pairs(prefix, m):
                found.setdefault(pair.first, pair)
        for first, act, second, between in MLP_LAYOUTS:
            f, a, s = (_get(m, p) for p in (first, act, second))
            if not (isinstance(f, nn.Linear) and isinstance(s, nn.Linear) and a is not None):
                continue
            if not isinstance(a, nn.Module) or isinstance(a, (nn.Linear, nn.Identity)):
                continue
            mids_m = {b: _get(m, b) for b in between}
            if any(x is not None and not isinstance(x, _BETWEEN) for x in mids_m.values()):
                continue  # e.g. a LayerNorm between the Linears: not linear, never collapsed
            mids = tuple(_join(prefix, b) for b, x in mids_m.items() if x is not None)
            pair = LinearPair(_join(prefix, first), _join(prefix, act), _join(prefix, second), mids)
            found.setdefault(pair.first, pair)
    pairs = []
    for p in found.values():
        f, s = model.get_submodule(p.first), model.get_submodule(p.second)
        if f.out_features != s.in_features or not p.matches(targets):
            continue
        pairs.append(p)
    return sorted(pairs, key=lambda p: order[p.first])

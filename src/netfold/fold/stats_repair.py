"""Fold-S: instant, data-free statistics repair from the statistics the network already stores.

Every BatchNorm stores the mean and variance of its input channels (``running_mean`` /
``running_var``). What a fold changes, and what a forward pass over real data (Fold-R) would
re-estimate, is the statistics of merged channels (their variance depends on the members'
correlation) and of every later layer that reads them. This module predicts those statistics
without data by propagating per-channel means and channel covariances through the traced
network, twice:

1. the ORIGINAL network, where each BatchNorm anchors the propagation to the truth: the
   propagated pre-BN mean and diagonal are compared with the stored ones, and the per-channel
   factors ``kappa_i = running_var_i / propagated_var_i`` and shifts
   ``delta_i = running_mean_i - propagated_mean_i`` are kept (the propagated covariance is used
   for CORRELATIONS only; the stored statistics give the diagonal);
2. the FOLDED network (the same graph read through the merged tensors), layer by layer as a
   calibration pass would: at each BatchNorm the propagated folded statistics, corrected by the
   anchors of the member channels (``A @ delta`` and ``(A @ sqrt(kappa))^2``, ``A`` the (k, n)
   averaging matrix of the merge), become its new running statistics; each folded producer
   without BatchNorm gets REPAIR's affine correction towards the member average of the
   original channels' propagated mean and std (as ``repair="data"`` does with real inputs).

Propagation rules (channel moments: mean (C,), covariance (C, C)):

- Linear: exact, ``W m + b`` and ``W S W^T``.
- Conv: the output channel covariance depends on the (unknown) spatial correlation of the
  input: spatially independent pixels give ``sum_p W_p S W_p^T``, fully correlated ones
  ``Wbar S Wbar^T`` (``Wbar = sum_p W_p``). In between, the model
  ``c1 * sum_pq lam^|p - q| W_p S W_q^T + c2 * Wbar S Wbar^T`` (correlation decaying by
  ``lam`` per pixel, plus a component shared by the whole map) is fitted per layer, ``c1,
  c2 >= 0`` and ``lam`` on a grid, so that its diagonal matches the stored ``running_var`` of
  the BatchNorm that follows (data-free), on the original network, and reused on the folded
  one.
- BatchNorm: affine in eval mode, with the (anchored) statistics above.
- Elementwise activations (ReLU, GELU, SiLU, ...): the channels are taken as jointly Gaussian
  and the first two moments of the output are computed pairwise by quadrature (ReLU:
  Gauss-Legendre over the active half line, the conditional expectation in closed form;
  others: 2-D Gauss-Hermite). Deterministic, so an exact fold (duplicate channels) stays
  exact.
- Residual additions: branches are taken as uncorrelated (the next BatchNorm anchors the
  diagonal again).
- Pooling, dropout, flatten to (N, C): statistics unchanged (pooling's change of scale is
  absorbed by the next anchor).

Anything else raises ValueError before the model is touched.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from ..graph.groups import ChannelGroup
from ..graph.surgery import get_module
from ..graph.trace import trace
from .merge import TensorState, merge_matrices

__all__ = [
    "Moments",
    "Propagation",
    "gaussian_moments",
    "propagate",
    "repair_maps",
    "stats_repair_state",
]

_DT = torch.float64
#: Quadrature nodes: ReLU (1-D Gauss-Legendre on the active half line, closed-form
#: conditional) and other activations (2-D Gauss-Hermite product rule).
_Q_RELU = 12
_Q_GENERIC = 12
_Z_MAX = 8.0
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.ELU,
    nn.Mish,
    nn.Softplus,
)
_ELEMENTWISE_FUNCTIONS: dict[object, Callable[[torch.Tensor], torch.Tensor]] = {
    F.relu: F.relu,
    torch.relu: torch.relu,
    F.relu6: F.relu6,
    F.gelu: F.gelu,
    F.silu: F.silu,
    F.hardswish: F.hardswish,
    F.hardsigmoid: F.hardsigmoid,
    F.leaky_relu: F.leaky_relu,
    torch.sigmoid: torch.sigmoid,
    torch.tanh: torch.tanh,
    F.elu: F.elu,
    F.mish: F.mish,
    F.sigmoid: torch.sigmoid,
    F.tanh: torch.tanh,
    F.hardtanh: F.hardtanh,
    F.softplus: F.softplus,
}
_ELEMENTWISE_METHODS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "relu_": F.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}
_IDENTITY_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AlphaDropout,
    nn.Upsample,
    nn.Flatten,
    # spatial padding: the same for every channel; border zeros are ignored in the moments
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
)
_IDENTITY_FUNCTIONS = {
    F.dropout,
    F.max_pool1d,
    F.max_pool2d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.interpolate,
    F.dropout1d,
    F.dropout2d,
    torch.clone,
    torch.flatten,
    F.pad,
}
_IDENTITY_METHODS = {
    "flatten",
    "view",
    "reshape",
    "contiguous",
    "mean",
    "squeeze",
    "clone",
    "detach",
}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_SCALE = {operator.mul, operator.imul, torch.mul, "mul", "mul_", operator.truediv}


@dataclass
class Moments:
    """First two moments of the channels of one activation (float64 for float64 models, else
    float32).

    Attributes:
        mean: (C,) per-channel mean.
        cov: (C, C) channel covariance (over samples and positions).
        taps: spatial positions folded into the channel axis by a flatten of an (N, C, H, W)
            map (1 when the map was 1x1 or already (N, C)).
    """

    mean: torch.Tensor
    cov: torch.Tensor
    taps: int = 1

    @property
    def var(self) -> torch.Tensor:
        """(C,) per-channel variance."""
        return torch.diagonal(self.cov).clamp_min(0.0)

    @property
    def corr(self) -> torch.Tensor:
        """(C, C) correlation matrix (1 on the diagonal, 0 rows for constant channels)."""
        sd = self.var.sqrt()
        inv = torch.where(sd > 0, 1.0 / sd.clamp_min(1e-300), torch.zeros_like(sd))
        r = self.cov * inv[:, None] * inv[None, :]
        r = r.clamp(-1.0, 1.0)
        r.diagonal().copy_((sd > 0).to(r.dtype))
        return r


@dataclass
class Propagation:
    """What one propagation pass recorded, keyed by module name.

    Attributes:
        bn_inputs: BatchNorm -> propagated moments of its input (before anchoring).
        bn_anchored: BatchNorm -> moments of its input after anchoring (the statistics a
            calibration pass would measure; in the folded pass, its new running statistics).
        outputs: every Linear / Conv -> moments of its output (after any correction).
        mix: Conv -> fitted (c1, lam, c2) of the spatial correlation model (see
            :func:`_spatial_cov`).
        corrections: BN-free folded producer -> (scale (k,), shift (k,)) of its output.
    """

    bn_inputs: dict[str, Moments]
    bn_anchored: dict[str, Moments]
    outputs: dict[str, Moments]
    mix: dict[str, tuple[float, float, float]]
    corrections: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _hermite(q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilists' Gauss-Hermite nodes and weights for N(0, 1) (weights sum to 1)."""
    # Golub-Welsch: eigenvalues of the Jacobi matrix of the Hermite_e recurrence.
    off = torch.sqrt(torch.arange(1, q, dtype=torch.float64))
    J = torch.diag(off, 1) + torch.diag(off, -1)
    nodes, vecs = torch.linalg.eigh(J)
    weights = vecs[0] ** 2
    return nodes, weights / weights.sum()


def _legendre(q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Legendre nodes and weights on [-1, 1] (Golub-Welsch)."""
    k = torch.arange(1, q, dtype=torch.float64)
    off = k / torch.sqrt(4.0 * k * k - 1.0)
    nodes, vecs = torch.linalg.eigh(torch.diag(off, 1) + torch.diag(off, -1))
    return nodes, 2.0 * vecs[0] ** 2


def _relu_cond_mean(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """E[relu(y)] for y ~ N(m, s^2), elementwise; exact relu(m) where s = 0."""
    safe = s.clamp_min(1e-300)
    t = m / safe
    out = m * torch.special.ndtr(t) + safe * torch.exp(-0.5 * t * t) * _INV_SQRT_2PI
    if bool((s <= 0).any()):  # rare: correlation exactly +-1 (duplicate channels)
        out = torch.where(s > 0, out, m.clamp_min(0.0))
    return out


def _relu_nodes(m: torch.Tensor, sd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel quadrature of N(0, 1) over the half line where relu(m + sd z) > 0.

    The kink of ReLU ruins Gauss-Hermite accuracy (~1% at 32 nodes); Gauss-Legendre on
    [max(-m/sd, -8), 8] integrates a smooth function instead. Returns (z (C, Q), w (C, Q)),
    w including the normal density.
    """
    t, v = (a.to(m.dtype) for a in _legendre(_Q_RELU))
    lo = torch.where(sd > 0, -m / sd.clamp_min(1e-300), torch.full_like(m, -_Z_MAX))
    lo = lo.clamp(-_Z_MAX, _Z_MAX)
    half = 0.5 * (_Z_MAX - lo)[:, None]
    z = lo[:, None] + half * (t[None, :] + 1.0)
    w = v[None, :] * half * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return z, w


def gaussian_moments(
    mean: torch.Tensor,
    cov: torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    is_relu: bool = False,
    chunk: int = 128,
) -> Moments:
    """Mean and covariance of ``fn(x)`` for x ~ N(mean, cov), elementwise ``fn``.

    Pairwise quadrature: E[f(x_i) f(x_j)] uses x_j | x_i, so only the pair's correlation
    enters. The diagonal uses the same rule with correlation 1, so duplicated channels give
    identical rows and columns (an exact fold stays exact).

    Args:
        mean: (C,) channel means.
        cov: (C, C) channel covariance.
        fn: the elementwise activation.
        is_relu: ``fn`` is ReLU: the inner expectation in closed form (faster, more accurate).
        chunk: rows per block (memory is chunk * C * Q^2 doubles).

    Returns:
        Moments of the activation's output, (C,) and (C, C).
    """
    m = mean
    base = Moments(m, cov.to(m.dtype))
    sd = base.var.sqrt()
    rho = base.corr
    if is_relu:
        za, wa = _relu_nodes(m, sd)  # (C, Q) each
        fa = m[:, None] + sd[:, None] * za  # relu is the identity on the nodes
    else:
        z, w = (a.to(m.dtype) for a in _hermite(_Q_GENERIC))
        za, wa = z.expand(m.shape[0], -1), w.expand(m.shape[0], -1)
        fa = fn(m[:, None] + sd[:, None] * za)
    ef = (fa * wa).sum(1)  # (C,)
    n = m.shape[0]
    eff = torch.empty(n, n, dtype=m.dtype)
    fw = fa * wa
    for i0 in range(0, n, chunk):
        i1 = min(n, i0 + chunk)
        r = rho[i0:i1]  # (c, n)
        resid = sd[None, :] * torch.sqrt((1.0 - r * r).clamp_min(0.0))
        # conditional mean of x_j given x_i at node a: (c, n, Q)
        cm = m[None, :, None] + (sd[None, :] * r)[..., None] * za[i0:i1, None, :]
        if is_relu:
            g = _relu_cond_mean(cm, resid[..., None].expand_as(cm))
        else:
            y = cm[..., None] + resid[..., None, None] * z[None, None, None, :]
            g = fn(y) @ w  # (c, n, Q)
        eff[i0:i1] = torch.einsum("ia,ija->ij", fw[i0:i1], g)
    # Conditioning on x_i or on x_j differs by the quadrature error; the average is symmetric
    # and treats twin channels identically, so duplicates keep correlation exactly 1.
    eff = 0.5 * (eff + eff.t())
    cov_out = eff - ef[:, None] * ef[None, :]
    return Moments(ef, cov_out)


def _dense_taps(w: torch.Tensor, c_in: int, dtype: torch.dtype) -> torch.Tensor:
    """Conv weight (out, in/groups, *k) -> dense per-tap matrices (taps, out, c_in)."""
    out, per_group = w.shape[0], w.shape[1]
    groups = c_in // per_group
    if groups * per_group != c_in or out % groups:
        raise ValueError(f"conv weight {tuple(w.shape)} does not fit {c_in} input channels")
    taps = math.prod(w.shape[2:]) if w.dim() > 2 else 1
    wt = w.reshape(out, per_group, taps).permute(2, 0, 1).to(dtype)  # (taps, out, per_group)
    if groups == 1:
        return wt
    og = out // groups
    dense = torch.zeros(taps, out, c_in, dtype=dtype)
    for g in range(groups):
        dense[:, g * og : (g + 1) * og, g * per_group : (g + 1) * per_group] = wt[
            :, g * og : (g + 1) * og
        ]
    return dense


#: Spatial correlation decay per tap step tried when calibrating a conv (0: independent).
_LAMBDAS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)


def _tap_distance(
    kernel: Sequence[int], dilation: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """(taps, taps) L1 distance between the kernel taps, in input pixels."""
    grids = torch.meshgrid(
        *[torch.arange(k, dtype=dtype) * d for k, d in zip(kernel, dilation)], indexing="ij"
    )
    coords = torch.stack([g.flatten() for g in grids], 1)
    return (coords[:, None, :] - coords[None, :, :]).abs().sum(-1)


def _spatial_cov(
    dense: torch.Tensor, cov: torch.Tensor, dist: torch.Tensor, mix: tuple[float, float, float]
) -> torch.Tensor:
    """Output channel covariance of a multi-tap map for input pixels whose correlation decays as
    lam^distance, plus a component correlated over the whole map: (out, out).

    ``mix`` = (c1, lam, c2): ``c1 * sum_pq lam^d(p,q) W_p S W_q^T + c2 * Wbar S Wbar^T``.
    """
    c1, lam, c2 = mix
    M = dense @ cov  # (taps, out, in)
    out = torch.zeros(dense.shape[1], dense.shape[1], dtype=dense.dtype)
    if c1 > 0:
        K = lam**dist if lam > 0 else (dist == 0).to(dense.dtype)
        V = torch.einsum("pq,qoi->poi", K, dense)
        out = out + c1 * torch.einsum("poi,pri->or", M, V)
    if c2 > 0:
        wbar = dense.sum(0)
        out = out + c2 * (M.sum(0) @ wbar.t())
    return out


def _fit_spatial(
    dense: torch.Tensor, cov: torch.Tensor, dist: torch.Tensor, target: torch.Tensor
) -> tuple[float, float, float]:
    """The (c1, lam, c2) of :func:`_spatial_cov` whose diagonal best matches ``target`` (out,).

    Relative least squares, c1, c2 >= 0, lam from a grid; only diagonals are formed.
    """
    M = dense @ cov
    D = torch.einsum("poi,qoi->pqo", M, dense)  # diag of W_p S W_q^T, (taps, taps, out)
    full = D.sum((0, 1)) / target.clamp_min(1e-30)
    best, best_err = (1.0, 0.0, 0.0), math.inf
    for lam in _LAMBDAS:
        K = lam**dist if lam > 0 else (dist == 0).to(dense.dtype)
        part = torch.einsum("pq,pqo->o", K, D) / target.clamp_min(1e-30)
        c1, c2 = _nnls2(part, full)
        err = float(((c1 * part + c2 * full - 1.0) ** 2).sum())
        if err < best_err:
            best, best_err = (c1, lam, c2), err
    return best


def _nnls2(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Nonnegative (c1, c2) minimising ||c1 a + c2 b - 1||^2."""
    ones = torch.ones_like(a)
    cands: list[tuple[float, float]] = []
    sol = torch.linalg.lstsq(torch.stack([a, b], 1), ones[:, None]).solution.flatten()
    if bool((sol >= 0).all()):
        cands.append((float(sol[0]), float(sol[1])))
    for col, which in ((a, 0), (b, 1)):
        den = float((col * col).sum())
        if den > 0:
            c = float((col * ones).sum()) / den
            cands.append((c, 0.0) if which == 0 else (0.0, c))
    if not cands:
        return 1.0, 0.0
    return min(cands, key=lambda c: float(((c[0] * a + c[1] * b - 1.0) ** 2).sum()))


Getter = Callable[[str, str], torch.Tensor | None]


def _module_getter(model: nn.Module, state: TensorState | None) -> Getter:
    def get(mname: str, tname: str) -> torch.Tensor | None:
        if state is not None and mname in state and tname in state[mname]:
            return state[mname][tname].detach()
        t = getattr(get_module(model, mname), tname, None)
        return None if t is None else t.detach()

    return get


def _pass_dtype(model: nn.Module) -> torch.dtype:
    """float64 for float64 models (exactness checks), else float32: statistics need no more,
    and the quadrature runs about twice as fast."""
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    return torch.float64 if p is not None and p.dtype == torch.float64 else torch.float32


def _shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> dict[str, tuple]:
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)
    out = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            out[node.name] = tuple(meta.shape)
    return out


class _Pass:
    """One propagation over the traced graph, reading tensors through ``get``."""

    def __init__(
        self,
        gm: fx.GraphModule,
        shapes: dict[str, tuple],
        get: Getter,
        *,
        reference: Propagation | None,
        maps: dict[str, torch.Tensor],
        input_moments: Sequence[Moments] | None,
        uncorrelated: bool = False,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.gm, self.shapes, self.get = gm, shapes, get
        self.uncorrelated = uncorrelated
        self.ref = reference
        self.maps = {k: a.to(dtype) for k, a in maps.items()}
        self.dt = dtype
        self.input_moments = input_moments
        self.rec = Propagation({}, {}, {}, {}, {})

    def run(self) -> Propagation:
        env: dict[str, Moments | None] = {}
        placeholders = 0
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                env[node.name] = self._input(node, placeholders)
                placeholders += 1
            elif node.op == "get_attr":
                env[node.name] = None
            elif node.op == "output":
                break
            else:
                env[node.name] = self._node(node, env)
        return self.rec

    def _input(self, node: fx.Node, i: int) -> Moments | None:
        shape = self.shapes.get(node.name)
        if shape is None:
            return None
        if self.input_moments is not None and i < len(self.input_moments):
            return self.input_moments[i]
        c = shape[1] if len(shape) > 1 else shape[0]
        # Unknown input statistics: white, zero mean. The first BatchNorm re-anchors both.
        return Moments(torch.zeros(c, dtype=self.dt), torch.eye(c, dtype=self.dt))

    def _arg(self, env, node: fx.Node) -> Moments:
        v = env.get(node.args[0].name) if isinstance(node.args[0], fx.Node) else None
        if v is None:
            raise ValueError(
                f"repair='stats' cannot propagate statistics into {node.name!r} "
                f"({node.op} {node.target}): its input is not a tracked activation"
            )
        return v

    def _unsupported(self, node: fx.Node, what: str) -> ValueError:
        return ValueError(
            f"repair='stats' cannot propagate channel statistics through {what} "
            f"(node {node.name!r}); use repair='none', 'dir' or 'data' for this model"
        )

    def _node(self, node: fx.Node, env) -> Moments | None:
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            name = str(node.target)
            x = self._arg(env, node)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                return self._bn(name, mod, x)
            if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                return self._linear(node, name, x)
            if isinstance(mod, _ELEMENTWISE_MODULES):
                return gaussian_moments(x.mean, x.cov, mod, is_relu=type(mod) is nn.ReLU)
            if isinstance(mod, _IDENTITY_MODULES):
                return self._identity(node, x)
            raise self._unsupported(node, f"module {type(mod).__name__}")
        if node.op == "call_function":
            fn = node.target
            if fn in _ELEMENTWISE_FUNCTIONS:
                x = self._arg(env, node)
                return gaussian_moments(
                    x.mean,
                    x.cov,
                    _ELEMENTWISE_FUNCTIONS[fn],
                    is_relu=fn in (F.relu, torch.relu),
                )
            if fn in _IDENTITY_FUNCTIONS:
                return self._identity(node, self._arg(env, node))
            if fn in (F.conv1d, F.conv2d):  # a conv module calling F.conv* on its own weights
                names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
                ba = dict(zip(names, node.args), **node.kwargs)
                w, b = ba.get("weight"), ba.get("bias")
                is_attr = getattr(w, "op", None) == "get_attr"
                owner = str(w.target).rpartition(".")[0] if is_attr else None
                if owner is None or (
                    b is not None
                    and (getattr(b, "op", None) != "get_attr" or str(b.target) != f"{owner}.bias")
                ):
                    raise self._unsupported(node, f"function {fn.__name__} on foreign weights")
                dil = ba.get("dilation", 1)
                nd = len(self.get(owner, "weight").shape) - 2
                dil = tuple(dil) if isinstance(dil, (list, tuple)) else (int(dil),) * nd
                conv = (dil, int(ba.get("groups", 1)))
                return self._linear(node, owner, self._arg(env, node), conv)
            if fn in _ADD or fn in _SUB or fn in _SCALE:
                return self._binary(node, fn, env)
            if fn is getattr:
                return None
            raise self._unsupported(node, f"function {getattr(fn, '__name__', fn)}")
        if node.op == "call_method":
            if node.target in _IDENTITY_METHODS:
                return self._identity(node, self._arg(env, node))
            if node.target == "size" or node.target == "dim":
                return None
            if node.target in _ELEMENTWISE_METHODS:
                x = self._arg(env, node)
                f = _ELEMENTWISE_METHODS[node.target]
                return gaussian_moments(x.mean, x.cov, f, is_relu=f is F.relu)
            if node.target in _ADD or node.target in _SUB or node.target in _SCALE:
                return self._binary(node, node.target, env)
            raise self._unsupported(node, f"method Tensor.{node.target}")
        raise self._unsupported(node, f"{node.op} {node.target}")

    def _binary(self, node: fx.Node, op, env) -> Moments:
        """Sum / difference of two activations, or an activation and a number."""
        vals = [env.get(a.name) if isinstance(a, fx.Node) else a for a in node.args[:2]]
        if len(vals) != 2 or node.kwargs:
            raise self._unsupported(node, "this arithmetic")
        a, b = vals
        if isinstance(a, Moments) and isinstance(b, Moments) and (op in _ADD or op in _SUB):
            # Branches taken as uncorrelated; the next BatchNorm re-anchors the diagonal.
            sign = 1.0 if op in _ADD else -1.0
            return Moments(a.mean + sign * b.mean, a.cov + b.cov, a.taps)
        num = (int, float)
        if isinstance(a, num) and isinstance(b, Moments) and op not in (operator.truediv,):
            a, b = b, a
            if op in _SUB:
                return Moments(b - a.mean, a.cov, a.taps)
        if isinstance(a, Moments) and isinstance(b, num) and not isinstance(b, bool):
            if op in _ADD:
                return Moments(a.mean + b, a.cov, a.taps)
            if op in _SUB:
                return Moments(a.mean - b, a.cov, a.taps)
            c = 1.0 / b if op is operator.truediv else float(b)
            return Moments(a.mean * c, a.cov * c * c, a.taps)
        raise self._unsupported(node, "a product or quotient of two activations")

    def _identity(self, node: fx.Node, x: Moments) -> Moments:
        """Shape-only ops, pooling, dropout: moments unchanged; flatten records the taps."""
        in_shape = self.shapes.get(node.args[0].name) if node.args else None
        out_shape = self.shapes.get(node.name)
        if in_shape is None or out_shape is None:
            raise self._unsupported(node, "an op of unknown shape")
        # Static shapes come from the original model: compare axes, not the (folded) widths.
        if len(out_shape) >= 2 and len(in_shape) >= 2 and out_shape[1] == in_shape[1]:
            return x  # channels stay on axis 1 (pooling, dropout, view to the same channels)
        if len(out_shape) == 2 and len(in_shape) > 2:
            taps = math.prod(in_shape[2:])
            if out_shape[1] == in_shape[1] * taps:
                return x if taps == 1 else Moments(x.mean, x.cov, x.taps * taps)
        if in_shape == out_shape:
            return x
        raise self._unsupported(node, f"a reshape from {in_shape} to {out_shape}")

    def _linear(
        self, node: fx.Node, name: str, x: Moments, conv: tuple[tuple, int] | None = None
    ) -> Moments:
        """Linear / conv ``name`` on moments ``x``; ``conv``: (dilation, groups) of a functional
        conv call (a module's own attributes otherwise)."""
        w = self.get(name, "weight")
        if conv is None and w.dim() > 2:
            mod = self.gm.get_submodule(name)
            conv = (tuple(mod.dilation), int(mod.groups))
        b = self.get(name, "bias")
        c_in = x.mean.shape[0]
        if w.dim() == 2 and x.taps > 1:
            if w.shape[1] != c_in * x.taps:
                raise self._unsupported(node, "a Linear whose inputs do not match the flatten")
            w = w.reshape(w.shape[0], c_in, x.taps)
        dense = _dense_taps(w, c_in, self.dt)
        mean = dense.sum(0) @ x.mean
        if b is not None:
            mean = mean + b.to(self.dt)
        if dense.shape[0] == 1:
            cov = dense[0] @ x.cov @ dense[0].t()
        else:
            if w.dim() == 3 and x.taps > 1:  # Linear after flatten: positions, no kernel grid
                dist = 1.0 - torch.eye(dense.shape[0], dtype=self.dt)
            else:
                dist = _tap_distance(w.shape[2:], conv[0], self.dt)
            if self.ref is None:
                mix = self._calibrate(node, dense, x.cov, dist)
                self.rec.mix[name] = mix
            else:
                mix = self.ref.mix[name]
            cov = _spatial_cov(dense, x.cov, dist, mix)
        out = Moments(mean, cov)
        # a depthwise conv (one input channel per filter); the traced groups constant is the
        # unfolded width, so read it off the (possibly folded) weight instead
        per_channel = conv is not None and conv[1] > 1 and w.dim() > 2 and w.shape[1] == 1
        if self.ref is not None and name in self.maps and not per_channel:
            # A folded producer without BatchNorm (a depthwise conv is a per-channel op of its
            # group instead: the BatchNorm after it is anchored).
            out = self._affine_repair(name, out)
        self.rec.outputs[name] = out
        return out

    def _calibrate(
        self, node: fx.Node, dense: torch.Tensor, cov: torch.Tensor, dist: torch.Tensor
    ) -> tuple[float, float, float]:
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module":
            bn = self.gm.get_submodule(users[0].target)
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats:
                return _fit_spatial(dense, cov, dist, bn.running_var.detach().to(self.dt))
        # No stored statistics to calibrate on: a middle guess between the extremes.
        return 0.5, 0.0, 0.5

    def _affine_repair(self, name: str, out: Moments) -> Moments:
        """REPAIR for a BN-free folded producer: match the members' mean / std (A @ ...)."""
        A = self.maps[name]
        orig = self.ref.outputs[name]
        t_mean, t_sd = A @ orig.mean, A @ orig.var.sqrt()
        sd = out.var.sqrt()
        scale = torch.where(sd > 0, t_sd / sd.clamp_min(1e-300), torch.ones_like(sd))
        shift = t_mean - out.mean * scale
        self.rec.corrections[name] = (scale, shift)
        return Moments(t_mean, out.cov * scale[:, None] * scale[None, :], out.taps)

    def _bn(self, name: str, bn: nn.Module, x: Moments) -> Moments:
        self.rec.bn_inputs[name] = x
        eps = bn.eps
        if bn.track_running_stats:
            if self.ref is None:
                mu = bn.running_mean.detach().to(self.dt)
                v = bn.running_var.detach().to(self.dt)
                anchored = Moments(mu, v.sqrt()[:, None] * x.corr * v.sqrt()[None, :], x.taps)
            else:
                orig = self.ref.bn_inputs[name]
                stored = self.ref.bn_anchored[name]
                A = self.maps.get(name)
                kappa = torch.where(
                    orig.var > 0, stored.var / orig.var.clamp_min(1e-300), torch.ones_like(orig.var)
                )
                delta = stored.mean - orig.mean
                d = kappa.sqrt()
                if A is not None:
                    d, delta = A @ d, A @ delta
                anchored = Moments(x.mean + delta, x.cov * d[:, None] * d[None, :], x.taps)
                if A is not None and self.uncorrelated:
                    # Ablation: members taken as uncorrelated, var = (1/N^2) sum_i var_i.
                    want = (A * A) @ stored.var
                    r = (want / anchored.var.clamp_min(1e-300)).sqrt()
                    anchored = Moments(anchored.mean, anchored.cov * r[:, None] * r[None, :])
        else:  # batch statistics at inference: the output is standardised whatever comes in
            anchored = x
        self.rec.bn_anchored[name] = anchored
        rm, rv = anchored.mean, anchored.var
        gamma = self.get(name, "weight")
        beta = self.get(name, "bias")
        s = 1.0 / torch.sqrt(rv + eps)
        if gamma is not None:
            s = s * gamma.to(self.dt)
        mean = torch.zeros_like(rm) if beta is None else beta.to(self.dt).clone()
        return Moments(mean, anchored.cov * s[:, None] * s[None, :], x.taps)


def propagate(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    input_moments: Sequence[Moments] | None = None,
) -> Propagation:
    """Propagate channel moments through the original ``model``, anchored at every BatchNorm.

    Args:
        model: a torch.fx-traceable CNN / MLP.
        example_inputs: an input batch, e.g. (N, C, H, W), for shapes only.
        input_moments: moments of each model input's channels; default white, zero mean.

    Returns:
        The recorded :class:`Propagation`.

    Raises:
        ValueError: the graph holds an op the propagation does not model.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    gm = trace(model)
    shapes = _shapes(gm, example_inputs)
    get = _module_getter(model, None)
    dtype = input_moments[0].mean.dtype if input_moments else _pass_dtype(model)
    return _Pass(
        gm, shapes, get, reference=None, maps={}, input_moments=input_moments, dtype=dtype
    ).run()


def repair_maps(
    groups: Sequence[ChannelGroup], plans: dict[str, object]
) -> dict[str, torch.Tensor]:
    """Module name -> averaging matrix (k, n) for every BatchNorm and BN-free producer folded.

    Args:
        groups: the model's channel groups.
        plans: group name -> plan with ``labels``, ``k`` and ``rule`` (a GroupPlan).
    """
    maps: dict[str, torch.Tensor] = {}
    for g in groups:
        pl = plans.get(g.name)
        if pl is None:
            continue
        A = merge_matrices(pl.labels, pl.k, pl.rule, _DT)[1]
        bns = set(g.bn_of.values())
        for c in g.channel_ops:
            maps[c] = A
        for p in g.producers:
            if p not in g.bn_of:
                maps[p] = A
        for c in bns:
            maps[c] = A
    return maps


def stats_repair_state(
    model: nn.Module,
    state: TensorState,
    maps: dict[str, torch.Tensor],
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    reference: Propagation | None = None,
    uncorrelated: bool = False,
    static: bool = False,
) -> tuple[TensorState, Propagation]:
    """The merged tensors plus the repaired statistics, computed without touching ``model``.

    Args:
        model: the ORIGINAL model (unchanged).
        state: merged tensors from :func:`netfold.fold.merge.merge_group` (not modified).
        maps: from :func:`repair_maps`.
        example_inputs: an input batch (shapes only).
        reference: an original-network :func:`propagate` result to reuse (sweeps).
        uncorrelated: ablation: give each merged BatchNorm the variance of a mean of
            UNCORRELATED members, (1/N^2) sum_i var_i, instead of the propagated correlation.
        static: ablation: only merged BatchNorms change, to the statistics of the mean of
            their members in the ORIGINAL network (mean A mu, variance
            (1/N^2) sum_ij rho_ij s_i s_j); the folded upstream and every later BatchNorm are
            ignored (BN-free producers are still corrected).

    Returns:
        ``(new_state, folded_propagation)``: ``new_state`` is ``state`` with every tracked
        BatchNorm's ``running_mean`` / ``running_var`` replaced by the predicted ones and each
        BN-free folded producer's ``weight`` / ``bias`` carrying its affine correction.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    gm = trace(model)
    shapes = _shapes(gm, example_inputs)
    dtype = _pass_dtype(model)
    if reference is None:
        reference = _Pass(
            gm,
            shapes,
            _module_getter(model, None),
            reference=None,
            maps={},
            input_moments=None,
            dtype=dtype,
        ).run()
    folded = _Pass(
        gm,
        shapes,
        _module_getter(model, state),
        reference=reference,
        maps=maps,
        input_moments=None,
        uncorrelated=uncorrelated,
        dtype=dtype,
    ).run()
    new: TensorState = {m: dict(t) for m, t in state.items()}
    for name, mom in folded.bn_anchored.items():
        bn = get_module(model, name)
        if not bn.track_running_stats:
            continue
        if static:
            if name not in maps:
                continue
            orig = reference.bn_anchored[name]
            A = maps[name].to(orig.mean.dtype)
            mom = Moments(A @ orig.mean, A @ orig.cov @ A.t())
        new.setdefault(name, {})["running_mean"] = mom.mean.to(bn.running_mean.dtype)
        new[name]["running_var"] = mom.var.to(bn.running_var.dtype)
    for name, (scale, shift) in folded.corrections.items():
        m = get_module(model, name)
        w = new.get(name, {}).get("weight", m.weight.detach())
        b = new.get(name, {}).get("bias", m.bias.detach() if m.bias is not None else None)
        w64 = w.to(_DT) * scale.reshape((-1,) + (1,) * (w.dim() - 1))
        b64 = (b.to(_DT) if b is not None else torch.zeros_like(scale)) * scale + shift
        new.setdefault(name, {})["weight"] = w64.to(w.dtype)
        if m.bias is None:
            raise ValueError(
                f"repair='stats' needs a bias on BN-free producer {name!r} to carry its shift"
            )
        new[name]["bias"] = b64.to(w.dtype)
    return new, folded


# ------------------------------------------------------------------------------ registration
def _prepare(ctx) -> None:
    """The registry's step: predicted statistics join the merged tensors before the write."""
    ctx.state = stats_repair_state(
        ctx.model, ctx.state, repair_maps(ctx.todo, ctx.plans), ctx.example_inputs
    )[0]


def _register() -> None:
    from .repairs import Repair, register

    register(
        Repair(
            "stats",
            "nothing",
            "BatchNorm statistics predicted from the stored ones by moment propagation "
            "(data-free, instant)",
            prepare=_prepare,
            families=False,
        )
    )


_register()

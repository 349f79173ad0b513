"""Find fusable pairs from module structure plus a recorded forward, without mutating anything.

A candidate is a pair (or chain) of modules of fusable kinds where the second reads the first's
output tensor directly: Conv/Linear -> BatchNorm, BatchNorm -> Conv/Linear, Linear -> Linear
(through BatchNorm1d / Identity), RMSNorm/LayerNorm -> Linear(s). Each candidate is either
planned (a :class:`Fusion` with a pure ``build`` function) or rejected with a reason. The proof
that "B consumes exactly A's output" comes from the tape (:mod:`netfold.fuse.record`): the tensor
A returned is read by exactly one op, B's core op, as its input, and is not a model output.
Anything between them (an activation, a residual add, a view, a functional ``torch.relu``)
shows up as another reader and the pair is not fused.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from netfold.fuse import ops as F_
from netfold.fuse.config import FuseConfig
from netfold.fuse.record import Key, OpRecord, Recording

__all__ = ["Fusion", "Rejection", "plan_fusions", "plan_dropout_removal", "is_norm"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_OPS = {"conv1d", "conv2d", "conv3d"}
_DROPOUTS = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

Get = Callable[[str], nn.Module]
Build = Callable[[Get], list[tuple[str, nn.Module]]]


@dataclass
class Fusion:
    """A planned fusion.

    Attributes:
        kind: "conv_bn", "linear_bn", "bn_conv", "bn_linear", "linear_chain", "norm_linear",
            "pad_conv", "dropout".
        modules: qualified module names in dataflow order.
        build: pure function of a module lookup (``name -> module`` in the model being rewritten:
            the model itself or its float64 twin) returning ``[(name, new_module), ...]``.
        detail: human-readable specifics (widths, costs).
    """

    kind: str
    modules: tuple[str, ...]
    build: Build
    detail: str = ""

    @property
    def key(self) -> tuple[str, tuple[str, ...]]:
        return (self.kind, self.modules)


@dataclass
class Rejection:
    """A candidate that was not fused, and why."""

    kind: str
    modules: tuple[str, ...]
    reason: str

    @property
    def key(self) -> tuple[str, tuple[str, ...]]:
        return (self.kind, self.modules)


def is_norm(m: nn.Module) -> bool:
    """LayerNorm / RMSNorm-like: a leaf whose only parameters are a 1-D weight and optional bias.

    Recognised: ``nn.LayerNorm``, ``nn.RMSNorm`` and classes named ``*RMSNorm`` / ``*LayerNorm``
    (Hugging Face). Whether the module really computes ``normalize(x) * weight (+ bias)`` is
    checked numerically before folding.
    """
    if not isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and not type(m).__name__.endswith(
        ("RMSNorm", "LayerNorm")
    ):
        return False
    w = m._parameters.get("weight")
    if w is None or w.dim() != 1:
        return False
    names = {k for k, v in m._parameters.items() if v is not None}
    if names - {"weight", "bias"} or next(m.children(), None) is not None:
        return False
    b = m._parameters.get("bias")
    return b is None or b.shape == w.shape


def plan_dropout_removal(model: nn.Module, config: FuseConfig) -> list[Fusion]:
    """Dropout modules (exact types only; identity at eval) to replace with ``nn.Identity``."""
    if not config.remove_dropout:
        return []
    out = []
    for name, m in model.named_modules():
        if name and type(m) in _DROPOUTS and not _skipped(config, (name,)):
            out.append(
                Fusion(
                    "dropout",
                    (name,),
                    (lambda get, n=name: [(n, nn.Identity())]),
                    f"{type(m).__name__}(p={m.p})",
                )
            )
    return out


def _skipped(config: FuseConfig, names: tuple[str, ...]) -> str | None:
    for n in names:
        for pat in config.skip:
            if fnmatch.fnmatchcase(n, pat):
                return n
    return None


@dataclass
class _Ctx:
    model: nn.Module
    rec: Recording
    config: FuseConfig
    blocked: set[tuple[str, tuple[str, ...]]]
    mods: dict[str, nn.Module] = field(default_factory=dict)
    n_paths: dict[int, int] = field(default_factory=dict)
    param_owners: dict[int, int] = field(default_factory=dict)
    claimed: set[str] = field(default_factory=set)
    deferred: bool = False  # a candidate waited for a module claimed this round
    fusions: list[Fusion] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mods = dict(self.model.named_modules())
        for _, m in self.model.named_modules(remove_duplicate=False):
            self.n_paths[id(m)] = self.n_paths.get(id(m), 0) + 1
            for p in m._parameters.values():
                if p is not None:
                    self.param_owners[id(p)] = self.param_owners.get(id(p), 0) + 1

    # ---- generic checks -------------------------------------------------------------------
    def problem(self, names: tuple[str, ...]) -> str | None:
        """Why these modules cannot be rewritten at all (None if they can)."""
        s = _skipped(self.config, names)
        if s is not None:
            return f"{s!r} matches a skip pattern"
        for n in names:
            m = self.mods[n]
            calls = len(self.rec.calls.get(n, []))
            if calls != 1:
                return f"{n!r} is called {calls} times in the forward pass"
            if self.n_paths.get(id(m), 1) > 1:
                return f"{n!r} is registered under several names"
            for pname, p in m._parameters.items():
                if p is not None and self.param_owners.get(id(p), 1) > 1:
                    return f"{n}.{pname} is shared with another module (tied weights)"
        return None

    def core_op(self, name: str, kinds: set[str] | str) -> tuple[OpRecord | None, str]:
        """The one op of module ``name`` that computes its output from its own weight and bias."""
        kinds = {kinds} if isinstance(kinds, str) else kinds
        m = self.mods[name]
        out = self.rec.output_of(name)
        if out is None:
            return None, f"{name!r} does not return a single tensor from a single call"
        ops = [op for op in self.rec.ops_in(name) if op.name in kinds]
        if len(ops) != 1:
            return None, f"{name!r} runs {len(ops)} {'/'.join(sorted(kinds))} ops"
        op = ops[0]
        if self.rec.output_key(name) not in op.outputs:
            return None, f"{name!r} returns something other than its {op.name} result"
        if op.name == "batch_norm":
            w, b = op.arg(3, "weight"), op.arg(4, "bias")
            if (
                op.arg(1, "running_mean") is not m.running_mean
                or op.arg(2, "running_var") is not m.running_var
            ):
                return None, f"{name!r} does not normalise with its running statistics"
            if op.arg(5, "training", False):
                return None, f"{name!r} normalises with batch statistics (training mode)"
        else:
            w, b = op.arg(1, "weight"), op.arg(2, "bias")
        if w is not m.weight or b is not m.bias:
            return None, f"{name!r} does not apply its own weight/bias directly"
        return op, ""

    def readers(self, key: Key | None) -> list[OpRecord]:
        """Ops that read the value ``key`` (a module output or op output, at that version)."""
        return self.rec.uses(key)

    def is_output(self, key: Key | None) -> bool:
        return key in self.rec.model_outputs

    def add(self, f: Fusion) -> None:
        self.fusions.append(f)
        self.claimed.update(f.modules)

    def reject(self, kind: str, modules: tuple[str, ...], reason: str) -> None:
        if (kind, modules) not in self.blocked:
            self.rejections.append(Rejection(kind, modules, reason))


def _describe(ops_: list[OpRecord]) -> str:
    names = [op.where() for op in ops_[:3]]
    more = f" and {len(ops_) - 3} more" if len(ops_) > 3 else ""
    return ", ".join(names) + more


def _bn_ok(ctx: _Ctx, name: str, t_in: torch.Tensor) -> tuple[OpRecord | None, str]:
    """BatchNorm ``name`` reads exactly ``t_in`` with running statistics."""
    bn = ctx.mods[name]
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return None, f"{name!r} has no running statistics (normalises with batch statistics)"
    if bn.training:
        return None, f"{name!r} is in training mode"
    op, why = ctx.core_op(name, "batch_norm")
    if op is None:
        return None, why
    if op.arg(0, "input") is not t_in:
        return None, f"{name!r} normalises something other than the producer's output"
    return op, ""


# ---- Conv/Linear -> BatchNorm, and Linear chains ------------------------------------------


def _plan_producers(ctx: _Ctx, order: list[str]) -> None:
    cfg = ctx.config
    for name in order:
        m = ctx.mods.get(name)
        if name in ctx.claimed or m is None:
            continue
        if isinstance(m, _CONVS) and cfg.conv_bn:
            _plan_conv_bn(ctx, name)
        elif isinstance(m, nn.Linear) and (cfg.linear_bn or cfg.linear_chain):
            _plan_linear(ctx, name)


def _outputs_of_all_calls(ctx: _Ctx, name: str) -> list[Key]:
    return [c.out_key for c in ctx.rec.calls.get(name, []) if c.out_key is not None]


def _next_of_kind(
    ctx: _Ctx, name: str, kind: type | tuple[type, ...], op_names: set[str]
) -> tuple[str | None, list[OpRecord]]:
    """A module of ``kind`` that reads ``name``'s output through an op in ``op_names``, and all readers."""
    readers: list[OpRecord] = []
    for out in _outputs_of_all_calls(ctx, name):
        readers.extend(ctx.readers(out))
    for op in readers:
        if (
            op.name in op_names
            and op.module is not None
            and isinstance(ctx.mods.get(op.module), kind)
        ):
            return op.module, readers
    return None, readers


def _conv_bn_problem(ctx: _Ctx, conv: str, bn: str, readers: list[OpRecord]) -> str | None:
    why = ctx.problem((conv, bn))
    if why:
        return why
    _, why = ctx.core_op(conv, _CONV_OPS)
    if why:
        return why
    t, key = ctx.rec.output_of(conv), ctx.rec.output_key(conv)
    if len(readers) != 1:
        return f"the output of {conv} is also read by {_describe([r for r in readers if r.module != bn])}"
    if ctx.is_output(key):
        return f"the output of {conv} is a model output"
    _, why = _bn_ok(ctx, bn, t)
    if why:
        return why
    if ctx.mods[bn].num_features != ctx.mods[conv].out_channels:
        return "channel counts differ"
    return None


def _plan_conv_bn(ctx: _Ctx, conv: str) -> None:
    bn, readers = _next_of_kind(ctx, conv, _BatchNorm, {"batch_norm"})
    if bn is None:
        return
    kind, mods = "conv_bn", (conv, bn)
    if (kind, mods) in ctx.blocked:
        return
    if bn in ctx.claimed:
        ctx.deferred = True
        return
    why = _conv_bn_problem(ctx, conv, bn, readers)
    if why is not None:
        ctx.reject(kind, mods, why)
        return
    cm, bm = ctx.mods[conv], ctx.mods[bn]
    ctx.add(
        Fusion(
            kind,
            mods,
            lambda get: [
                (conv, F_.fold_bn_into_producer(get(conv), get(bn))),
                (bn, nn.Identity()),
            ],
            f"{type(cm).__name__}({cm.in_channels}->{cm.out_channels}) + {type(bm).__name__}",
        )
    )


def _chain_step(ctx: _Ctx, cur: str, t: torch.Tensor) -> tuple[str | None, str | None]:
    """Next member (Linear or BatchNorm1d) of a linear chain after ``cur``, or why the chain stops.

    Returns ``(name, None)`` to extend, ``(None, reason)`` for a rejected candidate, ``(None, None)``
    when what follows is simply not fusable (an activation, a view, ...).
    """
    key = ctx.rec.output_key(cur)
    readers = ctx.readers(key)
    nxt = [
        op
        for op in readers
        if op.module is not None
        and (
            (op.name == "linear" and isinstance(ctx.mods.get(op.module), nn.Linear))
            or (op.name == "batch_norm" and isinstance(ctx.mods.get(op.module), _BatchNorm))
        )
    ]
    if not nxt:
        return None, None
    name = nxt[0].module
    if name in ctx.claimed:
        ctx.deferred = True  # taken by another fusion this round; try again next round
        return None, None
    if len(readers) != 1:
        return (
            None,
            f"the output of {cur} is also read by {_describe([r for r in readers if r is not nxt[0]])}",
        )
    if ctx.is_output(key):
        return None, f"the output of {cur} is a model output"
    why = ctx.problem((name,))
    if why is not None:
        return None, why
    m = ctx.mods[name]
    if isinstance(m, _BatchNorm):
        if not ctx.config.linear_bn:
            return None, "linear_bn disabled"
        if t.dim() != 2:
            return None, (
                f"{name!r} normalises dim 1 of a {t.dim()}-D activation, not the Linear's features"
            )
        _, why = _bn_ok(ctx, name, t)
        return (name, None) if not why else (None, why)
    if not ctx.config.linear_chain:
        return None, "linear_chain disabled"
    op, why = ctx.core_op(name, "linear")
    if op is None:
        return None, why
    if op.arg(0, "input") is not t or len(ctx.rec.ops_in(name)) != 1:
        return None, f"{name!r} transforms its input before the matmul"
    return name, None


def _linear_costs(mods: list[nn.Module]) -> tuple[int, int, int, int]:
    """(params of the chain's Linears, their MACs per row, merged params, merged MACs per row)."""
    lins = [m for m in mods if isinstance(m, nn.Linear)]
    p = sum(
        m.in_features * m.out_features + (m.out_features if m.bias is not None else 0) for m in lins
    )
    f = sum(m.in_features * m.out_features for m in lins)
    d0, dn = lins[0].in_features, lins[-1].out_features
    return p, f, d0 * dn + dn, d0 * dn


def _plan_linear(ctx: _Ctx, first: str) -> None:
    m0 = ctx.mods[first]
    why = ctx.problem((first,))
    op0, why0 = ctx.core_op(first, "linear")
    t = ctx.rec.output_of(first)
    # Walk the dataflow: Linear/BatchNorm1d members that read exactly the previous output.
    chain = [first]
    stop_reason: str | None = None
    nxt_name: str | None = None
    if why is None and op0 is not None and t is not None:
        cur = first
        while True:
            nxt_name, stop_reason = _chain_step(ctx, cur, t)
            if nxt_name is None:
                break
            chain.append(nxt_name)
            cur = nxt_name
            t = ctx.rec.output_of(cur)
    else:
        # Report a rejection only if a fusable partner actually follows.
        partner, _ = _next_of_kind(ctx, first, (nn.Linear, _BatchNorm), {"linear", "batch_norm"})
        if partner is not None and partner not in ctx.claimed:
            kind = "linear_bn" if isinstance(ctx.mods[partner], _BatchNorm) else "linear_chain"
            ctx.reject(kind, (first, partner), why or why0)
        return
    if stop_reason is not None:
        # The candidate that failed is (last chain member -> the module that follows it).
        partner, _ = _next_of_kind(
            ctx, chain[-1], (nn.Linear, _BatchNorm), {"linear", "batch_norm"}
        )
        if partner is not None:
            kind = "linear_bn" if isinstance(ctx.mods[partner], _BatchNorm) else "linear_chain"
            ctx.reject(kind, (chain[-1], partner), stop_reason)

    # Greedy left-to-right segmentation: merge while the merged Linear is no bigger than the chain.
    segments: list[list[str]] = []
    seg: list[str] = []
    pending: list[str] = []  # BatchNorms after the last Linear in seg
    for name in chain:
        m = ctx.mods[name]
        if isinstance(m, _BatchNorm):
            pending.append(name)
            continue
        if not seg:
            seg = [name]
            continue
        trial = seg + pending + [name]
        p_sep, f_sep, p_m, f_m = _linear_costs([ctx.mods[n] for n in trial])
        ok = ctx.config.allow_growth or (p_m <= p_sep and f_m <= f_sep)
        if type(ctx.mods[seg[0]]) is not nn.Linear:
            ok = False
            ctx.reject(
                "linear_chain",
                tuple(trial),
                f"{seg[0]!r} is a {type(ctx.mods[seg[0]]).__name__}, not a plain nn.Linear",
            )
        elif not ok:
            ctx.reject(
                "linear_chain",
                tuple(trial),
                f"merging would grow params {p_sep} -> {p_m} / MACs per row {f_sep} -> {f_m} "
                "(set allow_growth=True)",
            )
        elif ("linear_chain", tuple(trial)) in ctx.blocked:
            ok = False
        if ok:
            seg = trial
            pending = []
        else:
            segments.append(seg + pending)
            seg, pending = [name], []
    if seg:
        segments.append(seg + pending)

    for seg in segments:
        n_lin = sum(isinstance(ctx.mods[n], nn.Linear) for n in seg)
        mods_ = [ctx.mods[n] for n in seg]
        if n_lin >= 2:
            key = ("linear_chain", tuple(seg))
            if key in ctx.blocked:
                continue
            lins = [m for m in mods_ if isinstance(m, nn.Linear)]
            detail = (
                " -> ".join([str(lins[0].in_features)] + [str(m.out_features) for m in lins])
                + f" => {lins[0].in_features} -> {lins[-1].out_features}"
            )
            ctx.add(
                Fusion(
                    "linear_chain",
                    tuple(seg),
                    lambda get, seg=seg: (
                        [(seg[0], F_.compose_linear_chain([get(n) for n in seg]))]
                        + [(n, nn.Identity()) for n in seg[1:]]
                    ),
                    detail,
                )
            )
        elif len(seg) >= 2 and ctx.config.linear_bn:
            # One Linear followed by BatchNorm1d(s): fold each BN into it.
            key = ("linear_bn", tuple(seg))
            if key in ctx.blocked:
                continue
            lin_name, bns = seg[0], seg[1:]

            def build(get: Get, lin_name=lin_name, bns=bns) -> list[tuple[str, nn.Module]]:
                new = get(lin_name)
                for b in bns:
                    new = F_.fold_bn_into_producer(new, get(b))
                return [(lin_name, new)] + [(b, nn.Identity()) for b in bns]

            ctx.add(
                Fusion(
                    "linear_bn",
                    tuple(seg),
                    build,
                    f"Linear({m0.in_features}->{m0.out_features}) + BatchNorm1d",
                )
            )


# ---- BatchNorm -> Conv/Linear ----------------------------------------------------------------


def _op_zero_pads(op: OpRecord, weight: torch.Tensor) -> bool:
    """Whether a conv op pads its input with zeros (its ``padding`` argument)."""
    p = op.arg(4, "padding", 0)
    if isinstance(p, str):
        return p == "same" and any(k > 1 for k in weight.shape[2:])
    if isinstance(p, int):
        return p > 0
    return any(int(x) > 0 for x in p)


def _bn_forward_problem(
    ctx: _Ctx, bn: str, layer: str, kind: str, consumer: OpRecord, readers: list[OpRecord]
) -> str | None:
    why = ctx.problem((bn, layer))
    if why:
        return why
    call = ctx.rec.calls[bn][0]
    _, why = _bn_ok(ctx, bn, call.args[0] if call.args else None)
    if why:
        return why
    core, why = ctx.core_op(layer, _CONV_OPS if kind == "bn_conv" else "linear")
    if why:
        return why
    t, key = ctx.rec.output_of(bn), ctx.rec.output_key(bn)
    if len(readers) != 1:
        return f"the output of {bn} is also read by {_describe([r for r in readers if r is not consumer])}"
    if ctx.is_output(key):
        return f"the output of {bn} is a model output"
    _, shift = F_.bn_affine(ctx.mods[bn])
    nonzero_shift = bool(shift.any())
    lm = ctx.mods[layer]
    if kind == "bn_linear":
        if t.dim() != 2:
            return f"{bn!r} acts on dim 1 of a {t.dim()}-D activation, the Linear on the last"
        if core.arg(0, "input") is not t:
            return f"{layer!r} transforms its input before the matmul"
        return None
    if consumer.name == "pad":
        # nn.Conv with padding_mode reflect/replicate/circular: F.pad copies values of bn(x), and
        # bn(pad(x)) == pad(bn(x)) for those modes; constant padding inserts a value instead.
        mode = consumer.arg(2, "mode", "constant")
        value = consumer.arg(3, "value", None)
        if mode == "constant" and (nonzero_shift or value not in (None, 0, 0.0)):
            return "constant padding after a BatchNorm with non-zero shift is not foldable"
        if not any(core.arg(0, "input") is o for o in consumer.out_tensors):
            return f"{layer!r} transforms its padded input before the convolution"
    elif core.arg(0, "input") is not t:
        return f"{layer!r} transforms its input before the convolution"
    if _op_zero_pads(core, lm.weight) and nonzero_shift:
        return (
            "zero padding would see 0 where the original sees the BatchNorm shift "
            f"(max |shift| {float(shift.abs().max()):.3g})"
        )
    return None


def _plan_bn_forward(ctx: _Ctx, order: list[str]) -> None:
    for bn in order:
        m = ctx.mods.get(bn)
        if bn in ctx.claimed or not isinstance(m, _BatchNorm):
            continue
        readers = ctx.readers(ctx.rec.output_key(bn))
        consumer = next(
            (
                op
                for op in readers
                if op.module is not None
                and (
                    (op.name in _CONV_OPS | {"pad"} and isinstance(ctx.mods.get(op.module), _CONVS))
                    or (op.name == "linear" and isinstance(ctx.mods.get(op.module), nn.Linear))
                )
            ),
            None,
        )
        if consumer is None:
            continue
        layer = consumer.module
        lm = ctx.mods[layer]
        kind = "bn_linear" if isinstance(lm, nn.Linear) else "bn_conv"
        mods = (bn, layer)
        if (kind, mods) in ctx.blocked:
            continue
        if layer in ctx.claimed:
            ctx.deferred = True
            continue
        why = _bn_forward_problem(ctx, bn, layer, kind, consumer, readers)
        if why is not None:
            ctx.reject(kind, mods, why)
            continue
        ctx.add(
            Fusion(
                kind,
                mods,
                lambda get, bn=bn, layer=layer: [
                    (bn, nn.Identity()),
                    (layer, F_.fold_bn_into_consumer(get(bn), get(layer))),
                ],
                f"{type(m).__name__} + {type(lm).__name__}",
            )
        )


# ---- RMSNorm / LayerNorm weight -> Linear(s) -------------------------------------------------


def _norm_is_elementwise_affine(norm: nn.Module, x: torch.Tensor, out: torch.Tensor) -> bool:
    """Numerically check ``norm(x) == normalize(x) * weight (+ bias)`` (rules out ``(1 + w)``)."""
    unit = F_.unit_norm(norm)
    with torch.no_grad():
        u = unit(x)
        expect = u * norm.weight
        if isinstance(getattr(norm, "bias", None), torch.Tensor):
            expect = expect + norm.bias
    scale = float(out.detach().abs().max()) if out.numel() else 0.0
    err = float((expect - out).abs().max()) if out.numel() else 0.0
    return err <= 1e-5 * scale + 1e-6


def _keeps_last_dim(op: OpRecord, t: torch.Tensor) -> bool:
    """``t[key]`` where ``key`` leaves the last (feature) dim whole: it commutes with a per-feature
    scale, e.g. HF's ``hidden_states[:, slice_indices, :]`` before ``lm_head``."""
    if op.name != "__getitem__" or op.arg(0, "self") is not t:
        return False
    key = op.arg(1, "key")
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        return False
    indexed = [k for k in key if k is not None]
    last = key[-1] if key else None
    return len(indexed) == t.dim() and isinstance(last, slice) and last == slice(None)


def _norm_readers(
    ctx: _Ctx, name: str
) -> tuple[list[tuple[OpRecord, torch.Tensor]], list[OpRecord], list[Key]]:
    """Split the readers of a norm's output into (Linear op, the tensor it reads) pairs and others.

    A reader that only slices rows (see :func:`_keeps_last_dim`) is looked through.
    Returns ``(linear_readers, other_readers, keys_of_the_sliced_tensors)``.
    """
    t = ctx.rec.output_of(name)
    lins: list[tuple[OpRecord, torch.Tensor]] = []
    others: list[OpRecord] = []
    inter: list[Key] = []

    def is_lin(op: OpRecord) -> bool:
        return (
            op.name == "linear"
            and op.module is not None
            and isinstance(ctx.mods.get(op.module), nn.Linear)
        )

    for op in ctx.readers(ctx.rec.output_key(name)):
        if is_lin(op):
            lins.append((op, t))
        elif _keeps_last_dim(op, t) and len(op.outputs) == 1:
            g, g_key = op.out_tensors[0], op.outputs[0]
            sub = ctx.readers(g_key)
            if sub and all(is_lin(s) for s in sub):
                lins += [(s, g) for s in sub]
                inter.append(g_key)
            else:
                others.append(op)
        else:
            others.append(op)
    return lins, others, inter


def _norm_problem(
    ctx: _Ctx,
    name: str,
    layers: tuple[str, ...],
    t: torch.Tensor,
    lins: list[tuple[OpRecord, torch.Tensor]],
    others: list[OpRecord],
    inter: list[Key],
) -> str | None:
    why = ctx.problem((name, *layers))
    if why:
        return why
    if others:
        return f"the output of {name} is also read by {_describe(others)}"
    if len(layers) != len(lins):
        return "a Linear reads the norm output more than once"
    if ctx.is_output(ctx.rec.output_key(name)) or any(ctx.is_output(k) for k in inter):
        return f"the output of {name} is a model output"
    for op, src in lins:
        core, why = ctx.core_op(op.module, "linear")
        if core is None:
            return why
        if core.arg(0, "input") is not src:
            return f"{op.module} transforms its input before the matmul"
    m = ctx.mods[name]
    x = ctx.rec.calls[name][0].args[0] if ctx.rec.calls[name][0].args else None
    if not isinstance(x, torch.Tensor) or not _norm_is_elementwise_affine(m, x, t):
        return f"{type(m).__name__} does not compute normalize(x) * weight (+ bias)"
    return None


def _plan_norms(ctx: _Ctx, order: list[str]) -> None:
    for name in order:
        m = ctx.mods.get(name)
        if m is None or name in ctx.claimed or not is_norm(m):
            continue
        b = m._parameters.get("bias")
        if bool((m.weight == 1).all()) and (b is None or not bool(b.any())):
            continue  # already unit: nothing to fold
        t = ctx.rec.output_of(name)
        if t is None:
            n_calls = len(ctx.rec.calls.get(name, []))
            if n_calls > 1:
                ctx.reject("norm_linear", (name,), f"{name} is called {n_calls} times")
            continue
        lins, others, inter = _norm_readers(ctx, name)
        if not lins:
            continue  # no Linear reads it: not a candidate
        layers = tuple(dict.fromkeys(op.module for op, _ in lins))
        mods = (name, *layers)
        if ("norm_linear", mods) in ctx.blocked:
            continue
        if any(n in ctx.claimed for n in layers):
            ctx.deferred = True
            continue
        why = _norm_problem(ctx, name, layers, t, lins, others, inter)
        if why is not None:
            ctx.reject("norm_linear", mods, why)
            continue

        def build(get: Get, name=name, layers=layers) -> list[tuple[str, nn.Module]]:
            new_norm, new_lins = F_.fold_norm_into_linears(get(name), [get(n) for n in layers])
            return [(name, new_norm), *zip(layers, new_lins)]

        what = "weight and bias" if b is not None else "weight"
        ctx.add(
            Fusion(
                "norm_linear", mods, build, f"{type(m).__name__} {what} -> {len(layers)} Linear(s)"
            )
        )


# ---- zero-padding module -> Conv padding -------------------------------------------------------

_PADS = (
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
)


def _pad_problem(
    ctx: _Ctx, pad: str, conv: str, op: OpRecord, readers: list[OpRecord]
) -> str | None:
    why = ctx.problem((pad, conv))
    if why:
        return why
    pm, cm = ctx.mods[pad], ctx.mods[conv]
    if float(pm.value) != 0.0:
        return f"{pad} pads with {pm.value}, not zero"
    if cm.padding_mode != "zeros":
        return f"{conv} pads with mode {cm.padding_mode!r}"
    if len(readers) != 1:
        return (
            f"the output of {pad} is also read by {_describe([r for r in readers if r is not op])}"
        )
    if ctx.is_output(ctx.rec.output_key(pad)):
        return f"the output of {pad} is a model output"
    core, why = ctx.core_op(conv, _CONV_OPS)
    if core is None:
        return why
    if core is not op or core.arg(0, "input") is not ctx.rec.output_of(pad):
        return f"{conv} transforms the padded input before the convolution"
    if isinstance(cm.padding, str) and cm.padding != "valid":
        return f"{conv} uses padding={cm.padding!r}"
    p = pm.padding  # (left, right, top, bottom, ...) from the last dim backwards
    if len(p) != 2 * (cm.weight.dim() - 2):
        return f"{pad} pads {len(p) // 2} dims, the conv has {cm.weight.dim() - 2}"
    if any(p[2 * i] != p[2 * i + 1] for i in range(len(p) // 2)):
        return f"asymmetric padding {tuple(p)} cannot become Conv padding"
    return None


def _conv_with_padding(conv: nn.Module, pad_name_in_conv: str | None, extra: tuple[int, ...]):
    """A copy of ``conv`` with ``extra`` zero padding added (per spatial dim, first dim first)."""
    new = F_.clone_with(conv)
    old = (0,) * len(extra) if isinstance(conv.padding, str) else tuple(conv.padding)
    new.padding = tuple(a + b for a, b in zip(old, extra))
    if pad_name_in_conv:  # the pad module lives inside the conv (TF-style "same" convs)
        parent_name, _, attr = pad_name_in_conv.rpartition(".")
        parent = new.get_submodule(parent_name) if parent_name else new
        setattr(parent, attr, nn.Identity())
    return new


def _plan_pad_conv(ctx: _Ctx, order: list[str]) -> None:
    for pad in order:
        pm = ctx.mods.get(pad)
        if pm is None or pad in ctx.claimed or type(pm) not in _PADS:
            continue
        readers = ctx.readers(ctx.rec.output_key(pad))
        op = next(
            (
                r
                for r in readers
                if r.name in _CONV_OPS and isinstance(ctx.mods.get(r.module or ""), _CONVS)
            ),
            None,
        )
        if op is None:
            continue
        conv = op.module
        mods = (pad, conv)
        if ("pad_conv", mods) in ctx.blocked:
            continue
        if conv in ctx.claimed:
            ctx.deferred = True
            continue
        why = _pad_problem(ctx, pad, conv, op, readers)
        if why is not None:
            ctx.reject("pad_conv", mods, why)
            continue
        p = ctx.mods[pad].padding
        extra = tuple(p[2 * i] for i in reversed(range(len(p) // 2)))  # first spatial dim first
        inside = pad[len(conv) + 1 :] if pad.startswith(conv + ".") else None

        def build(get: Get, pad=pad, conv=conv, extra=extra, inside=inside):
            new = _conv_with_padding(get(conv), inside, extra)
            return [(conv, new)] if inside else [(pad, nn.Identity()), (conv, new)]

        ctx.add(Fusion("pad_conv", mods, build, f"zero padding {extra} -> conv padding"))


def plan_fusions(
    model: nn.Module,
    rec: Recording,
    config: FuseConfig,
    blocked: set[tuple[str, tuple[str, ...]]] | None = None,
) -> tuple[list[Fusion], list[Rejection], bool]:
    """Plan one round of fusions from a recorded forward.

    Every module takes part in at most one fusion per round, so the fusions of a round are
    independent: each can be applied or rolled back alone.

    Args:
        model: the model that was recorded (unchanged by planning).
        rec: its recording (:func:`netfold.fuse.record.record_forward`).
        config: which fusions are enabled.
        blocked: (kind, modules) keys never to plan again (rolled back earlier).

    Returns:
        ``(fusions, rejections, deferred)``; ``deferred`` says a candidate waited for a module
        another fusion claimed, so another round may find more.
    """
    ctx = _Ctx(model, rec, config, set(blocked or ()))
    order = [n for n in rec.calls if n in ctx.mods and n != ""]
    _plan_producers(ctx, order)
    if config.bn_forward:
        _plan_bn_forward(ctx, order)
    if config.norm_into_linear:
        _plan_norms(ctx, order)
    if config.pad_conv:
        _plan_pad_conv(ctx, order)
    return ctx.fusions, ctx.rejections, ctx.deferred

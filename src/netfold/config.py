"""Frozen, validated, JSON round-trippable configurations for every netfold operation.

Each config names one algorithm and its knobs; data never lives in a config.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Any

CLUSTER_METHODS = (
    "kmeans",
    "agglomerative-ward",
    "agglomerative-complete",
    "agglomerative-average",
    "agglomerative-single",
    "spectral",
    "greedy",
)
PRUNE_METHODS = ("magnitude-l1", "magnitude-l2")
MERGE_BASELINES = ("ifm",)
METHODS = CLUSTER_METHODS + PRUNE_METHODS + MERGE_BASELINES
#: Repair names a FoldConfig accepts. Filled by the repair registry
#: (:func:`netfold.fold.repairs.register`, which calls :func:`add_repair_name`): a new repair
#: is one registered module, and configs accept its name without an edit here.
#: "auto" (the default) is resolved per model before planning (:mod:`netfold.fold.auto`).
REPAIRS: tuple[str, ...] = ("auto", "none", "ar", "dir", "data")


def add_repair_name(name: str) -> None:
    """Accept ``name`` as ``FoldConfig.repair`` (called by the repair registry only)."""
    global REPAIRS
    if name not in REPAIRS:
        REPAIRS = (*REPAIRS, name)


ALLOCATIONS = ("auto", "uniform", "cost")
#: The ratio a FoldConfig uses when neither ``ratio`` nor ``target_sparsity`` is given.
DEFAULT_RATIO = 0.5


class _JSONMixin:
    """to_dict / to_json / from_dict / from_json for (possibly nested) frozen dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        if not isinstance(d, dict):
            raise TypeError(f"{cls.__name__}.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
        kwargs = {}
        for name, value in d.items():
            sub = _NESTED.get((cls.__name__, name))
            kwargs[name] = (
                sub.from_dict(value) if sub is not None and isinstance(value, dict) else value
            )
        return cls(**kwargs)

    @classmethod
    def from_json(cls, s: str):
        return cls.from_dict(json.loads(s))


def _check_fraction(name: str, value: float, *, upper_inclusive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if not ok:
        rng = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(f"{name} must lie in {rng}, got {value}")


@dataclass(frozen=True)
class DeepInversionConfig(_JSONMixin):
    """Deep Inversion synthesis (Yin et al., 2020) as used by Fold-DIR.

    The authors' defaults are batch 256 and 4000 Adam steps; on a 2-core CPU that takes far too
    long, so the default here is a smaller budget (see docs/repair.md for the measured trade-off).
    """

    batch_size: int = 64
    steps: int = 200
    lr: float = 0.05
    tv_weight: float = 2.5e-6
    l2_weight: float = 0.2
    bn_weight: float = 1e4
    class_weight: float = 1.0
    jitter: int = 2
    num_classes: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ValueError(
                f"batch_size must be >= 2 (BatchNorm statistics), got {self.batch_size}"
            )
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for n in ("tv_weight", "l2_weight", "bn_weight", "class_weight"):
            if getattr(self, n) < 0:
                raise ValueError(f"{n} must be >= 0, got {getattr(self, n)}")
        if self.jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {self.jitter}")


LLM_HEAD_UNITS = ("query", "kv")
LLM_CORRECTIONS = ("none", "scale", "lsq")
LLM_REFITS = ("auto", "full", "diag")
LLM_FEATURES = ("auto", "weights", "activations")
LLM_SYNTH_STARTS = ("random", "bos")


@dataclass(frozen=True)
class LLMConfig(_JSONMixin):
    """Options for decoder LLMs (Hugging Face Llama family); ignored for other models.

    Args:
        heads: attention folding unit: "query" (query heads, clustered within their KV group;
            KV heads untouched) or "kv" (whole KV groups: a KV head with its query heads).
        fold_attention / fold_mlp: which groups of each decoder layer fold.
        correction: the data-free correction used with ``repair="ar"``: "none"; "scale"
            (Fold-AR-style: each merged row keeps the mean norm of its members); "lsq" (each
            merged SwiGLU channel's down_proj column is the least-squares fit of its members'
            outputs under Gaussian inputs scaled by the RMSNorm weight; merged query heads keep
            their members' mean norm). See docs/llm.md for what each one measured.
        gauss_samples: synthetic inputs per layer for the "lsq" correction.
        ridge: relative ridge term of the least-squares fits (``repair="data"`` and "lsq").
        protect: MLP channels whose weight gain ||down_i|| ||up_i|| ||gate_i|| exceeds this
            multiple of the layer's median are never merged or pruned (they carry the massive
            activations); 0 protects none.
        synth_sequences / synth_length: ``repair="dir"`` for LLMs: the calibration text is
            sampled from the model itself (temperature 1), this many sequences of this many
            tokens; then the down_proj refit of ``repair="data"`` runs on it (data-free). The
            same text feeds ``allocation="cost"`` and activation features.
        synth_start: how each sampled sequence begins: "bos" (the BOS token) or "random" (BOS
            and one token drawn uniformly from the vocabulary, as LLM-QAT does: more varied
            text).
        refit: the down_proj refit of ``repair="data"`` / ``"dir"``: "full" (ridge least
            squares of every merged column on the original outputs, k x k normal equations),
            "diag" (the "lsq" correction's per-member weights, estimated on the token
            activations instead of Gaussian samples: one scalar per original channel) or
            "auto": "full" for a group with at least 4 token rows per merged channel, else
            "diag" (a full refit on too few rows overfits; benchmarks/results/llm_variants.json).
        features: what k-means clusters MLP channels on: "weights" (each channel's
            [gate row | up row | down column], data-free without any text), "activations" (each
            channel's output h_i(x) on token rows, from the calibration ids or the model's own
            sampled text) or "auto": "activations" whenever token ids are at
            hand anyway (``allocation="cost"``, ``repair="dir"`` / ``"data"``), else "weights".
        self_check: after the fold, compare the folded and the original model on a few short
            sequences the ORIGINAL model wrote before folding (held out: another seed than the
            calibration text); the Report gets ``extra["self_check"]`` (perplexities, ratio,
            mean token KL, tokens, seconds; :mod:`netfold.eval.self_check`) and a warning
            when the folded perplexity exceeds ``self_check_threshold`` times the original's.
            False: no check (saves a few seconds).
        self_check_threshold: the perplexity ratio above which the check warns (> 1).
        self_check_sequences / self_check_length: the held-out text, sequences x tokens.
    """

    heads: str = "query"
    fold_attention: bool = True
    fold_mlp: bool = True
    correction: str = "lsq"
    gauss_samples: int = 512
    ridge: float = 1e-3
    protect: float = 8.0
    synth_sequences: int = 64
    synth_length: int = 128
    refit: str = "auto"
    features: str = "auto"
    synth_start: str = "random"
    self_check: bool = True
    self_check_threshold: float = 3.0
    self_check_sequences: int = 4
    self_check_length: int = 64

    def __post_init__(self) -> None:
        if self.heads not in LLM_HEAD_UNITS:
            raise ValueError(f"unknown heads unit {self.heads!r}; choose from {LLM_HEAD_UNITS}")
        if self.correction not in LLM_CORRECTIONS:
            raise ValueError(
                f"unknown correction {self.correction!r}; choose from {LLM_CORRECTIONS}"
            )
        if self.refit not in LLM_REFITS:
            raise ValueError(f"unknown refit {self.refit!r}; choose from {LLM_REFITS}")
        if self.synth_start not in LLM_SYNTH_STARTS:
            raise ValueError(
                f"unknown synth_start {self.synth_start!r}; choose from {LLM_SYNTH_STARTS}"
            )
        if self.features not in LLM_FEATURES:
            raise ValueError(f"unknown features {self.features!r}; choose from {LLM_FEATURES}")
        if self.gauss_samples < 16:
            raise ValueError(f"gauss_samples must be >= 16, got {self.gauss_samples}")
        if not self.ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if not self.protect >= 0:
            raise ValueError(f"protect must be >= 0, got {self.protect}")
        if self.synth_sequences < 1 or self.synth_length < 2:
            raise ValueError("synth_sequences must be >= 1 and synth_length >= 2")
        if not isinstance(self.self_check, bool):
            raise TypeError(f"self_check must be a bool, got {self.self_check!r}")
        t = self.self_check_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 1:
            raise ValueError(f"self_check_threshold must be a number > 1, got {t!r}")
        if self.self_check_sequences < 1 or self.self_check_length < 4:
            raise ValueError("self_check_sequences must be >= 1 and self_check_length >= 4")


@dataclass(frozen=True)
class FoldConfig(_JSONMixin):
    """What to fold and how.

    Args:
        ratio: fraction of channels removed in every foldable group; k = round(n * (1 - ratio)),
            at least ``min_channels``. 0 is the identity. Default (None): 0.5
            (:data:`DEFAULT_RATIO`) without ``target_sparsity``, unused with it; giving both is
            an error.
        ratios: per-group overrides, ``{pattern: ratio}``; a pattern (fnmatch) is matched against
            the group name and every module name in the group, first match wins.
        target_sparsity: fraction of all parameters to remove; when set, netfold solves for the
            ratios (uniform, or by ``allocation``) and ``ratio`` must be left unset.
        allocation: how the parameter budget is spread over groups: "auto" (default: "cost"
            for decoder LLMs, "uniform" otherwise; :mod:`netfold.fold.auto`), "uniform" (one
            ratio) or
            "cost" (data-free: each group's width from its k-means folding cost curve J(k),
            normalised by the group's weight energy, one global threshold; see
            :mod:`netfold.fold.allocate`). With "cost" and no ``target_sparsity`` the budget
            is the parameter count uniform ``ratio`` would give.
        method: clusterer ("kmeans", "agglomerative-{ward,complete,average,single}", "spectral",
            "greedy"), or a baseline on the same groups: "magnitude-l1" / "magnitude-l2"
            (structured pruning by the coupled weights' norm) or "ifm" (iterative feature
            merging).
        repair: "auto" (default: the measured best data-free repair for the model, resolved
            before planning and named in ``Report.extra["repair"]``: "stats" for BatchNorm
            networks, "dir" with the cost allocation for decoder LLMs, "none" otherwise, "data"
            when ``data=`` is given; :mod:`netfold.fold.auto`), "none" (Fold-naive), "ar"
            (approximate REPAIR, data-free), "dir" (Deep-Inversion
            REPAIR, data-free), "data" (REPAIR with calibration batches), "stats" (data-free,
            instant: BatchNorm statistics predicted from the stored ones by moment
            propagation, :mod:`netfold.fold.stats_repair`).
        seed: seeds every random choice (k-means init, deep inversion).
        n_init / max_iter / tol: k-means restarts, Lloyd iterations per restart, relative
            tolerance on the objective for early stopping.
        min_channels: no group is folded below this width.
        round_to: channel groups are folded to a multiple of this many channels (nearest,
            never below it, never above the group's width): 8 or 16 matches the channel blocks
            of CPU / GPU convolution and GEMM kernels, so the folded model runs at the speed
            its FLOPs promise (benchmarks/latency_bench.py); 1 keeps exact ratios.
        skip: fnmatch patterns of groups/modules never to fold.
        deep_inversion: settings for repair="dir".
        llm: options for decoder LLMs (heads unit, data-free correction).
    """

    ratio: float | None = None
    ratios: dict[str, float] | None = None
    target_sparsity: float | None = None
    allocation: str = "auto"
    method: str = "kmeans"
    repair: str = "auto"
    seed: int = 0
    n_init: int = 10
    max_iter: int = 20
    tol: float = 1e-4
    min_channels: int = 1
    round_to: int = 1
    skip: tuple[str, ...] = ()
    deep_inversion: DeepInversionConfig = field(default_factory=DeepInversionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)

    def __post_init__(self) -> None:
        if self.ratio is not None:
            _check_fraction("ratio", self.ratio)
        if self.target_sparsity is not None:
            _check_fraction("target_sparsity", self.target_sparsity)
            if self.ratio is not None:
                # Two budgets for one fold: silently dropping either would surprise someone.
                raise ValueError(
                    f"give either ratio ({self.ratio}) or target_sparsity "
                    f"({self.target_sparsity}), not both"
                )
        elif self.ratio is None:
            # Stored resolved, so to_dict / JSON and every reader of .ratio see the number.
            object.__setattr__(self, "ratio", DEFAULT_RATIO)
        if self.ratios is not None:
            if not isinstance(self.ratios, dict):
                raise TypeError(
                    f"ratios must be a dict of pattern -> ratio, got {type(self.ratios).__name__}"
                )
            for pat, r in self.ratios.items():
                if not isinstance(pat, str) or not pat:
                    raise ValueError(f"ratios keys must be non-empty strings, got {pat!r}")
                _check_fraction(f"ratios[{pat!r}]", r)
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; choose from {ALLOCATIONS}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {METHODS}")
        if self.repair not in REPAIRS:
            raise ValueError(f"unknown repair {self.repair!r}; choose from {REPAIRS}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        for n in ("n_init", "max_iter", "min_channels"):
            v = getattr(self, n)
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{n} must be an int, got {v!r}")
        if self.n_init < 1:
            raise ValueError(f"n_init must be >= 1, got {self.n_init}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        if (
            isinstance(self.tol, bool)
            or not isinstance(self.tol, (int, float))
            or not self.tol >= 0
        ):
            raise ValueError(f"tol must be a number >= 0, got {self.tol!r}")
        if self.min_channels < 1:
            raise ValueError(f"min_channels (k) must be >= 1, got {self.min_channels}")
        if not isinstance(self.round_to, int) or isinstance(self.round_to, bool):
            raise TypeError(f"round_to must be an int, got {self.round_to!r}")
        if self.round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {self.round_to}")
        if isinstance(self.skip, str) or not all(isinstance(s, str) and s for s in self.skip):
            raise TypeError("skip must be a sequence of non-empty fnmatch patterns (strings)")
        object.__setattr__(self, "skip", tuple(self.skip))
        if isinstance(self.deep_inversion, dict):
            object.__setattr__(
                self, "deep_inversion", DeepInversionConfig.from_dict(self.deep_inversion)
            )
        if not isinstance(self.deep_inversion, DeepInversionConfig):
            raise TypeError("deep_inversion must be a DeepInversionConfig")
        if isinstance(self.llm, dict):
            object.__setattr__(self, "llm", LLMConfig.from_dict(self.llm))
        if not isinstance(self.llm, LLMConfig):
            raise TypeError("llm must be a LLMConfig")

    def ratio_for(
        self, name: str, modules: Iterable[str], default: float | None = None
    ) -> float | None:
        """The ratio for the group ``name`` whose modules are ``modules``: None when a ``skip``
        pattern matches, else the first matching ``ratios`` pattern, else ``default`` (or
        ``ratio``, or :data:`DEFAULT_RATIO` when ``target_sparsity`` leaves it unset). Patterns
        are fnmatch'ed against the name and every module name."""
        names = [name, *modules]

        def hit(pattern: str) -> bool:
            return any(fnmatch(n, pattern) for n in names)

        if any(hit(p) for p in self.skip):
            return None
        for pat, r in (self.ratios or {}).items():
            if hit(pat):
                return r
        if default is not None:
            return default
        return self.ratio if self.ratio is not None else DEFAULT_RATIO

    def patterns_without_match(self, names: Iterable[Iterable[str]]) -> list[tuple[str, str]]:
        """The ``ratios`` / ``skip`` patterns that match none of ``names``.

        Args:
            names: per group, its name followed by its module names.

        Returns:
            ``[(field, pattern), ...]`` with field "ratios" or "skip", in config order.
        """
        groups = [list(n) for n in names]

        def used(pattern: str) -> bool:
            return any(fnmatch(n, pattern) for g in groups for n in g)

        out = [("ratios", p) for p in (self.ratios or {}) if not used(p)]
        return out + [("skip", p) for p in self.skip if not used(p)]

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["skip"] = list(self.skip)
        return d


_NESTED: dict[tuple[str, str], type] = {
    ("FoldConfig", "deep_inversion"): DeepInversionConfig,
    ("FoldConfig", "llm"): LLMConfig,
}

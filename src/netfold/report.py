"""The Report every netfold operation returns: what changed, what it cost, what was skipped."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GroupReport:
    """One channel group: its name, widths and the modules whose tensors it indexes."""

    name: str
    width_before: int
    width_after: int
    modules: list[str] = field(default_factory=list)
    cost: float | None = None  # clustering objective (sum of squared distances to centroids)
    labels: list[int] | None = None  # cluster of each original channel (folded groups only)


@dataclass
class Report:
    """Outcome of fold / fuse / collapse.

    Attributes:
        operation: "fold", "fuse", "collapse", ...
        params_before / params_after: parameter counts (shared tensors counted once).
        flops_before / flops_after: forward FLOPs for one input sample (None when not measured).
        seconds: wall time of the operation.
        groups: per channel group widths.
        skipped: (group or module, reason) for everything left alone.
        warnings: anything a user should read.
        log: free-form decision log entries (fusion decisions, collapsed pairs, ...).
        extra: method-specific numbers (e.g. max abs error of a verification).
    """

    operation: str
    params_before: int
    params_after: int
    flops_before: int | None = None
    flops_after: int | None = None
    seconds: float = 0.0
    groups: list[GroupReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Fraction of parameters removed: 1 - params_after / params_before."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def flops_ratio(self) -> float | None:
        if not self.flops_before or self.flops_after is None:
            return None
        return self.flops_after / self.flops_before

    def add_groups(
        self,
        groups: list[Any],
        widths: dict[str, int],
        costs: dict[str, float],
        labels: dict[str, Any],
    ) -> None:
        """Record every channel group: foldable ones with width before/after, folding cost and
        cluster labels (a sequence or Tensor per group name); frozen producer groups in
        ``skipped`` with their reasons. ``groups`` are :class:`netfold.graph.groups.ChannelGroup`.
        """
        for g in groups:
            if g.foldable:
                k = widths.get(g.name, g.size)
                for why in getattr(g, "approximations", ()) if k < g.size else ():
                    # e.g. a LayerNorm over the channels: not exact even for duplicates
                    self.warnings.append(f"group {g.name} folds approximately: {why}")
                lab = labels.get(g.name)
                self.groups.append(
                    GroupReport(
                        g.name,
                        g.size,
                        widths.get(g.name, g.size),
                        g.modules,
                        costs.get(g.name),
                        lab.tolist() if hasattr(lab, "tolist") else lab,
                    )
                )
            elif g.producers:
                self.skipped.append((g.name, "; ".join(g.frozen_reasons)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sparsity"] = self.sparsity
        d["skipped"] = [list(s) for s in self.skipped]
        return d

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    def __str__(self) -> str:
        lines = [f"netfold {self.operation}: {self.seconds:.2f} s"]
        lines.append(
            f"  params  {self.params_before:>12,} -> {self.params_after:>12,}"
            f"  (sparsity {100 * self.sparsity:.1f}%)"
        )
        if self.flops_before is not None and self.flops_after is not None:
            r = self.flops_ratio
            lines.append(
                f"  FLOPs   {self.flops_before:>12,} -> {self.flops_after:>12,}"
                + (f"  ({100 * (1 - r):.1f}% fewer)" if r is not None else "")
            )
        if self.groups:
            lines.append(f"  {len(self.groups)} group(s):")
            w = max(len(g.name) for g in self.groups)
            for g in self.groups:
                lines.append(f"    {g.name:<{w}}  {g.width_before:>5} -> {g.width_after:<5}")
        for name, why in self.skipped:
            lines.append(f"  skipped {name}: {why}")
        for msg in self.warnings:
            lines.append(f"  warning: {msg}")
        for k, v in self.extra.items():
            if isinstance(v, (int, float, str)):
                lines.append(f"  {k}: {v}")
        return "\n".join(lines)

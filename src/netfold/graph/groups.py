"""ChannelGroup: every tensor slice that indexes one channel space, so one clustering folds all.

A group is data, not math: which modules produce the channels (their output rows), which modules
carry one parameter per channel (BatchNorm, depthwise convs, PReLU), and which modules read the
channels (their input columns). Surgery and merging read a group and never guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Consumer:
    """A module that reads the group's channels through its input axis (weight axis 1).

    ``repeat`` is the number of contiguous input columns per channel: 1 for a conv or a Linear
    on channels, H*W for a Linear after ``flatten`` of an (N, C, H, W) map.
    """

    module: str
    repeat: int = 1


@dataclass
class ChannelGroup:
    """One channel space of size ``size`` and every module slice indexed by it.

    Attributes:
        name: readable id (the first producer's module name; "+residual" for shared streams).
        size: number of channels n.
        producers: Linear / Conv modules whose output rows (weight axis 0, bias) are the channels.
        channel_ops: modules with one entry per channel along axis 0 (BatchNorm, depthwise conv,
            PReLU with one slope per channel): merged by the cluster mean.
        consumers: modules reading the channels through weight axis 1: merged by the cluster sum.
        bn_of: producer name -> the BatchNorm that directly normalises its output, if any.
        head_size: channels move in blocks of this size (1 for CNNs/MLPs; head_dim for heads).
        frozen_reasons: non-empty when the group must not be folded (and why).
    """

    name: str
    size: int
    producers: list[str] = field(default_factory=list)
    channel_ops: list[str] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    bn_of: dict[str, str] = field(default_factory=dict)
    head_size: int = 1
    frozen_reasons: list[str] = field(default_factory=list)

    @property
    def foldable(self) -> bool:
        return not self.frozen_reasons and bool(self.producers)

    @property
    def modules(self) -> list[str]:
        """Every module name in the group, producers first."""
        seen: dict[str, None] = {}
        for m in self.producers + self.channel_ops + [c.module for c in self.consumers]:
            seen.setdefault(m, None)
        return list(seen)

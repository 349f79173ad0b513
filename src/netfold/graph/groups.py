"""ChannelGroup: every tensor slice that indexes one channel space, so one clustering folds all.

A group is data, not math: which modules produce the channels (their output rows), which modules
carry one parameter per channel (BatchNorm, depthwise convs, PReLU, LayerNorm over the channels),
which bare parameters are indexed by the channels (layer-scale gammas, position embeddings), and
which modules read the channels (their input columns). Surgery and merging read a group and never
guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Consumer:
    """A module that reads the group's channels through its input axis (weight axis 1).

    ``repeat`` is the number of contiguous input columns per channel: 1 for a conv or a Linear
    on channels, H*W for a Linear after ``flatten`` of an (N, C, H, W) map.

    ``offset`` is the index of the group's first channel among the module's input channels
    (a consumer of ``torch.cat([a, b], 1)`` reads ``b``'s group at offset ``a.shape[1]``): the
    group occupies weight columns ``[offset * repeat, (offset + size) * repeat)``.

    ``groups`` is the consumer's conv ``groups`` (1 < groups < channels for a grouped conv):
    its weight (out, in / groups, ...) holds, for the outputs of conv group j, only the columns
    of input channels ``j * in / groups ...``; the group is then folded with clusters confined
    to conv groups (``ChannelGroup.align``).
    """

    module: str
    repeat: int = 1
    offset: int = 0
    groups: int = 1


@dataclass(frozen=True)
class ChannelParam:
    """A parameter (or buffer) ``module.tensor`` indexed by the group's channels on ``axis``.

    Layer-scale gammas of shape (C,) or (C, 1, 1), a ViT's class token (1, 1, C) and position
    embedding (1, N, C): tensors multiplied with / added to the channels elementwise. They are
    merged like every per-channel parameter, by the cluster mean along ``axis``. ``module`` is
    the owning module's name ("" for the model itself).
    """

    module: str
    tensor: str
    axis: int = 0

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.tensor}" if self.module else self.tensor


@dataclass
class ChannelGroup:
    """One channel space of size ``size`` and every module slice indexed by it.

    Attributes:
        name: readable id (the first producer's module name; "+residual" for shared streams).
        size: number of channels n.
        producers: Linear / Conv modules whose output rows (weight axis 0, bias) are the channels.
        channel_ops: modules with one entry per channel along axis 0 (BatchNorm, depthwise conv,
            PReLU with one slope per channel, LayerNorm over the channel axis): merged by the
            cluster mean.
        channel_params: bare parameters indexed by the channels on some axis (layer-scale,
            position embedding, class token): merged by the cluster mean along that axis.
        consumers: modules reading the channels through weight axis 1: merged by the cluster sum.
        bn_of: producer name -> the BatchNorm that directly normalises its output, if any.
        head_size: channels move in blocks of this size (1 for CNNs/MLPs; head_dim for heads).
        frozen_reasons: non-empty when the group must not be folded (and why).
        input_norm: a norm (e.g. RMSNorm) whose per-feature weight scales the producers' inputs;
            data-free features weight the producer columns by it.
        align: the channels form ``align`` equal contiguous blocks (the conv groups of grouped
            convs touching the space) and every cluster stays inside one block, each block
            keeping the same number of channels; 1 for no constraint.
        approximations: why folding this group is not exact even for duplicated channels in
            general (e.g. a LayerNorm normalising across the channels: its mean and variance
            over k merged channels equal those over the n originals only when every cluster
            has the same size). Empty when merging duplicates is exact.
        norm_offset: ``input_norm`` scales by ``norm_offset + weight`` (Gemma's RMSNorm: 1).
        activation: the module applying the channels' nonlinearity (a decoder MLP's act), so
            activation features and least-squares corrections call the model's own function.
    """

    name: str
    size: int
    producers: list[str] = field(default_factory=list)
    channel_ops: list[str] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    bn_of: dict[str, str] = field(default_factory=dict)
    head_size: int = 1
    frozen_reasons: list[str] = field(default_factory=list)
    input_norm: str | None = None
    align: int = 1
    channel_params: list[ChannelParam] = field(default_factory=list)
    approximations: list[str] = field(default_factory=list)
    norm_offset: float = 0.0
    activation: str | None = None

    @property
    def foldable(self) -> bool:
        return not self.frozen_reasons and bool(self.producers)

    def valid_width(self, k: int) -> bool:
        """Whether the group can be folded to ``k`` channels (a positive multiple of ``align``)."""
        return 1 <= k <= self.size and k % self.align == 0

    @property
    def modules(self) -> list[str]:
        """Every module name in the group, producers first."""
        seen: dict[str, None] = {}
        for m in self.producers + self.channel_ops + [c.module for c in self.consumers]:
            seen.setdefault(m, None)
        return list(seen)


HEAD_UNITS = ("query", "kv")


@dataclass
class HeadGroup:
    """The attention heads of one layer, folded as whole heads so RoPE dimensions stay together.

    Query head h reads key/value head ``h // (num_heads // num_kv_heads)`` (grouped-query
    attention). The clustering unit is either a query head, clustered only with the query heads
    of its own KV group (every KV group keeps the same number of query heads), or a whole KV
    group (one KV head with its query heads). q/k/v rows are merged by the cluster mean (head
    dimension d of one head with dimension d of the others), o_proj columns by the sum.

    Attributes:
        name: the attention module.
        q, k, v, o: the projection modules (q/k/v: (heads * head_dim, hidden) weights;
            o: (hidden, num_heads * head_dim)).
        num_heads / num_kv_heads / head_dim: the current shape.
        unit: "query" or "kv" (see above); "query" with one query head per KV head is "kv".
        input_norm: the norm in front of q/k/v (its weight scales the data-free features).
        frozen_reasons: non-empty when the group must not be folded.
        norm_offset: ``input_norm`` scales by ``norm_offset + weight`` (Gemma's RMSNorm: 1).
    """

    name: str
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    unit: str = "query"
    input_norm: str | None = None
    frozen_reasons: list[str] = field(default_factory=list)
    norm_offset: float = 0.0

    def __post_init__(self) -> None:
        if self.unit not in HEAD_UNITS:
            raise ValueError(f"unit must be one of {HEAD_UNITS}, got {self.unit!r}")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.name}: {self.num_heads} query heads cannot share {self.num_kv_heads} KV heads"
            )

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def effective_unit(self) -> str:
        return "kv" if self.group_size == 1 else self.unit

    @property
    def size(self) -> int:
        """Units the clustering sees: KV groups, or query heads per KV group."""
        return self.num_kv_heads if self.effective_unit == "kv" else self.group_size

    @property
    def foldable(self) -> bool:
        return not self.frozen_reasons and self.size > 1

    @property
    def modules(self) -> list[str]:
        return [self.q, self.k, self.v, self.o]

    def heads_for(self, k_units: int) -> tuple[int, int]:
        """(query heads, KV heads) kept when the clustering keeps ``k_units`` units."""
        if self.effective_unit == "kv":
            return k_units * self.group_size, k_units
        return k_units * self.num_kv_heads, self.num_kv_heads

    def units_for_heads(self, num_heads: int) -> int:
        """Units that keep exactly ``num_heads`` query heads; ValueError if none does."""
        for u in range(1, self.size + 1):
            if self.heads_for(u)[0] == num_heads:
                return u
        reachable = [self.heads_for(u)[0] for u in range(1, self.size + 1)]
        raise ValueError(
            f"{self.name}: {num_heads} query heads cannot be met by folding "
            f"{'KV groups' if self.effective_unit == 'kv' else 'query heads within KV groups'} "
            f"of {self.num_heads} heads / {self.num_kv_heads} KV heads; reachable: {reachable}"
        )

"""Unit discovery: which output channels can be pruned, and what reads them.

A *unit* (DESIGN.md §2) is a producer (``Conv2d`` with groups=1, or ``Linear``), the
channel-wise followers that lose the same channels (BatchNorm, activations, pooling,
dropout, identity, flatten, depthwise conv), and the one consumer (``Conv2d`` groups=1 or
``Linear``) that reads them.

``find_units`` (:mod:`thinet_fast.discovery`) traces the model with ``torch.fx``, propagates shapes from the example
inputs (on fake tensors, so no real compute and no change to the model), and walks the
graph forward from every producer. Channels that are coupled to something else (a
residual add, a concat, a second reader, a grouped conv, an op we do not know) are never
pruned silently: they come back in ``UnitPlan.refused`` with a reason that names the
module.

This module holds the data classes. The walk through the graph is in
:mod:`thinet_fast.walk`, tracing and shape passes in :mod:`thinet_fast.tracing`, module
access by name in :mod:`thinet_fast.modules`. None of them knows the pruning math.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence, Union

import torch

from .modules import get_module, set_module
from .tables import format_table
from .tracing import UntraceableModelError

__all__ = [
    "Unit",
    "Refusal",
    "UnitPlan",
    "UntraceableModelError",
    "find_units",
    "get_module",
    "set_module",
]

ExampleInputs = Union[torch.Tensor, Sequence[torch.Tensor]]


# --------------------------------------------------------------------------- data classes
def _pair(v: Any, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class Unit:
    """One prunable chain: producer -> channel-wise followers -> consumer.

    Attributes:
        producer: fqn of the ``Conv2d`` (groups=1) or ``Linear`` whose outputs are removed.
        followers: fqns of the modules between producer and consumer, in call order. They
            all act channel by channel; the stateful ones (BatchNorm, depthwise conv,
            per-channel PReLU) lose the same channels. Functional ops (``F.relu``,
            ``torch.flatten``...) have no fqn; they are listed in ``ops``.
        consumer: fqn of the ``Conv2d`` (groups=1) or ``Linear`` that reads the channels.
        channels: C, the producer's output channels at discovery time.
        taps: t, consumer weights per input channel: kh*kw for a conv, in_features/C for
            a Linear after flatten (channel-major: feature ``c*t + u``), 1 otherwise.
        consumer_kind: ``"conv"`` or ``"linear"``.
        producer_kind: ``"conv"`` or ``"linear"``.
        flatten: True when the consumer is a Linear that reads a flattened (N, C*t)
            tensor (t may be 1, e.g. after global pooling).
        tokens: True when the consumer is a Linear that reads the channels on the last
            dim of an (N, ..., C) tensor (transformer tokens, channels-last maps): every
            position is a location, as for a 1x1 conv.
        consumer_out: K, the consumer's output channels / features.
        consumer_in_shape: shape of the consumer's input without the batch dim, as seen
            with the example inputs (e.g. (C, H, W) for a conv, (C*t,) after flatten).
        kernel_size, stride, padding, dilation, padding_mode: consumer conv geometry;
            ``None`` for a Linear consumer. ``padding`` may be the string ``"same"``
            when the conv was built that way.
        ops: every op on the path (modules by fqn, functions by name), for display.
        consumer_norm: fqn of the BatchNorm that alone reads the consumer's output
            (called once, with running statistics), else None: a bias correction of a
            bias-free consumer is folded into its running mean instead of adding a bias.
    """

    producer: str
    followers: tuple[str, ...]
    consumer: str
    channels: int
    taps: int
    consumer_kind: Literal["conv", "linear"]
    producer_kind: Literal["conv", "linear"] = "conv"
    flatten: bool = False
    tokens: bool = False
    consumer_out: int = 0
    consumer_in_shape: tuple[int, ...] = ()
    kernel_size: Optional[tuple[int, int]] = None
    stride: Optional[tuple[int, int]] = None
    padding: Optional[Union[tuple[int, int], str]] = None
    dilation: Optional[tuple[int, int]] = None
    padding_mode: Optional[str] = None
    ops: tuple[str, ...] = ()
    consumer_norm: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.producer or not self.consumer:
            raise ValueError("Unit needs a producer and a consumer fqn")
        if self.consumer_kind not in ("conv", "linear"):
            raise ValueError(f"Unit({self.producer}): consumer_kind must be 'conv' or 'linear', got {self.consumer_kind!r}")
        if self.producer_kind not in ("conv", "linear"):
            raise ValueError(f"Unit({self.producer}): producer_kind must be 'conv' or 'linear', got {self.producer_kind!r}")
        if self.channels < 1 or self.taps < 1:
            raise ValueError(f"Unit({self.producer}): channels and taps must be >= 1, got {self.channels}, {self.taps}")
        object.__setattr__(self, "followers", tuple(self.followers))
        object.__setattr__(self, "ops", tuple(self.ops))
        object.__setattr__(self, "consumer_in_shape", tuple(int(s) for s in self.consumer_in_shape))
        if self.consumer_kind == "conv":
            if self.flatten:
                raise ValueError(f"Unit({self.producer}): a conv consumer cannot read a flattened tensor")
            if self.kernel_size is None:
                raise ValueError(f"Unit({self.producer}): conv consumer needs kernel_size/stride/padding/dilation")
            ks = _pair(self.kernel_size, "kernel_size")
            object.__setattr__(self, "kernel_size", ks)
            object.__setattr__(self, "stride", _pair(self.stride if self.stride is not None else 1, "stride"))
            object.__setattr__(self, "dilation", _pair(self.dilation if self.dilation is not None else 1, "dilation"))
            if not isinstance(self.padding, str):
                object.__setattr__(self, "padding", _pair(self.padding if self.padding is not None else 0, "padding"))
            if self.taps != ks[0] * ks[1]:
                raise ValueError(f"Unit({self.producer}): conv taps {self.taps} != kh*kw {ks[0] * ks[1]}")
        else:
            if self.kernel_size is not None:
                raise ValueError(f"Unit({self.producer}): a Linear consumer has no kernel geometry")
        if self.tokens and (self.consumer_kind != "linear" or self.flatten or self.taps != 1):
            raise ValueError(f"Unit({self.producer}): tokens=True is for a Linear consumer reading (N, ..., C) "
                             "with one tap per channel")

    @property
    def in_features(self) -> int:
        """C*t: the consumer's input width for these channels."""
        return self.channels * self.taps

    def describe(self) -> str:
        path = " -> ".join(self.ops) if self.ops else " -> ".join((self.producer, *self.followers, self.consumer))
        return path


@dataclass(frozen=True)
class Refusal:
    """A producer whose channels will not be pruned, and why (names the module)."""

    producer: str
    reason: str


@dataclass
class UnitPlan:
    """The result of :func:`find_units`: prunable units and refused producers."""

    units: list[Unit] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    graph: Any = field(default=None, repr=False, compare=False)  # the traced fx.GraphModule, for reuse

    def __len__(self) -> int:
        return len(self.units)

    def __iter__(self):
        return iter(self.units)

    def __getitem__(self, key: Union[int, str]) -> Unit:
        if isinstance(key, str):
            for u in self.units:
                if u.producer == key:
                    return u
            raise KeyError(f"no unit with producer `{key}`" + self._why_not(key))
        return self.units[key]

    def __contains__(self, fqn: object) -> bool:
        return any(u.producer == fqn for u in self.units)

    def _why_not(self, fqn: str) -> str:
        for r in self.refused:
            if r.producer == fqn:
                return f" (refused: {r.reason})"
        return ""

    @property
    def producers(self) -> list[str]:
        return [u.producer for u in self.units]

    def table(self) -> str:
        """A fixed-width table of units, then the refusals."""
        head = ("producer", "C", "followers", "consumer", "kind", "t", "K")
        rows = [
            (u.producer, str(u.channels), ", ".join(u.followers) or "-", u.consumer,
             u.consumer_kind + ("/flat" if u.flatten else "/tokens" if u.tokens else ""), str(u.taps), str(u.consumer_out))
            for u in self.units
        ]
        lines = [f"UnitPlan: {len(self.units)} unit(s), {len(self.refused)} refused", format_table([head, *rows])]
        if self.refused:
            lines.append("refused:")
            lines += [f"  {r.reason}" for r in self.refused]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def __getattr__(name: str):
    # find_units lives in thinet_fast.discovery (it imports this module); kept here too
    if name == "find_units":
        from .discovery import find_units
        return find_units
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

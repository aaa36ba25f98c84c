"""Activation replay for the sequential schedule (DESIGN.md §7).

The calibration activations are cached as a state of the traced graph (one value at a
cut point; inside a residual block, the block input and the branch value). Each unit's
statistics come from running only the segment from the cached state to its consumer,
on the model as pruned so far; while it runs, the state at the consumer's input is
cached for the next unit, and once the unit is pruned its kept channels of the
consumer's input start the next segment. Where pruning would change another value of
that state, the state just before the producer is cached instead. The cache is bounded
by a memory budget; past it a unit re-runs from the images.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..memory import available_host_memory
from ..ops.draws import image_keys
from ..segments import Segments, State, values
from ..units import Unit
from .collect import Keyed, iter_batches

MB = 1 << 20


def default_budgets(device: torch.device, host_budget: int | None) -> tuple[int, int]:
    """(device bytes, host bytes) the cache may use: half of what is free on each, or
    ``host_budget`` for the host (0 turns replay off)."""
    host = available_host_memory() // 2 if host_budget is None else int(host_budget)
    dev = 0
    if device.type == "cuda" and host != 0:
        free, _ = torch.cuda.mem_get_info(device)
        dev = free // 2
    return dev, host


@dataclass
class _Cache:
    pos: int
    values: list
    keys: list = field(default_factory=list)  # per batch: the image keys its draws use
    nbytes: int = 0
    on_host: bool = False


class Replay:
    """Where each sequential unit's statistics pass starts, and the cache behind it.

    Use per unit: ``source = replay.plan(unit)``, feed ``source.batches()`` through
    ``source.forward``, then ``replay.commit(unit, keep)`` after the unit is pruned."""

    def __init__(self, model: nn.Module, data, num_images: int, device: torch.device, *,
                 host_budget: int | None = None, enabled: bool = True, images_only: bool = False, graph=None):
        """``images_only``: cache the input batches only (a per-unit fine-tune may change
        any layer, so no later activation stays valid)."""
        self.model, self.data, self.num_images, self.device = model, data, num_images, device
        self.images_only = images_only
        self.dev_budget, self.host_budget = default_budgets(device, host_budget) if enabled else (0, 0)
        self.enabled = enabled and self.host_budget + self.dev_budget > 0
        self.seg = Segments(model, graph=graph) if self.enabled else None
        self.cache: _Cache | None = None
        self._next: _Cache | None = None

    def plan(self, unit: Unit) -> "_Source":
        if not self.enabled:
            return _Source(self, None, None, None, unit)
        seg = self.seg
        if self.images_only:
            return _Source(self, seg.input, seg.input, seg.input, unit)
        start, capture = seg.plan(unit.producer, unit.consumer, None if self.cache is None else self.cache.pos)
        if self.cache is not None and start == seg.input:
            self.cache = None  # it lies beyond this unit's consumer: useless from now on
        return _Source(self, start, capture, seg.input_of(unit.consumer), unit)

    def commit(self, unit: Unit, keep: torch.Tensor) -> None:
        """Make the states captured for ``unit`` the cache, with the consumer's input
        sliced to the kept channels when the capture was made there."""
        nxt, self._next = self._next, None
        if nxt is None:
            return
        # a consumer input that no image changes (swin v2's position-bias MLP reads a
        # buffer) is not in the state: it is recomputed from the live model each run
        if nxt.pos == self.seg.input_of(unit.consumer) and self.seg.dynamic[nxt.pos]:
            keep = keep.to(torch.long)
            for i, v in enumerate(nxt.values):
                # the consumer's input is the state's last value (the latest node in it)
                last = _slice_channels(v[-1] if isinstance(v, State) else v, keep, unit)
                if last is None:
                    self.cache = None
                    return
                nxt.values[i] = State((*v[:-1], last), v.batch) if isinstance(v, State) else last
            nxt.nbytes = sum(_nbytes(v) for v in nxt.values)
        self.cache = nxt


class _Source:
    """One unit's statistics pass: its batches, its forward and what it caches."""

    def __init__(self, replay: Replay, start, capture, target, unit: Unit):
        self.replay, self.start, self.capture, self.target, self.unit = replay, start, capture, target, unit
        self.stored: _Cache | None = None
        self.dropped = False
        self._replayed = False

    @property
    def from_cache(self) -> bool:
        r = self.replay
        return r.cache is not None and r.cache.pos == self.start

    def describe(self) -> str:
        r = self.replay
        if not r.enabled:
            return "from the images (replay off)"
        where = f"replayed from `{r.seg.name(self.start)}`" if self._replayed else "from the images"
        if self.stored is not None and not self.dropped:
            place = "host" if self.stored.on_host else str(r.device)
            others = [f"`{r.seg.name(i)}`" for i in r.seg.live(self.capture) if i != self.capture]
            also = f" with {', '.join(others)}" if others else ""
            where += f"; cached `{r.seg.name(self.capture)}`{also} ({self.stored.nbytes / MB:.1f} MB on {place})"
        elif self.dropped:
            where += f"; `{r.seg.name(self.capture)}` not cached: over the replay memory budget"
        return where

    def batches(self):
        r = self.replay
        self._replayed = self.from_cache
        if not self._replayed:
            for x in iter_batches(r.data, r.num_images, r.device):
                keys = image_keys(x)
                if self.stored is not None:
                    self.stored.keys.append(keys)
                yield Keyed(x, keys)
            return
        cache = r.cache
        reuse = self.capture == self.start  # the same cache serves the next unit
        copy = r.seg.mutated(r.model, self.start)
        for i, v in enumerate(cache.values):
            if not reuse:
                cache.values[i] = None  # free as we go
            keys = cache.keys[i]
            if self.stored is not None and self.stored is not cache:
                self.stored.keys.append(keys)
            yield Keyed(_each(v, lambda t: _fresh(t, t.to(r.device, non_blocking=True), copy and reuse)), keys)
        if not reuse:
            r.cache = None

    def forward(self):
        r = self.replay
        if not r.enabled:
            return None
        if self.capture is None or (self.capture == self.start and self.from_cache):
            if self.capture is not None:
                r._next = r.cache
            return r.seg.forward(r.model, self.start)
        self.stored = _Cache(self.capture, [], on_host=r.device.type == "cpu")
        r._next = self.stored
        copy = r.seg.mutated(r.model, self.capture)

        def keep(v):
            c = self.stored
            if self.dropped:
                return
            if not all(isinstance(t, _CACHEABLE) for t in values(v)):
                return self._drop()
            size = _nbytes(v)
            if not c.on_host and c.nbytes + size > r.dev_budget:  # spill to host memory
                c.values[:] = [_each(t, torch.Tensor.cpu) for t in c.values]
                c.on_host = True
            if c.on_host and c.nbytes + size > r.host_budget:
                return self._drop()

            def store(t):
                t = t.detach()
                return _fresh(t, t.cpu() if c.on_host else t, copy)
            c.values.append(_each(v, store))
            c.nbytes += size
        return r.seg.forward(r.model, self.start, capture=self.capture, keep=keep)

    def _drop(self):
        self.dropped = True
        self.stored.values.clear()
        self.stored.keys.clear()
        self.replay._next = None


_CACHEABLE = (torch.Tensor, int, float, bool, torch.Size, type(None))


def _each(v, fn):
    """``fn`` applied to the tensor(s) of a cached value or :class:`State`."""
    if isinstance(v, State):
        return State([fn(t) if isinstance(t, torch.Tensor) else t for t in v], v.batch)
    return fn(v) if isinstance(v, torch.Tensor) else v


def _fresh(old: torch.Tensor, new: torch.Tensor, copy: bool) -> torch.Tensor:
    """``new``, cloned when ``copy`` and it still shares ``old``'s memory."""
    return new.clone() if copy and new.data_ptr() == old.data_ptr() else new


def _nbytes(v) -> int:
    return sum(t.numel() * t.element_size() for t in values(v) if isinstance(t, torch.Tensor))


def _slice_channels(v: torch.Tensor, keep: torch.Tensor, unit: Unit):
    """The consumer input after its producer kept ``keep``: a channel slice (a block of
    ``taps`` features per channel after flatten)."""
    keep = keep.to(v.device)
    if unit.consumer_kind == "conv" and v.dim() == 4 and v.shape[1] == unit.channels:
        return v.index_select(1, keep)
    if unit.tokens and v.dim() > 2 and v.shape[-1] == unit.channels:
        return v.index_select(v.dim() - 1, keep)
    if unit.consumer_kind == "linear" and v.dim() == 2 and v.shape[1] == unit.channels * unit.taps:
        n = v.shape[0]
        return v.reshape(n, unit.channels, unit.taps).index_select(1, keep).reshape(n, -1)
    return None

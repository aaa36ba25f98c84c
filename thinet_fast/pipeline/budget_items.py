"""What a budget sets the width of, and what any choice of widths costs, exactly.

An *item* is one width a budget chooses: a plain unit's channels, a coupled group's
positions (per block) or an attention module's heads. Counts are taken on a shape-only
(meta) copy of the model, a :class:`Shadow`. Cutting a shadow for every candidate width
would cost a forward each, so :class:`CountModel` cuts one copy once per item, by one
step, and reads off what shrank:

- every parameter tensor's dims are affine in the steps removed (a conv reading one group
  and writing another shrinks in both dims; a concat reader's input is a sum), so its
  size is a product of affine terms;
- a Conv/Linear layer's FLOPs are its weight's size times what its input geometry fixes;
- an attention module losing heads is one block: its parameters and FLOPs fall by the
  same amount per head.

:meth:`CountModel.exact` cuts a fresh copy to the chosen widths and counts it the way
:func:`~thinet_fast.counting.count_params` / ``count_flops`` do: the allocation checks
its model against it, and counts exactly (slow, never wrong) where they disagree.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..attention import cut_first_heads, find_heads
from ..counting import count_flops, count_params, profile
from ..groups import find_groups
from ..rewrite import prune_unit_
from ..units import Unit
from .keeps import block_multiple

__all__ = ["Item", "unit_items", "group_items", "head_items", "Shadow", "CountModel"]

COUNTED = ("flops", "params")


@dataclass(eq=False)
class Item:
    """One width a budget chooses. ``producer``: the name keep dicts use (a unit's
    producer, a group's root, an attention module); ``channels``: its width in steps
    (channels, positions per block, heads); valid widths are multiples of ``multiple``
    or the whole width; ``source``: the Unit, ChannelGroup or HeadSite."""

    producer: str
    channels: int
    kind: str                       # "unit" | "group" | "heads"
    multiple: int = 1
    source: Any = field(default=None, repr=False)


def unit_items(units: Sequence[Unit], multiple: int = 1) -> list[Item]:
    return [Item(u.producer, u.channels, "unit", multiple, u) for u in units]


def group_items(groups, multiple: int = 1) -> list[Item]:
    """A group keeps the same positions in each of its ``blocks``; with ``round_to`` its
    whole width stays a multiple of it (:func:`~thinet_fast.pipeline.keeps.block_multiple`)."""
    return [Item(g.name, g.channels // g.blocks, "group", block_multiple(multiple, g.blocks), g) for g in groups]


def head_items(sites) -> list[Item]:
    return [Item(s.name, s.heads, "heads", 1, s) for s in sites]


PHASES = ("unit", "group", "heads")


class Shadow:
    """A meta copy of ``model`` cut the way the pipeline cuts: units first, then
    groups, then heads. Groups are found (Torch-Pruning's graph) only once every unit
    cut is made, and head sites once every group cut is, each on the model as it is
    then, as :func:`~thinet_fast.pipeline.prune.prune` finds them: a graph built before
    a unit cut would point at the modules that cut replaced. ``ignored_layers`` (fqns)
    and ``skip`` (unit producers) are what the real model's groups are found with;
    ``biases``: layers that hold a (zero) bias from the start, as the pipeline will
    give them one. ``device``: "meta" (shapes only), or a real device for a model whose
    forward needs data (a detector's box selection)."""

    def __init__(self, model: nn.Module, example: torch.Tensor, *, ignored_layers: Sequence[str] = (),
                 skip: Sequence[str] = (), biases: Sequence[str] = (), device="meta"):
        self.pristine = copy.deepcopy(model).to(device)  # never cut: what copy() starts from
        for name in biases:  # layers the pipeline will give a bias (budget_stats.new_biases)
            m = self.pristine.get_submodule(name)
            attr = "bias" if hasattr(m, "weight") else "in_proj_bias"  # attention: its input projection's
            w = m.weight if attr == "bias" else m.in_proj_weight
            if getattr(m, attr) is None:
                setattr(m, attr, nn.Parameter(torch.zeros(w.shape[0], device=device, dtype=w.dtype)))
        self.example = example.to(device)
        self._found = (tuple(ignored_layers), tuple(skip))
        self._reset()

    def _reset(self) -> None:
        self.model = copy.deepcopy(self.pristine)
        self.phase = 0
        self.groups: dict | None = None
        self.sites: dict | None = None

    def copy(self) -> "Shadow":
        """An uncut twin (it shares only the pristine copy, which nothing cuts)."""
        twin = copy.copy(self)
        twin._reset()
        return twin

    def _enter(self, kind: str) -> None:
        phase = PHASES.index(kind)
        if phase < self.phase:
            raise RuntimeError(f"a {kind} cut after a {PHASES[self.phase]} cut: cut units, then groups, then heads")
        self.phase = phase
        ignored_layers, skip = self._found
        if kind == "group" and self.groups is None:
            modules = dict(self.model.named_modules())
            found, _ = find_groups(self.model, self.example, ignored_layers=[modules[n] for n in ignored_layers
                                                                              if n in modules], skip=skip)
            self.groups = {g.name: g for g in found}
        if kind == "heads" and self.sites is None:
            self.sites = {s.name: s for s in find_heads(self.model, ignored_layers)[0]}

    def cut(self, item: Item, n: int) -> None:
        """Keep ``n`` of the item's steps (which ones does not change any count)."""
        self._enter(item.kind)
        if n >= item.channels:
            return
        if item.kind == "unit":
            prune_unit_(self.model, item.source, torch.arange(n))
            return
        found = self.groups if item.kind == "group" else self.sites
        if item.producer not in found:
            raise RuntimeError(f"the shape-only copy of the model does not show the {item.kind} "
                               f"`{item.producer}`; please report the model")
        if item.kind == "group":
            g = found[item.producer]
            per = g.channels // g.blocks
            g.prune([b * per + p for b in range(g.blocks) for p in range(n, per)])
        else:
            cut_first_heads(self.model, found[item.producer], n)

    def counts(self, kinds=COUNTED) -> dict[str, int]:
        out = {}
        if "flops" in kinds:
            out["flops"] = count_flops(self.model, self.example)
        if "params" in kinds:
            out["params"] = count_params(self.model)
        return out


class _Unmodelled(Exception):
    pass


def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


class CountModel:
    """Exact FLOPs and parameter counts of the model cut to any widths (see the module
    docstring), from one probe cut per item. ``model(keep, kinds)``: the counts for
    ``keep`` (item name -> steps kept; absent items keep all)."""

    def __init__(self, shadow: Shadow, items: Sequence[Item]):
        order = [PHASES.index(it.kind) for it in items]
        if order != sorted(order):
            raise ValueError("items must come units first, then groups, then heads (the order of the cuts)")
        self.shadow, self.items = shadow, list(items)
        self.exact_only = False
        try:
            self._probe()
        except _Unmodelled:
            self.exact_only = True  # counted exactly, one cut copy per count

    def _probe(self) -> None:
        probe = self.shadow.copy()
        base = _shapes(probe.model)
        layers = profile(probe.model, probe.example).layers
        rates: dict[tuple[str, int], dict[int, int]] = {}
        self.blocks: dict[int, tuple[int, int, float]] = {}   # head item -> (prefix params, params/head, flops/head)
        flops_of: dict[str, float] = {}
        for lc in layers:  # a module called several times: every call
            flops_of[lc.name] = flops_of.get(lc.name, 0) + lc.flops
        before = base
        for i, it in enumerate(self.items):
            probe.cut(it, it.channels - 1)
            after = _shapes(probe.model)
            if it.kind == "heads":
                prefix = it.producer + "."
                inside = lambda s: {n: v for n, v in s.items() if n.startswith(prefix)}  # noqa: E731
                if {n: v for n, v in after.items() if not n.startswith(prefix)} != \
                        {n: v for n, v in before.items() if not n.startswith(prefix)}:
                    raise _Unmodelled
                if inside(before) != inside(base):  # an earlier item's cut reached into it: not one block
                    raise _Unmodelled
                p0 = sum(math.prod(v) for v in inside(before).values())
                p1 = sum(math.prod(v) for v in inside(after).values())
                self.blocks[i] = (p0, p0 - p1, flops_of.get(it.producer, 0) / it.channels)
            else:
                if set(after) != set(before):
                    raise _Unmodelled
                for name, shape in before.items():
                    if len(shape) != len(after[name]):
                        raise _Unmodelled
                    for d, (x, y) in enumerate(zip(shape, after[name])):
                        if x != y:
                            rates.setdefault((name, d), {})[i] = x - y
            before = after
        heads_prefixes = tuple(self.items[i].producer + "." for i in self.blocks)
        # tensors: (name, [(size, [(item, rate), ...]) per dim]) for those that shrink
        self.tensors, self.params_fixed = [], 0
        for name, shape in base.items():
            if name.startswith(heads_prefixes):
                continue
            dims = [(size, sorted(rates.get((name, d), {}).items())) for d, size in enumerate(shape)]
            if any(terms for _, terms in dims):
                self.tensors.append((name, dims))
            else:
                self.params_fixed += math.prod(shape)
        self.params_fixed += sum(p0 for p0, _, _ in self.blocks.values())
        shrinking = {name for name, _ in self.tensors}
        heads_names = {self.items[i].producer for i in self.blocks}
        self.flops_fixed, self.flops_scaled = 0, []   # (weight name, flops per weight element)
        for lc in layers:
            weight = f"{lc.name}.weight"
            if lc.name in heads_names:
                continue
            if weight in shrinking:
                self.flops_scaled.append((weight, lc.flops / max(math.prod(base[weight]), 1)))
            else:
                self.flops_fixed += lc.flops

    def _removed(self, keep: dict[str, int]) -> list[int]:
        return [it.channels - keep.get(it.producer, it.channels) for it in self.items]

    def __call__(self, keep: dict[str, int], kinds=COUNTED) -> dict[str, int]:
        if self.exact_only:
            return self.exact(keep, kinds)
        r = self._removed(keep)
        size = {}
        for name, dims in self.tensors:
            n = 1
            for d, terms in dims:
                n *= d - sum(a * r[i] for i, a in terms)
            size[name] = n
        out = {}
        if "params" in kinds:
            out["params"] = self.params_fixed + sum(size.values()) - sum(b * r[i] for i, (_, b, _) in self.blocks.items())
        if "flops" in kinds:
            flops = self.flops_fixed + sum(f * size[w] for w, f in self.flops_scaled)
            flops += sum(f * (self.items[i].channels - r[i]) for i, (_, _, f) in self.blocks.items())
            out["flops"] = int(round(flops))
        return out

    def exact(self, keep: dict[str, int], kinds=COUNTED) -> dict[str, int]:
        """The counts of a fresh copy cut to ``keep``."""
        s = self.shadow.copy()
        for it in self.items:
            s.cut(it, keep.get(it.producer, it.channels))
        return s.counts(kinds)

    def step_costs(self, kind: str) -> list[float]:
        """What one step of each item saves at the full widths (at least 1)."""
        full = self({}, (kind,))[kind]
        return [max(float(full - self({it.producer: it.channels - 1}, (kind,))[kind]), 1.0) for it in self.items]

    def neighbours(self) -> list[set[int]] | None:
        """Per item, the items whose steps change what its step costs (they shrink the
        same tensor); None when counted exactly."""
        if self.exact_only:
            return None
        out = [set() for _ in self.items]
        for _, dims in self.tensors:
            touching = {i for _, terms in dims for i, _ in terms}
            for i in touching:
                out[i] |= touching - {i}
        return out

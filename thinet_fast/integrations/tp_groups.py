"""Torch-Pruning groups as thinet_fast sees them: which layers read a group's channels,
as consumers with a patch geometry and the channels they read (used by
:class:`~thinet_fast.integrations.torch_pruning.ThiNetImportance`)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..groups import MAX_FEATURE_GRAM, UnsupportedGroupError, _name, _root_idxs  # one definition
from ..ops.patches import ConsumerGeometry, UnsupportedConsumer

__all__ = ["UnsupportedGroupError", "MAX_FEATURE_GRAM"]

# ----------------------------------------------------------------- group analysis
@dataclass(frozen=True, eq=False)
class _Consumer:
    """A layer that reads the group's channels, as thinet_fast sees it."""

    module: nn.Module
    name: str
    kind: str                      # "conv" | "linear"
    geometry: ConsumerGeometry
    channels: int                  # C: the consumer's input channels (all of them)

    @property
    def taps(self) -> int:
        return self.geometry.taps

    @property
    def key(self) -> tuple[int, int]:
        return (id(self.module), self.taps)


@dataclass(frozen=True, eq=False)
class _Link:
    """Which of a consumer's input channels carry which of the group's root channels."""

    consumer: _Consumer
    channels: torch.Tensor         # (m,) consumer input channels
    positions: torch.Tensor        # (m,) their positions in the group's root idxs


def _conv_geometry(module: nn.Conv2d, name: str) -> ConsumerGeometry:
    try:
        return ConsumerGeometry.from_module(module)
    except UnsupportedConsumer as exc:
        raise UnsupportedGroupError(f"consumer `{name}`: {exc}. Add its producer(s) to ignored_layers.") from exc


def _linear_link(module: nn.Linear, name: str, pairs: list[tuple[int, int]], pos: dict) -> tuple[_Consumer, list, list]:
    """A Linear after flatten reads C·t features, channel-major (feature ``c*t + u``).
    Torch-Pruning maps each root channel to its t features; recover t and c."""
    F = module.in_features
    by_root: dict[Any, list[int]] = {}
    for f, r in pairs:
        by_root.setdefault(r, []).append(f)
    sizes = {len(set(fs)) for fs in by_root.values()}
    t = sizes.pop() if len(sizes) == 1 else 1
    aligned = t >= 1 and F % t == 0 and all(
        sorted(set(fs)) == list(range(min(fs), min(fs) + t)) and min(fs) % t == 0 for fs in by_root.values())
    if not aligned:
        t = 1
        if F > MAX_FEATURE_GRAM:
            raise UnsupportedGroupError(
                f"consumer `{name}` (Linear, {F} inputs) reads these channels in a layout that is not "
                "channel-major blocks of equal size, and a per-feature Gram would be too large. "
                "Add its producer(s) to ignored_layers.")
    cons = _Consumer(module, name, "linear", ConsumerGeometry.dense(t), F // t)
    chans = [f // t for f, _ in pairs]
    return cons, chans, [pos[r] for _, r in pairs]


_CHANNELWISE = (nn.modules.batchnorm._BatchNorm, nn.PReLU, nn.modules.instancenorm._InstanceNorm)


def _analyse(group) -> tuple[list, list[_Link], list[str]]:
    """Root idxs, consumer links, and producer names of a Torch-Pruning group.

    Raises :class:`UnsupportedGroupError` for a reader thinet_fast cannot express.
    """
    DG = getattr(group, "_DG", None)
    if DG is None:
        raise TypeError("ThiNetImportance needs a torch_pruning Group made by a DependencyGraph "
                        "(DG.get_pruning_group / DG.get_all_groups / a pruner); got one without its graph")
    items = list(group)
    if not items:
        raise ValueError("empty Torch-Pruning group")
    roots = _root_idxs(items[0])
    pos = {r: i for i, r in enumerate(roots)}
    links: list[_Link] = []
    producers: list[str] = []
    for item in items:
        dep, idxs = item[0], item[1]
        module, handler = dep.target.module, dep.handler
        if isinstance(module, nn.Parameter):
            continue  # an unwrapped per-channel parameter: it loses the same channels
        if type(module).__module__.startswith("torch_pruning"):
            continue  # traced functional ops (add, cat, split, flatten, pooling, activations)
        is_in, is_out = DG.is_in_channel_pruning_fn(handler), DG.is_out_channel_pruning_fn(handler)
        name = _name(DG, module)
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            if module.groups == module.in_channels == module.out_channels:
                continue  # depthwise: channel-wise, a follower (DESIGN §2)
            if is_in:
                raise UnsupportedGroupError(
                    f"`{name}` is a grouped Conv2d (groups={module.groups}) that reads these channels; thinet_fast "
                    "expresses Conv2d (groups=1, or depthwise) and Linear consumers. Add the group's producer(s) "
                    "to ignored_layers.")
        if is_in and not is_out:  # the layer's *input* channels are pruned: a reader
            local = [int(i) for i in idxs]
            rs = _root_idxs(item)
            pairs = [(c, r) for c, r in zip(local, rs) if r is not None and r in pos]
            if not pairs:
                continue
            if isinstance(module, nn.Conv2d):  # groups == 1 here (grouped/depthwise handled above)
                cons = _Consumer(module, name, "conv", _conv_geometry(module, name), module.in_channels)
                chans, posl = [c for c, _ in pairs], [pos[r] for _, r in pairs]
            elif isinstance(module, nn.Linear):
                cons, chans, posl = _linear_link(module, name, pairs, pos)
            else:
                raise UnsupportedGroupError(
                    f"`{name}` ({type(module).__name__}) reads these channels; thinet_fast takes statistics at "
                    "Conv2d (groups=1) and Linear consumers only. Add the group's producer(s) to ignored_layers.")
            uniq = sorted(set(zip(chans, posl)))
            seen: dict[int, int] = {}
            for c, p in uniq:
                if seen.setdefault(c, p) != p:
                    raise UnsupportedGroupError(
                        f"input channel {c} of consumer `{name}` maps to two channels of the group; "
                        "ThiNet cannot rank such a group")
            links.append(_Link(cons, torch.tensor([c for c, _ in uniq], dtype=torch.long),
                               torch.tensor([p for _, p in uniq], dtype=torch.long)))
        elif is_out and not is_in:
            producers.append(name)  # a layer whose outputs these channels are
        elif isinstance(module, _CHANNELWISE) or isinstance(module, nn.Embedding):
            continue  # channel-wise followers (and embeddings, which only produce channels)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            raise UnsupportedGroupError(
                f"`{name}` ({type(module).__name__}) normalises across these channels, so removing one changes "
                "the others; ThiNet's statistics cannot express that. Add the group's producer(s) to ignored_layers.")
        else:
            raise UnsupportedGroupError(
                f"`{name}` ({type(module).__name__}) is coupled to these channels and thinet_fast does not know "
                "how it reads them (it takes statistics at Conv2d/Linear consumers through channel-wise layers). "
                "Add the group's producer(s) to ignored_layers.")
    # one link per consumer: merge repeated items of the same module
    merged: dict[tuple[int, int], _Link] = {}
    for ln in links:
        old = merged.get(ln.consumer.key)
        if old is None:
            merged[ln.consumer.key] = ln
        else:
            pairs = sorted(set(zip(old.channels.tolist(), old.positions.tolist())) |
                           set(zip(ln.channels.tolist(), ln.positions.tolist())))
            merged[ln.consumer.key] = _Link(old.consumer, torch.tensor([c for c, _ in pairs]),
                                            torch.tensor([p for _, p in pairs]))
    return roots, list(merged.values()), producers


def _state_key(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced, resized or modified in place
    (autograd's version counter). Edits through ``.data`` are not seen: call ``reset()``."""
    return (id(model),) + tuple(
        (id(t), t.data_ptr(), tuple(t.shape), t._version)
        for t in itertools.chain(model.parameters(), model.buffers()))

"""Coupled channel groups (DESIGN.md §2), found with Torch-Pruning's DependencyGraph.

A *group* is every producer that writes a set of channels (the convs feeding a residual
add, the branches of a concat, an SE gate's expanding conv), every *reader* that takes
them in (``Conv2d``, also grouped, and ``Linear``, on flattened maps or on tokens), and
the modules in between that lose the same channels (BatchNorm, depthwise convs,
per-channel parameters, Torch-Pruning's traced add/cat/split ops). A LayerNorm over
the group's channels (a transformer's residual stream) and ``nn.MultiheadAttention``
reading and writing them are members too: cutting some channels renormalises the rest
in every token, so such a group's readers (Linear layers and the attention's input
projection) are refitted on what they see after the cut (:mod:`thinet_fast.pipeline.
coupled`). Channels a GroupNorm normalises together are kept.

The graph comes from Torch-Pruning (autograd tracing: it follows any model that runs,
also those torch.fx cannot trace, e.g. detection models; :mod:`thinet_fast.tp_graph`
builds and reads it). This module only reads a group and says how thinet_fast sees it;
it knows modules, not the math. Groups with a
member it cannot express (attention, an unknown module) are refused with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import nn

from . import attention
from .modules import sync_widths
from .ops.patches import ConsumerGeometry, UnsupportedConsumer
from .regions import Entry, Exit, TokenExit, find_regions
from .tp_graph import all_groups, dependency_graph, graph_name, input_shapes, members, mixing, owners, root_idxs

__all__ = ["ChannelGroup", "Reader", "Link", "UnsupportedGroupError", "dependency_graph", "find_groups",
           "analyse", "input_shapes", "MAX_FEATURE_GRAM"]

# A Linear reader whose features do not come in aligned per-channel blocks is taken
# feature by feature (t = 1, exact); its Gram is then in_features² entries.
MAX_FEATURE_GRAM = 16384
_CHANNELWISE = (nn.modules.batchnorm._BatchNorm, nn.PReLU, nn.modules.instancenorm._InstanceNorm)
_ACROSS = (nn.LayerNorm, nn.GroupNorm)  # normalise across the channels they keep


class UnsupportedGroupError(ValueError):
    """A group's channels reach a layer whose statistics thinet_fast cannot express."""


@dataclass(frozen=True, eq=False)
class Reader:
    """A layer that reads channels of a group: its statistics are taken at its input."""

    module: nn.Module              # or an nn.MultiheadAttention: its input projection reads
    name: str
    kind: str                      # "conv" | "linear"
    geometry: ConsumerGeometry     # a Linear on tokens reads like a 1x1 conv
    channels: int                  # C: the reader's input channels (all of them)
    tokens: bool = False           # a Linear on (N, ..., C)
    groups: int = 1                # a grouped conv: block-diagonal over its input

    @property
    def taps(self) -> int:
        return self.geometry.taps

    @property
    def key(self) -> tuple[int, int]:
        return (id(self.module), self.taps)

    def kernel(self) -> torch.Tensor:
        """The weight as a dense (K, C, kh, kw) or (K, C·t) kernel for the statistics."""
        w = getattr(self.module, "weight", None)
        w = (self.module.in_proj_weight if w is None else w).detach()  # attention: its input projection
        if self.tokens:
            return w[:, :, None, None]
        if self.groups == 1:
            return w
        K, n = w.shape[0], w.shape[1]
        dense = w.new_zeros((K, self.channels) + tuple(w.shape[2:]))
        m = K // self.groups
        for a in range(self.groups):
            dense[a * m:(a + 1) * m, a * n:(a + 1) * n] = w[a * m:(a + 1) * m]
        return dense


@dataclass(frozen=True, eq=False)
class Link:
    """Which of a reader's input channels carry which of the group's channels."""

    reader: Reader
    channels: torch.Tensor         # (m,) reader input channels
    positions: torch.Tensor        # (m,) their positions in the group


@dataclass(eq=False)
class ChannelGroup:
    """One coupled group. ``blocks`` > 1: the channels fall in that many equal blocks
    (grouped convs, GroupNorm) and every block must lose the same positions."""

    name: str                      # the root producer's fqn
    root: Any = field(repr=False)  # Torch-Pruning's root module and pruning function
    root_fn: Any = field(repr=False)
    channels: int
    producers: tuple[str, ...]
    followers: tuple[str, ...]
    links: list[Link]
    blocks: int = 1
    notes: tuple[str, ...] = ()
    graph: Any = field(default=None, repr=False)  # the DependencyGraph that cuts it
    norms: tuple[str, ...] = ()      # LayerNorms across the channels: the readers see them renormalised
    attention: tuple[str, ...] = ()  # MultiheadAttention reading and writing them (its model width)

    @property
    def normalised(self) -> bool:
        """Whether a cut changes what the kept channels' readers see (a LayerNorm
        renormalises them, or attention mixes them): readers are refitted after the cut."""
        return bool(self.norms or self.attention)

    def prune(self, drop: list[int]) -> None:
        """Cut the positions ``drop`` from every member (Torch-Pruning; attention's model
        width by :func:`~thinet_fast.attention.cut_width`, as Torch-Pruning would also
        cut the heads' width)."""
        if not drop:
            return
        group = self.graph.get_pruning_group(self.root, self.root_fn, drop)
        mha = [it for it in group if isinstance(it[0].target.module, nn.MultiheadAttention)]
        if mha:  # Torch-Pruning's own MultiheadAttention cut would narrow the heads too
            group._group = [it for it in group._group if not isinstance(it[0].target.module,
                                                                        nn.MultiheadAttention)]
        group.prune()
        for item in mha:
            old = item[0].target.module
            keep = torch.tensor(sorted(set(range(old.embed_dim)) - {int(i) for i in item[1]}), dtype=torch.long)
            _replace(self.graph.model, old, attention.cut_width(old, keep))
        sync_widths(self.graph.model)

    @property
    def readers(self) -> list[Reader]:
        return [ln.reader for ln in self.links]


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for m in root.modules():
        for n, child in m._modules.items():
            if child is old:
                m._modules[n] = new
                return
    raise RuntimeError(f"a {type(old).__name__} of the group is not in the model it was traced on")


def _in_other_attention(DG) -> set[str]:
    """The fqns of the modules inside attention other than nn.MultiheadAttention (Swin's,
    MaxViT's), whose forward repeats the model width (cached on the graph)."""
    found = getattr(DG, "_thinet_other_attention", None)
    if found is None:
        names = getattr(DG, "_module2name", {})
        found = {names[c] for m in DG.model.modules()
                 if isinstance(m, attention.ATTENTION_TYPES)
                 and not isinstance(m, (nn.MultiheadAttention, attention.HeadPrunedAttention))
                 for c in m.modules() if c in names}
        DG._thinet_other_attention = found
    return found


_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
           nn.Embedding, nn.MultiheadAttention)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _conv_reader(module: nn.Conv2d, name: str) -> Reader:
    try:
        geometry = ConsumerGeometry.from_module(module)
    except UnsupportedConsumer as exc:
        raise UnsupportedGroupError(f"reader `{name}`: {exc}") from exc
    return Reader(module, name, "conv", geometry, module.in_channels, groups=module.groups)


def _linear_reader(module: nn.Linear, name: str, pairs: list[tuple[int, int]], pos: dict,
                   tokens: bool) -> tuple[Reader, list, list]:
    """A Linear after flatten reads C·t features, channel-major (feature ``c*t + u``);
    Torch-Pruning maps each group channel to its t features. Recover t and c."""
    F = module.in_features
    if tokens:
        return (Reader(module, name, "linear", ConsumerGeometry.conv(1), F, tokens=True),
                [f for f, _ in pairs], [pos[r] for _, r in pairs])
    by_root: dict[Any, list[int]] = {}
    for f, r in pairs:
        by_root.setdefault(r, []).append(f)
    sizes = {len(set(fs)) for fs in by_root.values()}
    t = sizes.pop() if len(sizes) == 1 else 1
    aligned = F % t == 0 and all(
        sorted(set(fs)) == list(range(min(fs), min(fs) + t)) and min(fs) % t == 0 for fs in by_root.values())
    if not aligned:
        t = 1
        if F > MAX_FEATURE_GRAM:
            raise UnsupportedGroupError(
                f"reader `{name}` (Linear, {F} inputs) reads these channels in a layout that is not channel-major "
                "blocks of equal size, and a per-feature Gram would be too large")
    return (Reader(module, name, "linear", ConsumerGeometry.dense(t), F // t),
            [f // t for f, _ in pairs], [pos[r] for _, r in pairs])


def _identity(item, n: int) -> bool:
    return [int(i) for i in item.idxs] == list(range(n)) and root_idxs(item) == list(range(n))


def analyse(group, shapes: Optional[dict] = None, *, strict: bool = False) -> ChannelGroup:
    """How thinet_fast sees a Torch-Pruning group (``shapes``: :func:`input_shapes`).

    ``strict``: refuse grouped-conv readers and normalised groups too (the
    Torch-Pruning importance, which ranks channels but does not reconstruct). Raises
    :class:`UnsupportedGroupError` naming the member it cannot express."""
    DG = getattr(group, "_DG", None)
    if DG is None:
        raise TypeError("a torch_pruning Group made by a DependencyGraph is needed (DG.get_pruning_group / "
                        "DG.get_all_groups / a pruner); got one without its graph")
    items = list(group)
    if not items:
        raise ValueError("empty Torch-Pruning group")
    roots = root_idxs(items[0])
    C = len(roots)
    pos = {r: i for i, r in enumerate(roots)}
    links: list[Link] = []
    producers, followers, notes, blocks = [], [], [], 1
    norms, mha = [], []
    for item in items:
        dep, idxs = item[0], item[1]
        module, handler = dep.target.module, dep.handler
        name = graph_name(DG, module) if not isinstance(module, nn.Parameter) else "<parameter>"
        if isinstance(module, Entry):
            where = getattr(DG, "_thinet_region", "")
            raise UnsupportedGroupError(f"these channels come into `{where or 'the model'}` from outside it (a "
                                        "channel-wise layer reads an input); they are kept")
        if isinstance(module, (Exit, TokenExit)):
            where = getattr(DG, "_thinet_region", "")
            raise UnsupportedGroupError(
                "these channels are an output of " + (f"`{where}`, and code outside the traced graph reads them"
                                                      if where else "the model") + "; they are kept")
        if isinstance(module, nn.Parameter):
            pname = DG._param_to_name.get(module, name) if hasattr(DG, "_param_to_name") else name
            owner = owners(DG).get(id(module))
            if isinstance(owner, _LAYERS):
                # a layer's own weight reached as a bare parameter: the model calls it
                # functionally (F.linear(x, self.qkv.weight)), which the graph cannot cut
                raise UnsupportedGroupError(
                    f"`{pname}` ({type(owner).__name__} weight) is used outside its module's forward (a functional "
                    "call such as F.linear), so its channels cannot be cut with the group's")
            followers.append(pname)
            continue  # a per-channel parameter (layer scale, class token): it loses the same channels
        if type(module).__module__.startswith("torch_pruning"):
            why = mixing(dep.target, DG) if type(module).__name__ != "_OutputOp" else None
            if why:
                raise UnsupportedGroupError(why)
            continue  # traced functional ops (add, cat, split, flatten, pooling, activations)
        is_in, is_out = DG.is_in_channel_pruning_fn(handler), DG.is_out_channel_pruning_fn(handler)
        if _is_depthwise(module):
            followers.append(name)  # channel-wise (DESIGN §2)
            continue
        grouped = isinstance(module, nn.Conv2d) and module.groups > 1
        if grouped:
            width = module.in_channels if is_in else module.out_channels
            if strict and is_in:
                raise UnsupportedGroupError(
                    f"`{name}` is a grouped Conv2d (groups={module.groups}) that reads these channels")
            if not _identity(item, C) or width != C:
                raise UnsupportedGroupError(
                    f"`{name}` is a grouped Conv2d (groups={module.groups}) that sees these channels in another "
                    "order or mixed with others; its groups cannot be kept aligned")
            blocks = math.lcm(blocks, module.groups)
        if is_in and not is_out:  # the layer's *input* channels are pruned: a reader
            pairs = [(int(c), r) for c, r in zip(idxs, root_idxs(item)) if r is not None and r in pos]
            if not pairs:
                continue
            if isinstance(module, nn.Conv2d):
                reader = _conv_reader(module, name)
                chans, posl = [c for c, _ in pairs], [pos[r] for _, r in pairs]
            elif isinstance(module, nn.Linear):
                shape = (shapes or {}).get(module, ())
                reader, chans, posl = _linear_reader(module, name, pairs, pos, tokens=len(shape) > 2)
            else:
                raise UnsupportedGroupError(f"`{name}` ({type(module).__name__}) reads these channels; statistics "
                                            "are taken at Conv2d and Linear readers only")
            uniq = sorted(set(zip(chans, posl)))
            seen: dict[int, int] = {}
            for c, p in uniq:
                if seen.setdefault(c, p) != p:
                    raise UnsupportedGroupError(f"input channel {c} of reader `{name}` maps to two channels "
                                                "of the group")
            links.append(Link(reader, torch.tensor([c for c, _ in uniq], dtype=torch.long),
                              torch.tensor([p for _, p in uniq], dtype=torch.long)))
        elif is_out and not is_in:
            if not isinstance(module, (nn.Conv2d, nn.Linear, nn.Embedding)):
                raise UnsupportedGroupError(f"`{name}` ({type(module).__name__}) writes these channels; producers "
                                            "are Conv2d, Linear and Embedding")
            producers.append(name)
        elif isinstance(module, _CHANNELWISE):
            followers.append(name)
        elif isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1 and _identity(item, C) and \
                module.normalized_shape[0] == C and not strict:
            norms.append(name)  # renormalises the kept channels: the readers are refitted after the cut
        elif isinstance(module, _ACROSS):
            how = " in groups" if isinstance(module, nn.GroupNorm) else \
                " (an importance ranks them without refitting its readers)" if strict else " and others"
            raise UnsupportedGroupError(
                f"`{name}` ({type(module).__name__}) normalises across these channels{how}, so cutting some "
                "changes the others in every sample; they are kept")
        elif isinstance(module, nn.MultiheadAttention):
            why = attention._why_not(module)
            if strict:
                why = ("an importance ranks channels without refitting the readers that attention and its "
                       "LayerNorms need")
            elif why is None and not (_identity(item, C) and module.embed_dim == C):
                why = "it sees these channels mixed with others"
            if why:
                raise UnsupportedGroupError(f"`{name}` (MultiheadAttention) reads and writes these channels, and "
                                            f"{why}; they are kept")
            mha.append(name)  # a reader through its input projection (every token a sample), and a producer
            links.append(Link(Reader(module, name, "linear", ConsumerGeometry.conv(1), C, tokens=True),
                              torch.arange(C), torch.arange(C)))
        else:
            raise UnsupportedGroupError(f"`{name}` ({type(module).__name__}) is coupled to these channels and "
                                        "thinet_fast does not know how it uses them")
    if C % blocks:
        raise UnsupportedGroupError(f"{C} channels do not split into {blocks} equal blocks")
    if norms or mha:  # refitted after the cut from their own input and output (Linear layers only)
        inner = _in_other_attention(DG)
        where = next((n for n in [ln.reader.name for ln in links] + producers if n in inner), None)
        if where:
            raise UnsupportedGroupError(
                f"`{where}` is inside a window or relative-position attention module that reads and writes channels "
                f"`{(norms or mha)[0]}` normalises; thinet_fast cuts the model width of nn.MultiheadAttention only, "
                "so they are kept")
        other = next((ln.reader for ln in links if ln.reader.kind != "linear" or ln.reader.taps != 1), None)
        if other is not None:
            raise UnsupportedGroupError(
                f"`{other.name}` ({type(other.module).__name__}) reads channels that "
                f"`{(norms or mha)[0]}` renormalises or mixes; such readers are refitted after the cut, which "
                "thinet_fast does for Linear layers (on tokens or features) only; they are kept")
    merged: dict[tuple[int, int], Link] = {}  # one link per reader
    for ln in links:
        old = merged.get(ln.reader.key)
        if old is None:
            merged[ln.reader.key] = ln
            continue
        pairs = sorted(set(zip(old.channels.tolist(), old.positions.tolist())) |
                       set(zip(ln.channels.tolist(), ln.positions.tolist())))
        merged[ln.reader.key] = Link(old.reader, torch.tensor([c for c, _ in pairs]), torch.tensor([p for _, p in pairs]))
    for ln in merged.values():
        if ln.reader.groups > 1 and ln.channels.numel() != C:
            raise UnsupportedGroupError(f"grouped reader `{ln.reader.name}` reads only part of the group")
    root = items[0][0].target.module
    return ChannelGroup(graph_name(DG, root), root, items[0][0].handler, C, tuple(dict.fromkeys(producers)),
                        tuple(dict.fromkeys(followers)), list(merged.values()), blocks, tuple(notes),
                        norms=tuple(dict.fromkeys(norms)), attention=tuple(dict.fromkeys(mha)))


def find_groups(model: nn.Module, example_inputs, *, ignored_layers: Iterable[nn.Module] = (),
                skip: Iterable[str] = ()) -> tuple[list[ChannelGroup], list[tuple[str, str]]]:
    """Every group of ``model`` rooted at a Conv2d/Linear, except those whose root is in
    ``skip`` or whose producers are ``ignored_layers``. The graph is built per region
    (:mod:`thinet_fast.regions`): the whole model when torch.fx traces it, else its
    traceable subtrees. Returns ``(groups, refused)``: ``refused`` holds ``(fqn, reason)``."""
    ignored = [m for layer in ignored_layers for m in layer.modules()]
    ignored_ids = {id(m) for m in ignored}
    shapes = input_shapes(model, example_inputs)
    names = {m: n for n, m in model.named_modules()}
    skip = set(skip)
    found, refused = [], []
    for scope in find_regions(model, example_inputs):
        try:
            DG = dependency_graph(scope.wrapped(), (scope.args, scope.kwargs), forward_fn=lambda m, x: m(*x))
        except Exception as exc:  # Torch-Pruning's tracer fails on code it does not model
            refused.append((scope.name or "<model>", f"Torch-Pruning could not build its graph: "
                                                     f"{type(exc).__name__}: {exc}"[:300]))
            continue
        DG._module2name, DG._thinet_region = names, scope.name
        for root, g in all_groups(DG, ignored_ids, refused):
            if root in skip:
                continue
            try:
                cg = analyse(g, shapes)
            except UnsupportedGroupError as exc:
                refused.append((root, str(exc)))
                continue
            cg.graph = DG
            if any(p in skip for p in cg.producers):
                continue
            if any(id(m) in ignored_ids for m in members(g)):
                refused.append((root, "a member is in ignored_layers"))
                continue
            if not cg.links:
                refused.append((root, "no Conv2d/Linear reads these channels (they reach the model output)"))
                continue
            if cg.channels < 2:
                refused.append((root, f"{cg.channels} channel(s); nothing to prune"))
                continue
            found.append(cg)
    order = {n: i for i, n in enumerate(names.values())}  # definition order: front to back, as a rule
    found.sort(key=lambda g: order.get(g.name, len(order)))
    return found, refused



"""Torch-Pruning's dependency graph as thinet_fast reads it: building it (in eval mode,
on a region's inputs), bounding its index search, and reading its nodes (module names,
parameter owners, products outside any module). It knows Torch-Pruning's objects, not
how a group is pruned (:mod:`thinet_fast.groups`)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .modes import hooked_forward, preserved_modes
from .regions import TokenExit

__all__ = ["torch_pruning", "dependency_graph", "input_shapes", "graph_name", "owners", "root_idxs", "mixing",
           "all_groups", "members", "MAX_MAPPED_INDICES"]


# Torch-Pruning maps a group's indices through every op it reaches; a reshape it cannot
# model (window partitions, token shuffles) multiplies them each time round, and the
# search then runs for hours. Past this many mapped indices for one group it is refused:
# a count, not a clock, so every machine refuses the same groups. (A VGG-16 fc6 group
# maps 512·49 indices a few times.)
MAX_MAPPED_INDICES = 400_000


class _Budget(Exception):
    pass


class _Counted:
    """An index mapping that charges its output to the graph's budget."""

    def __init__(self, fn, budget: list):
        self.fn, self.budget = fn, budget

    def __call__(self, idxs):
        out = self.fn(idxs)
        if self.budget[0] is not None:
            self.budget[0] -= len(out)
            if self.budget[0] < 0:
                raise _Budget
        return out

    def __getattr__(self, name):  # Torch-Pruning may read the mapping's fields
        return getattr(self.fn, name)


class _CountedList(list):
    """A dependency's index mappings: whatever Torch-Pruning stores is counted."""

    def __init__(self, items, budget: list):
        self.budget = budget
        super().__init__(self._wrap(v) for v in items)

    def _wrap(self, v):
        return v if v is None or isinstance(v, _Counted) or not callable(v) else _Counted(v, self.budget)

    def __setitem__(self, i, v):
        super().__setitem__(i, self._wrap(v))


def count_mappings(DG) -> list:
    """Make every index mapping of ``DG`` charge a shared budget; returns the budget
    cell (``[None]``: unlimited)."""
    budget = [None]
    for node in DG.module2node.values():
        for dep in node.dependencies:
            if not isinstance(dep.index_mapping, _CountedList):
                dep.index_mapping = _CountedList(dep.index_mapping, budget)
    return budget


def torch_pruning():
    try:
        import torch_pruning as tp
    except ImportError as exc:  # pragma: no cover - exercised by a test that hides the package
        raise ImportError("coupled='prune' finds channel groups with Torch-Pruning's DependencyGraph, which is not "
                          f"importable ({exc}). Install it with: pip install torch-pruning") from exc
    return tp


def dependency_graph(model: nn.Module, example_inputs, *, ignored_layers: Iterable[nn.Module] = (), forward_fn=None):
    """Torch-Pruning's dependency graph of ``model`` (traced with ``example_inputs``)."""
    tp = torch_pruning()
    with preserved_modes(model, train=False):
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, forward_fn=forward_fn,
                                                     ignored_layers=list(ignored_layers), verbose=False)


@torch.no_grad()
def input_shapes(model: nn.Module, example_inputs) -> dict[nn.Module, tuple]:
    """The input shape of every Conv2d/Linear in one forward (a Linear on tokens has > 2 dims)."""
    shapes, handles = {}, []

    def hook(mod, args):
        if args and isinstance(args[0], torch.Tensor):
            shapes.setdefault(mod, tuple(args[0].shape))

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_pre_hook(hook))
    hooked_forward(model, example_inputs, handles)
    return shapes


def graph_name(DG, module) -> str:
    name = DG._module2name.get(module) if hasattr(DG, "_module2name") else None
    return name if name else f"<{type(module).__name__}>"



def owners(DG) -> dict:
    """id(parameter) -> the module that holds it (cached on the graph)."""
    found = getattr(DG, "_thinet_owners", None)
    if found is None:
        model = getattr(DG, "model", None)
        found = {} if model is None else {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
        DG._thinet_owners = found
    return found


def _node_params(DG) -> set:
    """ids of the parameters inside the modules the graph holds as nodes (cached)."""
    found = getattr(DG, "_thinet_node_params", None)
    if found is None:
        found = {id(p) for m in DG.module2node if isinstance(m, nn.Module) for p in m.parameters()}
        DG._thinet_node_params = found
    return found


_PRODUCTS = ("Addmm", "Mm", "Bmm", "Baddbmm", "Addbmm", "Mv", "Dot", "Convolution", "Linear", "Matmul", "Einsum")
_VIEWS = ("TBackward", "PermuteBackward", "TransposeBackward", "ViewBackward", "UnsafeViewBackward",
          "ExpandBackward", "ReshapeAliasBackward")


def leaves(grad_fn, depth: int = 3) -> list:
    """The parameters a product reads, through transposes and views."""
    out = []
    for nxt, _ in getattr(grad_fn, "next_functions", ()):
        if nxt is None:
            continue
        if hasattr(nxt, "variable"):
            out.append(nxt.variable)
        elif depth and type(nxt).__name__.startswith(_VIEWS):
            out += leaves(nxt, depth - 1)
    return out


def mixing(node, DG) -> str | None:
    """Why a traced op that mixes channels (a matrix product, a convolution) outside
    every module the graph knows breaks the group, or None. A Linear on tokens runs its
    own product inside: that one reads the weight of a module the graph holds."""
    kind = type(getattr(node, "grad_fn", None)).__name__
    if not kind.startswith(_PRODUCTS):
        return None
    params = leaves(node.grad_fn)
    inside = _node_params(DG)
    if any(id(p) in inside for p in params):  # e.g. attention's out_proj, run by the attention's forward
        return None
    held_by = owners(DG)
    held = [held_by.get(id(p)) for p in params]
    named = [m for m in held if m is not None]
    if named:
        return (f"these channels reach {kind[:-len('Backward0')] or kind} on the weight of "
                f"`{graph_name(DG, named[0])}` ({type(named[0]).__name__}) outside its module's forward (a functional "
                "call such as F.linear), which the graph cannot cut")
    return (f"these channels reach a product of activations ({kind}, e.g. attention's q·kᵀ) that mixes them; "
            "they are kept")


def root_idxs(item) -> list:
    root = getattr(item, "root_idxs", None)
    return list(item.idxs) if root is None else list(root)


def all_groups(DG, ignored_ids: set, refused: list):
    """``(root fqn, group)`` for each Conv2d/Linear whose output channels no earlier
    group holds. A root that Torch-Pruning cannot group (its index mapping fails) is
    refused with the reason, instead of ending the search."""
    seen: set[int] = set()
    budget = count_mappings(DG)
    for m in list(DG.module2node):
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or isinstance(m, TokenExit) or id(m) in seen \
                or id(m) in ignored_ids:
            continue
        pruner = DG.get_pruner_of_module(m)
        width = pruner.get_out_channels(m) if pruner is not None else None
        if not width:
            continue
        root = graph_name(DG, m)
        budget[0] = MAX_MAPPED_INDICES
        try:
            group = DG.get_pruning_group(m, pruner.prune_out_channels, list(range(width)))
        except _Budget:
            refused.append((root, f"Torch-Pruning mapped more than {MAX_MAPPED_INDICES} indices for these channels "
                                  "(a reshape it cannot model, e.g. a window partition); add the root to "
                                  "ignored_layers to skip the search"))
            seen.add(id(m))
            continue
        except Exception as exc:
            refused.append((root, f"Torch-Pruning could not group these channels: {type(exc).__name__}: {exc}"[:300]))
            seen.add(id(m))
            continue
        finally:
            budget[0] = None
        for dep, _ in group:
            if DG.is_out_channel_pruning_fn(dep.handler):
                seen.add(id(dep.target.module))
        yield root, group


def members(group):
    return [it[0].target.module for it in group if isinstance(it[0].target.module, nn.Module)]

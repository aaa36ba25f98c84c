"""``find_units``: trace a model and list its prunable units and the refused producers."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

from .tracing import propagate_shapes, trace
from .units import ExampleInputs, Refusal, Unit, UnitPlan
from .walk import Refuse, is_candidate, producer_kind, walk

__all__ = ["find_units"]


def _as_tuple(example_inputs: ExampleInputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a Tensor or a tuple of Tensors, got {type(example_inputs).__name__}")


def find_units(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    units: Optional[Iterable[str]] = None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    leaf_modules: Iterable[str] = (),
) -> UnitPlan:
    """Trace ``model`` and return its prunable units and the producers it will not prune.

    Args:
        model: the model; it is traced, never modified.
        example_inputs: a tensor or tuple of tensors for ``model(*example_inputs)``. Only
            their shapes matter: shapes are propagated on fake tensors (meta tensors when
            the model lives on the meta device).
        units: producer fqns to prune. Each must be a prunable producer, otherwise
            ``ValueError`` names it and the reason.
        filter_fn: ``filter_fn(module, fqn) -> bool`` called for every candidate producer
            (``Conv2d`` groups=1 / ``Linear``); False drops it from the plan. Selected
            producers that cannot be pruned are listed in ``refused`` (not raised).
        leaf_modules: fqns that fx should not trace into (for code fx cannot trace). They
            act as unknown ops: channels flowing into or out of them are refused.

    Returns:
        ``UnitPlan(units, refused)`` in graph (topological) order.

    Raises:
        UntraceableModelError: fx failed; the message names the module and the fix.
        ValueError: a requested producer is missing or not prunable.
    """
    if units is not None and filter_fn is not None:
        raise ValueError("find_units: pass units=[...] or filter_fn=..., not both")
    if isinstance(units, str):
        units = [units]
    inputs = _as_tuple(example_inputs)
    gm = trace(model, leaf_modules)
    propagate_shapes(gm, model, inputs)

    call_counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            call_counts[str(n.target)] = call_counts.get(str(n.target), 0) + 1

    found: list[Unit] = []
    refused: list[Refusal] = []
    seen: set[str] = set()
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        fqn = str(n.target)
        m = gm.get_submodule(fqn)
        if not is_candidate(m) or fqn in seen:
            continue
        seen.add(fqn)
        kind = producer_kind(m)
        if kind is None:
            refused.append(Refusal(fqn, f"`{fqn}` is a {type(m).__name__}, a subclass of "
                                        f"{'Conv2d' if isinstance(m, nn.Conv2d) else 'Linear'}; only exact "
                                        "nn.Conv2d/nn.Linear are rewritten"))
            continue
        if call_counts[fqn] > 1:
            refused.append(Refusal(fqn, f"`{fqn}` is called {call_counts[fqn]} times (shared module)"))
            continue
        c = m.out_channels if kind == "conv" else m.out_features
        if c < 2:
            refused.append(Refusal(fqn, f"`{fqn}` has {c} output channel(s); nothing to prune"))
            continue
        try:
            found.append(walk(gm, n, c, kind, call_counts))
        except Refuse as r:
            refused.append(Refusal(fqn, f"`{fqn}`: {r}"))
    for fqn, m in model.named_modules():
        if is_candidate(m) and fqn not in seen:
            refused.append(Refusal(fqn, f"`{fqn}` is not called in the traced forward "
                                        "(unused, or inside a leaf module)"))

    modules = dict(model.named_modules())
    if units is not None:
        wanted = list(dict.fromkeys(units))
        by_fqn = {u.producer: u for u in found}
        why = {r.producer: r.reason for r in refused}
        errors = []
        for fqn in wanted:
            if fqn in by_fqn:
                continue
            if fqn in why:
                errors.append(f"`{fqn}` cannot be pruned: {why[fqn]}")
            elif fqn not in modules:
                errors.append(f"`{fqn}` is not a module of {type(model).__name__}")
            else:
                errors.append(f"`{fqn}` is a {type(modules[fqn]).__name__}, not a producer "
                              "(Conv2d with groups=1 or Linear)")
        if errors:
            raise ValueError("find_units: requested producer(s) not prunable:\n  " + "\n  ".join(errors))
        keep = set(wanted)
        return UnitPlan([u for u in found if u.producer in keep], [], graph=gm)
    if filter_fn is not None:
        found = [u for u in found if filter_fn(modules[u.producer], u.producer)]
        refused = [r for r in refused if filter_fn(modules[r.producer], r.producer)]
    return UnitPlan(found, refused, graph=gm)

"""What a budget allocates over, and every item's greedy error curve, from one pass.

The items are the plain units and, with ``coupled="prune"``, the coupled groups and
the attention sites the pipeline would prune (found as it finds them: groups with the
units' producers skipped, then the sites). One pass over the unpruned model feeds every
unit's consumer, every group reader and every site's projection; the curves then come
from the statistics the stages select on: a unit's own, a group's readers summed over
its positions (:func:`~thinet_fast.pipeline.coupled.group_statistics`), a site's heads
(:func:`~thinet_fast.pipeline.heads.head_gram`).
"""
from __future__ import annotations

import torch
from torch import nn

from ..attention import find_heads
from ..groups import find_groups
from ..units import UnitPlan, get_module
from .budget_items import Item, group_items, head_items, unit_items
from .collect import collect_watched, iter_batches, reader_watch, unit_watch
from .coupled import bias_home, group_statistics, group_wanted
from .heads import head_gram, head_watch, wanted
from .keeps import round_multiple
from .methods import SelectContext, get_method, selection_backend

__all__ = ["budget_items", "item_curves", "new_biases"]


def budget_items(model: nn.Module, plan: UnitPlan, cfg, example: torch.Tensor, device) -> list[Item]:
    """The items a budget on ``model`` sets: units, then groups, then heads."""
    multiple = round_multiple(cfg.round_to, device)
    items = unit_items(plan.units, multiple)
    if cfg.coupled == "prune":
        groups, _ = find_groups(model, example, ignored_layers=[get_module(model, f) for f in cfg.ignored_layers],
                                skip={u.producer for u in plan.units})
        sites, _ = find_heads(model, cfg.ignored_layers)
        # a normalised group (a transformer's residual stream) reaches inside attention,
        # which the fast counts do not model yet: a budget keeps it (run_coupled says so)
        items += (group_items([g for g in groups if group_wanted(g, cfg, model) and not g.normalised], multiple)
                  + head_items([s for s in sites if wanted(s, cfg)]))
    return [it for it in items if it.channels >= 2]  # one step: nothing to allocate


def _tagged(tag: str, watched: list) -> list:
    return [((tag, key), *rest) for key, *rest in watched]


def item_curves(model: nn.Module, items: list[Item], data, spec, cfg, device, *, bar=None, timer=None):
    """(each item's greedy error curve, the units' statistics keyed by producer) from
    one pass over ``spec.num_images`` images of ``data``."""
    units = [it.source for it in items if it.kind == "unit"]
    groups = [it.source for it in items if it.kind == "group"]
    sites = [it.source for it in items if it.kind == "heads"]
    readers = list({r.key: r for g in groups for r in g.readers}.values())
    watched = _tagged("unit", unit_watch(model, units, spec)) + _tagged(
        "reader", reader_watch(readers, spec, first_index=len(units)))
    heads, handles = head_watch(sites, spec, first_index=len(units) + len(readers))
    try:
        stats = collect_watched(model, watched + _tagged("heads", heads),
                                iter_batches(data, spec.num_images, device), bar=bar, timer=timer)
    finally:
        for h in handles:
            h.remove()
    by = {tag: {key: st for (t, key), st in stats.items() if t == tag} for tag in ("unit", "reader", "heads")}

    def selecting(it):  # the statistics its stage selects on
        if it.kind == "unit":
            return by["unit"][it.producer]
        if it.kind == "group":
            return group_statistics(it.source, by["reader"])
        return head_gram(by["heads"][it.producer], it.channels)
    ctx = SelectContext(backend=selection_backend("thinet", cfg.backend, device))
    curves = [s.curve for s in get_method("thinet").run_many([selecting(it) for it in items],
                                                              [it.channels for it in items], ctx)]
    return curves, by["unit"]


def new_biases(model: nn.Module, items: list[Item], cfg) -> list[str]:
    """The layers the stages will give a bias: with ``bias_compensation`` every refitted
    layer takes a correction, and one without a bias or a BatchNorm to fold it into
    gains one (whatever width it keeps). A budget counts them from the start."""
    if not cfg.bias_compensation:
        return []
    out = []
    for it in items:
        if it.kind == "unit":
            u = it.source
            if get_module(model, u.consumer).bias is None and u.consumer_norm is None:
                out.append(u.consumer)
        elif it.kind == "group" and it.source.normalised:  # refitted after the cut: no BatchNorm takes it
            out += [r.name for r in it.source.readers if getattr(r.module, "bias", getattr(
                r.module, "in_proj_bias", None)) is None]
        elif it.kind == "group":
            out += [r.name for r in it.source.readers if r.module.bias is None and bias_home(r.module, it.source.graph)
                    is None]
        elif it.source.projection.bias is None:
            out.append(f"{it.source.name}.{it.source.projection_name}")
    return list(dict.fromkeys(out))

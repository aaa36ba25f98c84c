"""``dry_run``: what a prune would make, without statistics: the planned width of every
unit, and the parameters and FLOPs it saves, from the architecture alone (each unit
keeps its first channels; the counts do not depend on which)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..counting import count_flops, count_params
from ..rewrite import prune_unit_
from ..units import UnitPlan
from . import keeps
from .config import PruneConfig

__all__ = ["PlannedUnit", "DryRun", "dry_run"]


@dataclass(frozen=True)
class PlannedUnit:
    producer: str
    consumer: str
    channels: int
    kept: int
    params_saved: int
    flops_saved: int


@dataclass
class DryRun:
    units: list[PlannedUnit]
    params: tuple[int, int]   # (before, after)
    flops: tuple[int, int]
    refused: list = field(default_factory=list)  # (producer, reason)
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        w = max([len(u.producer) for u in self.units] + [8])
        lines = [f"{'producer':<{w}}  {'channels':>8}  {'kept':>6}  {'params saved':>13}  {'FLOPs saved':>14}"]
        for u in self.units:
            lines.append(f"{u.producer:<{w}}  {u.channels:>8}  {u.kept:>6}  {u.params_saved:>13,}  {u.flops_saved:>14,}")
        (p0, p1), (f0, f1) = self.params, self.flops
        lines.append(f"total: params {p0:,} -> {p1:,} ({p1 / max(p0, 1):.1%}), "
                     f"FLOPs {f0:,} -> {f1:,} ({f1 / max(f0, 1):.1%}) per image")
        if self.refused:
            lines.append(f"not pruned ({len(self.refused)}):")
            lines += [f"  {p}: {why}" for p, why in self.refused]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"units": [u.__dict__ for u in self.units], "params": list(self.params), "flops": list(self.flops),
                "refused": [list(r) for r in self.refused], "notes": self.notes}


@torch.no_grad()
def dry_run(model: nn.Module, example: torch.Tensor, config: PruneConfig | None = None, **options) -> DryRun:
    """The widths ``prune(model, data, config)`` would give, and what each unit saves,
    without reading any data beyond ``example`` (one input batch for the shapes). The
    caller's model is not changed. A budget (``flops_target=``, ``params_target=``)
    needs statistics: it is refused."""
    from .prune import _config, _plan, run_device  # the same unit selection as prune()

    cfg = _config(config, options)
    for name in ("flops_target", "params_target"):
        if getattr(cfg, name) is not None:
            raise ValueError(f"dry_run: {name}= allocates from statistics; give keep= or preset= to plan widths")
    preset = None
    if cfg.preset is not None:
        from ..presets import check_base, get_preset
        preset = get_preset(cfg.preset)
        check_base(preset, model)
    device = run_device(cfg.device, model)
    work = copy.deepcopy(model).to(example.device).eval()
    units_arg = cfg.units if preset is None else (cfg.units or preset.producers)
    if preset is None and isinstance(cfg.keep, dict) and units_arg is None and cfg.filter_fn is None:
        units_arg = list(cfg.keep)
    plan, untraced = _plan(work, example, cfg, units_arg)
    if isinstance(cfg.keep, dict):
        plan = UnitPlan([u for u in plan.units if u.producer in cfg.keep], plan.refused, graph=plan.graph)
    n_keep = keeps.for_config(plan, cfg, preset, device)
    p0, f0 = count_params(work), count_flops(work, example[:1])
    rows, p_prev, f_prev = [], p0, f0
    for u in plan.units:
        prune_unit_(work, u, torch.arange(n_keep[u.producer]))
        p, f = count_params(work), count_flops(work, example[:1])
        rows.append(PlannedUnit(u.producer, u.consumer, u.channels, n_keep[u.producer], p_prev - p, f_prev - f))
        p_prev, f_prev = p, f
    if preset is not None and preset.transform is not None:
        work = preset.transform(work)
        p_prev, f_prev = count_params(work), count_flops(work, example[:1])
    notes = [untraced] if untraced else []
    if cfg.coupled == "prune":
        heads = _plan_heads(work, example, cfg, p_prev, f_prev)
        rows += heads
        p_prev -= sum(r.params_saved for r in heads)
        f_prev -= sum(r.flops_saved for r in heads)
        notes.append("coupled channel groups are not planned here (their widths depend on the graph engine); "
                     "the totals cover the plain units and the attention heads")
    return DryRun(rows, (p0, p_prev), (f0, f_prev), [(r.producer, r.reason) for r in plan.refused], notes)


def _plan_heads(work: nn.Module, example, cfg, p: int, f: int) -> list[PlannedUnit]:
    """Each attention module's heads cut to the count prune() keeps (channels = heads);
    ``p``, ``f``: the model's parameters and FLOPs now."""
    from ..attention import cut_first_heads, find_heads
    from .heads import heads_kept, wanted

    rows = []
    for site in [s for s in find_heads(work, cfg.ignored_layers)[0] if wanted(s, cfg)]:
        n = heads_kept(site, cfg)
        cut_first_heads(work, site, n)
        p1, f1 = count_params(work), count_flops(work, example[:1])
        rows.append(PlannedUnit(site.name, f"{site.name}.{site.projection_name}", site.heads, n, p - p1, f - f1))
        p, f = p1, f1
    return rows

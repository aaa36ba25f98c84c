"""Keep policies: how many channels each unit keeps, as ``{producer fqn: n_keep}``.

One rounding rule per policy:

- :func:`uniform` (``keep=0.5``): ``round(C · fraction)``, at least 1.
- :func:`per_unit` (``keep={"features.0": 0.25, "features.2": 40}``): a fraction rounds
  like :func:`uniform`; an int is the exact count (at most C).
- :func:`from_preset` (``preset=``): the preset's own rule, ``floor(C · fraction)`` by
  default, as in the paper's tables (see :mod:`thinet_fast.presets`).
- the FLOPs budget (``flops_target=``, :func:`thinet_fast.pipeline.budget.allocate_flops`):
  allocated from the greedy error curves, each unit keeping at least
  :func:`min_counts` (``round(C · min_keep)``, at least 1).
"""
from __future__ import annotations

from typing import Mapping

from ..units import UnitPlan

__all__ = ["n_keep_for", "uniform", "per_unit", "from_preset", "min_counts", "for_config"]


def n_keep_for(channels: int, keep: float | int, who: str = "keep") -> int:
    """Channels kept for a fraction (rounded to nearest, at least 1) or an explicit count."""
    if isinstance(keep, int) and not isinstance(keep, bool):
        if keep > channels:
            raise ValueError(f"{who}={keep} asks for more channels than the producer has ({channels})")
        return keep
    return max(1, min(channels, int(round(channels * float(keep)))))


def uniform(plan: UnitPlan, fraction: float) -> dict[str, int]:
    return {u.producer: n_keep_for(u.channels, float(fraction)) for u in plan.units}


def per_unit(plan: UnitPlan, keep: Mapping[str, float | int]) -> dict[str, int]:
    return {u.producer: n_keep_for(u.channels, keep[u.producer], f"keep[{u.producer!r}]") for u in plan.units}


def from_preset(plan: UnitPlan, preset) -> dict[str, int]:
    return preset.keep_for(plan)


def min_counts(plan_units, min_keep: float) -> list[int]:
    """The FLOPs budget's floor per unit."""
    return [max(1, int(round(min_keep * u.channels))) for u in plan_units]


def for_config(plan: UnitPlan, cfg, preset=None) -> dict[str, int]:
    """The counts ``cfg`` asks for (every policy but the budget, which needs statistics)."""
    if preset is not None:
        return from_preset(plan, preset)
    keep = 0.5 if cfg.keep is None else cfg.keep
    return per_unit(plan, keep) if isinstance(keep, Mapping) else uniform(plan, keep)

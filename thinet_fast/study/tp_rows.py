"""The study's Torch-Pruning rows: its magnitude (L2) and Taylor importances on the same
units thinet_fast prunes, every unit cut at once (Torch-Pruning's own schedule), no
reconstruction (Torch-Pruning has none). Needs the torch-pruning extra."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..units import find_units

TP_ROWS = {"tp_magnitude": "magnitude", "tp_taylor": "taylor"}


def run_tp_row(row: str, base: nn.Module, keep: float, calib, example: torch.Tensor) -> nn.Module:
    """A copy of ``base`` with every thinet_fast unit's producer cut to ``keep`` by
    Torch-Pruning; Taylor scores come from cross-entropy gradients summed over the
    calibration batches."""
    import torch_pruning as tp
    model = copy.deepcopy(base).eval()
    producers = {u.producer for u in find_units(model, example).units}
    ignored = [m for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in producers]
    kind = TP_ROWS[row]
    imp = tp.importance.GroupMagnitudeImportance(p=2) if kind == "magnitude" else \
        tp.importance.GroupTaylorImportance()
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=1 - keep, ignored_layers=ignored)
    if kind == "taylor":
        model.zero_grad()
        for x, y in calib:
            nn.functional.cross_entropy(model(x), y).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model.eval()

"""BatchNorm re-estimation after pruning (DESIGN §5)."""
from __future__ import annotations

import torch
from torch import nn

from ..modes import preserved_modes
from .collect import iter_batches

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data, *, num_images: int = 1000, device=None) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``data`` (forward only,
    no labels). Affine weights are untouched. Returns how many layers were reset."""
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    try:
        with preserved_modes(model, train=False):
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over all calibration batches
                m.train()
            device = device or next(model.parameters()).device
            for x in iter_batches(data, num_images, device):
                model(x)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
    return len(bns)

"""BatchNorm re-estimation after pruning (DESIGN §5), for the layers a cut reaches."""
from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

from ..modes import preserved_modes
from .collect import iter_batches

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def running_norms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]


class _Reach(TorchFunctionMode):
    """Marks every tensor computed from a marked one (the sources' outputs)."""

    def __init__(self):
        super().__init__()
        self.marked = WeakTensorKeyDictionary()

    def mark(self, value) -> None:
        for t in tree_leaves(value):
            if isinstance(t, torch.Tensor):
                self.marked[t] = True

    def reached(self, value) -> bool:
        return any(isinstance(t, torch.Tensor) and t in self.marked for t in tree_leaves(value))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.reached((args, kwargs)):
            self.mark(out)
        return out


@torch.no_grad()
def downstream_norms(model: nn.Module, sources, example: torch.Tensor) -> list[nn.Module]:
    """The BatchNorm layers (with running statistics) whose input depends on the output
    of a module in ``sources``, found by one forward of ``example`` that follows the
    data through every torch function (no tracing: any model that runs works)."""
    sources, norms = set(sources), set(running_norms(model))
    reach, hit, handles = _Reach(), [], []
    try:
        for m in model.modules():
            if m in sources:
                handles.append(m.register_forward_hook(lambda mod, args, out: reach.mark(out)))
            if m in norms:
                handles.append(m.register_forward_pre_hook(
                    lambda mod, args: hit.append(mod) if reach.reached(args) else None))
        with preserved_modes(model, train=False), reach:
            model(example)
    finally:
        for h in handles:
            h.remove()
    seen = set()
    return [m for m in hit if not (m in seen or seen.add(m))]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data, *, num_images: int = 1000, device=None,
                          layers=None) -> int:
    """Re-estimate the running mean and variance of ``layers`` (default: every
    BatchNorm with running statistics) on ``data`` (forward only, no labels). Affine
    weights are untouched. Returns how many layers were reset."""
    bns = running_norms(model) if layers is None else list(layers)
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

"""``target="unpruned"``: the statistics that fit a consumer towards the unpruned model.

In the sequential schedule each unit's pass also runs the unpruned model (a copy taken
before the first cut) on the same images, up to the same consumer; the two inputs meet
at the same keyed locations and feed the cross-moments of :mod:`thinet_fast.ops.cross`.
The unpruned copy is cut short at its consumer, so the extra cost is one forward to
that layer per unit. This module joins the pipeline to the ops; the math is there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..ops import cross
from ..ops.draws import keyed_locations
from ..ops.patches import ConsumerGeometry, tokens_as_map
from ..ops.stats import MAX_COV_DIM
from ..units import Unit, get_module

__all__ = ["Towards", "CrossSink", "paired_forward", "fits_cross"]


@dataclass
class Towards:
    """What the fit towards the unpruned output needs, for one consumer (float64)."""

    P_cur: torch.Tensor      # Σ z' z'ᵀ
    Q: torch.Tensor          # Σ z' zᵀ (current × unpruned)
    P_ref: torch.Tensor      # Σ z zᵀ
    mean_cur: torch.Tensor   # (C, t)
    mean_ref: torch.Tensor   # (C, t)
    count: int


def fits_cross(unit: Unit) -> bool:
    """The three (C·t)² moments are held only while they stay small."""
    return unit.channels * unit.taps <= MAX_COV_DIM


class CrossSink:
    """Pairs the unpruned model's consumer input (``take_ref``) with the current one
    (``update``) and accumulates the cross-moments at the accumulator's locations."""

    def __init__(self, unit: Unit, geometry: ConsumerGeometry, seed: int, samples_per_image):
        self.unit, self.geometry, self.seed = unit, geometry, seed
        self.per_image = None if geometry.linear else samples_per_image
        self.ref = None
        self.moments = None
        self.sums = None
        self.count = 0

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        return self.geometry.as_map(tokens_as_map(x) if self.unit.tokens else x)

    def take_ref(self, x: torch.Tensor) -> None:
        self.ref = self._view(x)

    def update(self, x: torch.Tensor, keys: torch.Tensor) -> None:
        x = self._view(x)
        if self.ref is None or self.ref.shape != x.shape:
            raise RuntimeError(f"target='unpruned': the unpruned model's input to {self.unit.consumer!r} is missing "
                               "or has another shape; the two models must see the same batches")
        if keys is None or keys.numel() != x.shape[0]:
            raise RuntimeError(f"target='unpruned' needs one key per image at {self.unit.consumer!r}")
        oh, ow = self.geometry.out_size(x.shape[2], x.shape[3])
        img, oy, ox = keyed_locations(keys, self.seed, (oh, ow), self.per_image)
        m = cross.cross_moments(x, self.ref.to(x.device), self.geometry, img, oy, ox)
        self.moments = m if self.moments is None else tuple(a + b for a, b in zip(self.moments, m))
        zc = x.double()
        zr = self.ref.double()
        sums = (_patch_sum(zc, self.geometry, img, oy, ox), _patch_sum(zr, self.geometry, img, oy, ox))
        self.sums = sums if self.sums is None else tuple(a + b for a, b in zip(self.sums, sums))
        self.count += img.numel()
        self.ref = None

    def result(self) -> Towards:
        if self.moments is None:
            raise RuntimeError(f"target='unpruned': no batch reached {self.unit.consumer!r}")
        C, t = self.unit.channels, self.unit.taps
        n = max(self.count, 1)
        return Towards(*self.moments, self.sums[0].reshape(C, t) / n, self.sums[1].reshape(C, t) / n, self.count)


def _patch_sum(x, geometry, img, oy, ox) -> torch.Tensor:
    from ..ops.patches import gather_patches

    return gather_patches(x, geometry, img, oy, ox).sum(0).reshape(-1)


class _RefStop(Exception):
    pass


def paired_forward(reference: nn.Module, unit: Unit, sink: CrossSink, forward):
    """A forward that first runs ``reference`` up to the unit's consumer (its input goes
    to ``sink``), then ``forward`` (the current model)."""
    module = get_module(reference, unit.consumer)

    def hook(_, args):
        sink.take_ref(args[0])
        raise _RefStop

    def run(x):
        handle = module.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                reference(x)
        except _RefStop:
            pass
        finally:
            handle.remove()
        return forward(x)

    return run

"""Cheap fingerprints: what a checkpoint was made from (a model, calibration data).

A model's fingerprint hashes its module classes, parameter and buffer names, shapes,
dtypes and bytes (BLAKE2b; a few hundred MB/s on one core, once per resumable run).
A data digest sums hashes of the images' keys (a strided sample of 64 values each),
so it costs next to nothing beside the forward."""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from .ops.draws import image_keys, keyed

__all__ = ["model_fingerprint", "DataDigest", "callable_name"]


def _tensor_bytes(t: torch.Tensor):
    t = t.detach().reshape(-1).contiguous().cpu()
    return t.view(torch.uint8).numpy() if t.numel() else b""


def model_fingerprint(model: nn.Module) -> str:
    """Hex digest of ``model``'s architecture (module classes by name) and weights."""
    h = hashlib.blake2b(digest_size=16)
    for fqn, m in model.named_modules():
        h.update(f"{fqn}:{type(m).__module__}.{type(m).__qualname__};".encode())
    for name, t in model.state_dict(keep_vars=False).items():
        if isinstance(t, torch.Tensor):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            h.update(_tensor_bytes(t))
    return h.hexdigest()


class DataDigest:
    """Images seen and a hash of their keys (:func:`thinet_fast.ops.draws.image_keys`):
    a sum over images, so it depends neither on batching nor on order nor on how the
    images are sharded over processes (:meth:`all_reduce` sums the shards)."""

    def __init__(self):
        self.images = 0
        self._sums = torch.zeros(2, dtype=torch.int64)

    def update(self, x: torch.Tensor) -> None:
        draws = keyed(image_keys(x), 0x51ED, "location", 2)  # two 31-bit hashes per image
        self._sums += draws.sum(0)
        self.images += int(x.shape[0])

    def all_reduce(self) -> "DataDigest":
        """Sum the digests of every process (no-op without torch.distributed)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.cat([self._sums, torch.tensor([self.images])])
            dist.all_reduce(t)
            self._sums, self.images = t[:2].clone(), int(t[2])
        return self

    def hexdigest(self) -> str:
        a, b = (int(v) % (1 << 61) for v in self._sums)
        return f"{a:016x}{b:016x}"

    def as_dict(self) -> dict:
        return {"images": self.images, "hash": self.hexdigest()}


def callable_name(fn) -> str | None:
    """A stable name for a user callable (``filter_fn=``), or None."""
    if fn is None:
        return None
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"

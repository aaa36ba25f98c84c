"""Cheap fingerprints: what a checkpoint was made from (a model, calibration data).

A model's fingerprint hashes its module classes, parameter and buffer names, shapes,
dtypes and bytes (BLAKE2b; a few hundred MB/s on one core, once per resumable run).
A data digest hashes the image count and a strided sample of at most 4096 values of
each batch (plus its sum), so it costs next to nothing beside the forward."""
from __future__ import annotations

import hashlib

import torch
from torch import nn

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
    """Images seen and a hash of a sample of their values; ``update`` per batch."""

    SAMPLE = 4096

    def __init__(self):
        self.images = 0
        self._h = hashlib.blake2b(digest_size=16)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1)
        step = max(1, flat.numel() // self.SAMPLE)
        sample = flat[::step].to("cpu", torch.float64)
        self._h.update(f"{tuple(x.shape)};{float(flat.double().sum()):.10e};".encode())
        self._h.update(sample.numpy().tobytes())
        self.images += int(x.shape[0])

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def as_dict(self) -> dict:
        return {"images": self.images, "hash": self.hexdigest()}


def callable_name(fn) -> str | None:
    """A stable name for a user callable (``filter_fn=``), or None."""
    if fn is None:
        return None
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"

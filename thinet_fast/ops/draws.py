"""Random draws keyed by image content: the same images give the same samples however
the calibration data is batched, sharded or spread over processes.

Every random choice the statistics make for an image (its sampled output locations,
the output channels drawn for them, whether it joins the held-out fold) is a hash of
``(seed, stream, image key, j)``, where the *image key* is a hash of the image's own
values (a strided sample of at most 64 of them, by their exact bits). So a torchrun
job with any number of processes, or a DataLoader with any batch size, draws exactly
what one process on the whole data draws. Identical images get identical draws.

All arithmetic stays in 31-bit values held in int64 tensors (no overflow), on the CPU.
"""
from __future__ import annotations

import torch

__all__ = ["image_keys", "position_keys", "keyed", "keyed_locations", "STREAMS"]

M31 = (1 << 31) - 1
STREAMS = {"location": 0, "output": 1, "outputs": 2, "holdout": 3}
_KEY_VALUES = 64


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash (xor-shift-multiply rounds); every product stays < 2^62."""
    x = x & M31
    x = (((x >> 15) ^ x) * 0x2C1B3C6D) & M31
    x = (((x >> 12) ^ x) * 0x297A2D39) & M31
    return (x >> 15) ^ x


def image_keys(x: torch.Tensor) -> torch.Tensor:
    """(N,) int64 keys of the N images in batch ``x`` (any shape (N, ...), any real
    dtype): a hash of the exact bits of up to 64 strided values of each image."""
    flat = x.detach().reshape(x.shape[0], -1)
    step = max(1, flat.shape[1] // _KEY_VALUES)
    v = flat[:, ::step][:, :_KEY_VALUES].to("cpu", torch.float64).contiguous().view(torch.int64)
    parts = (v & M31) ^ _mix((v >> 31) & M31) ^ ((v >> 62) & 3)
    j = _mix(torch.arange(parts.shape[1], dtype=torch.int64) * 2 + 1)
    h = _mix(parts ^ j).sum(1) & M31  # order-aware (j), independent of the batch
    return _mix(h ^ (flat.shape[1] & M31))


def position_keys(index: torch.Tensor) -> torch.Tensor:
    """Keys from stream positions, for callers that feed activations without images."""
    return _mix(index.to(torch.int64) + 0x5BD1E995)


def row_keys(keys: torch.Tensor, rows: int) -> torch.Tensor:
    """Keys for ``rows`` samples made from a batch of images ``keys``: a layer whose
    batch is not the image batch (a detector's RoI head) keys each row from the whole
    batch and the row's position, so its draws are as repeatable as the images'."""
    batch = _mix(keys.to("cpu", torch.int64)).sum() & M31
    return _mix(position_keys(torch.arange(rows, dtype=torch.int64)) ^ batch)


def keyed(keys: torch.Tensor, seed: int, stream: str, count: int) -> torch.Tensor:
    """(N, count) int64 draws in [0, 2^31) for images ``keys`` (N,)."""
    s = _mix(torch.tensor((int(seed) * 0x9E3779B1 + STREAMS[stream] * 0x7FEB352D) & M31, dtype=torch.int64))
    base = _mix(keys.to("cpu", torch.int64) ^ s)
    j = _mix(torch.arange(count, dtype=torch.int64) * 0x3243F6A9 + s)
    return _mix(base[:, None] ^ j[None, :])


def keyed_locations(keys: torch.Tensor, seed: int, out_hw: tuple[int, int], per_image: int | None):
    """(img, oy, ox) int64: ``per_image`` output positions per image drawn from its key
    (with replacement), or every position when ``per_image`` is None."""
    oh, ow = out_hw
    n = keys.numel()
    if per_image is None:
        img = torch.arange(n).repeat_interleave(oh * ow)
        pos = torch.arange(oh * ow).repeat(n)
    else:
        img = torch.arange(n).repeat_interleave(per_image)
        pos = (keyed(keys, seed, "location", per_image) % (oh * ow)).reshape(-1)
    return img, pos // ow, pos % ow

"""Calibration images decoded once per run: :class:`DecodedCache` keeps each image of
an image folder as the uint8 tensor its eval transform has before ToTensor, in shared
memory that every DataLoader worker fills and reads, and normalises at each read, so
the values are the same bits as the uncached path while each JPEG is read once."""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .images import _shared_flags
from .memory import available_host_memory

__all__ = ["DecodedCache", "decoded", "memory_budget"]


def _shm_free() -> int | None:
    try:
        st = os.statvfs("/dev/shm")
        return st.f_bavail * st.f_frsize
    except (OSError, AttributeError):
        return None


def memory_budget(fraction: float = 0.25) -> int:
    """Default bytes for :class:`DecodedCache`: ``fraction`` of the available RAM, and at
    most half of the free /dev/shm (the cache lives there so DataLoader workers share it;
    touching more shm than the mount holds kills the process with SIGBUS, as in Docker's
    default 64 MB)."""
    budget = int(available_host_memory(fallback=1 << 30) * fraction)
    shm = _shm_free()
    return budget if shm is None else min(budget, shm // 2)


def _split_transform(transform):
    """(steps before ToTensor, steps after) of a deterministic eval transform, or raise."""
    from torchvision import transforms as T
    steps = list(transform.transforms) if isinstance(transform, T.Compose) else [transform]
    at = [i for i, s in enumerate(steps) if isinstance(s, T.ToTensor)]
    if len(at) != 1:
        raise TypeError("DecodedCache needs a transform with one ToTensor (the standard eval preprocessing of "
                        f"thinet_fast.data.image_folder(train=False)), not {transform!r}")
    pre, post = steps[:at[0]], steps[at[0] + 1:]
    allowed = [(s, (T.Resize, T.CenterCrop, T.Pad, T.Grayscale)) for s in pre] + [(s, T.Normalize) for s in post]
    for s, kinds in allowed:
        if not isinstance(s, kinds):
            raise ValueError(f"DecodedCache stores the result of a deterministic transform; {type(s).__name__} is "
                             "not one (a random crop or flip must be drawn anew at each read). Cache the eval "
                             "preprocessing: thinet_fast.data.image_folder(path, train=False)")
    return pre, post


def _resolve(dataset):
    """(base DatasetFolder, base index of each position or None for all)."""
    from torchvision.datasets import DatasetFolder
    index, d = None, dataset
    while isinstance(d, Subset):
        index = [int(i) for i in d.indices] if index is None else [int(d.indices[i]) for i in index]
        d = d.dataset
    if not isinstance(d, DatasetFolder):
        raise TypeError(f"DecodedCache caches image folders (or Subsets of one), not {type(d).__name__}")
    return d, index


class DecodedCache(Dataset):
    """``dataset`` (an image folder with the eval transform, or a Subset of one, e.g.
    :func:`thinet_fast.data.per_class_subset`), each image decoded the first time it is
    read and kept as the uint8 tensor the transform has before ToTensor; reads divide by
    255 and normalise exactly as ToTensor and Normalize do, so the values are the same
    bits as the uncached path. The first ``capacity`` positions (as many as fit in
    ``max_bytes``, default :func:`memory_budget`) are cached in shared memory, which all
    DataLoader workers fill and read, across passes; later positions are decoded at each
    read. So a ~30-pass ResNet-50 prune reads each JPEG once."""

    def __init__(self, dataset, max_bytes: int | None = None):
        self.dataset = dataset
        self.base, self._index = _resolve(dataset)
        self._pre, self._post = _split_transform(self.base.transform)
        self.capacity, self.item_shape = 0, None
        self._slab = self._filled = None
        budget = memory_budget() if max_bytes is None else int(max_bytes)
        shm = _shm_free()
        if shm is not None and budget > shm // 2:
            warnings.warn(f"DecodedCache: max_bytes={budget} is more than half the free /dev/shm ({shm} bytes); "
                          f"caching within {shm // 2} bytes", stacklevel=2)
            budget = shm // 2
        if len(self) and budget > 0:
            first = self._decode(0)
            if isinstance(first, torch.Tensor):  # the first item fixes the shape of a slot
                self.capacity = min(len(self), budget // first.numel())
            if self.capacity:
                self.item_shape = tuple(first.shape)
                self._slab = torch.empty((self.capacity, *self.item_shape), dtype=torch.uint8).share_memory_()
                self._filled = _shared_flags(self.capacity)
                self._slab[0].copy_(first)
                self._filled[0] = 1

    def __len__(self) -> int:
        return len(self.base) if self._index is None else len(self._index)

    def _base_index(self, i: int) -> int:
        if i < 0:
            i += len(self)
        return i if self._index is None else self._index[i]

    @property
    def targets(self) -> list[int]:
        t = self.base.targets
        return list(t) if self._index is None else [t[j] for j in self._index]

    @property
    def classes(self):
        return self.base.classes

    @property
    def skipped(self) -> list[str]:
        return list(getattr(self.base, "skipped", []))

    @property
    def cached(self) -> int:
        """How many images are held decoded now (filled by any worker)."""
        return 0 if self._filled is None else int(self._filled[:self.capacity].sum())

    def _decode(self, i: int):
        """The pre-ToTensor uint8 (C, H, W) tensor of position ``i``, or the transformed
        float tensor where the image mode is not 8-bit (nothing to cache exactly)."""
        j = self._base_index(i)
        if hasattr(self.base, "load"):
            img, _ = self.base.load(j)  # ImageFiles: bad files named, or replaced
        else:
            img = self.base.loader(self.base.samples[j][0])
        for step in self._pre:
            img = step(img)
        if img.mode not in ("RGB", "L"):
            return self._finish_pil(img)
        arr = torch.from_numpy(np.array(img, np.uint8, copy=True))
        return arr.view(img.size[1], img.size[0], len(img.getbands())).permute(2, 0, 1).contiguous()

    def _finish_pil(self, img):
        from torchvision.transforms import functional as F
        x = F.to_tensor(img)
        for step in self._post:
            x = step(x)
        return ("float", x)

    def _finish(self, u: torch.Tensor) -> torch.Tensor:
        # what ToTensor does to a uint8 image, then the same Normalize: identical bits
        x = u.to(dtype=torch.get_default_dtype()).div(255)
        for step in self._post:
            x = step(x)
        return x

    def __getitem__(self, i: int):
        i = int(i)
        if i < -len(self) or i >= len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i %= len(self)
        j = self._base_index(i)
        target = self.base.targets[j]
        if self.base.target_transform is not None:
            target = self.base.target_transform(target)
        if i < self.capacity and self._filled[i]:
            return self._finish(self._slab[i]), target
        u = self._decode(i)
        if isinstance(u, tuple):
            return u[1], target
        if i < self.capacity and tuple(u.shape) == self.item_shape:
            self._slab[i].copy_(u)
            self._filled[i] = 1  # after the copy: a reader never sees a half-written slot
        return self._finish(u), target


def decoded(dataset, max_bytes: int | None = None):
    """``dataset`` with each image decoded once (:class:`DecodedCache`); a dataset
    already in memory (a TensorDataset, e.g. Fashion-MNIST) or already cached is
    returned as it is."""
    if isinstance(dataset, (TensorDataset, DecodedCache)):
        return dataset
    base = dataset
    while isinstance(base, Subset):
        base = base.dataset
    if isinstance(base, (TensorDataset, DecodedCache)):  # in memory already
        return dataset
    return DecodedCache(dataset, max_bytes=max_bytes)

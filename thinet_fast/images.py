"""Image folders a user can trust: unreadable files named (or skipped and counted), the
class count checked against the model, and calibration images decoded once per run.

Skipping bad files (``skip_bad=True``) works by *replacement*: when the file at index
``i`` cannot be read, ``dataset[i]`` returns the nearest following readable image of
the same class (wrapping within the class), and ``i`` is recorded in a shared-memory
flag array, so ``dataset.skipped`` lists the bad paths in the main process even when
DataLoader workers found them. Why not the alternatives:

* dropping the item would change ``len(dataset)`` after the sampler has drawn its
  indices and needs a special ``collate_fn`` (a plain DataLoader would fail on it);
  replacement keeps every batch shape, every label and any DataLoader working;
* an up-front scan costs one open per file of the whole folder (1.28 M for ImageNet
  train) before any work, and a truncated JPEG passes a header check anyway, so the
  failure has to be handled at decode time regardless.

The cost: a replaced image counts twice (a handful among thousands of images), and the
report can say how many were skipped. Replacement is deterministic (it depends on the
index and on which files are bad, not on the worker or the order of reads).
"""
from __future__ import annotations

import bisect
import os
import re
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = ["BadImageError", "ImageFiles", "check_classes"]

SKIP_HINT = ("Replace or delete the file, or skip unreadable images with --skip-bad-images "
             "(skip_bad=True in thinet_fast.data.image_folder); skipped files are counted")
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing"})


class BadImageError(ValueError):
    """An image file that cannot be read or decoded; the message names the file and the fix.

    Raised in a DataLoader worker, torch re-creates it in the main process from a message
    holding the worker's whole traceback; the constructor keeps only our line, so the
    user sees the file and the fix, not 60 lines of DataLoader internals."""

    def __init__(self, message: str, path: str | None = None):
        if "Original Traceback" in message:  # re-raised by torch's ExceptionWrapper
            ours = re.findall(r"BadImageError: (.*)", message)
            if ours:
                message = ours[-1] + " (in a DataLoader worker)"
            found = re.search(r"image file (.+?) \(", message)
            path = path or (found.group(1) if found else None)
        super().__init__(message)
        self.path = path


def _shared_flags(n: int) -> torch.Tensor:
    # shared memory: a worker's write is seen by the main process and the other workers,
    # under fork (inherited mapping) as under spawn (pickled as a handle by torch)
    return torch.zeros(max(n, 1), dtype=torch.uint8).share_memory_()


def _is_bad_read(exc: Exception) -> bool:
    # PIL raises a zoo of errors on corrupt files (OSError, SyntaxError, struct.error,
    # ValueError, IndexError, DecompressionBombError...); running out of memory is not one
    return not isinstance(exc, MemoryError)


def _reason(path: str, exc: Exception) -> str:
    try:
        if os.path.getsize(path) == 0:
            return "the file is empty (0 bytes)"
    except OSError:
        pass
    return f"{type(exc).__name__}: {exc}"


def _make_image_files():
    # built on first use, so importing thinet_fast does not import torchvision (slow)
    from torchvision.datasets import ImageFolder

    class ImageFiles(ImageFolder):
        """torchvision's ImageFolder whose unreadable files raise :class:`BadImageError`
        (path and fix), or with ``skip_bad=True`` are replaced by the next readable image
        of the same class and listed in :attr:`skipped` (see the module docstring)."""

        def __init__(self, root, transform=None, skip_bad: bool = False, **kw):
            super().__init__(str(root), transform=transform, **kw)
            self.skip_bad = bool(skip_bad)
            self._bad = _shared_flags(len(self.samples)) if self.skip_bad else None
            self._members = None  # per-class sample indices, built on the first bad file

        @property
        def skipped(self) -> list[str]:
            """Paths of the files found unreadable so far (in any worker), in index order."""
            if self._bad is None:
                return []
            return [self.samples[i][0] for i in self._bad[:len(self.samples)].nonzero().flatten().tolist()]

        def _open(self, index: int):
            path = self.samples[index][0]
            try:
                img = self.loader(path)
                if hasattr(img, "load"):  # decode now, so a truncated file fails here, not in the transform
                    img.load()
                return img
            except Exception as exc:  # noqa: BLE001 -- see _is_bad_read
                if not _is_bad_read(exc):
                    raise
                raise BadImageError(f"cannot read the image file {path} ({_reason(path, exc)}). {SKIP_HINT}.",
                                    path) from None

        def load(self, index: int):
            """(decoded PIL image, target) for ``index``, or for its replacement."""
            target = self.samples[index][1]  # IndexError here when out of range
            index %= len(self.samples)
            if not (self.skip_bad and self._bad[index]):  # a file known bad is not retried
                try:
                    return self._open(index), target
                except BadImageError:
                    if not self.skip_bad:
                        raise
            self._bad[index] = 1
            if self._members is None:
                members: dict[int, list[int]] = {}
                for i, (_, t) in enumerate(self.samples):
                    members.setdefault(t, []).append(i)
                self._members = members
            same = self._members[target]
            at = bisect.bisect_left(same, index)
            for j in same[at + 1:] + same[:at]:
                if self._bad[j]:
                    continue
                try:
                    return self._open(j), target
                except BadImageError:
                    self._bad[j] = 1
            folder = Path(self.root) / self.classes[target]
            raise BadImageError(f"no readable image in the class folder {folder}: all {len(same)} files failed "
                                f"(the first: {self.samples[same[0]][0]})", str(folder))

        def __getitem__(self, index: int):
            img, target = self.load(index)
            if self.transform is not None:
                img = self.transform(img)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return img, target

    ImageFiles.__module__ = __name__
    ImageFiles.__qualname__ = "ImageFiles"
    return ImageFiles


def __getattr__(name):
    # ImageFiles is built on first use; the module attribute is then a real class, so
    # workers (spawn) and pickles find it as thinet_fast.images.ImageFiles
    if name == "ImageFiles":
        cls = _make_image_files()
        globals()["ImageFiles"] = cls
        return cls
    raise AttributeError(name)


# ---------------------------------------------------------------- class count
def _base_dataset(data):
    from .decoded import DecodedCache
    d = data.dataset if isinstance(data, DataLoader) else data
    while True:
        if isinstance(d, Subset):
            d = d.dataset
        elif isinstance(d, DecodedCache):
            d = d.base
        else:
            return d


def check_classes(data, num_outputs: int, what: str = "--data", *, exact: bool = True) -> int | None:
    """Raise a ValueError when ``data`` (a dataset, a Subset of one, a DecodedCache or a
    DataLoader over any of these) has another number of classes than the model's
    ``num_outputs``. An ImageFolder must have exactly ``num_outputs`` class folders (its
    labels are the sorted folder positions, so fewer classes mislabel every image); a
    folder whose "classes" are ``train``/``val`` is named as the dataset's top folder
    given instead of one split. Datasets without ``.classes`` are checked by their
    largest label. ``exact=False`` (calibration, whose labels are unused) allows fewer
    classes than outputs, e.g. 100 ImageNet classes for a 1000-way model. Returns the
    number of classes found (None if unknown)."""
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise TypeError(f"num_outputs must be a positive int, not {num_outputs!r}")
    base = _base_dataset(data)
    classes = getattr(base, "classes", None)
    if classes is None:
        targets = getattr(base, "targets", None)
        if targets is None and isinstance(base, TensorDataset) and len(base.tensors) > 1:
            targets = base.tensors[1]
        if targets is None or len(targets) == 0:
            return None
        top = int(torch.as_tensor(targets).max())
        if top >= num_outputs:
            raise ValueError(f"{what}: labels go up to {top}, but the model has {num_outputs} outputs")
        return None
    root = getattr(base, "root", "?")
    splits = [c for c in classes if c.lower() in SPLIT_NAMES]
    is_parent = bool(classes) and len(splits) == len(classes)
    if len(classes) != num_outputs and (exact or is_parent or len(classes) > num_outputs):
        shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
        msg = f"{what} {root}: {len(classes)} class folders ({shown}), but the model has {num_outputs} outputs."
        if is_parent:
            sub = {c.lower(): c for c in splits}
            train = sub.get("train") or sub.get("training") or splits[0]
            val = sub.get("val") or sub.get("validation") or sub.get("valid") or splits[-1]
            msg += (f" {root} holds the splits {', '.join(splits)}, not the classes: this is the dataset's top "
                    f"folder. Pass {Path(root) / train} (calibration, fine-tuning) or {Path(root) / val} "
                    f"(evaluation), whose subfolders are the classes.")
        else:
            msg += (" Pass the folder whose subfolders are the classes (ImageNet layout: train/n01440764/*.JPEG), "
                    "or a model with as many outputs (--num-classes).")
        raise ValueError(msg)
    if is_parent:
        warnings.warn(f"{what} {root}: the class folders are named {', '.join(splits)}; is this the dataset's top "
                      f"folder instead of one split?", stacklevel=2)
    return len(classes)

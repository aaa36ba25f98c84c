"""Data for calibration, fine-tuning and evaluation: Fashion-MNIST (the demo) and
ImageFolder trees (ImageNet layout), with the paper's per-class calibration subset.

Image folders name their unreadable files or skip and count them
(:mod:`thinet_fast.images`), :func:`check_classes` compares a folder's classes with the
model's outputs, and :func:`decoded` decodes calibration images once per run
(:mod:`thinet_fast.decoded`)."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .decoded import DecodedCache, decoded, memory_budget  # noqa: F401 (re-exported)
from .images import BadImageError, check_classes  # noqa: F401 (re-exported)

FMNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FMNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _read_idx(path: Path) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


def _find(root: Path, stem: str) -> Path | None:
    for cand in (root / stem, root / f"{stem}.gz", root / "raw" / stem, root / "raw" / f"{stem}.gz",
                 root / "FashionMNIST" / "raw" / stem, root / "FashionMNIST" / "raw" / f"{stem}.gz"):
        if cand.exists():
            return cand
    return None


def fashion_mnist_root(root: str | os.PathLike | None = None, download: bool = False) -> Path:
    """Where the Fashion-MNIST IDX files are: ``root``, $THINET_FAST_FMNIST, Debian's
    ``dataset-fashion-mnist`` package, or torchvision's download (when ``download``)."""
    cands = [Path(root)] if root else []
    if os.environ.get("THINET_FAST_FMNIST"):
        cands.append(Path(os.environ["THINET_FAST_FMNIST"]))
    cands += [Path(d) for d in FMNIST_DIRS] + [cache_dir() / "fashion-mnist"]
    for c in cands:
        if all(_find(c, stem) for pair in FMNIST_FILES.values() for stem in pair):
            return c
    if download:
        from torchvision.datasets import FashionMNIST
        target = cache_dir() / "fashion-mnist"
        FashionMNIST(str(target), train=True, download=True)
        FashionMNIST(str(target), train=False, download=True)
        return target
    raise FileNotFoundError(
        "Fashion-MNIST not found. Install Debian's package (`apt-get install dataset-fashion-mnist`, files in "
        "/usr/share/datasets/fashion-mnist), set THINET_FAST_FMNIST to a folder with the IDX files, "
        "or pass download=True where the internet is reachable.")


def fashion_mnist(train: bool = True, root=None, download: bool = False, limit: int | None = None) -> TensorDataset:
    """Fashion-MNIST as a normalised (N, 1, 28, 28) float TensorDataset."""
    base = fashion_mnist_root(root, download)
    img_stem, lbl_stem = FMNIST_FILES[train]
    images = _read_idx(_find(base, img_stem))
    labels = _read_idx(_find(base, lbl_stem)).long()
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = (images.float().div_(255.0).sub_(FMNIST_MEAN).div_(FMNIST_STD)).unsqueeze(1)
    return TensorDataset(x, labels)


def per_class_subset(dataset: Dataset, per_class: int, seed: int = 0, targets=None) -> Subset:
    """The paper's calibration set: ``per_class`` random images of every class."""
    if targets is None:
        targets = getattr(dataset, "targets", None)
        if targets is None and isinstance(dataset, TensorDataset):
            targets = dataset.tensors[1]
        if targets is None:
            raise ValueError("dataset has no .targets; pass targets=")
    targets = torch.as_tensor(targets)
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in targets.unique().tolist():
        members = (targets == c).nonzero().squeeze(1)
        idx.append(members[torch.randperm(members.numel(), generator=g)[:per_class]])
    idx = torch.cat(idx)
    return Subset(dataset, idx[torch.randperm(idx.numel(), generator=g)].tolist())


def image_folder(path: str | os.PathLike, train: bool = False, image_size: int = 224, skip_bad: bool = False):
    """An ImageFolder (ImageNet layout) with the standard torchvision preprocessing.

    An unreadable file raises :class:`BadImageError` naming it; with ``skip_bad`` it is
    replaced by the next readable image of its class and listed in ``.skipped`` (also
    when DataLoader workers read it; :mod:`thinet_fast.images` says why replacement)."""
    from torchvision import transforms

    from .images import ImageFiles
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path} is not a folder of class subfolders (ImageNet layout)")
    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        tf = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), norm])
    else:
        tf = transforms.Compose([transforms.Resize(int(image_size * 256 / 224)), transforms.CenterCrop(image_size),
                                 transforms.ToTensor(), norm])
    return ImageFiles(path, transform=tf, skip_bad=skip_bad)


def loader(dataset: Dataset, batch_size: int = 64, shuffle: bool = False, workers: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=g,
                      pin_memory=torch.cuda.is_available())


def cache_dir() -> Path:
    return Path(os.environ.get("THINET_FAST_CACHE", Path.home() / ".cache" / "thinet_fast"))

"""Image folders a user can trust (thinet_fast.images, thinet_fast.decoded): unreadable
files named or skipped and counted (also with DataLoader workers), the class count
checked against the model, and calibration images decoded once, bit-exactly."""
from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from thinet_fast import data as tfdata
from thinet_fast.data import BadImageError, check_classes, decoded, image_folder

SIZE = 16  # Resize(18) + CenterCrop(16): small images keep the test fast


def _write_image(path: Path, rng: np.random.Generator, fmt: str) -> None:
    from PIL import Image
    h, w = (int(v) for v in rng.integers(8, 41, size=2))
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path, format=fmt)


def make_folder(root: Path, classes=("ant", "bee", "cat"), per_class=4, seed=0, bad=True) -> dict:
    """A tiny ImageNet-layout folder of random RGB JPEG/PNG files; with ``bad``, one
    file of random bytes named .jpg, one empty file and one truncated JPEG. Returns the
    bad paths by kind."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            fmt = "JPEG" if k % 2 == 0 else "PNG"
            _write_image(root / c / f"img{k}.{'jpg' if fmt == 'JPEG' else 'png'}", rng, fmt)
    if not bad:
        return {}
    from PIL import Image
    kinds = {"random": root / classes[0] / "img1_corrupt.jpg", "empty": root / classes[1] / "img0_empty.jpg",
             "truncated": root / classes[2] / "img2_truncated.jpg"}
    kinds["random"].write_bytes(rng.integers(0, 256, size=500, dtype=np.uint8).tobytes())
    kinds["empty"].write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)).save(buf, format="JPEG")
    kinds["truncated"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return {k: str(v) for k, v in kinds.items()}


class CountingLoader:
    """Wraps an image loader and appends each opened path to a file, so opens made in
    DataLoader workers are counted too."""

    def __init__(self, inner, log: Path):
        self.inner, self.log = inner, str(log)

    def __call__(self, path):
        with open(self.log, "a") as f:
            f.write(path + "\n")
        return self.inner(path)

    def counts(self) -> Counter:
        p = Path(self.log)
        return Counter(p.read_text().splitlines()) if p.exists() else Counter()


def _index(ds, path: str) -> int:
    return [p for p, _ in ds.samples].index(path)


# ---------------------------------------------------------------- bad files named
@pytest.mark.parametrize("kind", ["random", "empty", "truncated"])
def test_bad_image_error_names_path_and_fix(tmp_path, kind):
    bad = make_folder(tmp_path)
    ds = image_folder(tmp_path, image_size=SIZE)
    with pytest.raises(BadImageError) as info:
        ds[_index(ds, bad[kind])]
    msg = str(info.value)
    print(msg)
    assert bad[kind] in msg and info.value.path == bad[kind]
    assert "--skip-bad-images" in msg and "skip_bad=True" in msg
    if kind == "empty":
        assert "0 bytes" in msg
    good = ds[_index(ds, str(tmp_path / "ant" / "img0.jpg"))][0]  # readable files still read
    assert good.shape == (3, SIZE, SIZE)


def test_bad_image_error_through_workers_is_one_line(tmp_path):
    bad = make_folder(tmp_path)
    ds = image_folder(tmp_path, image_size=SIZE)
    with pytest.raises(BadImageError) as info:
        for _ in tfdata.loader(ds, batch_size=4, workers=2):
            pass
    msg = str(info.value)
    print(msg)
    assert any(p in msg for p in bad.values()), msg
    assert info.value.path in bad.values()
    assert "--skip-bad-images" in msg
    assert "\n" not in msg and "Original Traceback" not in msg


# ---------------------------------------------------------------- skip and count
def test_skip_bad_replaces_within_class_and_counts(tmp_path):
    bad = make_folder(tmp_path)
    ds = image_folder(tmp_path, image_size=SIZE, skip_bad=True)
    assert ds.skipped == []
    items = [ds[i] for i in range(len(ds))]
    assert sorted(ds.skipped) == sorted(bad.values())
    for i, (x, y) in enumerate(items):
        assert x.shape == (3, SIZE, SIZE) and y == ds.samples[i][1]
    bad_idx = {_index(ds, p) for p in bad.values()}
    for i in bad_idx:  # the slot holds the next readable image of the same class
        j = next(k for k in list(range(i + 1, len(ds))) + list(range(i))
                 if k not in bad_idx and ds.samples[k][1] == ds.samples[i][1])
        diff = (items[i][0] - items[j][0]).abs().max().item()
        print(f"replacement of {i} by {j}: max |diff| {diff}")
        assert diff == 0


def test_skip_bad_with_workers(tmp_path):
    bad = make_folder(tmp_path)
    ref = image_folder(tmp_path, image_size=SIZE, skip_bad=True)
    expect = torch.stack([ref[i][0] for i in range(len(ref))])
    ds = image_folder(tmp_path, image_size=SIZE, skip_bad=True)
    xs, ys = zip(*tfdata.loader(ds, batch_size=3, workers=2))
    x, y = torch.cat(xs), torch.cat(ys)
    assert len(x) == len(ds) and y.tolist() == ds.targets
    print("max |diff| workers=2 vs 0:", (x - expect).abs().max().item())
    assert torch.equal(x, expect)
    assert sorted(ds.skipped) == sorted(bad.values())  # found in the workers, seen here


def test_class_without_readable_image(tmp_path):
    make_folder(tmp_path, bad=False)
    (tmp_path / "dud").mkdir()
    for k in range(2):
        (tmp_path / "dud" / f"x{k}.jpg").write_bytes(b"not an image")
    ds = image_folder(tmp_path, image_size=SIZE, skip_bad=True)
    with pytest.raises(BadImageError, match="no readable image in the class folder") as info:
        ds[_index(ds, str(tmp_path / "dud" / "x0.jpg"))]
    print(info.value)
    assert str(tmp_path / "dud") in str(info.value)
    assert len(ds.skipped) == 2


# ---------------------------------------------------------------- class count
def test_check_classes_count(tmp_path):
    make_folder(tmp_path, bad=False)
    ds = image_folder(tmp_path, image_size=SIZE)
    assert check_classes(ds, 3) == 3
    assert check_classes(tfdata.loader(tfdata.per_class_subset(ds, 2), batch_size=2), 3) == 3
    with pytest.raises(ValueError) as info:
        check_classes(decoded(Subset(ds, [0, 5])), 1000, what="--eval-data")
    msg = str(info.value)
    print(msg)
    assert "--eval-data" in msg and "3 class folders" in msg and "1000 outputs" in msg
    assert "top folder" not in msg


def test_check_classes_train_val_parent(tmp_path):
    for split, seed in (("train", 0), ("val", 1)):
        make_folder(tmp_path / split, per_class=2, seed=seed, bad=False)
    parent = image_folder(tmp_path, image_size=SIZE)  # recursive: every image of a split is one "class"
    assert parent.classes == ["train", "val"]
    with pytest.raises(ValueError) as info:
        check_classes(tfdata.loader(parent, batch_size=4), 3, what="--data")
    msg = str(info.value)
    print(msg)
    assert str(tmp_path / "train") in msg and str(tmp_path / "val") in msg and "top folder" in msg
    with pytest.warns(UserWarning, match="top folder"):
        check_classes(parent, 2)
    assert check_classes(image_folder(tmp_path / "train", image_size=SIZE), 3) == 3


def test_check_classes_tensor_labels():
    ds = TensorDataset(torch.zeros(4, 1), torch.tensor([0, 9, 3, 1]))
    assert check_classes(ds, 10) is None
    with pytest.raises(ValueError, match="labels go up to 9"):
        check_classes(ds, 5)


# ---------------------------------------------------------------- decode once
def _pairs(cache, plain):
    return [(cache[i], plain[i]) for i in range(len(plain))]


def _counted_folder(tmp_path):
    """A good image folder whose every file open is counted: (dataset, counter)."""
    make_folder(tmp_path, bad=False)
    ds = image_folder(tmp_path, image_size=SIZE)
    ds.loader = counting = CountingLoader(ds.loader, tmp_path / "opens.log")
    return ds, counting


def _assert_each_opened_once(counting, n: int) -> None:
    opens = counting.counts()
    print(opens)
    assert len(opens) == n and set(opens.values()) == {1}


def test_decoded_equals_uncached_exactly(tmp_path):
    make_folder(tmp_path)
    ds = image_folder(tmp_path, image_size=SIZE, skip_bad=True)
    sub = tfdata.per_class_subset(ds, 3, seed=1)
    cache = decoded(sub)
    assert cache.capacity == len(sub) and cache.targets == [ds.targets[i] for i in sub.indices]
    for rnd in range(2):  # the first reads decode and store, the second read the store
        for (xc, yc), (xu, yu) in _pairs(cache, sub):
            diff = (xc - xu).abs().max().item()
            if diff or yc != yu or xc.dtype != xu.dtype:
                print(f"pass {rnd}: max |diff| {diff}, labels {yc} {yu}, dtypes {xc.dtype} {xu.dtype}")
            assert yc == yu and xc.dtype == xu.dtype and torch.equal(xc, xu)
        assert cache.cached == len(sub)
    assert sorted(cache.skipped) == sorted(ds.skipped)


def test_decoded_reads_each_file_once(tmp_path):
    ds, counting = _counted_folder(tmp_path)
    cache = decoded(tfdata.per_class_subset(ds, 3))
    for _ in range(3):
        for i in range(len(cache)):
            cache[i]
    _assert_each_opened_once(counting, len(cache))


def test_decoded_shared_by_workers_across_passes(tmp_path):
    ds, counting = _counted_folder(tmp_path)
    plain = image_folder(tmp_path, image_size=SIZE)  # its reads are not counted
    expect = torch.stack([plain[i][0] for i in range(len(plain))])
    cache = decoded(ds)
    for _ in range(3):  # each pass starts new workers; the store outlives them
        x = torch.cat([b[0] for b in tfdata.loader(cache, batch_size=2, workers=2)])
        print("max |diff| cached (workers) vs uncached:", (x - expect).abs().max().item())
        assert torch.equal(x, expect)
    _assert_each_opened_once(counting, len(ds))


def test_decoded_beyond_budget_decodes_each_time(tmp_path):
    ds, counting = _counted_folder(tmp_path)
    cache = decoded(ds, max_bytes=2 * 3 * SIZE * SIZE + 1)  # room for two images
    assert cache.capacity == 2
    for _ in range(3):
        for (xc, _), (xu, _) in _pairs(cache, ds):
            assert torch.equal(xc, xu), (xc - xu).abs().max().item()
    opens = counting.counts()
    paths = [p for p, _ in ds.samples]
    # cached: 1 open + 3 by the uncached comparison; beyond: 3 passes x (cache + comparison) = 6
    assert [opens[p] for p in paths[:2]] == [1 + 3] * 2, opens
    assert all(opens[p] == 6 for p in paths[2:]), opens


def test_decoded_refuses_random_transform_and_passes_tensors(tmp_path):
    make_folder(tmp_path, bad=False)
    with pytest.raises(ValueError, match="RandomResizedCrop"):
        decoded(image_folder(tmp_path, train=True, image_size=SIZE))
    t = TensorDataset(torch.zeros(2, 1))
    assert decoded(t) is t

"""``prune(coupled="prune")`` against Torch-Pruning at the same parameter count.

For each model (random init, the same calibration images): Torch-Pruning's magnitude
pruner at ``pruning_ratio`` (every group, uniform), Torch-Pruning with thinet_fast's
``ThiNetImportance``, and ``thinet_fast.prune(keep=1 - ratio, coupled="prune")``.
Printed: parameters after pruning, relative output deviation from the unpruned model on
held-out images, wall time.

    .venv/bin/python -W ignore bench/vs_torch_pruning.py resnet50 densenet121 mobilenet_v2
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torchvision
import torch_pruning as tp

import thinet_fast as tf
from thinet_fast.integrations.torch_pruning import ThiNetImportance


def _params(m):
    return sum(p.numel() for p in m.parameters())


def _dev(model, ref, x):
    with torch.no_grad():
        y, y0 = model(x), ref(x)
    if isinstance(y, dict):
        y, y0 = y["out"], y0["out"]
    return float((y - y0).norm() / y0.norm().clamp_min(1e-30))


def _tp(model, x, importance, ratio):
    m = copy.deepcopy(model)
    head = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)][-1:]
    pruner = tp.pruner.BasePruner(m, x[:1], importance=importance, pruning_ratio=ratio, ignored_layers=head)
    pruner.step()
    return m


def run(name: str, images: int, size: int, ratio: float, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    kw = {"image_size": size} if name.startswith("vit") else {}
    model = torchvision.models.get_model(name, weights=None, **kw).eval()
    g = torch.Generator().manual_seed(seed)
    calib = torch.randn(images, 3, size, size, generator=g)
    held = torch.randn(16, 3, size, size, generator=g)
    rows = {"model": name, "params": _params(model)}
    t = time.perf_counter()
    mag = _tp(model, calib, tp.importance.MagnitudeImportance(p=1), ratio)
    rows["tp_magnitude"] = (_params(mag), _dev(mag, model, held), time.perf_counter() - t)
    t = time.perf_counter()
    thi = _tp(model, calib, ThiNetImportance([calib], num_images=images), ratio)
    rows["tp_thinet_importance"] = (_params(thi), _dev(thi, model, held), time.perf_counter() - t)
    t = time.perf_counter()
    ours = tf.prune(model, calib, keep=1 - ratio, num_images=images, coupled="prune", progress=False).model
    rows["thinet_fast"] = (_params(ours), _dev(ours, model, held), time.perf_counter() - t)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=0.5)
    args = ap.parse_args()
    print("| model | params | TP magnitude: params, dev, s | TP + ThiNetImportance | thinet_fast prune(coupled) |")
    print("|---|---|---|---|---|")
    for name in args.models:
        r = run(name, args.images, args.size, args.ratio)
        cells = [f"{p / 1e6:.2f}M, {d:.3f}, {s:.1f}" for p, d, s in
                 (r["tp_magnitude"], r["tp_thinet_importance"], r["thinet_fast"])]
        print(f"| {name} | {r['params'] / 1e6:.2f}M | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

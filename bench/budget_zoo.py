"""A parameter budget with coupled="prune" on torchvision models at random init: does
``prune(params_target=..., coupled="prune")`` meet it, and how long does it take.

    .venv/bin/python -W ignore bench/budget_zoo.py resnet18 vit_b_16 fasterrcnn_mobilenet_v3_large_320_fpn
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision

import thinet_fast as tf

DETECTION = ("fasterrcnn", "retinanet", "fcos", "maskrcnn", "keypointrcnn", "ssd")


def build(name: str):
    """The model (no downloaded weights) and the input size it needs."""
    kw, size = {}, 64
    if name.startswith("vit"):
        kw = {"image_size": 64}
    elif name.startswith("maxvit") or name.startswith("inception"):
        size = 224 if name.startswith("maxvit") else 299
    elif name.startswith(DETECTION):
        kw = {"weights_backbone": None} if name.startswith("ssd") else {"weights_backbone": None, "min_size": 64,
                                                                       "max_size": 64}
    elif name.startswith(("deeplab", "lraspp", "fcn")):
        kw = {"weights_backbone": None}
    return torchvision.models.get_model(name, weights=None, **kw).eval(), size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--target", type=float, default=0.4)
    ap.add_argument("--images", type=int, default=8)
    args = ap.parse_args()
    print("| model | kept | met | s |\n|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        model, size = build(name)
        x = torch.randn(args.images, 3, size, size)
        t = time.perf_counter()
        try:
            res = tf.prune(model, x, params_target=args.target, coupled="prune", num_images=args.images,
                           progress=False)
        except Exception as exc:  # one model failing must not hide the others
            print(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:150]} | | {time.perf_counter() - t:.0f} |")
            continue
        kept = tf.count_params(res.model) / tf.count_params(model)
        print(f"| {name} | {kept:.3f} | {res.report.config['budget']['met']} | {time.perf_counter() - t:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()

"""Where a budget put the cut: per unit, group and attention module, the width kept and
the relative error before and after the refit, for ``prune(params_target=N,
coupled="prune")`` on a torchvision model at random init (the setup of
bench/vs_torch_pruning.py).

    .venv/bin/python -W ignore bench/budget_report.py efficientnet_b0 1700000
"""
from __future__ import annotations

import argparse

import torch
import torchvision

import thinet_fast as tf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("params", type=int, help="params_target: the most parameters the pruned model may have")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    kw = {"image_size": args.size} if args.model.startswith("vit") else {}
    model = torchvision.models.get_model(args.model, weights=None, **kw).eval()
    for m in model.modules():  # as bench/vs_torch_pruning.py: a zeroed head would hide every change
        if isinstance(m, torch.nn.Linear) and not bool(m.weight.any()):
            m.reset_parameters()
    g = torch.Generator().manual_seed(0)
    calib = torch.randn(args.images, 3, args.size, args.size, generator=g)
    held = torch.randn(16, 3, args.size, args.size, generator=g)
    res = tf.prune(model, calib, params_target=args.params, coupled="prune", num_images=args.images,
                   reconstruction="full", progress=False)
    with torch.no_grad():
        y0, y = model(held), res.model(held)
    print(f"{args.model}: {tf.count_params(model):,} -> {tf.count_params(res.model):,} parameters, output deviation "
          f"{float((y - y0).norm() / y0.norm()):.3f}")
    print("| item | kept | error selected | error after refit |\n|---|---|---|---|")
    for r in res.report.units:
        if r.kept < r.channels:
            print(f"| {r.producer} | {r.kept}/{r.channels} | {r.error_selected:.3f} | {r.error_reconstructed:.3f} |")


if __name__ == "__main__":
    main()

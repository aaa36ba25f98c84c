"""What a budget costs on top of the prune: ResNet-50 (torchvision, random init), 32
images 224x224 in 4 batches, ``coupled="prune"``, sequential schedule; ``keep=0.5``
against ``params_target=0.3``, each as a multiple of one plain forward pass over the
same batches (timed first, in the same process).

    .venv/bin/python -W ignore bench/budget_speed.py
"""
from __future__ import annotations

import time

import torch
import torchvision

import thinet_fast as tf


def main():
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.relu(torch.randn(8, 3, 224, 224, generator=g)) for _ in range(4)]
    t = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            model(b)
    forward = time.perf_counter() - t
    print(f"forward over 32 images: {forward:.2f} s")
    for option in (dict(keep=0.5), dict(params_target=0.3)):
        t = time.perf_counter()
        res = tf.prune(model, batches, coupled="prune", num_images=32, progress=False, **option)
        seconds = time.perf_counter() - t
        phases = ", ".join(f"{k} {v:.1f}" for k, v in res.report.timings.items() if k != "total" and v >= 0.05)
        print(f"{option}: {seconds:.1f} s = {seconds / forward:.1f}x the forward, {tf.count_params(res.model):,} "
              f"parameters ({phases})")


if __name__ == "__main__":
    main()

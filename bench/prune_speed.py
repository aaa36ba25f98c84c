"""Whole-prune speed against the forward passes it cannot avoid (issue 7).

Workloads (random-init weights: speed does not depend on them; fixed random images):
  vgg16-oneshot     torchvision VGG-16, 50 images 224x224 in 5 batches, conv1_1..conv5_2
                    kept at 50%, statistics="full", reconstruction="full", bias
                    compensation, 10 locations per image, schedule="oneshot"
  vgg16-sequential  the same, schedule="sequential" (activation replay)
  resnet50-sequential  ResNet-50 (v1, the paper's) with preset="resnet50-thinet-50",
                    32 images 224x224 in 4 batches, sequential

Each run times one plain forward pass (eval, no_grad) over the same batches before the
prune and one after it, in the same process, and prints the prune's time over their
mean, with the report's per-phase breakdown. Run from the repository root:

    .venv/bin/python bench/prune_speed.py vgg16-oneshot [--json out.json]

``bench/test_bench_prune.py`` runs these under pytest-benchmark and checks the targets.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch
import torchvision

import thinet_fast as tf
from thinet_fast.models import resnet50_original

VGG_UNITS = [f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26)]  # conv1_1..conv5_2
TARGETS = {"vgg16-oneshot": 1.3, "vgg16-sequential": 1.5, "resnet50-sequential": 2.0}
RSS_TARGET_GB = {"vgg16-oneshot": 2.5}


def _images(n: int, batch: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(n, 3, 224, 224, generator=g))  # non-negative, like normalised photos after ReLU
    return [x[i:i + batch] for i in range(0, n, batch)]


def workload(name: str):
    """(model, batches, prune options) for a workload name."""
    torch.manual_seed(0)
    if name.startswith("vgg16"):
        model = torchvision.models.vgg16().eval()
        opts = dict(units=VGG_UNITS, keep=0.5, statistics="full", reconstruction="full", bias_compensation=True,
                    samples_per_image=10, num_images=50,
                    schedule="oneshot" if name.endswith("oneshot") else "sequential")
        return model, _images(50, 10), opts
    if name == "resnet50-sequential":
        model = resnet50_original().eval()
        return model, _images(32, 8), dict(preset="resnet50-thinet-50", num_images=32, schedule="sequential")
    raise ValueError(f"unknown workload {name!r}; choose from {sorted(TARGETS)}")


@torch.no_grad()
def forward_seconds(model: torch.nn.Module, batches) -> float:
    t0 = time.perf_counter()
    for x in batches:
        model(x)
    return time.perf_counter() - t0


def run(name: str, progress: bool = False, keep_model: bool = False) -> dict:
    model, batches, opts = workload(name)
    forward_seconds(model, batches[:1])  # warm-up (allocator, oneDNN primitives)
    before = forward_seconds(model, batches)
    t0 = time.perf_counter()
    res = tf.prune(model, batches, progress=progress, **opts)
    prune_s = time.perf_counter() - t0
    fwd = (before + forward_seconds(model, batches)) / 2  # one pass before and one after: drift cancels
    out = {
        "workload": name, "forward_s": fwd, "prune_s": prune_s, "ratio": prune_s / fwd,
        "target": TARGETS[name], "timings": res.report.timings,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "units": [{k: u.get(k) for k in ("consumer", "channels", "kept", "reconstruction", "replay", "seconds",
                                         "error_reconstructed", "heldout_images")}
                  for u in res.report.units],
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    }
    if keep_model:
        out["model"] = res.model
    return out


def describe(r: dict) -> str:
    t = r["timings"]
    phases = ", ".join(f"{k} {v:.2f}" for k, v in t.items() if k != "total")
    return (f"{r['workload']}: forward {r['forward_s']:.2f} s, prune {r['prune_s']:.2f} s, "
            f"ratio {r['ratio']:.2f}x (target <= {r['target']}x), peak RSS {r['peak_rss_gb']:.2f} GB\n"
            f"  phases (s): {phases}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workload", choices=sorted(TARGETS))
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    r = run(args.workload, progress=args.progress)
    print(describe(r))
    for u in r["units"]:
        print(f"  {u['consumer']:>16s} kept {u['kept']:4d} {u['reconstruction']:6s} {u['seconds'] or 0:6.2f}s "
              f"{u.get('replay') or ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1, default=str)


if __name__ == "__main__":
    main()

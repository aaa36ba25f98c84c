"""The embedded default: ThiNet and the baselines on Fashion-MNIST, end to end.

Trains (or reuses a cached) small VGG-style net and bottleneck ResNet, prunes each with
every method at the same budget, fine-tunes briefly with distillation from the
unpruned model, and prints the paper-style table. Everything runs on the CPU.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from functools import partial

import torch

from . import data as tfdata
from .models import DemoResNet, DemoVGG
from .pipeline import prune
from .report import measure_speed, model_stats
from .tables import format_table
from .serialization import load, save
from .training import evaluate, finetune

DEMO_MODELS = {"vgg": DemoVGG, "vgg_nobn": partial(DemoVGG, batch_norm=False), "resnet": DemoResNet}
# plain VGG without BatchNorm: 0.1 trains best (0.05: 86.4%, 0.1: 89.2%, 0.2 diverges)
TRAIN_LR = {"vgg_nobn": 0.1}
# a demo row is a method plus option overrides: "+full" is thinet_fast's exact path
# (all-output statistics, least-squares refit of the consumer, bias compensation),
# "+bn" re-estimates BatchNorm statistics on the calibration images afterwards
VARIANTS = {
    "+full": {"statistics": "full", "reconstruction": "full"},
    "+bn": {"bn_recalibration": True},
}
DEMO_METHODS = ("thinet", "thinet+full", "thinet+full+bn", "thinet_ls", "lasso", "apoz", "weight_sum", "random")


def _row_options(row: str, s: "DemoSettings") -> dict:
    method, *extras = row.split("+")
    opts = {"method": method, "statistics": s.statistics, "reconstruction": s.reconstruction}
    for extra in extras:
        if f"+{extra}" not in VARIANTS:
            raise ValueError(f"unknown demo variant '+{extra}' in {row!r}; known: {sorted(VARIANTS)}")
        opts.update(VARIANTS[f"+{extra}"])
    return opts


@dataclass
class DemoSettings:
    models: tuple[str, ...] = ("vgg", "resnet")
    methods: tuple[str, ...] = DEMO_METHODS
    keep: float = 0.5
    train_epochs: float = 2.0
    train_limit: int | None = None       # images of the training set to use (None = 60k)
    calib_per_class: int = 50            # paper: 10 per class on ImageNet
    samples_per_image: int = 10
    finetune_steps: int = 100
    eval_limit: int | None = None
    batch_size: int = 128
    schedule: str = "sequential"
    statistics: str = "sampled"
    reconstruction: str = "scale"
    seed: int = 0
    cache: bool = True
    speed: bool = True


def trained(name: str, s: DemoSettings, train_loader, log) -> torch.nn.Module:
    path = tfdata.cache_dir() / "demo" / f"{name}-e{s.train_epochs}-n{s.train_limit}-s{s.seed}.pt"
    if s.cache and path.exists():
        log(f"[{name}] reusing cached model {path}")
        return load(path)
    torch.manual_seed(s.seed)
    model = DEMO_MODELS[name]()
    log(f"[{name}] training {s.train_epochs} epoch(s) on Fashion-MNIST ...")
    t0 = time.time()
    finetune(model, train_loader, epochs=s.train_epochs, lr=TRAIN_LR.get(name, 0.05), weight_decay=5e-4,
             progress=True)
    log(f"[{name}] trained in {time.time() - t0:.0f}s")
    if s.cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        save(model, path)
    return model


def run_demo(settings: DemoSettings | None = None, log=print) -> list[dict]:
    """Run the demo and return one row per (model, method)."""
    s = settings or DemoSettings()
    torch.manual_seed(s.seed)
    train_set = tfdata.fashion_mnist(train=True, limit=s.train_limit)
    test_set = tfdata.fashion_mnist(train=False, limit=s.eval_limit)
    train_loader = tfdata.loader(train_set, s.batch_size, shuffle=True, seed=s.seed)
    test_loader = tfdata.loader(test_set, 500)
    calib = tfdata.loader(tfdata.per_class_subset(train_set, s.calib_per_class, seed=s.seed), 100)
    example = test_set.tensors[0][:1]
    rows = []
    for name in s.models:
        base = trained(name, s, train_loader, log)
        acc = evaluate(base, test_loader)
        st = model_stats(base, example)
        row0 = {"model": name, "method": "original", "params": st.params, "flops": st.flops,
                "size_mb": st.size_mb, "top1": acc[1], "top5": acc[5], "top1_finetuned": None,
                "seconds": 0.0}
        if s.speed:
            row0["forward_ms"], row0["backward_ms"] = measure_speed(base, example)
        rows.append(row0)
        log(f"[{name}] original: top-1 {100 * acc[1]:.2f}%  params {st.params / 1e3:.1f}K  FLOPs {st.flops / 1e6:.2f}M")
        for method in s.methods:
            t0 = time.time()
            res = prune(base, calib, keep=s.keep, **_row_options(method, s), schedule=s.schedule,
                        num_images=10 * s.calib_per_class, samples_per_image=s.samples_per_image,
                        seed=s.seed, progress=False)
            seconds = time.time() - t0
            pruned = res.model
            acc_p = evaluate(pruned, test_loader)
            ft = copy.deepcopy(pruned)
            if s.finetune_steps:
                finetune(ft, train_loader, steps=s.finetune_steps, lr=0.01, teacher=base, progress=False)
            acc_f = evaluate(ft, test_loader)
            row = {"model": name, "method": method, "params": res.report.params, "flops": res.report.flops,
                   "size_mb": res.report.pruned.size_mb, "top1": acc_p[1], "top5": acc_p[5],
                   "top1_finetuned": acc_f[1], "seconds": seconds}
            if s.speed:
                row["forward_ms"], row["backward_ms"] = measure_speed(ft, example)
            rows.append(row)
            log(f"[{name}] {method:>10}: pruned top-1 {100 * acc_p[1]:.2f}%  after {s.finetune_steps} "
                f"fine-tune steps {100 * acc_f[1]:.2f}%  (prune {seconds:.1f}s)")
    log("")
    log(format_rows(rows, s))
    return rows


def format_rows(rows: list[dict], s: DemoSettings) -> str:
    head = ("model", "method", "#Param.", "#FLOPs", "MB", "f./b. ms (b=32)", "top-1 pruned", "top-5 pruned",
            f"top-1 +{s.finetune_steps} steps KD", "prune s")
    out = [head]
    for r in rows:
        fb = f"{r['forward_ms']:.1f}/{r['backward_ms']:.1f}" if "forward_ms" in r else "-"
        out.append((r["model"], r["method"], f"{r['params'] / 1e3:.1f}K", f"{r['flops'] / 1e6:.2f}M",
                    f"{r['size_mb']:.2f}", fb, f"{100 * r['top1']:.2f}%", f"{100 * r['top5']:.2f}%",
                    "-" if r["top1_finetuned"] is None else f"{100 * r['top1_finetuned']:.2f}%",
                    f"{r['seconds']:.1f}"))
    return format_table(out)


def dump(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)

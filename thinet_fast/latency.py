"""Latency as a deployment sees it: inference (eval mode, no autograd) and, apart from
it, a training step (forward + backward), at chosen batch sizes; median and spread over
repeats, after warm-up. The model's mode, gradients and buffers are left as they were."""
from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from .modes import preserved_modes

__all__ = ["measure_latency", "latency_table", "restored_state"]


@contextlib.contextmanager
def restored_state(model: nn.Module):
    """Time a model without leaving a trace: its ``.grad`` tensors (backward accumulates
    into them) and buffers (BatchNorm statistics move in train mode) are put back."""
    params = list(model.parameters())
    saved = [p.grad for p in params]
    buffers = [b.detach().clone() for b in model.buffers()]
    try:
        yield params
    finally:
        for p, g in zip(params, saved):
            p.grad = g
        with torch.no_grad():
            for b, old in zip(model.buffers(), buffers):
                b.copy_(old)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(seconds: list[float]) -> dict:
    ms = sorted(1e3 * s for s in seconds)
    q = lambda f: ms[min(len(ms) - 1, int(round(f * (len(ms) - 1))))]  # noqa: E731
    return {"median_ms": q(0.5), "p10_ms": q(0.1), "p90_ms": q(0.9), "repeats": len(ms)}


def measure_latency(model: nn.Module, example: torch.Tensor, batch_sizes=(1, 32), *, warmup: int = 3,
                    repeats: int = 10, train: bool = True) -> dict:
    """``{"inference": {bs: summary}, "train": {bs: summary}}`` where a summary holds
    median, 10th and 90th percentile milliseconds per batch."""
    device = next(model.parameters()).device
    out = {"inference": {}, "train": {}}
    with restored_state(model) as params:
        for bs in batch_sizes:
            x = example[:1].expand(bs, *example.shape[1:]).contiguous().to(device)
            times = []
            with preserved_modes(model, train=False), torch.inference_mode():
                for i in range(warmup + repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    model(x)
                    _sync(device)
                    if i >= warmup:
                        times.append(time.perf_counter() - t0)
            out["inference"][bs] = _summary(times)
            if not train:
                continue
            times = []
            with preserved_modes(model, train=True):
                for i in range(warmup + repeats):
                    for p in params:
                        p.grad = None
                    _sync(device)
                    t0 = time.perf_counter()
                    model(x).float().sum().backward()
                    _sync(device)
                    if i >= warmup:
                        times.append(time.perf_counter() - t0)
            out["train"][bs] = _summary(times)
    return out


def latency_table(result: dict) -> str:
    lines = [f"{'mode':<10} {'batch':>6} {'median ms':>10} {'p10':>9} {'p90':>9}"]
    for mode, rows in result.items():
        for bs, s in rows.items():
            lines.append(f"{mode:<10} {bs:>6} {s['median_ms']:>10.2f} {s['p10_ms']:>9.2f} {s['p90_ms']:>9.2f}")
    return "\n".join(lines)

"""Reports laid out like the paper's tables (params, FLOPs, MB, f./b. ms, top-1/top-5)."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass

import torch
from torch import nn

from .counting import count_flops, count_params, model_size_mb
from .modes import preserved_modes
from .latency import _sync, latency_table, measure_latency, restored_state  # noqa: F401 (the report's speed figures)
from .records import UnitRecord
from .tables import format_table


@dataclass
class ModelStats:
    params: int
    flops: int
    size_mb: float
    forward_ms: float | None = None
    backward_ms: float | None = None
    top1: float | None = None
    top5: float | None = None


@dataclass
class Report:
    """Result of a pruning run. ``params``/``flops`` are the pruned model's."""

    pruned: ModelStats
    original: ModelStats | None = None
    units: list[UnitRecord] = field(default_factory=list)
    backend: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)  # seconds per phase (forward, statistics, ...)
    speed: dict = field(default_factory=dict)    # measure_latency() per model ("pruned", "original")

    @property
    def params(self) -> int:
        return self.pruned.params

    @property
    def flops(self) -> int:
        return self.pruned.flops

    def measure(self, pruned: nn.Module, original: nn.Module | None = None, *, eval_data=None,
                speed: bool = True, example: torch.Tensor | None = None, max_batches: int | None = None,
                progress: bool = False) -> "Report":
        """Fill in top-1/top-5 (from ``eval_data``) and forward/backward ms at batch 32
        for the pruned model and, if given, the original. Returns self."""
        from .training import evaluate
        pairs = [(self.pruned, pruned)] + ([(self.original, original)] if original is not None and self.original else [])
        for stats, model in pairs:
            if eval_data is not None:
                acc = evaluate(model, eval_data, max_batches=max_batches, progress=progress)
                stats.top1, stats.top5 = acc.get(1), acc.get(5)
            if speed:
                x = example
                if x is None:
                    if eval_data is None:
                        raise ValueError("speed=True needs example= or eval_data= to know the input shape")
                    x = next(iter(eval_data))[0][:1]
                stats.forward_ms, stats.backward_ms = measure_speed(model, x)
        return self

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "units"}
        out = {k: asdict(v) if is_dataclass(v) else v for k, v in out.items()}
        out["units"] = [u.to_dict() for u in self.units]
        return out

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), default=str, **kw)

    def table(self) -> str:
        rows = [("Model", "Top-1", "Top-5", "#Param.", "#FLOPs", "Size (MB)", "f./b. (ms)")]
        for name, s in (("original", self.original), ("pruned", self.pruned)):
            if s is not None:
                rows.append((name, _pct(s.top1), _pct(s.top5), _m(s.params), _g(s.flops), f"{s.size_mb:.2f}",
                             _fb(s.forward_ms, s.backward_ms)))
        out = [format_table(rows)]
        if self.units:
            urows = [("producer", "consumer", "C", "kept", "method", "stats", "recon", "err sel", "err rec")]
            for u in self.units:
                urows.append((u.producer, u.consumer, str(u.channels), str(u.kept), u.method, u.statistics,
                              u.reconstruction, f"{u.error_selected:.4f}",
                              f"{u.error_reconstructed:.4f}" + ("" if u.heldout_images else "*")))
            legend = "err: relative output error of the consumer on held-out calibration images, which no fit saw"
            if any(not u.heldout_images for u in self.units):
                legend += "; * in sample (no held-out images: holdout=0 or too few images)"
            out.append(format_table(urows) + "\n" + legend)
        if self.backend:
            out.append("backends: " + ", ".join(f"{k}={v}" for k, v in self.backend.items()))
        if self.timings:
            t = self.timings
            parts = [f"{k} {v:.2f}" for k, v in t.items() if k != "total" and v >= 0.005]
            out.append(f"time: {t.get('total', 0.0):.2f} s (" + ", ".join(parts) + ")")
        out.extend(f"note: {n}" for n in self.notes)
        return "\n\n".join(out)

    __str__ = table


def _pct(v):
    return "-" if v is None else f"{100 * v:.2f}%"


def _m(v):
    return f"{v / 1e6:.2f}M"


def _g(v):
    return f"{v / 1e9:.3f}G" if v >= 1e8 else f"{v / 1e6:.2f}M"


def _fb(f, b):
    return "-" if f is None else f"{f:.1f}/{b:.1f}"




def comparison(model: ModelStats, original: ModelStats) -> str:
    """One line against the unpruned model: ratios, and Δ top-1/top-5 when both have them."""
    parts = [f"vs original: params {model.params / max(original.params, 1):.1%}, "
             f"FLOPs {model.flops / max(original.flops, 1):.1%}, size {model.size_mb / max(original.size_mb, 1e-9):.1%}"]
    for k in ("top1", "top5"):
        a, b = getattr(model, k), getattr(original, k)
        if a is not None and b is not None:
            parts.append(f"Δ {k} {100 * (a - b):+.2f} points")
    return ", ".join(parts)


def model_stats(model: nn.Module, example: torch.Tensor) -> ModelStats:
    return ModelStats(count_params(model), count_flops(model, example), model_size_mb(model))


def measure_speed(model: nn.Module, example: torch.Tensor, *, batch_size: int = 32, warmup: int = 2,
                  repeats: int = 5) -> tuple[float, float]:
    """Forward and backward milliseconds per batch of ``batch_size`` on the model's device
    (median of ``repeats``). The model's mode and gradients are restored afterwards."""
    device = next(model.parameters()).device
    x = example[:1].expand(batch_size, *example.shape[1:]).contiguous().to(device)
    fwd, bwd = [], []
    with restored_state(model) as params, preserved_modes(model, train=True):
        for i in range(warmup + repeats):
            for p in params:  # time backward on fresh .grad tensors
                p.grad = None
            _sync(device)
            t0 = time.perf_counter()
            out = model(x)
            _sync(device)
            t1 = time.perf_counter()
            out.float().sum().backward()
            _sync(device)
            t2 = time.perf_counter()
            if i >= warmup:
                fwd.append(t1 - t0)
                bwd.append(t2 - t1)
    fwd.sort(), bwd.sort()
    return 1e3 * fwd[len(fwd) // 2], 1e3 * bwd[len(bwd) // 2]


def build_report(model: nn.Module, example: torch.Tensor, *, reference: nn.Module | None = None,
                 units: list | None = None, config: dict | None = None, backend: dict | None = None,
                 notes: list[str] | None = None) -> Report:
    pruned = model_stats(model, example)
    original = None
    if reference is not None:  # the reference may live on another device than the pruned model
        dev = next(iter(reference.parameters()), example).device
        original = model_stats(reference, example.to(dev))
    records = [u if isinstance(u, UnitRecord) else UnitRecord.from_dict(u) for u in units or []]
    return Report(pruned, original, records, dict(backend or {}), dict(config or {}), list(notes or []))

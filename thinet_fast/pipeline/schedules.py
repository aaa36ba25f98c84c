"""Sequential (paper, resumable) and one-shot schedules."""
from __future__ import annotations

import os
import torch
from torch import nn

from ..rewrite import prune_unit_
from ..units import Unit, get_module
from ..ops.stats import STATS_BACKENDS
from .collect import collect_statistics
from .config import PruneConfig
from .decide import Decision, decide, select_thinet_batched, selection_backend

CHECKPOINT_FORMAT = "thinet_fast-checkpoint/1"


def _collect(model, units, data, cfg: PruneConfig, device, desc, first_index: int = 0):
    return collect_statistics(
        model, units, data, statistics=cfg.statistics, num_images=cfg.num_images,
        samples_per_image=cfg.samples_per_image, seed=cfg.seed, dtype=cfg.stats_dtype,
        backend=cfg.backend_for(STATS_BACKENDS),
        device=device, with_cov=cfg.reconstruction == "full", count_zeros=cfg.method == "apoz",
        progress=cfg.progress, desc=desc, first_index=first_index)


def _decide(model, unit, stats, n_keep, cfg: PruneConfig, selection=None) -> Decision:
    return decide(unit, stats, n_keep, get_module(model, unit.producer), get_module(model, unit.consumer),
                  method=cfg.method, reconstruction=cfg.reconstruction, bias_compensation=cfg.bias_compensation,
                  seed=cfg.seed, backend=cfg.backend, ridge=cfg.ridge, selection=selection)


def _apply(model, d: Decision):
    prune_unit_(model, d.unit, d.keep, consumer_weight=d.consumer_weight, consumer_bias=d.consumer_bias)


# ------------------------------------------------------------------ checkpoints
def save_checkpoint(path: str, model: nn.Module, cfg: PruneConfig, records: list[dict]) -> None:
    """Atomically write the partly pruned model and what was done."""
    tmp = f"{path}.tmp"
    torch.save({"format": CHECKPOINT_FORMAT, "fingerprint": cfg.fingerprint(), "records": records,
                "model": model}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, cfg: PruneConfig) -> dict:
    # weights_only=False: the checkpoint holds the module tree, and we only read files we wrote
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a thinet_fast checkpoint; delete it or pass another resume= path")
    theirs, ours = ckpt["fingerprint"], cfg.fingerprint()
    diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if diff:
        raise ValueError(f"checkpoint {path} was written with different options ({', '.join(diff)}); "
                         "pass the same options to resume, or a new resume= path")
    return ckpt


def transplant(model: nn.Module, source: nn.Module) -> None:
    """Make ``model`` hold ``source``'s whole module tree (parameters, buffers, children)."""
    for key in ("_modules", "_parameters", "_buffers"):
        object.__setattr__(model, key, getattr(source, key))


# ------------------------------------------------------------------ schedules
def run_sequential(model: nn.Module, units: list[Unit], n_keep: dict[str, int], data, cfg: PruneConfig,
                   device) -> list[Decision | dict]:
    """Paper schedule: statistics of each unit on the partly pruned model, forward stopped
    at its consumer; a checkpoint after every unit when ``cfg.resume`` is set."""
    records: list = []
    done: set[str] = set()
    if cfg.resume and os.path.exists(cfg.resume):
        ckpt = load_checkpoint(cfg.resume, cfg)
        records = list(ckpt["records"])
        done = {r["producer"] for r in records}
        # the whole checkpointed model: a per-unit fine-tune may have changed any layer
        transplant(model, ckpt["model"].to(device))
    for index, unit in enumerate(units):
        if unit.producer in done:
            continue
        stats = _collect(model, [unit], data, cfg, device, f"[{index + 1}/{len(units)}] {unit.consumer}",
                         first_index=index)[unit.producer]
        d = _decide(model, unit, stats, n_keep[unit.producer], cfg)
        _apply(model, d)
        if cfg.finetune is not None:
            cfg.finetune(model, unit, index)
        records.append(d.record())
        if cfg.resume:
            save_checkpoint(cfg.resume, model, cfg, records)
    return records


def run_oneshot(model: nn.Module, units: list[Unit], n_keep: dict[str, int], data, cfg: PruneConfig,
                device) -> list[dict]:
    """One pass collects every unit's statistics; ThiNet's greedy runs as one batched call."""
    stats = _collect(model, units, data, cfg, device, "statistics (one-shot)")
    selections = [None] * len(units)
    if cfg.method == "thinet":
        backend = selection_backend("thinet", cfg.backend, stats[units[0].producer].gram.device)
        selections = select_thinet_batched([stats[u.producer] for u in units],
                                           [n_keep[u.producer] for u in units], backend=backend)
    # every decision reads the unpruned consumers before any module is rewritten
    decisions = [_decide(model, u, stats[u.producer], n_keep[u.producer], cfg, sel)
                 for u, sel in zip(units, selections)]
    for d in decisions:
        _apply(model, d)
    return [d.record() for d in decisions]

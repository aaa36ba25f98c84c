"""Sequential (paper, resumable) and one-shot schedules."""
from __future__ import annotations

import copy
import time

from torch import nn

from ..fingerprint import DataDigest
from ..records import UnitRecord
from ..rewrite import prune_unit_
from ..units import Unit, get_module
from . import checkpoint
from .overall import Overall
from .collect import Keyed, StatsSpec, collect_units, consumer_geometry, iter_batches, norm_gain, progress_bar
from .config import PruneConfig
from .decide import Decision, decide
from .methods import SelectContext, get_method, selection_backend
from .replay import Replay
from .target import CrossSink, fits_cross, paired_forward
from .timing import Timings


def _decide(model, unit, stats, n_keep, cfg: PruneConfig, timer: Timings, selection=None,
            towards=None) -> Decision:
    t0 = time.perf_counter()
    d = decide(unit, stats, n_keep, get_module(model, unit.producer), get_module(model, unit.consumer),
               method=cfg.method, reconstruction=cfg.reconstruction, bias_compensation=cfg.bias_compensation,
               seed=cfg.seed, backend=cfg.backend, ridge=cfg.ridge, selection=selection, towards=towards,
               gain=norm_gain(model, unit) if cfg.through_norm else None)
    timer.sync()
    total = time.perf_counter() - t0
    select_s = min(getattr(d, "select_seconds", 0.0), total)
    timer.add("selection", select_s)
    timer.add("reconstruction", total - select_s)
    return d


def _apply(model, d: Decision, timer: Timings):
    with timer.phase("rewrite"):
        prune_unit_(model, d.unit, d.indices, consumer_weight=d.consumer_weight, consumer_bias=d.consumer_bias)


def transplant(model: nn.Module, source: nn.Module) -> None:
    """Make ``model`` hold ``source``'s whole module tree (parameters, buffers, children)."""
    for key in ("_modules", "_parameters", "_buffers"):
        object.__setattr__(model, key, getattr(source, key))


# ------------------------------------------------------------------ schedules
def run_sequential(model: nn.Module, units: list[Unit], n_keep: dict[str, int], data, cfg: PruneConfig,
                   device, spec: StatsSpec, timer: Timings, graph=None, example=None,
                   coupled=None) -> list[UnitRecord]:
    """Paper schedule: statistics of each unit on the partly pruned model. Each unit's
    pass runs only the segment from the replay cache to its consumer (or from the
    images, past the cache's memory budget); a checkpoint after every unit when
    ``cfg.resume`` is set (``example``: the first calibration image, if already read).
    ``coupled`` (a :class:`~thinet_fast.pipeline.coupled.CoupledStage`) runs after the
    last unit, and is checkpointed as one step."""
    records: list = []
    done: set[str] = set()
    digest, data_seen, coupled_done = None, None, None
    # the unpruned model, before any cut (and before a checkpoint replaces the tree)
    reference = copy.deepcopy(model).eval() if cfg.target == "unpruned" and units else None
    if cfg.resume:
        if example is None:
            example = next(iter(iter_batches(data, 1, device)))
        source = checkpoint.run_source(model, units, n_keep, example, cfg)
        digest = DataDigest()
        if checkpoint.exists(cfg.resume):
            loaded, meta = checkpoint.load_checkpoint(cfg.resume, cfg, source, model, device)
            records, data_seen = [UnitRecord.from_dict(r) for r in meta["records"]], meta.get("data")
            done = {r.producer for r in records}
            coupled_done = meta.get("coupled")  # the groups' refusals, once the stage has run
            # the whole checkpointed model: a per-unit fine-tune may have changed any layer
            transplant(model, loaded)
    replay = Replay(model, data, spec.num_images, device, host_budget=cfg.replay_memory,
                    enabled=cfg.replay_memory != 0 and bool(units) and reference is None,
                    images_only=cfg.finetune is not None,
                    graph=graph)
    overall = Overall(model, units, example, cfg.progress)
    try:
        for index, unit in enumerate(units):
            if unit.producer in done:
                overall.skip(unit)
                continue
            overall.start()
            source_pass = replay.plan(unit)
            batches = source_pass.batches()
            hashing = digest is not None and digest.images == 0 and not source_pass.from_cache
            if hashing:
                batches = _digested(batches, digest)
            forward, extra, sink = source_pass.forward(), None, None
            if reference is not None and index > 0 and fits_cross(unit):  # unit 0: nothing upstream was cut
                sink = CrossSink(unit, consumer_geometry(get_module(model, unit.consumer), unit),
                                 cfg.seed * 1000003 + index, spec.samples_per_image)
                forward = paired_forward(reference, unit, sink, forward or model)
                extra = {unit.consumer: sink.update}
            t_pass = time.perf_counter()
            with progress_bar(spec.pass_images, f"[{index + 1}/{len(units)}] {unit.consumer}", cfg.progress) as bar:
                stats = collect_units(model, [unit], batches, spec, first_index=index,
                                      forward=forward, bar=bar, timer=timer, extra=extra)[unit.producer]
            t_pass = time.perf_counter() - t_pass
            if hashing:
                checkpoint.check_data(cfg.resume, data_seen, digest.all_reduce())
                data_seen = digest.as_dict()
            d = _decide(model, unit, stats, n_keep[unit.producer], cfg, timer,
                        towards=sink.result() if sink is not None else None)
            _apply(model, d, timer)
            replay.commit(unit, d.indices)
            if cfg.finetune is not None:
                cfg.finetune(model, unit, index)
            records.append(d.record().replace(replay=source_pass.describe(), pass_seconds=t_pass))
            overall.done(index, unit, int(d.indices.numel()), d.error_reconstructed)
            if cfg.resume and checkpoint.writes_checkpoints():
                checkpoint.save_checkpoint(cfg.resume, model, cfg, source, records, data_seen)
    finally:
        overall.close()
    if digest is not None and digest.images == 0 and data_seen is not None:
        # every unit came from the checkpoint: still check that the data is its data
        for x in iter_batches(data, spec.num_images, device):
            digest.update(x)
        checkpoint.check_data(cfg.resume, data_seen, digest.all_reduce())
    if coupled is not None and coupled_done is not None:
        coupled.refused = [tuple(r) for r in coupled_done]
    elif coupled is not None:
        records += coupled.run(model)
        if cfg.resume and checkpoint.writes_checkpoints():
            checkpoint.save_checkpoint(cfg.resume, model, cfg, source, records, data_seen,
                                       coupled=[list(r) for r in coupled.refused])
    return records


def _digested(batches, digest):
    for x in batches:
        digest.update(x.value if isinstance(x, Keyed) else x)
        yield x


def run_oneshot(model: nn.Module, units: list[Unit], n_keep: dict[str, int], data, cfg: PruneConfig,
                device, spec: StatsSpec, timer: Timings, stats: dict | None = None) -> list[UnitRecord]:
    """One pass collects every unit's statistics (unless the budget pass already did);
    ThiNet's greedy runs as one batched call."""
    if stats is None:
        with progress_bar(spec.pass_images, "statistics (one-shot)", cfg.progress) as bar:
            stats = collect_units(model, units, iter_batches(data, spec.num_images, device), spec, bar=bar,
                                  timer=timer)
    selections = [None] * len(units)
    method = get_method(cfg.method)
    if method.select_many is not None:  # one batched call for every unit
        with timer.phase("selection"):
            ctx = SelectContext(seed=cfg.seed, ridge=cfg.ridge, backend=selection_backend(
                cfg.method, cfg.backend, stats[units[0].producer].gram.device))
            sels = method.run_many([stats[u.producer] for u in units], [n_keep[u.producer] for u in units], ctx)
            selections = [(s.keep, s.curve) for s in sels]
    # every decision reads the unpruned consumers before any module is rewritten
    decisions = [_decide(model, u, stats[u.producer], n_keep[u.producer], cfg, timer, sel)
                 for u, sel in zip(units, selections)]
    for d in decisions:
        _apply(model, d, timer)
    return [d.record() for d in decisions]

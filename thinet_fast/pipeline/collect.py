"""Collect consumer statistics with forward hooks (joins modules and ops).

Hooks are always removed, even when the forward fails. The forward is cut short with
an exception once every consumer of interest has seen the batch, so the sequential
schedule never runs the layers after the consumer.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn

from ..ops.patches import ConsumerGeometry
from ..ops.stats import MAX_COV_DIM, StatsAccumulator, Statistics, choose_mode
from ..modes import preserved_modes
from ..units import Unit, get_module


class _StopForward(Exception):
    """Raised inside a hook once all consumers have their input."""


def consumer_geometry(consumer: nn.Module, unit: Unit) -> ConsumerGeometry:
    if isinstance(consumer, nn.Conv2d):
        return ConsumerGeometry.conv(consumer.kernel_size, consumer.stride, consumer.padding, consumer.dilation)
    if isinstance(consumer, nn.Linear):
        return ConsumerGeometry.dense(unit.taps)
    raise TypeError(f"consumer {unit.consumer!r} is a {type(consumer).__name__}; expected Conv2d or Linear")


def resolve_mode(statistics: str, unit: Unit) -> str:
    return choose_mode(unit.channels, unit.taps) if statistics == "auto" else statistics


def iter_batches(data, num_images: int, device) -> Iterable[torch.Tensor]:
    """Input tensors from ``data`` (a tensor, or an iterable of tensors or of
    (input, ...) tuples), cut to ``num_images`` images in all."""
    if isinstance(data, torch.Tensor):
        data = [data]
    seen = 0
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(x, dict):
            raise TypeError("dict batches are not supported; pass an iterable of tensors or (input, target) tuples")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"a batch must be a tensor or a tuple whose first item is the input tensor; got {type(x).__name__}")
        x = x[: num_images - seen]
        if x.shape[0] == 0:
            break
        seen += x.shape[0]
        yield x.to(device, non_blocking=True)
        if seen >= num_images:
            break
    if seen == 0:
        raise ValueError("data yielded no images; pass a non-empty DataLoader, list of batches or tensor")


def make_accumulators(model: nn.Module, units: list[Unit], *, statistics: str, samples_per_image, seed: int,
                      dtype, backend: str, with_cov: bool = False, count_zeros: bool = True,
                      first_index: int = 0) -> dict[str, StatsAccumulator]:
    accs = {}
    for j, unit in enumerate(units, start=first_index):
        consumer = get_module(model, unit.consumer)
        mode = resolve_mode(statistics, unit)
        accs[unit.producer] = StatsAccumulator(
            consumer.weight, consumer_geometry(consumer, unit), mode=mode, samples_per_image=samples_per_image,
            seed=seed * 1_000_003 + j + _rank_offset(), dtype=dtype, backend=backend,
            with_cov=with_cov and mode != "full" and unit.channels * unit.taps <= MAX_COV_DIM,
            count_zeros=count_zeros)
    return accs


def _rank_offset() -> int:
    # each process draws its own samples; their sums are what the all-reduce adds
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return 7919 * torch.distributed.get_rank()
    return 0


@contextlib.contextmanager
def _hooks(model: nn.Module, units: list[Unit], accs: dict[str, StatsAccumulator], stop_early: bool):
    handles, seen = [], set()
    wanted = {u.consumer for u in units}
    by_consumer: dict[str, list[StatsAccumulator]] = {}
    for u in units:
        by_consumer.setdefault(u.consumer, []).append(accs[u.producer])

    def make_hook(fqn):
        def hook(module, args):
            for acc in by_consumer[fqn]:
                acc.update(args[0])
            seen.add(fqn)
            if stop_early and seen >= wanted:
                raise _StopForward
        return hook

    try:
        for fqn in wanted:
            handles.append(get_module(model, fqn).register_forward_pre_hook(make_hook(fqn)))
        yield seen
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_statistics(model: nn.Module, units: list[Unit], data, *, statistics: str = "auto",
                       num_images: int = 1000, samples_per_image=10, seed: int = 0, dtype=torch.float32,
                       backend: str = "auto", device=None, with_cov: bool = False, count_zeros: bool = True,
                       stop_early: bool = True, first_index: int = 0,
                       progress: bool = False, desc: str = "statistics") -> dict[str, Statistics]:
    """One pass over ``data`` that feeds every unit's consumer input to its accumulator.

    Unit j draws its samples from seed ``seed·1000003 + first_index + j``.
    Returns producer fqn -> :class:`Statistics`. Under ``torch.distributed`` the
    buffers are summed across processes (each process should see different images).
    """
    if not units:
        return {}
    device = torch.device(device) if device is not None else _model_device(model)
    accs = make_accumulators(model, units, statistics=statistics, samples_per_image=samples_per_image,
                             seed=seed, dtype=dtype, backend=backend, with_cov=with_cov, count_zeros=count_zeros,
                             first_index=first_index)
    bar = _progress(num_images, desc, progress)
    try:
        with preserved_modes(model, train=False), _hooks(model, units, accs, stop_early) as seen:
            for x in iter_batches(data, num_images, device):
                seen.clear()
                try:
                    model(x)
                except _StopForward:
                    pass
                missing = {u.consumer for u in units} - seen
                if missing:
                    raise RuntimeError(f"the forward pass never reached consumer(s) {sorted(missing)}; "
                                       "is the unit list from this model?")
                bar.update(x.shape[0])
    finally:
        bar.close()
    reduce_accumulators(list(accs.values()))
    return {p: acc.result() for p, acc in accs.items()}


def reduce_accumulators(accs: list[StatsAccumulator]) -> None:
    """Sum accumulators across processes when torch.distributed is initialised."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for acc in accs:
        tensors = acc.tensors()
        for t in tensors:
            dist.all_reduce(t)
        acc.load_tensors(tensors)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True)


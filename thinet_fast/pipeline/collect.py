"""The one statistics collector: a frozen :class:`StatsSpec` and one hook runner.

Every pass that feeds consumer inputs to accumulators goes through :func:`feed`: the
one-shot and sequential schedules, the FLOPs-budget pass, activation replay and the
Torch-Pruning importance. Hooks are always removed, the model runs in eval mode with
every submodule's own train flag restored afterwards, and the forward is cut short once
every consumer of interest has seen the batch.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..modes import preserved_modes
from ..ops.draws import image_keys, row_keys
from ..ops.patches import ConsumerGeometry, tokens_as_map
from ..ops.dispatch import BACKEND_NAMES
from ..ops.stats import MAX_COV_DIM, STATISTICS, Statistics, StatsAccumulator, choose_mode
from ..segments import batch_size
from ..units import Unit, get_module
from .methods import get_method

Sink = Callable[[torch.Tensor, torch.Tensor], None]  # (consumer input, image keys)


class Keyed(NamedTuple):
    """A batch that is not the images themselves (replayed activations), with the keys
    of the images it came from (:func:`thinet_fast.ops.draws.image_keys`)."""

    value: Any
    keys: torch.Tensor


class StopForward(Exception):
    """Raised inside a hook once all consumers have their input."""


@dataclass(frozen=True)
class StatsSpec:
    """How statistics are collected, built once (``StatsSpec.from_config(cfg)``).

    Attributes:
        statistics: "sampled", "full", "direct" or "auto" (per unit, by cost).
        num_images: images read from the data per pass.
        samples_per_image: sampled locations per image; None = every location.
        seed: unit ``j`` draws with seed ``seed·1000003 + j``, per image key
            (:mod:`thinet_fast.ops.draws`): the same under any batching or sharding;
            the held-out fold uses ``seed`` itself, the same images for every unit.
        acc_dtype: accumulation dtype, float32 or float64 (``PruneConfig.stats_dtype``).
        backend: the statistics kernels' backend ("triton", "torch" or "auto").
        with_cov: keep the patch covariance in every mode (the full refit needs it).
        count_zeros: count zero inputs per channel (APoZ).
        holdout: about one image in n (by key) also forms the held-out fold; 0 = none.
        images: the images a pass will really read, when the data says (None: take
            ``num_images``); sizes the held-out fold.
        through_norm: a consumer's Gram weighs each output channel by its BatchNorm's
            gain (:func:`norm_gain`), so selection and fit see the normalised output.
    """

    statistics: str = "auto"
    num_images: int = 1000
    samples_per_image: int | None = 10
    seed: int = 0
    acc_dtype: torch.dtype = torch.float32
    backend: str = "auto"
    with_cov: bool = False
    count_zeros: bool = True
    holdout: int = 0
    images: int | None = None
    through_norm: bool = False

    def __post_init__(self):
        if self.statistics not in STATISTICS:
            raise ValueError(f"statistics={self.statistics!r} is not one of {STATISTICS}")
        if isinstance(self.num_images, bool) or not isinstance(self.num_images, int) or self.num_images < 1:
            raise ValueError(f"num_images must be an int >= 1; got {self.num_images!r}")
        if self.backend not in ("auto",) + BACKEND_NAMES:
            raise ValueError(f"backend={self.backend!r} is not one of {('auto',) + BACKEND_NAMES}")

    @classmethod
    def from_config(cls, cfg) -> "StatsSpec":
        """The spec a :class:`PruneConfig` asks for (the one place that reads its
        statistics options)."""
        return cls(statistics=cfg.statistics, num_images=cfg.num_images, samples_per_image=cfg.samples_per_image,
                   seed=cfg.seed, acc_dtype=cfg.stats_dtype, backend=cfg.backend,
                   with_cov=cfg.reconstruction == "full", count_zeros="zeros" in get_method(cfg.method).needs,
                   holdout=cfg.holdout if cfg.reconstruction != "none" else 0, through_norm=cfg.through_norm)

    def replace(self, **changes) -> "StatsSpec":
        return dataclasses.replace(self, **changes)

    def mode_for(self, channels: int, taps: int) -> str:
        return choose_mode(channels, taps) if self.statistics == "auto" else self.statistics

    def seed_for(self, index: int) -> int:
        return self.seed * 1_000_003 + index

    def accumulator(self, weight: torch.Tensor, geometry: ConsumerGeometry, *, channels: int,
                    index: int = 0) -> StatsAccumulator:
        mode = self.mode_for(channels, geometry.taps)
        return StatsAccumulator(
            weight, geometry, statistics=mode, samples_per_image=self.samples_per_image,
            seed=self.seed_for(index), acc_dtype=self.acc_dtype, backend=self.backend,
            with_cov=self.with_cov and mode != "full" and channels * geometry.taps <= MAX_COV_DIM,
            count_zeros=self.count_zeros, holdout_every=self.holdout, fold_seed=self.seed,
            expected_images=self.pass_images * world_size())

    @property
    def pass_images(self) -> int:
        """The images one pass reads here: ``num_images``, or fewer when the data has fewer."""
        return self.num_images if self.images is None else min(self.images, self.num_images)


def world_size() -> int:
    """Processes in the torch.distributed job (1 without one)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def consumer_geometry(consumer: nn.Module, unit: Unit) -> ConsumerGeometry:
    if unit.tokens:  # a Linear on tokens reads like a 1x1 conv over the positions
        return ConsumerGeometry.conv(1)
    try:
        return ConsumerGeometry.from_module(consumer, unit.taps)
    except ValueError as exc:
        raise TypeError(f"consumer {unit.consumer!r}: {exc}") from exc


def images_in(data) -> int | None:
    """How many images ``data`` holds, when that is known without reading it (a tensor,
    a list of batches, a DataLoader over a sized dataset); else None."""
    try:
        if isinstance(data, torch.Tensor):
            return int(data.shape[0])
        if isinstance(data, (list, tuple)):
            return sum(int((b[0] if isinstance(b, (list, tuple)) else b).shape[0]) for b in data)
        sampler = getattr(data, "sampler", None)  # a DistributedSampler: this process's share
        if sampler is not None:
            return len(sampler)
        dataset = getattr(data, "dataset", None)
        return len(dataset) if dataset is not None else None
    except Exception:  # an unsized dataset, odd batches: not knowable cheaply
        return None


def iter_batches(data, num_images: int, device) -> Iterable[torch.Tensor]:
    """Input tensors from ``data`` (a tensor, or an iterable of tensors or of
    (input, ...) tuples), cut to ``num_images`` images in all."""
    if isinstance(data, torch.Tensor):
        data = [data]
    try:
        data = iter(data)
    except TypeError:
        raise TypeError(f"data must be a DataLoader, a list of batches or a tensor; got a {type(data).__name__}, "
                        "which is not iterable") from None
    seen = 0
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(x, dict):
            raise TypeError("dict batches are not supported; pass an iterable of tensors or (input, target) tuples")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"a batch must be a tensor or a tuple whose first item is the input tensor; got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError("a batch is a 0-d tensor; batches need a leading batch dimension (N, ...)")
        x = x[: num_images - seen]
        if x.shape[0] == 0:
            continue  # an empty batch (e.g. a filtered shard): the next ones still count
        seen += x.shape[0]
        yield x.to(device, non_blocking=True)
        if seen >= num_images:
            break
    if seen == 0:
        raise ValueError("data yielded no images; pass a non-empty DataLoader, list of batches or tensor")


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def progress_bar(total: int | None, desc: str, enabled: bool, unit: str = "img"):
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, disable=not enabled)


@torch.no_grad()
def feed(model: nn.Module, sinks: Mapping[nn.Module, list[Sink]], batches: Iterable[torch.Tensor], *,
         forward: Callable[[torch.Tensor], object] | None = None, stop_early: bool = True,
         bar=None, names: Mapping[nn.Module, str] | None = None) -> int:
    """Run ``forward`` (default ``model``) on every batch, handing each watched module's
    input to its sinks. Returns the number of images fed.

    The hooks are forward pre-hooks on the modules of ``sinks``; they are removed even
    when the forward fails. With ``stop_early`` the forward stops once every watched
    module has seen the batch."""
    forward = model if forward is None else forward
    wanted, seen, handles = set(map(id, sinks)), set(), []

    current = {}  # this batch's image keys, for every hook

    def make_hook(module, targets):
        def hook(_, args):
            keys = current["keys"]
            if keys is not None and args[0].shape[0] != keys.numel():
                keys = row_keys(keys, args[0].shape[0])  # rows are not images (RoI heads)
            for sink in targets:
                sink(args[0], keys)
            seen.add(id(module))
            if stop_early and seen >= wanted:
                raise StopForward
        return hook

    images = 0
    try:
        for module, targets in sinks.items():
            handles.append(module.register_forward_pre_hook(make_hook(module, targets)))
        with preserved_modes(model, train=False):
            for x in batches:
                x, current["keys"] = (x.value, x.keys) if isinstance(x, Keyed) else (x, image_keys(x))
                seen.clear()
                try:
                    forward(x)
                except StopForward:
                    pass
                if seen != wanted:
                    missing = sorted((names or {}).get(m, type(m).__name__) for m in sinks if id(m) not in seen)
                    raise RuntimeError(f"the forward pass never reached consumer(s) {missing}; "
                                       "is the unit list from this model?")
                n = batch_size(x)
                images += n
                if bar is not None:
                    bar.update(n)
    finally:
        for h in handles:
            h.remove()
    return images


def unit_accumulators(model: nn.Module, units: list[Unit], spec: StatsSpec,
                      first_index: int = 0) -> dict[str, StatsAccumulator]:
    """One accumulator per unit (producer fqn -> accumulator), unit j seeded with index j."""
    accs = {}
    for j, unit in enumerate(units, start=first_index):
        consumer = get_module(model, unit.consumer)
        weight = consumer.weight[:, :, None, None] if unit.tokens else consumer.weight
        gain = norm_gain(model, unit) if spec.through_norm else None
        if gain is not None:  # the Gram measures what the BatchNorm passes on
            weight = weight.detach() * gain.to(weight)[(slice(None),) + (None,) * (weight.dim() - 1)]
        accs[unit.producer] = spec.accumulator(weight, consumer_geometry(consumer, unit),
                                               channels=unit.channels, index=j)
    return accs


def norm_gain(model: nn.Module, unit: Unit) -> torch.Tensor | None:
    """|γ| / sqrt(var + ε) of the BatchNorm that alone reads the consumer's output
    (``unit.consumer_norm``), float64, or None without one: the factor by which each
    output channel's error reaches the next layer. Floored at 1e-6 of its largest entry,
    so that a fit scaled by it can be scaled back."""
    if unit.consumer_norm is None:
        return None
    bn = get_module(model, unit.consumer_norm)
    if getattr(bn, "running_var", None) is None:
        return None
    g = (bn.running_var.detach().double() + bn.eps).rsqrt()
    if bn.weight is not None:
        g = g * bn.weight.detach().double().abs()
    return g.clamp_min(1e-6 * float(g.max().clamp_min(torch.finfo(torch.float64).tiny)))


def unit_sink(unit: Unit, acc: StatsAccumulator) -> Sink:
    """What a unit's consumer hook calls with its input and the image keys."""
    if not unit.tokens:
        return acc.update
    return lambda x, keys: acc.update(tokens_as_map(x), keys)


def collect_units(model: nn.Module, units: list[Unit], batches: Iterable[torch.Tensor], spec: StatsSpec, *,
                  first_index: int = 0, forward=None, stop_early: bool = True, bar=None,
                  timer=None, extra: Mapping[str, Sink] | None = None) -> dict[str, Statistics]:
    """Statistics of ``units`` from already prepared ``batches`` (images, or cached
    activations with a matching ``forward``); the pipeline's entry point. With a
    :class:`~thinet_fast.pipeline.timing.Timings`, the hooks' time counts as
    "statistics" and the rest of the pass as "forward"."""
    if not units:
        return {}
    stats = _collect(model, unit_watch(model, units, spec, first_index), batches, forward, stop_early, bar, timer,
                     extra)
    for u in units:
        _finite(stats[u.producer], u.consumer)
    return stats


def collect_accumulators(model: nn.Module, readers, batches: Iterable[torch.Tensor], spec: StatsSpec, *,
                         bar=None, timer=None) -> dict:
    """Statistics at every reader of coupled groups (:class:`thinet_fast.groups.Reader`),
    keyed by ``reader.key``; reader j is seeded as unit j."""
    stats = _collect(model, reader_watch(readers, spec), batches, None, True, bar, timer)
    for r in readers:
        _finite(stats[r.key], r.name)
    return stats


def unit_watch(model: nn.Module, units: list[Unit], spec: StatsSpec, first_index: int = 0) -> list:
    """What a pass watches for ``units``: [(producer, consumer module, consumer fqn, accumulator, sink)]."""
    accs = unit_accumulators(model, units, spec, first_index)
    return [(u.producer, get_module(model, u.consumer), u.consumer, accs[u.producer], unit_sink(u, accs[u.producer]))
            for u in units]


def reader_watch(readers, spec: StatsSpec, first_index: int = 0) -> list:
    """What a pass watches for coupled-group readers: [(reader.key, module, fqn, accumulator, sink)]."""
    watched = []
    for j, r in enumerate(readers, start=first_index):
        acc = spec.accumulator(r.kernel(), r.geometry, channels=r.channels, index=j)
        sink = (lambda a: lambda x, keys: a.update(tokens_as_map(x), keys))(acc) if r.tokens else acc.update
        watched.append((r.key, r.module, r.name, acc, sink))
    return watched


def collect_watched(model: nn.Module, watched: list, batches: Iterable[torch.Tensor], *, bar=None,
                    timer=None) -> dict[Any, Statistics]:
    """One pass for watch lists joined from :func:`unit_watch`, :func:`reader_watch` and
    :func:`~thinet_fast.pipeline.heads.head_watch` (keys must not collide), each checked finite."""
    stats = _collect(model, watched, batches, None, True, bar, timer)
    for key, _, name, _, _ in watched:
        _finite(stats[key], name)
    return stats


def _collect(model, watched, batches, forward, stop_early, bar, timer, extra=None) -> dict:
    """One pass feeding ``watched`` = [(key, module, name, accumulator, sink)]."""
    sinks: dict[nn.Module, list[Sink]] = {}
    names = {}
    for _, m, name, _, sink in watched:
        sinks.setdefault(m, []).append(sink if timer is None else timer.timed("statistics", sink))
        names[m] = name
    for name, sink in (extra or {}).items():
        sinks.setdefault(get_module(model, name), []).append(sink if timer is None else timer.timed("statistics", sink))
    accs = [acc for _, _, _, acc, _ in watched]
    if timer is None:
        feed(model, sinks, batches, forward=forward, stop_early=stop_early, bar=bar, names=names)
        reduce_accumulators(accs)
        return {key: acc.result(release=True) for key, _, _, acc, _ in watched}
    hooks_before = timer.seconds["statistics"]
    t0 = time.perf_counter()
    feed(model, sinks, batches, forward=forward, stop_early=stop_early, bar=bar, names=names)
    timer.sync()
    timer.add("forward", time.perf_counter() - t0 - (timer.seconds["statistics"] - hooks_before))
    with timer.phase("statistics"):
        reduce_accumulators(accs)
        return {key: acc.result(release=True) for key, _, _, acc, _ in watched}


def _finite(stats: Statistics, consumer: str) -> Statistics:
    """Refuse statistics with NaN/Inf, naming the consumer, before anything uses them."""
    if not bool(torch.isfinite(stats.gram).all()):
        raise FloatingPointError(
            f"the statistics of consumer {consumer!r} contain NaN or Inf: the calibration batches or "
            "the model give non-finite activations there (check the inputs for NaN; fp16 overflow?)")
    return stats


def collect_statistics(model: nn.Module, units: list[Unit], data, spec: StatsSpec | None = None, *,
                       device=None, stop_early: bool = True, first_index: int = 0, progress: bool = False,
                       desc: str = "statistics", **spec_options) -> dict[str, Statistics]:
    """One pass over ``data`` that feeds every unit's consumer input to its accumulator.

    Pass a :class:`StatsSpec` or its fields as keywords (``statistics=``, ``num_images=``,
    ``samples_per_image=``, ``seed=``, ``acc_dtype=`` (alias ``dtype=``), ``backend=``, ``with_cov=``,
    ``count_zeros=``). Unit j draws its samples from seed ``seed·1000003 +
    first_index + j``. Returns producer fqn -> :class:`Statistics`. Under
    ``torch.distributed`` the buffers are summed across processes (each process should
    see different images).
    """
    if spec is not None and spec_options:
        raise TypeError(f"pass a StatsSpec or its fields as keywords, not both (got {sorted(spec_options)})")
    if "dtype" in spec_options:  # the older name
        if "acc_dtype" in spec_options:
            raise TypeError("collect_statistics: give acc_dtype= or its alias dtype=, not both")
        spec_options["acc_dtype"] = spec_options.pop("dtype")
    spec = spec if spec is not None else StatsSpec(**spec_options)
    device = torch.device(device) if device is not None else model_device(model)
    with progress_bar(spec.pass_images, desc, progress) as bar:
        return collect_units(model, units, iter_batches(data, spec.num_images, device), spec,
                             first_index=first_index, stop_early=stop_early, bar=bar)


def reduce_accumulators(accs: list[StatsAccumulator]) -> None:
    """Sum accumulators across processes when torch.distributed is initialised."""
    if world_size() == 1:
        return
    dist = torch.distributed
    for acc in accs:
        tensors = acc.tensors()
        for t in tensors:
            dist.all_reduce(t)
        acc.load_tensors(tensors)
        if acc.keeps_cov:  # held-out patches are gathered, not summed
            acc.load_held_patches(_all_gather_rows(acc.held_patches()))


def reduce_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` summed across processes (in place) when torch.distributed is initialised."""
    if world_size() > 1:
        for t in tensors:
            torch.distributed.all_reduce(t)
    return tensors


def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    dist = torch.distributed
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    most = int(max(int(s) for s in sizes))
    padded = torch.zeros((most,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])

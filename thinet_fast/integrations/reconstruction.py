"""ThiNet's least-squares reconstruction after a Torch-Pruning step.

Torch-Pruning cuts channels and leaves the kept weights as they were. This module gives
its users ThiNet's reconstruction back: every layer whose *input* channels the step
removed is refitted so that, on calibration images, its output on the pruned model's
input matches the unpruned model's output (He et al. 2017 "towards the unpruned
model"; the math is :mod:`thinet_fast.ops.cross`)::

    from thinet_fast.integrations.torch_pruning import reconstructing, thinet_pruner

    pruner = thinet_pruner(model, example, calib, pruning_ratio=0.5, ignored_layers=[model.fc])
    with reconstructing(model, calib) as rec:   # keeps an unpruned copy
        pruner.step()                           # any Torch-Pruning step, or group.prune()
    print(rec.report.table())                   # refitted on exit

or in two calls: ``snap = record(model)``; the step; ``reconstruct(model, snap, calib)``.

How it works:

* :func:`record` deep-copies the unpruned model. :func:`reconstruct` finds the cut
  layers by comparing weights (every ``Conv2d``/``Linear`` whose input width shrank):
  Torch-Pruning copies the kept weights bit for bit, so the kept rows and columns are
  where the values that occur once in the unpruned layer came from, and the match is
  verified exactly. Any pruner, importance or manual ``group.prune()`` works.
* Layers are refitted one at a time in forward order, each on the pruned model as the
  earlier refits left it (a forward of both models up to the layer, per layer). At the
  same keyed locations it sums ``P' = Σ z'z'ᵀ``, ``Q = Σ z'zᵀ``, ``P = Σ zzᵀ`` (the
  pruned input embedded at the kept channels), in a fit fold and a held-out fold
  (about one image in ``holdout_every``). Candidates: the plain cut, ThiNet's scales
  (:func:`~thinet_fast.ops.cross.scale_towards`) and the full refit of every kept tap
  (:func:`~thinet_fast.ops.cross.refit_towards`) over ``ridges`` (towards the cut
  weights), each fitted on the fit fold; the least held-out error wins and is refitted
  on all images. With few samples per unknown (2x2 maps) that is often a strong ridge,
  the scales or the cut itself.
* Biases are kept (the uncentred fit fits the mean too). Left as cut, and listed in
  the report with the reason: grouped and depthwise convs (each kept channel reads only
  its own group; no per-group refit), convs other than 2-D, non-zero padding modes,
  layers whose C·t exceeds ``max_cov_dim`` (three (C·t)² moments), layers whose forward
  is never called.
* Nothing changes on failure: weights are written in place (the same tensors, so an
  optimizer keeps them) and restored if anything raises, Ctrl-C included.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from ..modes import preserved_modes
from ..modules import get_module
from ..ops import cross
from ..ops.draws import keyed
from ..ops.match import kept_indices
from ..ops.patches import ConsumerGeometry, UnsupportedConsumer, tokens_as_map
from ..ops.reconstruct import RIDGES, _best_ridge
from ..ops.stats import HOLDOUT_EVERY, MAX_COV_DIM
from ..pipeline.collect import feed, iter_batches, model_device
from ..pipeline.target import CrossSink, paired_forward
from ..units import Unit

__all__ = ["Snapshot", "LayerFit", "ReconstructionReport", "record", "reconstruct", "reconstructing",
           "kept_indices", "RECONSTRUCTIONS"]

RECONSTRUCTIONS = ("auto", "full", "scale")


@dataclass
class Snapshot:
    """What :func:`reconstruct` needs from before the step: the unpruned model (a copy)."""

    reference: nn.Module


@dataclass
class LayerFit:
    """One cut layer: what was fitted, and its held-out error against the unpruned output
    (relative, ``‖y' - y‖² / ‖y‖²`` on the held-out calibration fold; None without one)."""

    name: str
    kind: str                     # "conv" | "linear"
    inputs: tuple[int, int]       # (kept, before the step)
    outputs: tuple[int, int]
    action: str                   # "full", "scale", "cut" (the plain cut scored best) or "skipped"
    ridge: Optional[float] = None
    error_cut: Optional[float] = None
    error_fit: Optional[float] = None
    samples: int = 0
    reason: str = ""


@dataclass
class ReconstructionReport:
    layers: list[LayerFit] = field(default_factory=list)

    @property
    def fitted(self) -> list[str]:
        return [f.name for f in self.layers if f.action in ("full", "scale")]

    @property
    def skipped(self) -> dict[str, str]:
        return {f.name: f.reason for f in self.layers if f.action == "skipped"}

    def table(self) -> str:
        num = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        rows = [("layer", "in", "out", "action", "ridge", "held err cut", "held err fit", "samples", "note")]
        rows += [(f.name, f"{f.inputs[0]}/{f.inputs[1]}", f"{f.outputs[0]}/{f.outputs[1]}", f.action, num(f.ridge),
                  num(f.error_cut), num(f.error_fit), str(f.samples), f.reason) for f in self.layers]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def record(model: nn.Module) -> Snapshot:
    """Call before the Torch-Pruning step: keeps an unpruned copy of ``model`` (eval mode,
    no gradients; it costs one model's memory until the snapshot is dropped)."""
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return Snapshot(reference)


# ----------------------------------------------------------------- statistics of one layer
def _as_map(module: nn.Module):
    """The layer's input as an (N, C, H, W) map and its geometry: a Linear reads like a
    1x1 conv over its positions (one for (N, F), L for tokens (N, ..., F))."""
    if isinstance(module, nn.Linear):
        return ConsumerGeometry.conv(1), lambda x: tokens_as_map(x.reshape(x.shape[0], -1, x.shape[-1]))
    return ConsumerGeometry.from_module(module), lambda x: x


class _Folds:
    """Pairs the unpruned input (``take_ref``) with the pruned one, embedded at the kept
    channels, and routes each image to the fit or the held-out :class:`CrossSink`.
    Batches are buffered (up to ``_BUFFER`` bytes) so that the (C·t)² moments are
    updated in a few large products: each update is a pass over three big matrices."""

    def __init__(self, unit: Unit, geometry, as_map, kept, seed: int, per_image, every: int):
        self.fit, self.held = (CrossSink(unit, geometry, seed, per_image) for _ in range(2))
        self.as_map, self.kept, self.C, self.seed, self.every = as_map, kept, unit.channels, seed, every
        self.ref, self.buffer, self.bytes = None, [], 0

    def take_ref(self, x):
        self.ref = self.as_map(x.detach())

    def update(self, x, keys):
        x = self.as_map(x.detach())
        full = x.new_zeros((x.shape[0], self.C) + tuple(x.shape[2:]))
        full[:, self.kept.to(x.device)] = x
        self.buffer.append((self.ref, full, keys))
        self.ref, self.bytes = None, self.bytes + 2 * full.numel() * full.element_size()
        if self.bytes > _BUFFER:
            self.flush()

    def flush(self):
        if not self.buffer:
            return
        ref, cur, keys = (torch.cat(parts) for parts in zip(*self.buffer))
        self.buffer, self.bytes = [], 0
        held = (keyed(keys, self.seed, "holdout", 1)[:, 0] % self.every == 0) if self.every \
            else torch.zeros(keys.numel(), dtype=torch.bool)
        for sink, m in ((self.fit, ~held), (self.held, held)):
            if bool(m.any()):
                sink.take_ref(ref[m.to(ref.device)])
                sink.update(cur[m.to(cur.device)], keys[m])


_BUFFER = 64 << 20


def _total(*sinks: CrossSink):
    """The moments (P', Q, P) and count of the sinks that saw images ((None, 0): none).
    Two are merged into the first one's matrices, in place (the (C·t)² matrices are
    the memory peak), as (P', Q, None): the fit needs no P."""
    seen = [s for s in sinks if s.moments is not None]
    if len(seen) < 2:
        return (seen[0].moments, seen[0].count) if seen else (None, 0)
    (P1, Q1, _), (P2, Q2, _) = seen[0].moments, seen[1].moments
    return (P1.add_(P2), Q1.add_(Q2), None), seen[0].count + seen[1].count


# ----------------------------------------------------------------- the fits
def _candidate(how, B: torch.Tensor, kept: torch.Tensor, moments) -> torch.Tensor:
    """The new weight (K, |S|, t), float64, of ``how``: ("cut", None), ("scale", None) or
    ("full", ridge), fitted on ``moments`` = (P', Q, P)."""
    kind, ridge = how
    P, Q, _ = moments
    if kind == "cut":
        return B[:, kept].clone()
    if kind == "scale":
        w = cross.scale_towards(cross.channel_gram(B, P), cross.channel_gram(B, Q), kept)
        return B[:, kept] * w.to(B.device)[None, :, None]
    return cross.refit_towards(B, P, Q, kept, ridge=ridge)


class _HeldOut:
    """``Σ‖A z'_S − B z‖² / Σ‖B z‖²`` on the held-out moments (z' pruned input, z
    unpruned), with the parts that do not depend on A formed once."""

    def __init__(self, B: torch.Tensor, kept: torch.Tensor, moments):
        P, Q, Pr = (m.double() for m in moments)
        K, t = B.shape[0], B.shape[2]
        taps = (kept[:, None] * t + torch.arange(t, device=kept.device)).reshape(-1)
        self.K, self.P_SS = K, P[taps][:, taps]
        self.QB = Q[taps] @ B.reshape(K, -1).T                          # Σ z'_S (B z)ᵀ
        self.yy = ((B.reshape(K, -1) @ Pr) * B.reshape(K, -1)).sum().clamp_min(torch.finfo(torch.float64).tiny)

    def __call__(self, A: torch.Tensor) -> float:
        A2 = A.reshape(self.K, -1)
        err = ((A2 @ self.P_SS) * A2).sum() - 2 * (A2 * self.QB.T).sum() + self.yy
        return float((err / self.yy).clamp_min(0))


def _choose(B, kept, fit, held, reconstruction: str, ridges):
    """(candidate, held-out error of the cut, of the candidate): every candidate is fitted
    on the fit fold and scored on the held-out one (no choice to make: no scores needed)."""
    pool = {"auto": [("cut", None), ("scale", None)], "full": [], "scale": [("scale", None)]}[reconstruction]
    full = [] if reconstruction == "scale" else [r for r in ridges if reconstruction == "full" or r != float("inf")]
    n = len(pool) + len(full)
    if held is None or fit is None:
        if n > 1:
            raise ValueError("no calibration image fell in the held-out fold (or all did), so the fit cannot be "
                             "chosen: pass more images, or reconstruction='full' with a single ridge")
        return (pool or [("full", full[0])])[0], None, None
    error = _HeldOut(B, kept, held)

    def score(how):
        return error(_candidate(how, B, kept, fit))

    err_cut = score(("cut", None))
    scored = [(err_cut if how[0] == "cut" else score(how), how) for how in pool]
    if full:  # strongest ridge first; the held-out error is unimodal in log ridge in practice
        r, e = _best_ridge(full, lambda r: score(("full", r)), default=full[-1])
        scored.append((e, ("full", r)))
    e, how = min(scored, key=lambda s: s[0])
    return how, err_cut, e


def _check(num_images, samples_per_image, reconstruction, ridges, holdout_every) -> None:
    if reconstruction not in RECONSTRUCTIONS:
        raise ValueError(f"reconstruction={reconstruction!r} is not one of {RECONSTRUCTIONS}")
    if int(num_images) < 1:
        raise ValueError(f"num_images must be >= 1; got {num_images}")
    if samples_per_image is not None and int(samples_per_image) < 1:
        raise ValueError(f"samples_per_image must be >= 1 or None (every location); got {samples_per_image}")
    if not ridges or any(not r >= 0 for r in ridges):
        raise ValueError(f"ridges must be non-empty and >= 0 (inf: the cut weights); got {ridges}")
    if holdout_every < 0 or holdout_every == 1:
        raise ValueError(f"holdout_every must be 0 (no held-out fold) or >= 2; got {holdout_every}")


# ----------------------------------------------------------------- the layers
def _width(m: nn.Module) -> tuple[int, int]:
    return (m.in_features, m.out_features) if isinstance(m, nn.Linear) else (m.in_channels, m.out_channels)


def _kind(m: nn.Module) -> str:
    return "linear" if isinstance(m, nn.Linear) else "conv"


def _cut_layers(model: nn.Module, reference: nn.Module, max_cov_dim: int):
    """([(name, module, reference module, rows, cols)] to refit, [LayerFit] left as cut).
    Every match is made here, before any weight is written."""
    todo, skipped = [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        try:
            ref = get_module(reference, name)
        except (KeyError, AttributeError):
            continue
        if type(ref) is not type(mod) or _width(mod)[0] == _width(ref)[0]:
            continue  # not a layer whose inputs the step cut
        kind, io = _kind(mod), tuple(zip(_width(mod), _width(ref)))
        reason = ""
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            reason = f"a {type(mod).__name__}: only Conv2d and Linear are refitted"
        elif kind == "conv" and mod.groups > 1:
            reason = f"grouped conv (groups={mod.groups}): left as cut, each kept channel reads only its group"
        else:
            try:
                taps = _as_map(mod)[0].taps
            except UnsupportedConsumer as exc:
                taps, reason = 0, str(exc)
            if not reason and _width(ref)[0] * taps > max_cov_dim:
                reason = f"C·t = {_width(ref)[0] * taps} > max_cov_dim = {max_cov_dim}: left as cut"
        if reason:
            skipped.append(LayerFit(name, kind, *io, action="skipped", reason=reason))
            continue
        try:
            rows, cols = kept_indices(ref.weight, mod.weight)
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc}") from None
        todo.append((name, mod, ref, rows, cols))
    return todo, skipped


def _forward_order(model: nn.Module, modules, data, device) -> list:
    """The modules in the order one image's forward calls them (those it never calls,
    e.g. an attention's out_proj read as a parameter, are missing)."""
    order = []
    handles = [m.register_forward_pre_hook(lambda mod, args: order.append(mod)) for m in modules]
    try:
        with preserved_modes(model, train=False):
            model(next(iter(iter_batches(data, 1, device))))
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


def _refit(model, reference, name, mod, ref, rows, cols, data, opts) -> LayerFit:
    geometry, as_map = _as_map(mod)
    C0, t = _width(ref)[0], geometry.taps
    unit = Unit(producer=name, followers=(), consumer=name, channels=C0, taps=t, consumer_kind="conv",
                kernel_size=geometry.kernel_size, stride=geometry.stride, padding=geometry.padding,
                dilation=geometry.dilation)
    dev = mod.weight.device
    per_image = None if isinstance(mod, nn.Linear) else opts["samples_per_image"]  # a Linear: every position
    folds = _Folds(unit, geometry, as_map, cols, opts["seed"], per_image, opts["holdout_every"])
    with preserved_modes(reference, train=False):
        feed(model, {mod: [folds.update]}, iter_batches(data, opts["num_images"], dev),
             forward=paired_forward(reference, unit, folds, model), names={mod: name})
    folds.flush()
    (fit, _), (held, _) = _total(folds.fit), _total(folds.held)
    B = ref.weight.detach().to(dev).reshape(ref.weight.shape[0], C0, t).double()[rows.to(dev)]
    kept = cols.to(dev)
    how, err_cut, err_fit = _choose(B, kept, fit, held, opts["reconstruction"], opts["ridges"])
    total, count = _total(folds.fit, folds.held)  # after the choice: it overwrites the fit fold
    A = _candidate(how, B, kept, total)
    if not bool(torch.isfinite(A).all()):
        raise FloatingPointError(f"the refit of {name!r} is not finite; check the calibration data")
    mod.weight.copy_(A.reshape(mod.weight.shape).to(mod.weight.dtype))
    action = "cut" if how[0] == "cut" or how[1] == float("inf") else how[0]
    return LayerFit(name, _kind(mod), *zip(_width(mod), _width(ref)), action=action, ridge=how[1],
                    error_cut=err_cut, error_fit=err_fit, samples=count)


@torch.no_grad()
def reconstruct(model: nn.Module, snapshot, data, *, num_images: int = 256, samples_per_image: Optional[int] = 10,
                reconstruction: str = "auto", ridges: Sequence[float] = RIDGES, holdout_every: int = HOLDOUT_EVERY,
                seed: int = 0, max_cov_dim: int = MAX_COV_DIM) -> ReconstructionReport:
    """Refit every layer of ``model`` whose input channels were cut since ``snapshot``
    (a :class:`Snapshot` from :func:`record`, or the unpruned model itself) towards the
    unpruned output, in place. Returns the per-layer report.

    Args:
        data: calibration batches (a tensor, or a re-iterable list/DataLoader of tensors
            or ``(input, target, ...)`` tuples): iterated once per refitted layer.
        num_images: images used per layer.
        samples_per_image: locations per image for a conv (None: every location); a
            Linear uses every position.
        reconstruction: "auto" (the cut, the scales or the full refit, whichever has the
            least held-out error), "full" (the full refit, its ridge chosen held-out when
            ``ridges`` has several) or "scale" (ThiNet's per-channel scales only).
        ridges: relative ridges of the full refit (strongest first), towards the cut
            weights; ``inf`` is the cut itself.
        holdout_every: about one image in n is held out to choose (0: none; then a
            single candidate is required).
        seed: seeds the locations and the fold.
        max_cov_dim: layers with C·t above it are left as cut (three (C·t)² moments).
    """
    _check(num_images, samples_per_image, reconstruction, ridges, holdout_every)
    if not isinstance(data, torch.Tensor) and iter(data) is data:
        raise TypeError("data is a one-shot iterator; it is read once per refitted layer. Pass a list of batches, "
                        "a tensor or a DataLoader.")
    reference = snapshot.reference if isinstance(snapshot, Snapshot) else snapshot
    if reference is model:
        raise ValueError("snapshot is the pruned model itself; call record(model) before the Torch-Pruning step")
    todo, skipped = _cut_layers(model, reference, int(max_cov_dim))
    opts = dict(num_images=int(num_images), samples_per_image=samples_per_image, seed=int(seed), ridges=tuple(ridges),
                holdout_every=int(holdout_every), reconstruction=reconstruction)
    fits = []
    if todo:
        by_module = {entry[1]: entry for entry in todo}
        order = _forward_order(model, list(by_module), data, model_device(model))
        skipped += [LayerFit(e[0], _kind(m), *zip(_width(m), _width(e[2])), action="skipped",
                             reason="its forward is never called: left as cut")
                    for m, e in by_module.items() if m not in order]
        backup = [(mod, mod.weight.detach().clone()) for _, mod, *_ in todo]
        try:
            for mod in order:
                name, _, ref, rows, cols = by_module[mod]
                fits.append(_refit(model, reference, name, mod, ref, rows, cols, data, opts))
        except BaseException:  # Ctrl-C included: the model comes back as the step left it
            for mod, w in backup:
                mod.weight.copy_(w)
            raise
    return ReconstructionReport(fits + skipped)


@dataclass
class Reconstructing:
    """What :func:`reconstructing` yields: the snapshot, and the report after the block."""

    snapshot: Snapshot
    report: Optional[ReconstructionReport] = None


@contextlib.contextmanager
def reconstructing(model: nn.Module, data, **options):
    """``with reconstructing(model, data) as rec: pruner.step()``: records the model on
    entry and calls :func:`reconstruct` (with ``options``) when the block ends without an
    exception; ``rec.report`` then holds the report. Options are checked on entry."""
    bound = inspect.signature(reconstruct).bind(model, None, data, **options)  # a misspelt option fails here
    bound.apply_defaults()
    _check(*(bound.arguments[k] for k in ("num_images", "samples_per_image", "reconstruction", "ridges",
                                          "holdout_every")))
    session = Reconstructing(record(model))
    yield session
    session.report = reconstruct(model, session.snapshot, data, **options)

"""Readers refitted after a cut, towards what they computed before it.

When a cut changes what the kept channels look like to their readers (a LayerNorm over
a transformer's residual stream renormalises the kept channels in every token), the
statistics taken before the cut no longer describe the readers' input. So the group is
cut first; then one pass runs the model from before the cut (``before``) and the cut one
(``after``) on the same images and, at every reader, sums the moments of its input after
(z', a constant 1 appended: the bias) and before (z), every token a sample. Each reader
is refitted so that ``Θ z' ≈ W z`` (:func:`~thinet_fast.ops.cross.refit_across`): its
output on the cut model approaches its output on the uncut one, on the inputs it will
see. Readers are Linear layers and attention's input projection (``nn.MultiheadAttention``
/ :class:`~thinet_fast.attention.HeadPrunedAttention`: queries, keys and values, fitted
once when they are one tensor, as in self-attention).

As elsewhere (DESIGN §5), about one image in ``holdout`` (by its key) also goes to a
held-out fold: the ridge is chosen on it among :data:`~thinet_fast.ops.reconstruct.RIDGES`
(``inf`` keeps the cut's own weights, so a refit never scores worse there than the cut),
and the reported error is the fold's. Without a fold, a reader with fewer than twice as
many samples as unknowns keeps the cut's weights (a refit would interpolate them).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ..attention import HeadPrunedAttention
from ..modes import preserved_modes
from ..ops.cross import across_error, refit_across
from ..ops.draws import image_keys, keyed
from ..ops.reconstruct import RIDGES
from ..units import get_module
from .collect import Keyed, StopForward, reduce_tensors

__all__ = ["refit_readers"]

_ATTENTION = (nn.MultiheadAttention, HeadPrunedAttention)


class _Moments:
    """Σ z'z'ᵀ, Σ z'zᵀ, Σ zzᵀ of one reader input (a 1 appended to both), float64: over
    every sample (``P, Q, R``) and over the held-out fold (``held``)."""

    def __init__(self):
        self.P = self.Q = self.R = None
        self.held = None
        self.samples = 0

    def update(self, cur: torch.Tensor, ref: torch.Tensor, held: torch.Tensor | None) -> None:
        zc, zr = _augmented(cur), _augmented(ref)
        if zc.shape[0] != zr.shape[0]:
            raise RuntimeError(f"a reader saw {zc.shape[0]} tokens after the cut and {zr.shape[0]} before it")
        self.samples += zc.shape[0]
        moments = [zc.T @ zc, zc.T @ zr, zr.T @ zr]
        if self.P is None:
            self.P, self.Q, self.R = moments
            self.held = [torch.zeros_like(m) for m in moments]
        else:
            self.P += moments[0]
            self.Q += moments[1]
            self.R += moments[2]
        if held is not None and bool(held.any()):
            hc, hr = zc[held], zr[held]
            for acc, m in zip(self.held, (hc.T @ hc, hc.T @ hr, hr.T @ hr)):
                acc += m

    def tensors(self) -> list[torch.Tensor]:
        return [self.P, self.Q, self.R] + self.held


def _augmented(x: torch.Tensor) -> torch.Tensor:
    z = x.detach().reshape(-1, x.shape[-1]).double()
    return torch.cat([z, z.new_ones(z.shape[0], 1)], 1)


def _held_rows(x: torch.Tensor, module, held_images: torch.Tensor | None) -> torch.Tensor | None:
    """Per row of ``x`` flattened to (samples, C): whether its image is held out; None
    when the rows cannot be told apart by image (then they all fit)."""
    if held_images is None:
        return None
    n = held_images.numel()
    axis = 1 if isinstance(module, _ATTENTION) and not module.batch_first and x.dim() == 3 else 0
    if x.dim() < 2 or x.shape[axis] != n:
        return None
    shape = [1] * (x.dim() - 1)
    shape[axis] = n
    return held_images.to(x.device).view(shape).expand(x.shape[:-1]).reshape(-1)


def _inputs(module, args, kwargs) -> tuple:
    """The tensors a reader reads: (x,) for a Linear; (query, key, value) for attention,
    or (query,) when the three are one tensor."""
    if not isinstance(module, _ATTENTION):
        return (args[0],)
    names = ("query", "key", "value")
    qkv = tuple(args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names))
    return qkv[:1] if qkv[1] is qkv[0] and qkv[2] is qkv[0] else qkv


def _weights(module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) per input of :func:`_inputs` (attention: q, k, v rows)."""
    if not isinstance(module, _ATTENTION):
        return [(module.weight, module.bias)]
    w, b = module.in_proj_weight, module.in_proj_bias
    parts = list(zip(w.chunk(3), (None,) * 3 if b is None else b.chunk(3)))
    return parts + [(w, b)]  # the last: all three rows, for one shared input


def _with_bias(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    w = w.detach().double()
    return torch.cat([w, (w.new_zeros(w.shape[0]) if b is None else b.detach().double())[:, None]], 1)


@torch.no_grad()
def refit_readers(before: nn.Module, after: nn.Module, names: list[str], batches: Callable[[], Iterable], *,
                  reconstruction: str = "full", ridge: float, bias_compensation: bool = True, holdout: int = 5,
                  seed: int = 0, bar=None) -> dict[str, tuple[float, float, float]]:
    """Refit the readers ``names`` of ``after`` in place (see the module docstring), one
    at a time in the order the forward reaches them, each on a pass over ``batches()``
    (a fresh iterable per call) that stops at it: a reader sees its input as the readers
    before it were refitted. Returns per reader ``(error of the cut weights, error after
    the refit, ‖y_before‖²)``, the errors ``‖y_after − y_before‖² / ‖y_before‖²``;
    ``reconstruction="none"`` measures without refitting."""
    out = {}
    for name in _forward_order(before, names, batches()):
        pairs, moments = _moments(before, after, [name], batches(), holdout, seed, bar)
        out[name] = _fit(name, *pairs[name], moments[name], reconstruction, ridge, bias_compensation)
    return out


def _forward_order(model: nn.Module, names: list[str], batches: Iterable) -> list[str]:
    order: list[str] = []

    def hook(name):
        def f(module, args):
            if name not in order:
                order.append(name)
            if len(order) == len(names):
                raise StopForward
        return f
    handles = [get_module(model, n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with preserved_modes(model, train=False):
            for x in batches:
                try:
                    model(x.value if isinstance(x, Keyed) else x)
                except StopForward:
                    pass
                break
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(names) - set(order))
    if missing:
        raise RuntimeError(f"the forward pass never reached reader(s) {missing}")
    return order


def _moments(before, after, names, batches, holdout, seed, bar):
    """One pass of both models: the moments of every reader in ``names``."""
    pairs = {n: (get_module(before, n), get_module(after, n)) for n in names}
    stash: dict[str, list] = {n: [] for n in names}
    moments: dict[str, list[_Moments]] = {}
    seen: set[str] = set()

    def teacher_hook(name):
        def hook(module, args, kwargs):
            stash[name].append(_inputs(module, args, kwargs))
            seen.add(name)
            if len(seen) == len(names):
                raise StopForward
        return hook

    def student_hook(name):
        def hook(module, args, kwargs):
            cur = _inputs(module, args, kwargs)
            if not stash[name]:
                raise RuntimeError(f"`{name}` ran more often on the cut model than on the model before the cut")
            ref = stash[name].pop(0)
            if len(ref) != len(cur):
                raise RuntimeError(f"`{name}`'s queries, keys and values are one tensor on one model only")
            accs = moments.setdefault(name, [_Moments() for _ in cur])
            for acc, c, r in zip(accs, cur, ref):
                acc.update(c, r, _held_rows(c, module, held_now[0]))
            seen.add(name)
            if len(seen) == len(names):
                raise StopForward
        return hook

    handles, held_now = [], [None]
    try:
        for n, (t, s) in pairs.items():
            handles.append(t.register_forward_pre_hook(teacher_hook(n), with_kwargs=True))
            handles.append(s.register_forward_pre_hook(student_hook(n), with_kwargs=True))
        with preserved_modes(before, train=False), preserved_modes(after, train=False):
            for x in batches:
                x, keys = (x.value, x.keys) if isinstance(x, Keyed) else (x, image_keys(x))
                held_now[0] = None if not holdout or keys is None else \
                    keyed(keys, seed, "holdout", 1)[:, 0] % holdout == 0
                for model in (before, after):
                    seen.clear()
                    try:
                        model(x)
                    except StopForward:
                        pass
                    if len(seen) != len(names):
                        missing = sorted(set(names) - seen)
                        raise RuntimeError(f"the forward pass never reached reader(s) {missing}")
                for n in names:
                    stash[n].clear()
                if bar is not None:
                    bar.update(int(x.shape[0]))
    finally:
        for h in handles:
            h.remove()
    for accs in moments.values():
        for acc in accs:
            acc.P, acc.Q, acc.R, *acc.held = reduce_tensors(acc.tensors())
    return pairs, moments


def _solve(W, acc: _Moments, prior, ridge: float, with_bias: bool, refit: bool = True
           ) -> tuple[torch.Tensor, float, float]:
    """The refit with its ridge chosen on the held-out fold; (Θ, error of the prior,
    error of Θ), on the fold when there is one. ``refit=False``: Θ is the prior."""
    k = None if with_bias else -1  # without a bias the student's constant feature is left out
    P, Q, R = acc.P[:k, :k], acc.Q[:k], acc.R
    hP, hQ, hR = acc.held[0][:k, :k], acc.held[1][:k], acc.held[2]
    n_held = float(acc.held[2][-1, -1])  # the constant's square summed: the held-out samples
    unknowns = P.shape[0]
    if not refit:
        fold = (hP, hQ, hR) if 0 < n_held < acc.samples else (P, Q, R)
        e = across_error(prior, W, *fold)
        return prior.double(), e, e
    if 0 < n_held < acc.samples:
        fit = [M - H for M, H in zip((P, Q, R), (hP, hQ, hR))]
        best, best_err = None, None
        for r in tuple(x for x in RIDGES if x > ridge) + (ridge,):
            theta = prior.double() if r == float("inf") else refit_across(W, *fit, prior, ridge=r)[0]
            e = across_error(theta, W, hP, hQ, hR)
            if best_err is None or e < best_err:
                best, best_err = r, e
        theta = prior.double() if best == float("inf") else refit_across(W, P, Q, R, prior, ridge=best)[0]
        return theta, across_error(prior, W, hP, hQ, hR), best_err
    if acc.samples < 2 * unknowns:  # nothing to choose a ridge on, and a refit would interpolate
        e = across_error(prior, W, P, Q, R)
        return prior.double(), e, e
    return refit_across(W, P, Q, R, prior, ridge=ridge)


def _fit(name, teacher, student, accs, reconstruction, ridge, bias_compensation) -> tuple[float, float, float]:
    ref_parts, cur_parts = _weights(teacher), _weights(student)
    if len(accs) == 1 and isinstance(student, _ATTENTION):
        ref_parts, cur_parts = ref_parts[-1:], cur_parts[-1:]
    else:
        ref_parts, cur_parts = ref_parts[:len(accs)], cur_parts[:len(accs)]
    fits, errors = [], [0.0, 0.0, 0.0]
    for acc, (w, b), (ws, bs) in zip(accs, ref_parts, cur_parts):
        with_bias = bs is not None or bias_compensation  # else the constant stays out: no bias to put it in
        prior = _with_bias(ws, bs) if with_bias else ws.detach().double()
        Wt = _with_bias(w, b)
        theta, e0, e1 = _solve(Wt, acc, prior, ridge, with_bias, refit=reconstruction != "none")
        energy = float((Wt @ acc.R * Wt).sum())
        fits.append((theta, with_bias))
        errors = [errors[0] + e0 * energy, errors[1] + e1 * energy, errors[2] + energy]
    _write(student, fits, len(accs) == 1 and isinstance(student, _ATTENTION))
    total = errors[2] or 1.0
    return errors[0] / total, errors[1] / total, errors[2]


def _write(module, fits, shared: bool) -> None:
    if not isinstance(module, _ATTENTION):
        (theta, with_bias), = fits
        _set(module, "weight", "bias", theta, with_bias)
        return
    theta = torch.cat([t for t, _ in fits]) if not shared else fits[0][0]
    _set(module, "in_proj_weight", "in_proj_bias", theta, fits[0][1])


def _set(module, wname: str, bname: str, theta: torch.Tensor, with_bias: bool) -> None:
    w = getattr(module, wname)
    n = w.shape[1]
    w.copy_(theta[:, :n].to(w))
    if not with_bias:
        return
    b = getattr(module, bname)
    if b is None:  # bias compensation: the reader gains one
        setattr(module, bname, nn.Parameter(theta[:, n].to(w).clone()))
    else:
        b.copy_(theta[:, n].to(b))

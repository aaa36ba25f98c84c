"""Physically cut a model down: one walker, :func:`prune_unit_`.

Given a :class:`~thinet_fast.units.Unit` and the sorted channel indices ``keep``, the
walker replaces

- the producer by a smaller ``Conv2d``/``Linear`` (rows ``keep``),
- every stateful follower by a smaller one (BatchNorm: affine and running stats;
  depthwise conv; per-channel PReLU),
- the consumer by one that reads only the kept channels (``Conv2d``: ``weight[:, keep]``;
  ``Linear`` after flatten: columns ``c*t + u`` for ``c`` in ``keep``; ``Linear`` after
  global pooling: columns ``keep``), or by the caller's reconstructed weight/bias.

New modules are plain ``nn.Conv2d``/``nn.Linear``/``nn.BatchNorm*`` of the same dtype
and device, in the same train/eval mode, so the result runs, trains, saves, exports to
ONNX and compiles like any model. Hooks and parametrizations registered on the replaced
modules are not carried over.

This module knows modules, not math: the pipeline computes ``keep`` and the consumer's
new weights; this module only slices and swaps.
"""
from __future__ import annotations

import copy
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .units import Unit, UnitPlan, get_module, set_module

__all__ = ["prune_unit_", "prune_units", "check_keep"]

KeepLike = Union[torch.Tensor, Sequence[int]]


def check_keep(keep: KeepLike, channels: int, who: str = "keep") -> torch.Tensor:
    """Validate channel indices and return them as a 1-D int64 CPU tensor.

    ``keep`` must be non-empty, integer, 1-D, sorted ascending without repeats, and in
    ``[0, channels)``. Errors say what is wrong and how to fix it.
    """
    if not isinstance(keep, torch.Tensor):
        try:
            keep = torch.as_tensor(list(keep))
        except Exception as exc:
            raise TypeError(f"{who}: expected a 1-D tensor of channel indices, got {type(keep).__name__}") from exc
    if keep.dtype == torch.bool:
        raise TypeError(f"{who}: got a boolean mask; pass indices instead: mask.nonzero().flatten()")
    if keep.is_floating_point() or keep.is_complex():
        raise TypeError(f"{who}: channel indices must be integers, got dtype {keep.dtype}")
    if keep.dim() != 1:
        raise ValueError(f"{who}: expected a 1-D tensor of channel indices, got shape {tuple(keep.shape)}")
    if keep.numel() == 0:
        raise ValueError(f"{who}: keeps no channel; a layer needs at least one")
    keep = keep.detach().to(device="cpu", dtype=torch.int64)
    lo, hi = int(keep.min()), int(keep.max())
    if lo < 0 or hi >= channels:
        raise ValueError(f"{who}: indices must lie in [0, {channels}), got min {lo}, max {hi}")
    d = keep[1:] - keep[:-1]
    if bool((d == 0).any()):
        raise ValueError(f"{who}: repeated channel indices; use torch.unique(keep)")
    if bool((d < 0).any()):
        raise ValueError(f"{who}: indices must be sorted ascending; use keep.sort().values "
                         "(and order any consumer_weight columns the same way)")
    return keep


# --------------------------------------------------------------------------- builders
def _param(t: torch.Tensor, like: Optional[nn.Parameter]) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=True if like is None else like.requires_grad)


def _new_conv(old: nn.Conv2d, in_ch: int, out_ch: int, groups: int,
              weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Conv2d:
    # Build on meta (no init cost), then attach the real tensors.
    new = nn.Conv2d(in_ch, out_ch, old.kernel_size, stride=old.stride, padding=old.padding,
                    dilation=old.dilation, groups=groups, bias=bias is not None,
                    padding_mode=old.padding_mode, device="meta", dtype=old.weight.dtype)
    new.weight = _param(weight, old.weight)
    if bias is not None:
        new.bias = _param(bias, old.bias if old.bias is not None else old.weight)
    new.train(old.training)
    return new


def _new_linear(old: nn.Linear, in_f: int, out_f: int,
                weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    new = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=old.weight.dtype)
    new.weight = _param(weight, old.weight)
    if bias is not None:
        new.bias = _param(bias, old.bias if old.bias is not None else old.weight)
    new.train(old.training)
    return new


def _new_bn(old: nn.modules.batchnorm._BatchNorm, keep: torch.Tensor) -> nn.Module:
    dtype = next((t.dtype for t in (old.weight, old.running_mean) if t is not None), None)
    new = type(old)(keep.numel(), eps=old.eps, momentum=old.momentum, affine=old.affine,
                    track_running_stats=old.track_running_stats, device="meta", dtype=dtype)
    if old.affine:
        new.weight = _param(old.weight.index_select(0, keep.to(old.weight.device)), old.weight)
        new.bias = _param(old.bias.index_select(0, keep.to(old.bias.device)), old.bias)
    if old.track_running_stats:
        k = keep.to(old.running_mean.device)
        new.running_mean = old.running_mean.index_select(0, k)
        new.running_var = old.running_var.index_select(0, k)
        new.num_batches_tracked = old.num_batches_tracked.clone()
    new.train(old.training)
    return new


def _new_prelu(old: nn.PReLU, keep: torch.Tensor) -> nn.PReLU:
    new = nn.PReLU(keep.numel(), device="meta", dtype=old.weight.dtype)
    new.weight = _param(old.weight.index_select(0, keep.to(old.weight.device)), old.weight)
    new.train(old.training)
    return new


# --------------------------------------------------------------------------- checks
def _stale(unit: Unit, fqn: str, what: str) -> ValueError:
    return ValueError(
        f"unit `{unit.producer}` is stale: `{fqn}` {what}, but the unit was found with "
        f"{unit.channels} channels (t={unit.taps}); re-run find_units on the current model"
    )


# The width prune_unit_ checks on a unit's producer / consumer, by (role, kind is "conv"):
# (attribute, how a mismatch reads, whether the expected width is channels * taps rather
# than channels: a Linear consumer reads the channel-major flatten).
_WIDTH = {
    ("producer", True): ("out_channels", "has {} output channels", False),
    ("producer", False): ("out_features", "has {} output features", False),
    ("consumer", True): ("in_channels", "reads {} channels", False),
    ("consumer", False): ("in_features", "reads {} features", True),
}


def _checked_module(model: nn.Module, unit: Unit, role: str) -> nn.Module:
    """The producer or consumer (``role``) of ``unit`` in ``model``, checked against the
    unit's kind (nn.Conv2d with groups=1, else nn.Linear) and its width."""
    fqn, kind = (unit.producer, unit.producer_kind) if role == "producer" else (unit.consumer, unit.consumer_kind)
    m = get_module(model, fqn)
    if kind == "conv":
        if type(m) is not nn.Conv2d or m.groups != 1:
            raise TypeError(f"{role} `{fqn}` is a {type(m).__name__}, expected nn.Conv2d with groups=1")
    elif type(m) is not nn.Linear:
        raise TypeError(f"{role} `{fqn}` is a {type(m).__name__}, expected nn.Linear")
    attr, what, times_taps = _WIDTH[role, kind == "conv"]
    width = getattr(m, attr)
    if width != unit.channels * (unit.taps if times_taps else 1):
        raise _stale(unit, fqn, what.format(width))
    return m


def _as_weight(w: torch.Tensor, unit: Unit, consumer: nn.Module, n: int) -> torch.Tensor:
    """Shape-check a caller's consumer weight and cast it to the consumer's dtype/device."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"consumer_weight for `{unit.consumer}` must be a Tensor, got {type(w).__name__}")
    K = consumer.weight.shape[0]
    t = unit.taps
    if unit.consumer_kind == "conv":
        kh, kw = consumer.kernel_size
        want = (K, n, kh, kw)
        ok = tuple(w.shape) in (want, (K, n * t), (K, n, t))
    else:
        want = (K, n * t)
        ok = tuple(w.shape) in (want, (K, n, t))
    if not ok:
        raise ValueError(f"consumer_weight for `{unit.consumer}` has shape {tuple(w.shape)}, expected {want} "
                         f"(K={K} outputs, {n} kept channels, t={t} taps)")
    if not w.is_floating_point():
        raise TypeError(f"consumer_weight for `{unit.consumer}` must be floating point, got {w.dtype}")
    w = w.detach().reshape(want).to(device=consumer.weight.device, dtype=consumer.weight.dtype).clone()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"consumer_weight for `{unit.consumer}` has NaN/inf entries")
    return w


def _as_bias(b: torch.Tensor, unit: Unit, consumer: nn.Module) -> torch.Tensor:
    K = consumer.weight.shape[0]
    if not isinstance(b, torch.Tensor) or tuple(b.shape) != (K,):
        shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
        raise ValueError(f"consumer_bias for `{unit.consumer}` must have shape ({K},), got {shape}")
    b = b.detach().to(device=consumer.weight.device, dtype=consumer.weight.dtype).clone()
    if not bool(torch.isfinite(b).all()):
        raise ValueError(f"consumer_bias for `{unit.consumer}` has NaN/inf entries")
    return b


# --------------------------------------------------------------------------- the walker
@torch.no_grad()
def prune_unit_(
    model: nn.Module,
    unit: Unit,
    keep: KeepLike,
    consumer_weight: Optional[torch.Tensor] = None,
    consumer_bias: Optional[torch.Tensor] = None,
) -> nn.Module:
    """Prune one unit of ``model`` **in place** and return ``model``.

    Args:
        model: the model to edit (the caller decides whether to copy it first).
        unit: a unit from :func:`~thinet_fast.units.find_units` on this model (or a copy).
        keep: sorted, unique int64 indices of the producer channels to keep.
        consumer_weight: optional replacement consumer weight for the kept channels:
            conv ``(K, n, kh, kw)`` (``(K, n*kh*kw)`` and ``(K, n, kh*kw)`` accepted),
            Linear ``(K, n*t)`` (``(K, n, t)`` accepted), with n = ``len(keep)``. Default:
            slice the existing weight.
        consumer_bias: optional replacement consumer bias ``(K,)``. For a consumer
            without a bias it is folded into the BatchNorm that alone reads the
            consumer (``unit.consumer_norm``: its running mean drops by the bias, exact
            in eval and training); without such a BatchNorm the consumer gets a bias.

    Everything is validated before the first module is replaced, so an error leaves the
    model untouched.
    """
    if not isinstance(unit, Unit):
        raise TypeError(f"prune_unit_: expected a Unit, got {type(unit).__name__}")
    keep = check_keep(keep, unit.channels, f"keep for `{unit.producer}`")
    n = keep.numel()

    # ---- resolve and check the modules against the unit
    prod = _checked_module(model, unit, "producer")
    cons = _checked_module(model, unit, "consumer")

    new_w = _as_weight(consumer_weight, unit, cons, n) if consumer_weight is not None else None
    new_b = _as_bias(consumer_bias, unit, cons) if consumer_bias is not None else None

    replacements: list[tuple[str, nn.Module]] = []
    for fqn in unit.followers:
        m = get_module(model, fqn)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.num_features != unit.channels:
                raise _stale(unit, fqn, f"has {m.num_features} features")
            replacements.append((fqn, _new_bn(m, keep)))
        elif isinstance(m, nn.Conv2d):  # depthwise follower
            if not (m.groups == m.in_channels == m.out_channels == unit.channels):
                raise _stale(unit, fqn, f"is not depthwise over {unit.channels} channels "
                                        f"(groups={m.groups}, in={m.in_channels}, out={m.out_channels})")
            k = keep.to(m.weight.device)
            replacements.append((fqn, _new_conv(
                m, n, n, n, m.weight.index_select(0, k),
                None if m.bias is None else m.bias.index_select(0, k))))
        elif isinstance(m, nn.PReLU) and m.num_parameters > 1:
            if m.num_parameters != unit.channels:
                raise _stale(unit, fqn, f"has {m.num_parameters} slopes")
            replacements.append((fqn, _new_prelu(m, keep)))
        # stateless followers (activations, pooling, dropout, flatten) need no change

    # ---- producer: keep rows
    k = keep.to(prod.weight.device)
    w = prod.weight.index_select(0, k)
    b = None if prod.bias is None else prod.bias.index_select(0, k)
    if unit.producer_kind == "conv":
        replacements.insert(0, (unit.producer, _new_conv(prod, prod.in_channels, n, 1, w, b)))
    else:
        replacements.insert(0, (unit.producer, _new_linear(prod, prod.in_features, n, w, b)))

    # ---- consumer: keep input channels (and their taps)
    k = keep.to(cons.weight.device)
    bias = new_b if new_b is not None else (None if cons.bias is None else cons.bias.detach().clone())
    norm = _folding_norm(model, unit, cons) if new_b is not None and cons.bias is None else None
    if norm is not None:  # BN(y + b) = BN'(y) with running_mean - b: no bias is added
        replacements.append((unit.consumer_norm, _shifted_bn(norm, new_b)))
        bias = None
    if unit.consumer_kind == "conv":
        w = new_w if new_w is not None else cons.weight.index_select(1, k)
        replacements.append((unit.consumer, _new_conv(cons, n, cons.out_channels, 1, w, bias)))
    else:
        t = unit.taps
        # channel-major flatten: channel c owns features c*t .. c*t + t-1
        cols = (k[:, None] * t + torch.arange(t, device=k.device)).reshape(-1)
        w = new_w if new_w is not None else cons.weight.index_select(1, cols)
        replacements.append((unit.consumer, _new_linear(cons, n * t, cons.out_features, w, bias)))

    for fqn, new in replacements:
        set_module(model, fqn, new)
    return model


def _folding_norm(model: nn.Module, unit: Unit, cons: nn.Module):
    """The consumer's BatchNorm, checked, when a bias correction can fold into it."""
    if unit.consumer_norm is None:
        return None
    bn = get_module(model, unit.consumer_norm)
    width = cons.out_channels if unit.consumer_kind == "conv" else cons.out_features
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.num_features != width or bn.running_mean is None:
        raise _stale(unit, unit.consumer_norm, "is not a BatchNorm with running statistics over the consumer outputs")
    return bn


def _shifted_bn(bn: nn.Module, shift: torch.Tensor) -> nn.Module:
    """A copy of ``bn`` that sees its input ``shift`` higher (exact in eval and training:
    batch statistics cancel a per-channel shift)."""
    new = copy.deepcopy(bn)
    with torch.no_grad():
        new.running_mean.sub_(shift.to(new.running_mean))
    return new


def prune_units(
    model: nn.Module,
    plan_or_units: Union[UnitPlan, Sequence[Unit]],
    keeps: Union[Mapping[str, KeepLike], Sequence[KeepLike]],
    consumer_weights: Optional[Mapping[str, torch.Tensor]] = None,
    consumer_biases: Optional[Mapping[str, torch.Tensor]] = None,
    *,
    inplace: bool = False,
) -> nn.Module:
    """Prune several units; returns the pruned model.

    Args:
        model: the model. Deep-copied first unless ``inplace=True``.
        plan_or_units: a :class:`UnitPlan` or a list of units, applied in that order
            (plans are in graph order, which is what makes consumer weights computed on
            the unpruned model line up: a consumer's outputs are cut after its inputs).
        keeps: ``{producer fqn: keep}`` (units not named are left alone) or a list
            aligned with the units.
        consumer_weights / consumer_biases: optional ``{producer fqn: tensor}``; see
            :func:`prune_unit_`.
        inplace: edit ``model`` itself.

    All ``keep`` indices are validated before anything is changed.
    """
    units = list(plan_or_units.units if isinstance(plan_or_units, UnitPlan) else plan_or_units)
    if isinstance(keeps, Mapping):
        producers = {u.producer for u in units}
        unknown = [k for k in keeps if k not in producers]
        if unknown:
            raise ValueError(f"prune_units: keeps names producer(s) that are not units of the plan: {unknown}")
        todo = [(u, keeps[u.producer]) for u in units if u.producer in keeps]
    else:
        keeps = list(keeps)
        if len(keeps) != len(units):
            raise ValueError(f"prune_units: {len(keeps)} keeps for {len(units)} units")
        todo = list(zip(units, keeps))
    cw = dict(consumer_weights or {})
    cb = dict(consumer_biases or {})
    names = {u.producer for u, _ in todo}
    for what, d in (("consumer_weights", cw), ("consumer_biases", cb)):
        extra = [k for k in d if k not in names]
        if extra:
            raise ValueError(f"prune_units: {what} given for producer(s) that are not pruned: {extra}")
    checked = [(u, check_keep(k, u.channels, f"keep for `{u.producer}`")) for u, k in todo]

    target = model if inplace else copy.deepcopy(model)
    for u, k in checked:
        prune_unit_(target, u, k, cw.get(u.producer), cb.get(u.producer))
    return target

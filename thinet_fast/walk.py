"""The walk from a producer to its consumer through the traced graph (DESIGN.md §2).

:func:`walk` follows a producer's output through channel-wise followers (BatchNorm,
activations, pooling, dropout, identity, flatten, depthwise convs) to the one consumer
that reads it, and returns the :class:`~thinet_fast.units.Unit`; anything that couples
the channels to something else raises :class:`Refuse` with a reason naming the module.
The op tables below say which modules and functions are channel-wise.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .ops.patches import ConsumerGeometry, UnsupportedConsumer
from .tracing import SHAPE as _SHAPE
from .units import Unit

__all__ = ["walk", "Refuse", "is_candidate", "producer_kind"]


# --------------------------------------------------------------------------- op tables
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
    nn.Sigmoid, nn.Tanh, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity,
)
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)

# torch functions / tensor methods that act on each element (or channel) independently.
_ELEMENTWISE_FN_NAMES = frozenset({
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "gelu", "silu", "hardswish",
    "hardsigmoid", "sigmoid", "sigmoid_", "tanh", "tanh_", "elu", "elu_", "selu", "celu",
    "mish", "softplus", "hardtanh", "hardtanh_", "dropout", "dropout1d", "dropout2d",
    "alpha_dropout", "feature_alpha_dropout", "contiguous", "clone",
})
_POOL_FN_NAMES = frozenset({
    "max_pool2d", "_max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d",
    "_adaptive_max_pool2d",
})
_RESHAPE_FN_NAMES = frozenset({"flatten", "view", "reshape", "squeeze", "unsqueeze"})
_REDUCE_FN_NAMES = frozenset({"mean", "amax", "sum"})
_PERMUTE_FN_NAMES = frozenset({"permute", "transpose", "swapaxes", "movedim"})
_ARITH = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul,
          operator.imul, operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div}
_ARITH_METHODS = frozenset({"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"})
_CAT = {torch.cat, torch.concat, torch.stack}
_META_METHODS = frozenset({"size", "dim", "ndimension", "numel", "type", "get_device"})
_META_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda"})


def _target_name(n: fx.Node) -> str:
    t = n.target
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", repr(t))


def _enclosing(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    return ""


def _where(n: fx.Node, gm: fx.GraphModule) -> str:
    """A human name for a node: module fqn, or function name + enclosing module."""
    if n.op == "call_module":
        return f"`{n.target}` ({type(gm.get_submodule(n.target)).__name__})"
    enc = _enclosing(n)
    return f"`{_target_name(n)}` (node `{n.name}`{f' in `{enc}`' if enc else ''})"


def _is_metadata_user(u: fx.Node) -> bool:
    """Users that read only the tensor's metadata (x.size(0) for a view) do not consume channels."""
    if u.op == "call_method" and u.target in _META_METHODS:
        return True
    if u.op == "call_function" and u.target is getattr and len(u.args) > 1 and u.args[1] in _META_ATTRS:
        return True
    return False


def _fn_name(n: fx.Node) -> Optional[str]:
    if n.op == "call_method":
        return str(n.target)
    if n.op == "call_function":
        mod = getattr(n.target, "__module__", "") or ""
        if mod.startswith("torch") or n.target in _ARITH or n.target in _CAT:
            return getattr(n.target, "__name__", None)
    return None


def _is_depthwise(m: nn.Module, c: int) -> bool:
    return type(m) is nn.Conv2d and m.groups == c and m.in_channels == c and m.out_channels == c


def producer_kind(m: nn.Module) -> Optional[str]:
    if type(m) is nn.Conv2d and m.groups == 1:
        return "conv"
    if type(m) is nn.Linear:
        return "linear"
    return None


def is_candidate(m: nn.Module) -> bool:
    """Conv2d(groups=1)/Linear, including subclasses (refused later with a reason)."""
    return (isinstance(m, nn.Conv2d) and m.groups == 1) or isinstance(m, nn.Linear)


# --------------------------------------------------------------------------- the walk
class Refuse(Exception):
    pass


@dataclass
class _State:
    ndim: int
    cdim: int
    flattened: bool = False
    taps: int = 1


def walk(gm: fx.GraphModule, start: fx.Node, c: int, kind: str, call_counts: dict[str, int]) -> Unit:
    """Follow the producer's output to its consumer; raise Refuse(reason) otherwise."""
    shape = start.meta.get(_SHAPE)
    if shape is None:
        raise Refuse("its output is not a tensor")
    st = _State(ndim=len(shape), cdim=1 if kind == "conv" else len(shape) - 1)
    if kind == "conv" and st.ndim != 4:
        raise Refuse(f"expected a 4-D (N, C, H, W) output, got shape {tuple(shape)}")
    followers: list[str] = []
    ops: list[str] = [str(start.target)]
    node = start
    while True:
        users = [u for u in node.users if not _is_metadata_user(u)]
        here = "its output" if node is start else f"the output of {_where(node, gm)}"
        if not users:
            raise Refuse(f"{here} is not used")
        if len(users) > 1:
            names = ", ".join(_where(u, gm) for u in users)
            kinds = {_coupling_kind(u) for u in users}
            if "add" in kinds:
                raise Refuse(f"{here} feeds a residual add and {len(users) - 1} other op(s) ({names}); "
                              "residual-coupled channels are not pruned")
            if "cat" in kinds:
                raise Refuse(f"{here} feeds a concat and other op(s) ({names}); concat-coupled channels are not pruned")
            raise Refuse(f"{here} is read by {len(users)} ops ({names}); channels with several consumers are not pruned")
        u = users[0]
        if u.op == "output":
            raise Refuse(f"{here} is a model output (no consumer to reconstruct from)")
        in_shape = node.meta.get(_SHAPE)
        out_shape = u.meta.get(_SHAPE)
        where = _where(u, gm)

        if u.op == "call_module":
            m = gm.get_submodule(u.target)
            fqn = str(u.target)
            ck = producer_kind(m)
            # ---- consumers
            if ck == "conv":
                if st.flattened or st.ndim != 4 or st.cdim != 1:
                    raise Refuse(f"{where} reads the channels after a reshape; not a channel-wise input")
                _check_single_call(fqn, call_counts, "consumer")
                if m.in_channels != c:
                    raise Refuse(f"{where} has in_channels={m.in_channels} but the producer has {c} channels")
                _geometry(m, where)
                ks = tuple(m.kernel_size)
                ops.append(fqn)
                return Unit(
                    producer=str(start.target), followers=tuple(followers), consumer=fqn, channels=c,
                    taps=ks[0] * ks[1], consumer_kind="conv", producer_kind=kind, flatten=False,
                    consumer_out=m.out_channels, consumer_in_shape=tuple(in_shape[1:]),
                    kernel_size=ks, stride=tuple(m.stride), padding=m.padding if isinstance(m.padding, str) else tuple(m.padding),
                    dilation=tuple(m.dilation), padding_mode=m.padding_mode, ops=tuple(ops),
                    consumer_norm=_norm_after(u, gm, call_counts, m.out_channels),
                )
            if ck == "linear":
                if st.cdim != st.ndim - 1:
                    raise Refuse(f"{where} reads the last dim of a {st.ndim}-D tensor whose channels are dim "
                                  f"{st.cdim}; flatten or pool first")
                tokens = st.ndim > 2  # (N, ..., C): every position is a location
                if tokens and st.flattened:
                    raise Refuse(f"{where} reads a flattened {st.ndim}-D input {tuple(in_shape)}")
                _check_single_call(fqn, call_counts, "consumer")
                if m.in_features != c * st.taps:
                    raise Refuse(f"{where} has in_features={m.in_features}, expected C*t = {c}*{st.taps}")
                ops.append(fqn)
                return Unit(
                    producer=str(start.target), followers=tuple(followers), consumer=fqn, channels=c,
                    taps=st.taps, consumer_kind="linear", producer_kind=kind, flatten=st.flattened, tokens=tokens,
                    consumer_out=m.out_features, consumer_in_shape=tuple(in_shape[1:]), ops=tuple(ops),
                    consumer_norm=_norm_after(u, gm, call_counts, m.out_features),
                )
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if isinstance(m, nn.Conv2d) and m.groups > 1 and not _is_depthwise(m, c):
                    raise Refuse(f"{where} is a grouped conv (groups={m.groups}, in={m.in_channels}, "
                                  f"out={m.out_channels}); only depthwise (groups == in == out) is channel-wise")
                if not (isinstance(m, nn.Conv2d) and _is_depthwise(m, c)):
                    raise Refuse(f"{where} is a subclass of {'Conv2d' if isinstance(m, nn.Conv2d) else 'Linear'}; "
                                  "only exact nn.Conv2d/nn.Linear are rewritten")
            # ---- followers
            if isinstance(m, nn.Conv2d) and _is_depthwise(m, c):
                _need_spatial(st, where)
                _check_single_call(fqn, call_counts, "follower")
            elif type(m) in _BN_MODULES:
                if st.flattened or st.cdim != 1:
                    raise Refuse(f"{where} normalises dim 1, which is not the channel dim here")
                if m.num_features != c:
                    raise Refuse(f"{where} has num_features={m.num_features}, expected {c}")
                _check_single_call(fqn, call_counts, "follower")
            elif type(m) is nn.PReLU:
                if m.num_parameters not in (1, c):
                    raise Refuse(f"{where} has {m.num_parameters} parameters, expected 1 or {c}")
                if m.num_parameters == c:
                    if st.flattened or st.cdim != 1:
                        raise Refuse(f"{where} has per-channel slopes on dim 1, which is not the channel dim here")
                    _check_single_call(fqn, call_counts, "follower")
            elif isinstance(m, _ELEMENTWISE_MODULES):
                pass
            elif isinstance(m, _POOL_MODULES):
                if getattr(m, "return_indices", False):
                    raise Refuse(f"{where} returns indices; not supported")
                _need_spatial(st, where)
            elif isinstance(m, nn.Flatten):
                _reshape(st, in_shape, out_shape, where)
            elif type(m).__name__ == "Permute" and isinstance(getattr(m, "dims", None), (list, tuple)):
                _permute(st, list(m.dims), where)  # torchvision.ops.Permute (ConvNeXt)
            else:
                raise Refuse(f"{where} is an op we do not know to be channel-wise")
            followers.append(fqn)
            ops.append(fqn)
            node = u
            continue

        name = _fn_name(u)
        if u.op in ("call_function", "call_method") and name is not None:
            if u.target in _CAT or name in ("cat", "concat", "stack"):
                raise Refuse(f"{here} feeds a concat {where}; concat-coupled channels are not pruned")
            if u.target in _ARITH or (u.op == "call_method" and name in _ARITH_METHODS):
                others = [a for a in list(u.args) + list(u.kwargs.values()) if a is not node]
                if any(isinstance(a, fx.Node) for a in others):
                    if name in ("add", "add_", "iadd", "sub", "sub_", "isub"):
                        raise Refuse(f"{here} feeds a residual add {where}; residual-coupled channels are not pruned")
                    raise Refuse(f"{here} is combined with another tensor in {where}; coupled channels are not pruned")
                ops.append(name)  # tensor (op) scalar: elementwise
            elif name in _ELEMENTWISE_FN_NAMES:
                ops.append(name)
            elif name in _POOL_FN_NAMES:
                _need_spatial(st, where)
                ops.append(name)
            elif name in _RESHAPE_FN_NAMES:
                _reshape(st, in_shape, out_shape, where)
                ops.append(name)
            elif name in _PERMUTE_FN_NAMES:
                _permute(st, _permute_order(st, u, node, where), where)
                ops.append(name)
            elif name in _REDUCE_FN_NAMES:
                _reduce(st, u, node, in_shape, out_shape, where)
                ops.append(name)
            else:
                raise Refuse(f"{here} feeds {where}, an op we do not know to be channel-wise")
            node = u
            continue
        raise Refuse(f"{here} feeds {where}, an op we do not know to be channel-wise")


def _coupling_kind(u: fx.Node) -> str:
    name = _fn_name(u) or ""
    if u.target in _CAT or name in ("cat", "concat", "stack"):
        return "cat"
    if name in ("add", "add_", "iadd", "sub", "sub_", "isub"):
        return "add"
    return "other"


def _norm_after(node: fx.Node, gm: fx.GraphModule, call_counts: dict[str, int], width: int) -> Optional[str]:
    """The BatchNorm that alone reads ``node``'s output, if any (see ``Unit.consumer_norm``)."""
    users = [u for u in node.users if not _is_metadata_user(u)]
    if len(users) != 1 or users[0].op != "call_module":
        return None
    fqn = str(users[0].target)
    m = gm.get_submodule(fqn)
    if type(m) in _BN_MODULES and m.num_features == width and m.running_mean is not None \
            and call_counts.get(fqn, 0) == 1:
        return fqn
    return None


def _geometry(m: nn.Module, where: str):
    try:
        return ConsumerGeometry.from_module(m)
    except UnsupportedConsumer as exc:
        raise Refuse(f"{where}: {exc}") from None


def _check_single_call(fqn: str, call_counts: dict[str, int], role: str) -> None:
    if call_counts.get(fqn, 0) > 1:
        raise Refuse(f"{role} `{fqn}` is called {call_counts[fqn]} times (shared module); "
                      "shrinking it would break its other calls")


def _need_spatial(st: _State, where: str) -> None:
    if st.flattened or st.ndim != 4 or st.cdim != 1:
        raise Refuse(f"{where} is a 2-D spatial op but the channels are not dim 1 of a 4-D tensor here")


def _reshape(st: _State, in_shape, out_shape, where: str) -> None:
    """Accept reshapes that keep the channel layout: identity, flatten (N,C,*S)->(N,C*prod S),
    and squeeze/unsqueeze of size-1 dims."""
    if in_shape is None or out_shape is None:
        raise Refuse(f"{where}: shape unknown")
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if in_shape == out_shape:
        return
    if (not st.flattened and st.cdim == 1 and len(in_shape) >= 3 and len(out_shape) == 2
            and out_shape[0] == in_shape[0] and out_shape[1] == math.prod(in_shape[1:])):
        st.taps = math.prod(in_shape[2:])
        st.ndim, st.cdim, st.flattened = 2, 1, True
        return
    if not st.flattened:
        nz_in = [i for i, s in enumerate(in_shape) if s != 1]
        nz_out = [i for i, s in enumerate(out_shape) if s != 1]
        if ([in_shape[i] for i in nz_in] == [out_shape[i] for i in nz_out]
                and in_shape[st.cdim] != 1 and st.cdim in nz_in):
            k = nz_in.index(st.cdim)
            st.cdim = nz_out[k]
            st.ndim = len(out_shape)
            return
    raise Refuse(f"{where} reshapes {in_shape} -> {out_shape}, which does not keep the channels whole")


def _reduce(st: _State, u: fx.Node, node: fx.Node, in_shape, out_shape, where: str) -> None:
    """mean/amax/sum over dims that are not the channel dim (global pooling written as x.mean((2, 3)))."""
    if st.flattened:
        raise Refuse(f"{where} reduces a flattened tensor")
    args = list(u.args[1:]) if u.args and u.args[0] is node else []
    dim = u.kwargs.get("dim", args[0] if args else None)
    keepdim = u.kwargs.get("keepdim", args[1] if len(args) > 1 else False)
    if dim is None or any(isinstance(a, fx.Node) for a in (dim, keepdim)):
        raise Refuse(f"{where} reduces over all dims (or dims computed at run time), mixing channels")
    dims = [dim] if isinstance(dim, int) else list(dim)
    dims = sorted({d % st.ndim for d in dims})
    if st.cdim in dims:
        raise Refuse(f"{where} reduces over the channel dim")
    c = in_shape[st.cdim]
    if not keepdim:
        st.cdim -= sum(1 for d in dims if d < st.cdim)
        st.ndim -= len(dims)
    if out_shape is None or len(out_shape) != st.ndim or out_shape[st.cdim] != c:
        raise Refuse(f"{where} produced shape {out_shape}, which does not keep the channels at dim {st.cdim}")


def _permute(st: _State, order: list, where: str) -> None:
    """permute/transpose move the channel dim (channels-last layouts); the channels stay whole."""
    if st.flattened:
        raise Refuse(f"{where} permutes a flattened tensor")
    order = [int(d) % st.ndim for d in order]
    if sorted(order) != list(range(st.ndim)):
        raise Refuse(f"{where}: dims {order} are not a permutation of {st.ndim} dims")
    st.cdim = order.index(st.cdim)


def _permute_order(st: _State, u: fx.Node, node: fx.Node, where: str) -> list:
    """Output dim i holds input dim order[i]."""
    args = list(u.args[1:]) if u.args and u.args[0] is node else []
    if any(isinstance(a, fx.Node) for a in args) or any(isinstance(v, fx.Node) for v in u.kwargs.values()):
        raise Refuse(f"{where} permutes by dims computed at run time")
    name = _fn_name(u)
    order = list(range(st.ndim))
    try:
        if name == "permute":
            dims = u.kwargs.get("dims", args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args)
            order = [int(d) % st.ndim for d in dims]
        elif name == "movedim":
            src = u.kwargs.get("source", args[0] if args else None)
            dst = u.kwargs.get("destination", args[1] if len(args) > 1 else None)
            src = [int(d) % st.ndim for d in ([src] if isinstance(src, int) else src)]
            dst = [int(d) % st.ndim for d in ([dst] if isinstance(dst, int) else dst)]
            placed = dict(zip(dst, src))
            rest = iter(d for d in range(st.ndim) if d not in src)
            order = [placed[i] if i in placed else next(rest) for i in range(st.ndim)]
        else:  # transpose / swapaxes
            a, b = (args + [u.kwargs.get("dim0"), u.kwargs.get("dim1")])[:2]
            a, b = int(a) % st.ndim, int(b) % st.ndim
            order[a], order[b] = order[b], order[a]
    except (IndexError, KeyError, TypeError, ValueError):
        raise Refuse(f"{where}: cannot read its dims") from None
    return order

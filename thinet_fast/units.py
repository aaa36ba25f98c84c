"""Unit discovery: which output channels can be pruned, and what reads them.

A *unit* (DESIGN.md §2) is a producer (``Conv2d`` with groups=1, or ``Linear``), the
channel-wise followers that lose the same channels (BatchNorm, activations, pooling,
dropout, identity, flatten, depthwise conv), and the one consumer (``Conv2d`` groups=1 or
``Linear``) that reads them.

``find_units`` traces the model with ``torch.fx``, propagates shapes from the example
inputs (on fake tensors, so no real compute and no change to the model), and walks the
graph forward from every producer. Channels that are coupled to something else (a
residual add, a concat, a second reader, a grouped conv, an op we do not know) are never
pruned silently: they come back in ``UnitPlan.refused`` with a reason that names the
module.

This module knows ``torch.nn`` modules and the fx graph. It knows nothing about the
pruning math (no import of ``thinet_fast.ops`` or ``thinet_fast.pipeline``).
"""
from __future__ import annotations

import contextlib
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .ops.patches import ConsumerGeometry, UnsupportedConsumer

__all__ = [
    "Unit",
    "Refusal",
    "UnitPlan",
    "UntraceableModelError",
    "find_units",
    "get_module",
    "set_module",
]

ExampleInputs = Union[torch.Tensor, Sequence[torch.Tensor]]


# --------------------------------------------------------------------------- fqn helpers
def get_module(model: nn.Module, fqn: str) -> nn.Module:
    """Return the submodule of ``model`` at the fully-qualified name ``fqn``.

    ``""`` is the model itself. Raises ``KeyError`` naming the missing part.
    """
    if fqn == "":
        return model
    mod = model
    walked = []
    for part in fqn.split("."):
        children = mod._modules
        if part not in children or children[part] is None:
            where = ".".join(walked) or "<root>"
            raise KeyError(
                f"no module `{fqn}` in {type(model).__name__}: `{where}` has no child `{part}` "
                f"(children: {', '.join(children) or 'none'})"
            )
        mod = children[part]
        walked.append(part)
    return mod


def set_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    """Replace the submodule at ``fqn`` by ``new`` (works inside Sequential/ModuleList too)."""
    if fqn == "":
        raise ValueError("cannot replace the root module; rebuild the model instead")
    if not isinstance(new, nn.Module):
        raise TypeError(f"set_module(`{fqn}`): expected an nn.Module, got {type(new).__name__}")
    parent_fqn, _, name = fqn.rpartition(".")
    parent = get_module(model, parent_fqn)
    if name not in parent._modules:
        raise KeyError(f"no module `{fqn}` in {type(model).__name__} to replace")
    # Sequential/ModuleList/ModuleDict all keep children in _modules; setattr registers there.
    setattr(parent, name, new)


# --------------------------------------------------------------------------- data classes
def _pair(v: Any, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class Unit:
    """One prunable chain: producer -> channel-wise followers -> consumer.

    Attributes:
        producer: fqn of the ``Conv2d`` (groups=1) or ``Linear`` whose outputs are removed.
        followers: fqns of the modules between producer and consumer, in call order. They
            all act channel by channel; the stateful ones (BatchNorm, depthwise conv,
            per-channel PReLU) lose the same channels. Functional ops (``F.relu``,
            ``torch.flatten``...) have no fqn; they are listed in ``ops``.
        consumer: fqn of the ``Conv2d`` (groups=1) or ``Linear`` that reads the channels.
        channels: C, the producer's output channels at discovery time.
        taps: t, consumer weights per input channel: kh*kw for a conv, in_features/C for
            a Linear after flatten (channel-major: feature ``c*t + u``), 1 otherwise.
        consumer_kind: ``"conv"`` or ``"linear"``.
        producer_kind: ``"conv"`` or ``"linear"``.
        flatten: True when the consumer is a Linear that reads a flattened (N, C*t)
            tensor (t may be 1, e.g. after global pooling).
        consumer_out: K, the consumer's output channels / features.
        consumer_in_shape: shape of the consumer's input without the batch dim, as seen
            with the example inputs (e.g. (C, H, W) for a conv, (C*t,) after flatten).
        kernel_size, stride, padding, dilation, padding_mode: consumer conv geometry;
            ``None`` for a Linear consumer. ``padding`` may be the string ``"same"``
            when the conv was built that way.
        ops: every op on the path (modules by fqn, functions by name), for display.
        consumer_norm: fqn of the BatchNorm that alone reads the consumer's output
            (called once, with running statistics), else None: a bias correction of a
            bias-free consumer is folded into its running mean instead of adding a bias.
    """

    producer: str
    followers: tuple[str, ...]
    consumer: str
    channels: int
    taps: int
    consumer_kind: Literal["conv", "linear"]
    producer_kind: Literal["conv", "linear"] = "conv"
    flatten: bool = False
    consumer_out: int = 0
    consumer_in_shape: tuple[int, ...] = ()
    kernel_size: Optional[tuple[int, int]] = None
    stride: Optional[tuple[int, int]] = None
    padding: Optional[Union[tuple[int, int], str]] = None
    dilation: Optional[tuple[int, int]] = None
    padding_mode: Optional[str] = None
    ops: tuple[str, ...] = ()
    consumer_norm: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.producer or not self.consumer:
            raise ValueError("Unit needs a producer and a consumer fqn")
        if self.consumer_kind not in ("conv", "linear"):
            raise ValueError(f"Unit({self.producer}): consumer_kind must be 'conv' or 'linear', got {self.consumer_kind!r}")
        if self.producer_kind not in ("conv", "linear"):
            raise ValueError(f"Unit({self.producer}): producer_kind must be 'conv' or 'linear', got {self.producer_kind!r}")
        if self.channels < 1 or self.taps < 1:
            raise ValueError(f"Unit({self.producer}): channels and taps must be >= 1, got {self.channels}, {self.taps}")
        object.__setattr__(self, "followers", tuple(self.followers))
        object.__setattr__(self, "ops", tuple(self.ops))
        object.__setattr__(self, "consumer_in_shape", tuple(int(s) for s in self.consumer_in_shape))
        if self.consumer_kind == "conv":
            if self.flatten:
                raise ValueError(f"Unit({self.producer}): a conv consumer cannot read a flattened tensor")
            if self.kernel_size is None:
                raise ValueError(f"Unit({self.producer}): conv consumer needs kernel_size/stride/padding/dilation")
            ks = _pair(self.kernel_size, "kernel_size")
            object.__setattr__(self, "kernel_size", ks)
            object.__setattr__(self, "stride", _pair(self.stride if self.stride is not None else 1, "stride"))
            object.__setattr__(self, "dilation", _pair(self.dilation if self.dilation is not None else 1, "dilation"))
            if not isinstance(self.padding, str):
                object.__setattr__(self, "padding", _pair(self.padding if self.padding is not None else 0, "padding"))
            if self.taps != ks[0] * ks[1]:
                raise ValueError(f"Unit({self.producer}): conv taps {self.taps} != kh*kw {ks[0] * ks[1]}")
        else:
            if self.kernel_size is not None:
                raise ValueError(f"Unit({self.producer}): a Linear consumer has no kernel geometry")

    @property
    def in_features(self) -> int:
        """C*t: the consumer's input width for these channels."""
        return self.channels * self.taps

    def describe(self) -> str:
        path = " -> ".join(self.ops) if self.ops else " -> ".join((self.producer, *self.followers, self.consumer))
        return path


@dataclass(frozen=True)
class Refusal:
    """A producer whose channels will not be pruned, and why (names the module)."""

    producer: str
    reason: str


@dataclass
class UnitPlan:
    """The result of :func:`find_units`: prunable units and refused producers."""

    units: list[Unit] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.units)

    def __iter__(self):
        return iter(self.units)

    def __getitem__(self, key: Union[int, str]) -> Unit:
        if isinstance(key, str):
            for u in self.units:
                if u.producer == key:
                    return u
            raise KeyError(f"no unit with producer `{key}`" + self._why_not(key))
        return self.units[key]

    def __contains__(self, fqn: object) -> bool:
        return any(u.producer == fqn for u in self.units)

    def _why_not(self, fqn: str) -> str:
        for r in self.refused:
            if r.producer == fqn:
                return f" (refused: {r.reason})"
        return ""

    @property
    def producers(self) -> list[str]:
        return [u.producer for u in self.units]

    def table(self) -> str:
        """A fixed-width table of units, then the refusals."""
        head = ("producer", "C", "followers", "consumer", "kind", "t", "K")
        rows = [
            (u.producer, str(u.channels), ", ".join(u.followers) or "-", u.consumer,
             u.consumer_kind + ("/flat" if u.flatten else ""), str(u.taps), str(u.consumer_out))
            for u in self.units
        ]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt = "  ".join("{:<%d}" % w for w in widths)
        lines = [f"UnitPlan: {len(self.units)} unit(s), {len(self.refused)} refused", fmt.format(*head),
                 fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        if self.refused:
            lines.append("refused:")
            lines += [f"  {r.reason}" for r in self.refused]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


class UntraceableModelError(RuntimeError):
    """``torch.fx`` could not trace the model; the message names the module that failed."""


# --------------------------------------------------------------------------- tracing
class _Tracer(fx.Tracer):
    """fx tracer that remembers the innermost module being traced when tracing fails."""

    def __init__(self, leaf_fqns: frozenset[str]) -> None:
        super().__init__()
        self.leaf_fqns = leaf_fqns
        self.failed_in: Optional[tuple[str, str]] = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaf_fqns or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # innermost frame sets it first
                try:
                    name = self.path_of_module(m)
                except NameError:
                    name = "<unregistered submodule>"
                self.failed_in = (name, type(m).__name__)
            raise


def _trace(model: nn.Module, leaf_modules: Iterable[str]) -> fx.GraphModule:
    tracer = _Tracer(frozenset(leaf_modules))
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        fqn, cls = tracer.failed_in or ("", type(model).__name__)
        where = f"`{fqn}` ({cls})" if fqn else f"the root module ({cls})"
        raise UntraceableModelError(
            f"torch.fx could not trace {where}: {type(exc).__name__}: {exc}\n"
            f"Fix: make {where} fx-traceable (no Python control flow on tensor values, no "
            f"len()/iteration over tensors), or pass leaf_modules=['{fqn or '...'}'] to "
            f"find_units so it is treated as an opaque op (its inputs and outputs are then "
            f"not pruned)."
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


_SHAPE = "thinet_shape"


class _ShapeRecorder(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as exc:
            raise RuntimeError(f"shape propagation failed at node `{n.name}` ({n.op} {_target_name(n)}): {exc}") from exc
        n.meta[_SHAPE] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        return out


@contextlib.contextmanager
def shape_pass(model: nn.Module):
    """Context for a forward that only needs shapes: the model is in eval mode inside
    (BatchNorm then accepts a batch of one, dropout is off), and every module's
    train/eval flag and every buffer's value are restored on exit (fake-tensor mode
    still bumps 0-dim CPU buffers such as num_batches_tracked in place)."""
    flags = [(m, m.training) for m in model.modules()]
    saved = [(b, b.detach().clone()) for b in model.buffers() if not b.is_meta]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


class _Call(nn.Module):
    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args):
        return self.fn(*args)


class _MetaNorms(torch.overrides.TorchFunctionMode):
    """Normalisations keep their input's shape: on meta tensors, skip their (Python)
    decompositions, a third of a meta ResNet-50 forward."""

    _SAME_SHAPE = {F.batch_norm, F.instance_norm, F.layer_norm, F.group_norm}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._SAME_SHAPE and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return torch.empty_like(args[0])
        return func(*args, **(kwargs or {}))


def shape_forward(model: nn.Module, fn: Callable, inputs: Sequence) -> Any:
    """``fn(*inputs)`` for shapes only, on a model whose parameters and buffers are left
    as they were. First with every parameter, buffer and input swapped for a meta tensor
    (no compute, no fake-tensor dispatch: the fastest), then on fake tensors, then (an
    op neither supports) as one real forward."""
    meta = lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x  # noqa: E731
    with torch.no_grad(), shape_pass(model):
        try:
            state = {f"model.{k}": v.to("meta") for k, v in [*model.named_parameters(), *model.named_buffers()]}
            with _MetaNorms():
                return torch.func.functional_call(_Call(model, fn), state, tuple(meta(x) for x in inputs))
        except Exception:  # a tensor held outside parameters/buffers, a data-dependent op, ...
            pass
        try:
            from torch._subclasses.fake_tensor import FakeTensorMode

            mode = FakeTensorMode(allow_non_fake_inputs=True)
            with mode:
                return fn(*[mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs])
        except Exception:
            pass
        return fn(*inputs)


def _propagate_shapes(gm: fx.GraphModule, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Record every node's output shape (see :func:`shape_forward`)."""
    shape_forward(model, lambda *xs: _ShapeRecorder(gm).run(*xs), inputs)


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


def _producer_kind(m: nn.Module) -> Optional[str]:
    if type(m) is nn.Conv2d and m.groups == 1:
        return "conv"
    if type(m) is nn.Linear:
        return "linear"
    return None


def _is_candidate(m: nn.Module) -> bool:
    """Conv2d(groups=1)/Linear, including subclasses (refused later with a reason)."""
    return (isinstance(m, nn.Conv2d) and m.groups == 1) or isinstance(m, nn.Linear)


# --------------------------------------------------------------------------- the walk
class _Refuse(Exception):
    pass


@dataclass
class _State:
    ndim: int
    cdim: int
    flattened: bool = False
    taps: int = 1


def _walk(gm: fx.GraphModule, start: fx.Node, c: int, kind: str, call_counts: dict[str, int]) -> Unit:
    """Follow the producer's output to its consumer; raise _Refuse(reason) otherwise."""
    shape = start.meta.get(_SHAPE)
    if shape is None:
        raise _Refuse("its output is not a tensor")
    st = _State(ndim=len(shape), cdim=1 if kind == "conv" else len(shape) - 1)
    if kind == "conv" and st.ndim != 4:
        raise _Refuse(f"expected a 4-D (N, C, H, W) output, got shape {tuple(shape)}")
    followers: list[str] = []
    ops: list[str] = [str(start.target)]
    node = start
    while True:
        users = [u for u in node.users if not _is_metadata_user(u)]
        here = "its output" if node is start else f"the output of {_where(node, gm)}"
        if not users:
            raise _Refuse(f"{here} is not used")
        if len(users) > 1:
            names = ", ".join(_where(u, gm) for u in users)
            kinds = {_coupling_kind(u) for u in users}
            if "add" in kinds:
                raise _Refuse(f"{here} feeds a residual add and {len(users) - 1} other op(s) ({names}); "
                              "residual-coupled channels are not pruned")
            if "cat" in kinds:
                raise _Refuse(f"{here} feeds a concat and other op(s) ({names}); concat-coupled channels are not pruned")
            raise _Refuse(f"{here} is read by {len(users)} ops ({names}); channels with several consumers are not pruned")
        u = users[0]
        if u.op == "output":
            raise _Refuse(f"{here} is a model output (no consumer to reconstruct from)")
        in_shape = node.meta.get(_SHAPE)
        out_shape = u.meta.get(_SHAPE)
        where = _where(u, gm)

        if u.op == "call_module":
            m = gm.get_submodule(u.target)
            fqn = str(u.target)
            ck = _producer_kind(m)
            # ---- consumers
            if ck == "conv":
                if st.flattened or st.ndim != 4 or st.cdim != 1:
                    raise _Refuse(f"{where} reads the channels after a reshape; not a channel-wise input")
                _check_single_call(fqn, call_counts, "consumer")
                if m.in_channels != c:
                    raise _Refuse(f"{where} has in_channels={m.in_channels} but the producer has {c} channels")
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
                    raise _Refuse(f"{where} reads the last dim of a {st.ndim}-D tensor whose channels are dim "
                                  f"{st.cdim}; flatten or pool first")
                if st.ndim != 2:
                    raise _Refuse(f"{where} reads a {st.ndim}-D input {tuple(in_shape)} (tokens or channels-last); "
                                  "only (N, features) Linear inputs are supported")
                _check_single_call(fqn, call_counts, "consumer")
                if m.in_features != c * st.taps:
                    raise _Refuse(f"{where} has in_features={m.in_features}, expected C*t = {c}*{st.taps}")
                ops.append(fqn)
                return Unit(
                    producer=str(start.target), followers=tuple(followers), consumer=fqn, channels=c,
                    taps=st.taps, consumer_kind="linear", producer_kind=kind, flatten=st.flattened,
                    consumer_out=m.out_features, consumer_in_shape=tuple(in_shape[1:]), ops=tuple(ops),
                    consumer_norm=_norm_after(u, gm, call_counts, m.out_features),
                )
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if isinstance(m, nn.Conv2d) and m.groups > 1 and not _is_depthwise(m, c):
                    raise _Refuse(f"{where} is a grouped conv (groups={m.groups}, in={m.in_channels}, "
                                  f"out={m.out_channels}); only depthwise (groups == in == out) is channel-wise")
                if not (isinstance(m, nn.Conv2d) and _is_depthwise(m, c)):
                    raise _Refuse(f"{where} is a subclass of {'Conv2d' if isinstance(m, nn.Conv2d) else 'Linear'}; "
                                  "only exact nn.Conv2d/nn.Linear are rewritten")
            # ---- followers
            if isinstance(m, nn.Conv2d) and _is_depthwise(m, c):
                _need_spatial(st, where)
                _check_single_call(fqn, call_counts, "follower")
            elif type(m) in _BN_MODULES:
                if st.flattened or st.cdim != 1:
                    raise _Refuse(f"{where} normalises dim 1, which is not the channel dim here")
                if m.num_features != c:
                    raise _Refuse(f"{where} has num_features={m.num_features}, expected {c}")
                _check_single_call(fqn, call_counts, "follower")
            elif type(m) is nn.PReLU:
                if m.num_parameters not in (1, c):
                    raise _Refuse(f"{where} has {m.num_parameters} parameters, expected 1 or {c}")
                if m.num_parameters == c:
                    if st.flattened or st.cdim != 1:
                        raise _Refuse(f"{where} has per-channel slopes on dim 1, which is not the channel dim here")
                    _check_single_call(fqn, call_counts, "follower")
            elif isinstance(m, _ELEMENTWISE_MODULES):
                pass
            elif isinstance(m, _POOL_MODULES):
                if getattr(m, "return_indices", False):
                    raise _Refuse(f"{where} returns indices; not supported")
                _need_spatial(st, where)
            elif isinstance(m, nn.Flatten):
                _reshape(st, in_shape, out_shape, where)
            else:
                raise _Refuse(f"{where} is an op we do not know to be channel-wise")
            followers.append(fqn)
            ops.append(fqn)
            node = u
            continue

        name = _fn_name(u)
        if u.op in ("call_function", "call_method") and name is not None:
            if u.target in _CAT or name in ("cat", "concat", "stack"):
                raise _Refuse(f"{here} feeds a concat {where}; concat-coupled channels are not pruned")
            if u.target in _ARITH or (u.op == "call_method" and name in _ARITH_METHODS):
                others = [a for a in list(u.args) + list(u.kwargs.values()) if a is not node]
                if any(isinstance(a, fx.Node) for a in others):
                    if name in ("add", "add_", "iadd", "sub", "sub_", "isub"):
                        raise _Refuse(f"{here} feeds a residual add {where}; residual-coupled channels are not pruned")
                    raise _Refuse(f"{here} is combined with another tensor in {where}; coupled channels are not pruned")
                ops.append(name)  # tensor (op) scalar: elementwise
            elif name in _ELEMENTWISE_FN_NAMES:
                ops.append(name)
            elif name in _POOL_FN_NAMES:
                _need_spatial(st, where)
                ops.append(name)
            elif name in _RESHAPE_FN_NAMES:
                _reshape(st, in_shape, out_shape, where)
                ops.append(name)
            elif name in _REDUCE_FN_NAMES:
                _reduce(st, u, node, in_shape, out_shape, where)
                ops.append(name)
            else:
                raise _Refuse(f"{here} feeds {where}, an op we do not know to be channel-wise")
            node = u
            continue
        raise _Refuse(f"{here} feeds {where}, an op we do not know to be channel-wise")


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
        raise _Refuse(f"{where}: {exc}") from None


def _check_single_call(fqn: str, call_counts: dict[str, int], role: str) -> None:
    if call_counts.get(fqn, 0) > 1:
        raise _Refuse(f"{role} `{fqn}` is called {call_counts[fqn]} times (shared module); "
                      "shrinking it would break its other calls")


def _need_spatial(st: _State, where: str) -> None:
    if st.flattened or st.ndim != 4 or st.cdim != 1:
        raise _Refuse(f"{where} is a 2-D spatial op but the channels are not dim 1 of a 4-D tensor here")


def _reshape(st: _State, in_shape, out_shape, where: str) -> None:
    """Accept reshapes that keep the channel layout: identity, flatten (N,C,*S)->(N,C*prod S),
    and squeeze/unsqueeze of size-1 dims."""
    if in_shape is None or out_shape is None:
        raise _Refuse(f"{where}: shape unknown")
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
    raise _Refuse(f"{where} reshapes {in_shape} -> {out_shape}, which does not keep the channels whole")


def _reduce(st: _State, u: fx.Node, node: fx.Node, in_shape, out_shape, where: str) -> None:
    """mean/amax/sum over dims that are not the channel dim (global pooling written as x.mean((2, 3)))."""
    if st.flattened:
        raise _Refuse(f"{where} reduces a flattened tensor")
    args = list(u.args[1:]) if u.args and u.args[0] is node else []
    dim = u.kwargs.get("dim", args[0] if args else None)
    keepdim = u.kwargs.get("keepdim", args[1] if len(args) > 1 else False)
    if dim is None or any(isinstance(a, fx.Node) for a in (dim, keepdim)):
        raise _Refuse(f"{where} reduces over all dims (or dims computed at run time), mixing channels")
    dims = [dim] if isinstance(dim, int) else list(dim)
    dims = sorted({d % st.ndim for d in dims})
    if st.cdim in dims:
        raise _Refuse(f"{where} reduces over the channel dim")
    c = in_shape[st.cdim]
    if not keepdim:
        st.cdim -= sum(1 for d in dims if d < st.cdim)
        st.ndim -= len(dims)
    if out_shape is None or len(out_shape) != st.ndim or out_shape[st.cdim] != c:
        raise _Refuse(f"{where} produced shape {out_shape}, which does not keep the channels at dim {st.cdim}")


# --------------------------------------------------------------------------- public entry
def _as_tuple(example_inputs: ExampleInputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a Tensor or a tuple of Tensors, got {type(example_inputs).__name__}")


def find_units(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    units: Optional[Iterable[str]] = None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    leaf_modules: Iterable[str] = (),
) -> UnitPlan:
    """Trace ``model`` and return its prunable units and the producers it will not prune.

    Args:
        model: the model; it is traced, never modified.
        example_inputs: a tensor or tuple of tensors for ``model(*example_inputs)``. Only
            their shapes matter: shapes are propagated on fake tensors (meta tensors when
            the model lives on the meta device).
        units: producer fqns to prune. Each must be a prunable producer, otherwise
            ``ValueError`` names it and the reason.
        filter_fn: ``filter_fn(module, fqn) -> bool`` called for every candidate producer
            (``Conv2d`` groups=1 / ``Linear``); False drops it from the plan. Selected
            producers that cannot be pruned are listed in ``refused`` (not raised).
        leaf_modules: fqns that fx should not trace into (for code fx cannot trace). They
            act as unknown ops: channels flowing into or out of them are refused.

    Returns:
        ``UnitPlan(units, refused)`` in graph (topological) order.

    Raises:
        UntraceableModelError: fx failed; the message names the module and the fix.
        ValueError: a requested producer is missing or not prunable.
    """
    if units is not None and filter_fn is not None:
        raise ValueError("find_units: pass units=[...] or filter_fn=..., not both")
    if isinstance(units, str):
        units = [units]
    inputs = _as_tuple(example_inputs)
    gm = _trace(model, leaf_modules)
    _propagate_shapes(gm, model, inputs)

    call_counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            call_counts[str(n.target)] = call_counts.get(str(n.target), 0) + 1

    found: list[Unit] = []
    refused: list[Refusal] = []
    seen: set[str] = set()
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        fqn = str(n.target)
        m = gm.get_submodule(fqn)
        if not _is_candidate(m) or fqn in seen:
            continue
        seen.add(fqn)
        kind = _producer_kind(m)
        if kind is None:
            refused.append(Refusal(fqn, f"`{fqn}` is a {type(m).__name__}, a subclass of "
                                        f"{'Conv2d' if isinstance(m, nn.Conv2d) else 'Linear'}; only exact "
                                        "nn.Conv2d/nn.Linear are rewritten"))
            continue
        if call_counts[fqn] > 1:
            refused.append(Refusal(fqn, f"`{fqn}` is called {call_counts[fqn]} times (shared module)"))
            continue
        c = m.out_channels if kind == "conv" else m.out_features
        if c < 2:
            refused.append(Refusal(fqn, f"`{fqn}` has {c} output channel(s); nothing to prune"))
            continue
        try:
            found.append(_walk(gm, n, c, kind, call_counts))
        except _Refuse as r:
            refused.append(Refusal(fqn, f"`{fqn}`: {r}"))
    for fqn, m in model.named_modules():
        if _is_candidate(m) and fqn not in seen:
            refused.append(Refusal(fqn, f"`{fqn}` is not called in the traced forward "
                                        "(unused, or inside a leaf module)"))

    modules = dict(model.named_modules())
    if units is not None:
        wanted = list(dict.fromkeys(units))
        by_fqn = {u.producer: u for u in found}
        why = {r.producer: r.reason for r in refused}
        errors = []
        for fqn in wanted:
            if fqn in by_fqn:
                continue
            if fqn in why:
                errors.append(f"`{fqn}` cannot be pruned: {why[fqn]}")
            elif fqn not in modules:
                errors.append(f"`{fqn}` is not a module of {type(model).__name__}")
            else:
                errors.append(f"`{fqn}` is a {type(modules[fqn]).__name__}, not a producer "
                              "(Conv2d with groups=1 or Linear)")
        if errors:
            raise ValueError("find_units: requested producer(s) not prunable:\n  " + "\n  ".join(errors))
        keep = set(wanted)
        return UnitPlan([u for u in found if u.producer in keep], [])
    if filter_fn is not None:
        found = [u for u in found if filter_fn(modules[u.producer], u.producer)]
        refused = [r for r in refused if filter_fn(modules[r.producer], r.producer)]
    return UnitPlan(found, refused)

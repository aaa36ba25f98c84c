"""Tracing a model with torch.fx, and shape-only forwards.

:func:`trace` builds the fx graph (naming the module that fx could not trace, and the
fix). :func:`shape_forward` runs a forward for shapes only: on meta tensors first (no
compute, no fake-tensor dispatch), then on fake tensors, then, for an op neither
supports, as one real forward; :func:`propagate_shapes` records every node's output
shape with it. (torch.fx's ``ShapeProp`` runs real tensors: a full forward per call.)
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .modes import preserved_modes

__all__ = ["UntraceableModelError", "trace", "shape_pass", "shape_forward", "propagate_shapes", "SHAPE"]


class UntraceableModelError(RuntimeError):
    """``torch.fx`` could not trace the model; the message names the module that failed."""


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


def trace(model: nn.Module, leaf_modules: Iterable[str]) -> fx.GraphModule:
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


SHAPE = "thinet_shape"  # node.meta key of the recorded output shape


class _ShapeRecorder(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as exc:
            raise RuntimeError(f"shape propagation failed at node `{n.name}` ({n.op} {n.target}): {exc}") from exc
        n.meta[SHAPE] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        return out


@contextlib.contextmanager
def shape_pass(model: nn.Module):
    """Context for a forward that only needs shapes: the model is in eval mode inside
    (BatchNorm then accepts a batch of one, dropout is off), and every module's
    train/eval flag and every buffer's value are restored on exit (fake-tensor mode
    still bumps 0-dim CPU buffers such as num_batches_tracked in place)."""
    saved = [(b, b.detach().clone()) for b in model.buffers() if not b.is_meta]
    try:
        with preserved_modes(model, train=False):
            yield
    finally:
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


def _tensor_attrs(model: nn.Module) -> list[tuple[nn.Module, str, Any]]:
    """Plain tensor attributes (not parameters or buffers), and lists of them: some
    modules move them to the input's device in forward (torchvision's AnchorGenerator),
    so a meta or fake forward would leave them meta or fake."""
    held = []
    for m in model.modules():
        for k, v in vars(m).items():
            if isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and v
                                               and all(isinstance(t, torch.Tensor) for t in v)):
                held.append((m, k, v))
    return held


def _restore(held) -> None:
    for m, k, v in held:
        setattr(m, k, v)


def shape_forward(model: nn.Module, fn: Callable, inputs: Sequence) -> Any:
    """``fn(*inputs)`` for shapes only, on a model whose parameters and buffers are left
    as they were. First with every parameter, buffer and input swapped for a meta tensor
    (no compute, no fake-tensor dispatch: the fastest), then on fake tensors, then (an
    op neither supports) as one real forward."""
    meta = lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x  # noqa: E731
    held = _tensor_attrs(model)
    with torch.no_grad(), shape_pass(model):
        try:
            state = {f"model.{k}": v.to("meta") for k, v in [*model.named_parameters(), *model.named_buffers()]}
            with _MetaNorms():
                return torch.func.functional_call(_Call(model, fn), state, tuple(meta(x) for x in inputs))
        except Exception:  # a tensor held outside parameters/buffers, a data-dependent op, ...
            pass
        finally:
            _restore(held)
        try:
            from torch._subclasses.fake_tensor import FakeTensorMode

            mode = FakeTensorMode(allow_non_fake_inputs=True)
            with mode:
                return fn(*[mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs])
        except Exception:
            pass
        finally:
            _restore(held)
        return fn(*inputs)


def propagate_shapes(gm: fx.GraphModule, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Record every node's output shape (see :func:`shape_forward`)."""
    shape_forward(model, lambda *xs: _ShapeRecorder(gm).run(*xs), inputs)

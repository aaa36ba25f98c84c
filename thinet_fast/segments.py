"""Run a traced model piece by piece: states, cut points and segments (DESIGN.md §7, Replay).

The *state* at a position of the traced graph (in topological order) is the tuple of
input-dependent values computed up to there that a later node still reads: all a
later segment needs. A *cut point* is a position whose state is one value (a layer
boundary in a chain, a block input in a ResNet); inside a residual block the state is
the block input plus the current branch value. Activations cached as a state can be
replayed instead of the images.

:class:`Segments` runs the graph from a state up to a module call, with the modules
looked up by name in the *live* model on every call, so segments stay right while units
are rewritten. At a cut point a state is passed as its one value, elsewhere as a
:class:`State`. This module knows modules and the fx graph, not the math.
"""
from __future__ import annotations

import inspect
import operator
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn

from .modules import get_module
from .tracing import trace

__all__ = ["Segments", "State", "values", "batch_size"]

_INPLACE_FNS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
                operator.ipow, operator.ior, operator.iand, operator.ixor, operator.ilshift, operator.irshift,
                operator.imatmul, operator.setitem}
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "squeeze", "unsqueeze", "transpose", "t",
                 "permute", "narrow", "expand", "expand_as", "as_strided", "unflatten", "movedim", "swapaxes",
                 "split", "chunk", "unbind", "select", "__getitem__", "detach", "contiguous", "unfold", "diagonal"}
_VIEW_FNS = {operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.squeeze, torch.unsqueeze,
             torch.permute, torch.narrow, torch.split, torch.chunk, torch.unbind, torch.select, torch.t,
             torch.movedim, torch.swapaxes, torch.diagonal, torch.detach}


def _fn_name(u: fx.Node) -> str:
    return str(u.target) if u.op == "call_method" else getattr(u.target, "__name__", "")


def _writes_in_place(model: nn.Module, u: fx.Node) -> bool:
    """True if node ``u`` may write into one of its inputs in place."""
    if u.kwargs.get("inplace") or "out" in u.kwargs:
        return True
    if u.op == "call_function":
        name = _fn_name(u)
        if u.target in _INPLACE_FNS or (name.endswith("_") and not name.endswith("__")):
            return True
        try:  # a positional inplace=True, as in F.relu(x, True)
            params = list(inspect.signature(u.target).parameters)
        except (TypeError, ValueError):
            params = []
        if "inplace" in params and len(u.args) > params.index("inplace") and u.args[params.index("inplace")] is True:
            return True
    if u.op == "call_method":
        name = _fn_name(u)
        if (name.endswith("_") and not name.endswith("__")) or name == "__setitem__":
            return True
    if u.op == "call_module":
        m = get_module(model, str(u.target))
        if getattr(m, "inplace", False):
            return True
    return False


def _is_view(u: fx.Node) -> bool:
    return (u.op == "call_method" and u.target in _VIEW_METHODS) or (u.op == "call_function" and u.target in _VIEW_FNS)


def _attr(model: nn.Module, target: str):
    mod_name, _, name = target.rpartition(".")
    return getattr(get_module(model, mod_name), name)


class State(tuple):
    """The values live at a position that is not a cut point, in node order, with the
    batch size (``batch``) of the images they came from."""

    batch: int

    def __new__(cls, values, batch: int):
        self = super().__new__(cls, values)
        self.batch = int(batch)
        return self


def values(x) -> tuple:
    """The values of a cached batch: a :class:`State`'s, or the one value."""
    return x if isinstance(x, State) else (x,)


def batch_size(x) -> int:
    """Images in a batch: a tensor's first dimension, or a :class:`State`'s ``batch``."""
    return x.batch if isinstance(x, State) else x.shape[0]


class Segments:
    """The traced graph of ``model`` with its cut points.

    Node positions are indices in topological order; position 0 is the input."""

    def __init__(self, model: nn.Module, leaf_modules: Iterable[str] = (), graph: fx.GraphModule | None = None):
        """``graph``: the model's traced graph if there is one already (find_units's)."""
        gm = graph if graph is not None else trace(model, leaf_modules)
        self.nodes: list[fx.Node] = list(gm.graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        inputs = [n for n in self.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise ValueError(f"replay needs a model with one input; {type(model).__name__} takes {len(inputs)}")
        self.input = self.pos[inputs[0]]
        dynamic = set()
        for n in self.nodes:
            if n.op == "placeholder" or any(a in dynamic for a in n.all_input_nodes):
                dynamic.add(n)
        self.dynamic = [n in dynamic for n in self.nodes]
        # a node's value may be freed after the last node that reads it
        self.last_use = [max((self.pos[u] for u in n.users), default=i) for i, n in enumerate(self.nodes)]
        self.cuts: list[int] = []
        live_until = -1
        for i, n in enumerate(self.nodes):
            if self.dynamic[i] and n.op != "output" and live_until <= i:
                self.cuts.append(i)
            if self.dynamic[i]:
                live_until = max(live_until, self.last_use[i])
        self._calls = {}
        for i, n in enumerate(self.nodes):
            if n.op == "call_module":
                self._calls.setdefault(str(n.target), i)
        self._live: dict[int, tuple[int, ...]] = {}
        self._written: dict[int, bool] = {}

    def name(self, pos: int) -> str:
        return "input" if pos == self.input else self.nodes[pos].name

    def call(self, fqn: str) -> int:
        """Position of the (first) call of module ``fqn``."""
        if fqn not in self._calls:
            raise KeyError(f"module `{fqn}` is not called in the traced graph")
        return self._calls[fqn]

    def input_of(self, fqn: str) -> int:
        """Position of the node whose value is the first argument of module ``fqn``'s call."""
        arg = self.nodes[self.call(fqn)].args[0]
        if not isinstance(arg, fx.Node):
            raise ValueError(f"module `{fqn}` is not called on a traced value")
        return self.pos[arg]

    def live(self, pos: int) -> tuple[int, ...]:
        """Positions of the values making up the state at ``pos`` (``(pos,)`` at a cut)."""
        if pos not in self._live:
            self._live[pos] = tuple(i for i in range(pos + 1) if self.dynamic[i] and self.nodes[i].op != "output"
                                    and (i == pos or self.last_use[i] > pos))
        return self._live[pos]

    def is_cut(self, pos: int) -> bool:
        return pos in self.cuts

    def latest_cut(self, before: int) -> int:
        """The last cut point strictly before position ``before`` (the input at worst)."""
        return max(c for c in self.cuts if c < before) if before > self.cuts[0] else self.cuts[0]

    def descendants(self, pos: int) -> set[int]:
        """Positions of the nodes that read node ``pos``'s value, directly or not."""
        out, todo = set(), [self.nodes[pos]]
        while todo:
            for u in todo.pop().users:
                if self.pos[u] not in out:
                    out.add(self.pos[u])
                    todo.append(u)
        return out

    def plan(self, producer: str, consumer: str, cached: int | None) -> tuple[int, int | None]:
        """(start, capture) of a sequential unit's pass: start from the ``cached`` state
        when it lies at or before the consumer's input, else from the input; capture the
        state at the consumer's input when pruning the producer changes only that value
        there (its kept channels then start the next pass), else the latest state before
        the producer call, which pruning leaves as it is. ``None``: nothing to capture."""
        target, call = self.input_of(consumer), self.call(producer)
        start = cached if cached is not None and cached <= target else self.input
        changed = self.descendants(call)
        if not any(i in changed for i in self.live(target) if i != target):
            return start, target
        capture = call - 1
        while capture > start and not self.dynamic[capture]:
            capture -= 1
        return start, (capture if capture >= start else None)

    def mutated(self, model: nn.Module, pos: int) -> bool:
        """True if a reader of a value of the state at ``pos`` may change it in place
        (a cached state must then be copied before it is run on)."""
        return any(self._mutated(model, i) for i in self.live(pos))

    def _mutated(self, model: nn.Module, pos: int) -> bool:
        """Conservative: an in-place reader of the value, or of a view of it. Pruning
        changes no module's in-place flag, so each node is scanned once."""
        if pos not in self._written:
            self._written[pos] = self._scan_writes(model, pos)
        return self._written[pos]

    def _scan_writes(self, model: nn.Module, pos: int) -> bool:
        todo, seen = [self.nodes[pos]], set()
        while todo:
            node = todo.pop()
            for u in node.users:
                if u in seen:
                    continue
                seen.add(u)
                if _writes_in_place(model, u):
                    return True
                if _is_view(u):
                    todo.append(u)
        return False

    def run(self, model: nn.Module, start: int, value, *, capture: int | None = None, stop: int | None = None):
        """Evaluate the graph from the state ``value`` at position ``start`` with
        ``model``'s modules. Returns the state at ``capture``, or the model's output
        without one. Stops after node ``stop``; a module hook may also stop it by raising."""
        live = self.live(start)
        if len(live) == 1:
            value, batch = (value,), None
        elif not isinstance(value, State) or len(value) != len(live):
            raise ValueError(f"the state at position {start} ({self.name(start)}) is {len(live)} values; "
                             f"got {type(value).__name__}")
        else:
            batch = value.batch
        env: dict[fx.Node, object] = {self.nodes[i]: v for i, v in zip(live, value)}
        captured = self._state(env, capture, batch) if capture == start else None
        end = len(self.nodes) - 1 if stop is None else stop
        for i, n in enumerate(self.nodes[: end + 1]):
            if i <= start and self.dynamic[i] or n.op == "placeholder":
                continue
            if n.op == "output":
                return fx.node.map_arg(n.args[0], env.__getitem__) if capture is None else captured
            args = fx.node.map_arg(n.args, env.__getitem__)
            kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
            if n.op == "call_module":
                out = get_module(model, str(n.target))(*args, **kwargs)
            elif n.op == "call_function":
                out = n.target(*args, **kwargs)
            elif n.op == "call_method":
                obj, *rest = args
                out = getattr(obj, n.target)(*rest, **kwargs)
            elif n.op == "get_attr":
                out = _attr(model, str(n.target))
            else:
                raise RuntimeError(f"unexpected fx node op {n.op!r}")
            env[n] = out
            if i == capture:
                captured = self._state(env, capture, batch)
            for a in n.all_input_nodes:  # free what no later node reads
                if self.dynamic[self.pos[a]] and self.last_use[self.pos[a]] <= i:
                    env.pop(a, None)
        return captured

    def _state(self, env, pos: int, batch: int | None):
        live = self.live(pos)
        if len(live) == 1:
            return env[self.nodes[live[0]]]
        values = [env[self.nodes[i]] for i in live]
        if batch is None:
            batch = next(v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.dim() > 0)
        return State(values, batch)

    def forward(self, model: nn.Module, start: int, capture: int | None = None, keep=None):
        """A ``forward(x)`` for :func:`thinet_fast.pipeline.collect.feed` that runs from
        the state at ``start``; with ``capture`` (a later position) each batch's state
        there goes to ``keep(state)`` before the rest runs (and before any hook stops it)."""
        def run(x):
            if capture is None:
                return self.run(model, start, x)
            v = x if capture == start else self.run(model, start, x, capture=capture, stop=capture)
            keep(v)
            return self.run(model, capture, v)
        return run

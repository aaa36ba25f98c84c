"""Selection methods: one registry, one tiny contract.

A method is a :class:`Method`: a name, the statistics it needs beyond the Gram, and
``select(stats, n_keep, ctx) -> Selection``. Config validation, the collector, the
schedules, the CLI and the Torch-Pruning integration all read :data:`REGISTRY`, so a new
method is one function and one :func:`register_method` call::

    import thinet_fast as tf

    def biggest_diagonal(stats, n_keep, ctx):
        # keep the channels whose own contribution sum(x_c^2) is largest
        return tf.Selection(tf.top_k(stats.gram.diagonal(), n_keep))

    tf.register_method(tf.Method("diag", biggest_diagonal, summary="largest Gram diagonal"))
    tf.prune(model, data, method="diag", keep=0.5)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..ops import baselines, dispatch, greedy
from ..ops.stats import Statistics

__all__ = ["Method", "Selection", "SelectContext", "REGISTRY", "register_method", "get_method", "method_names",
           "selection_backend"]

NEEDS = frozenset({"zeros"})  # statistics a method may ask for beyond the Gram


@dataclass(frozen=True)
class Selection:
    """Kept channel indices (sorted int64) and, where the method has one, the relative
    error curve E(n)/1ᵀG1 after removing 1, 2, ... channels."""

    keep: torch.Tensor
    curve: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class SelectContext:
    """What a selection may read besides the statistics."""

    producer: Optional[nn.Module] = None
    seed: int = 0
    backend: str = "auto"   # the resolved selection backend (see :func:`selection_backend`)
    ridge: float = 1e-8


@dataclass(frozen=True)
class Method:
    """A selection method.

    Attributes:
        name: what ``method=`` says.
        select: ``select(stats, n_keep, ctx) -> Selection``.
        needs: statistics beyond the Gram (``{"zeros"}``: per-channel zero counts).
        select_many: optional batched form over many units, ``(stats_list, n_keeps,
            ctx) -> list[Selection]`` (one call for a one-shot prune).
        rank: optional ``rank(G, ctx) -> removal order of every channel but one`` from a
            Gram alone (what the Torch-Pruning importance needs).
        op: the :data:`~thinet_fast.ops.dispatch.OPS` op its selection runs (its
            backends come from there), or None: plain torch.
        summary: one line for the CLI and docs.
    """

    name: str
    select: Callable[[Statistics, int, SelectContext], Selection]
    needs: frozenset = field(default_factory=frozenset)
    select_many: Optional[Callable] = None
    rank: Optional[Callable[[torch.Tensor, SelectContext], torch.Tensor]] = None
    op: Optional[str] = None
    summary: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"a method name must be an identifier-like string; got {self.name!r}")
        if not callable(self.select):
            raise TypeError(f"method {self.name!r}: select must be callable")
        object.__setattr__(self, "needs", frozenset(self.needs))
        if self.op is not None and self.op not in dispatch.OPS:
            raise ValueError(f"method {self.name!r}: op {self.op!r} is not one of {sorted(dispatch.OPS)}")
        unknown = self.needs - NEEDS
        if unknown:
            raise ValueError(f"method {self.name!r} needs {sorted(unknown)}; the collector provides {sorted(NEEDS)}")

    def run_many(self, stats: Sequence[Statistics], n_keep: Sequence[int], ctx: SelectContext) -> list[Selection]:
        if self.select_many is not None:
            return list(self.select_many(list(stats), list(n_keep), ctx))
        return [self.select(s, n, ctx) for s, n in zip(stats, n_keep)]


REGISTRY: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (``replace=True`` to redefine a name)."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method takes a thinet_fast.Method; got {type(method).__name__}")
    if method.name in REGISTRY and not replace:
        raise ValueError(f"a method named {method.name!r} is registered already; pass replace=True to redefine it")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"method={name!r} is not one of {method_names()}; register_method() adds one")
    return REGISTRY[name]


def method_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def selection_backend(method: str, backend: str, device) -> str:
    """The backend that runs ``method``'s selection for the run's preference ``backend``."""
    return selection_resolution(method, backend, device).backend


def selection_resolution(method: str, backend: str, device) -> dispatch.Resolution:
    op = get_method(method).op
    if op is None:
        return dispatch.Resolution(method, "torch")
    return dispatch.resolve(op, backend, device)


# ------------------------------------------------------------------ the built-in methods
def _thinet_many(stats: list[Statistics], n_keep: list[int], ctx: SelectContext) -> list[Selection]:
    """Greedy removal for many units in one batched call (problems padded). Each unit
    gets its whole removal order, so the error curve for every ratio comes for free."""
    grams = [s.gram for s in stats]
    orders, errors = greedy.greedy_remove(grams, [g.shape[0] - 1 for g in grams], return_errors=True,
                                          backend=ctx.backend)
    out = []
    for G, order, err, n in zip(grams, orders, errors, n_keep):
        total = G.double().sum().clamp_min(torch.finfo(torch.float64).tiny)
        keep = greedy.removal_to_keep(order, G.shape[0], n) if n < G.shape[0] else torch.arange(G.shape[0])
        out.append(Selection(keep.to(G.device), (err.double() / total).cpu()))
    return out


def _thinet(stats, n_keep, ctx):
    return _thinet_many([stats], [n_keep], ctx)[0]


def _thinet_rank(G, ctx):
    return greedy.greedy_remove(G, G.shape[0] - 1, backend=ctx.backend)


def _thinet_ls(stats, n_keep, ctx):
    # its own least-squares scales equal ls_scale's; the reconstruction recomputes them
    return Selection(greedy.greedy_keep_ls(stats.gram, n_keep, ridge=ctx.ridge, backend=ctx.backend).sort().values)


def _thinet_ls_rank(G, ctx):
    keep = greedy.greedy_keep_ls(G, G.shape[0], backend=ctx.backend)
    return keep.flip(0)[: G.shape[0] - 1]  # last chosen first removed


def _scored(score_fn):
    def select(stats, n_keep, ctx):
        return Selection(baselines.top_k(score_fn(stats, ctx).to(stats.gram.device), n_keep))
    return select


def _lasso(stats, n_keep, ctx):
    return Selection(baselines.lasso_keep(stats.gram, n_keep)[0])


for _m in (
    Method("thinet", _thinet, select_many=_thinet_many, rank=_thinet_rank, op="greedy_remove",
           summary="the paper's greedy removal on the next layer's Gram"),
    Method("thinet_ls", _thinet_ls, rank=_thinet_ls_rank, op="greedy_keep_ls",
           summary="forward selection with a least-squares refit (ThiNet journal version)"),
    Method("random", _scored(lambda s, ctx: baselines.random_scores(s.channels, ctx.seed)),
           summary="random channels (seeded)"),
    Method("weight_sum", _scored(lambda s, ctx: baselines.weight_sum_scores(ctx.producer.weight)),
           summary="largest filter L1 norm (Li et al. 2017)"),
    Method("apoz", _scored(lambda s, ctx: baselines.apoz_scores(s.zero_fraction)), needs={"zeros"},
           summary="fewest zero activations (Hu et al. 2016)"),
    Method("lasso", _lasso, summary="LASSO channel selection on the Gram (He et al. 2017)"),
):
    register_method(_m)

"""ThiNet as a Torch-Pruning importance criterion.

`Torch-Pruning <https://github.com/VainF/Torch-Pruning>`_ finds the groups of coupled
channels of a model (its ``DependencyGraph``) and asks an *importance* for a 1-D score
per channel of each group (higher = keep). :class:`ThiNetImportance` answers with
ThiNet's ranking (DESIGN.md §4): the group's channels in the order ThiNet's greedy
removal (or the journal's forward least squares) would drop them, computed from the
Gram matrix of the group's *consumers* (the ``Conv2d``/``Linear`` layers that read the
channels), streamed from calibration data with thinet_fast's accumulators.

A group whose channels are read by several consumers (a residual stream, a concat, a
layer feeding two branches) is ranked on the sum of all consumers' Gram matrices
(DESIGN.md §2). A reader that thinet_fast cannot express (a grouped conv, LayerNorm,
an LSTM, attention, a Conv1d, ...) raises :class:`UnsupportedGroupError` naming it; a
group with no reader at all (its channels are the model output, e.g. the classifier)
gets ``None``, which Torch-Pruning treats as "do not prune this group".

Only the selection comes from ThiNet: Torch-Pruning cuts the channels and does not
rescale the kept ones. :func:`reconstructing` (or :func:`record` before the step and
:func:`reconstruct` after it, from :mod:`thinet_fast.integrations.reconstruction`) adds
ThiNet's least-squares reconstruction of every layer the step cut;
:func:`thinet_fast.prune` also has bias compensation and BN re-estimation.

Example::

    import torch, thinet_fast
    from thinet_fast.integrations.torch_pruning import thinet_pruner

    model = thinet_fast.models.DemoResNet()
    pruner = thinet_pruner(model, torch.randn(1, 1, 28, 28), calib_loader,
                           pruning_ratio=0.5, num_images=1000)
    pruner.step()            # model is now pruned in place by Torch-Pruning

with the cut layers refitted towards the unpruned model::

    with reconstructing(model, calib_loader) as rec:
        pruner.step()
    print(rec.report.table())

or, with any Torch-Pruning pruner::

    imp = ThiNetImportance(calib_loader, num_images=1000, statistics="auto")
    pruner = torch_pruning.pruner.BasePruner(model, example, importance=imp, ...)

Importing this module needs Torch-Pruning (``pip install torch-pruning``, tested with
1.6.1); ``import thinet_fast`` never imports it.
"""
from __future__ import annotations

import itertools
import warnings
from typing import Optional, Sequence

import torch
from torch import nn

try:
    import torch_pruning as tp
except ImportError as _exc:  # pragma: no cover - exercised by a test that hides the package
    raise ImportError(
        "thinet_fast.integrations.torch_pruning needs Torch-Pruning, which is not importable "
        f"({_exc}). Install it with: pip install torch-pruning"
    ) from _exc

from ..ops.dispatch import BACKEND_NAMES
from ..ops.draws import position_keys
from ..ops.stats import STATISTICS
from ..pipeline.collect import StatsSpec, feed, iter_batches, model_device, reduce_accumulators
from ..pipeline.methods import REGISTRY, SelectContext, get_method, selection_backend
from ..groups import Reader, UnsupportedGroupError, analyse
from ..tp_graph import graph_name, root_idxs
from .reconstruction import ReconstructionReport, Snapshot, record, reconstruct, reconstructing

__all__ = ["ThiNetImportance", "UnsupportedGroupError", "thinet_pruner", "record", "reconstruct", "reconstructing",
           "Snapshot", "ReconstructionReport"]

METHODS = tuple(m.name for m in REGISTRY.values() if m.rank is not None)  # built-ins that rank from a Gram


def _links(group):
    """The readers of a Torch-Pruning group (strict: what a ranking without a refit can
    express; grouped readers and LayerNorm/GroupNorm are refused)."""
    try:
        return analyse(group, strict=True).links
    except UnsupportedGroupError as exc:
        raise UnsupportedGroupError(f"{exc}. Add the group's producer(s) to ignored_layers, or prune with "
                                    "thinet_fast.prune(coupled='prune'), which reconstructs them") from None


def _state_key(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced, resized or modified in place
    (autograd's version counter). Edits through ``.data`` are not seen: call ``reset()``."""
    return (id(model),) + tuple(
        (id(t), t.data_ptr(), tuple(t.shape), t._version)
        for t in itertools.chain(model.parameters(), model.buffers()))


# ----------------------------------------------------------------- the importance
class ThiNetImportance(tp.importance.Importance):
    """ThiNet's channel ranking as a Torch-Pruning importance: ``imp(group)`` returns one
    score per channel of ``group`` (in the order of the group's root idxs), higher =
    kept longer.

    For each consumer of the group (a ``Conv2d`` with groups=1 or a ``Linear``, reached
    through channel-wise layers, residual adds, concats or flatten) it streams the
    consumer's input from ``data`` into a :class:`thinet_fast.StatsAccumulator`, sums the
    consumers' Gram matrices over the group's channels, and ranks the channels:

    * ``method="thinet"``: ``thinet_fast.greedy_remove(G, C - 1)``; the channel removed
      first scores 0, the next 1, ..., the one never removed C - 1;
    * ``method="thinet_ls"``: ``thinet_fast.greedy_keep_ls(G, C)``; the channel kept
      first scores C - 1, the last one 0.

    With ``normalize=True`` (default) the scores are divided by C - 1, so every group's
    scores lie in [0, 1] (with ``global_pruning=True`` Torch-Pruning then prunes about
    the same fraction of every group; ThiNet's ranks are not comparable across layers).

    Statistics: all consumers are collected in one pass over ``data`` (forward pre-hooks,
    always removed, the forward cut short after the last consumer, the model in eval mode
    and its per-module train flags restored afterwards). With ``prefetch=True`` the first
    call also collects the consumers of every other group of the dependency graph, so a
    pruning step costs one pass. Results are cached while the model is unchanged: the key
    holds every parameter's and buffer's identity, storage, shape and version counter, so
    a pruning step, an optimizer step or ``load_state_dict`` triggers a new pass. Edits
    through ``.data`` are invisible to it: call :meth:`reset` then.

    Each consumer's accumulator is seeded as ``collect_statistics`` seeds a single unit
    (``seed * 1_000_003``, its draws keyed by image content, so under
    ``torch.distributed``, where the buffers are summed across processes, the result does
    not depend on the sharding), so for a plain unit the Gram equals
    ``thinet_fast.collect_statistics(model, [unit], data, seed=seed, ...)``'s.

    Args:
        data: calibration batches: a tensor, or a re-iterable (list, DataLoader) of tensors
            or ``(input, target, ...)`` tuples. Iterated again whenever the model changed.
        num_images: images to use per pass (paper: 10 per class).
        samples_per_image: locations per image (paper: 10); None = every location.
        statistics: "sampled" (paper), "full" (exact over every output), "direct", or
            "auto" (full while (C·t)² is small, direct otherwise), per consumer.
        method: "thinet" (greedy removal, ICCV) or "thinet_ls" (forward least squares).
        seed: sampling seed.
        backend: preferred kernel backend ("auto", "torch", "cpu", "cuda", "cupy",
            "triton"); each op uses it where it implements it and "auto" elsewhere.
        dtype: accumulation dtype (float32 or float64).
        normalize: divide the ranks by C - 1.
        prefetch: collect every group's consumers on the first call for a model state.
        ignored_layers: layers (or containers) whose groups are not prefetched (pass the
            pruner's ``ignored_layers``; :func:`thinet_pruner` does).
        root_module_types: the pruner's root module types (for prefetching).
    """

    def __init__(self, data, *, num_images: int = 1000, samples_per_image: Optional[int] = 10,
                 statistics: str = "auto", method: str = "thinet", seed: int = 0, backend: str = "auto",
                 dtype: torch.dtype = torch.float32, normalize: bool = True, prefetch: bool = True,
                 ignored_layers: Optional[Sequence[nn.Module]] = None,
                 root_module_types: Optional[Sequence[type]] = None) -> None:
        if data is None:
            raise ValueError("ThiNetImportance needs calibration data (a tensor, list of batches or DataLoader)")
        if not isinstance(data, torch.Tensor) and iter(data) is data:
            raise TypeError("data is a one-shot iterator; ThiNetImportance iterates it again whenever the model "
                            "changes. Pass a list of batches, a tensor or a DataLoader.")
        if statistics not in STATISTICS:
            raise ValueError(f"statistics={statistics!r} is not one of {STATISTICS}")
        if method not in REGISTRY or REGISTRY[method].rank is None:
            ranking = tuple(m.name for m in REGISTRY.values() if m.rank is not None)
            raise ValueError(f"method={method!r} is not one of {ranking} (the baselines live in thinet_fast.prune "
                             "and Torch-Pruning's own importances)")
        if backend != "auto" and backend not in BACKEND_NAMES:
            raise ValueError(f"backend={backend!r} is not one of {BACKEND_NAMES + ('auto',)}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
        if int(num_images) < 1:
            raise ValueError(f"num_images must be >= 1; got {num_images}")
        if samples_per_image is not None and int(samples_per_image) < 1:
            raise ValueError(f"samples_per_image must be >= 1 or None; got {samples_per_image}")
        self.data = data
        self.num_images = int(num_images)
        self.samples_per_image = None if samples_per_image is None else int(samples_per_image)
        self.statistics = statistics
        self.method = method
        self.seed = int(seed)
        self.backend = backend
        self.dtype = dtype
        self.normalize = bool(normalize)
        self.prefetch = bool(prefetch)
        self.ignored_layers = list(ignored_layers or [])
        self.root_module_types = tuple(root_module_types) if root_module_types is not None else (
            tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR, tp.ops.TORCH_LSTM)
        #: passes over ``data`` so far (one per model state with ``prefetch=True``)
        self.collections = 0
        self._key: Optional[tuple] = None
        # consumer key -> (module, name, mode, Gram); the module is held so its id stays unique
        self._stats: dict[tuple[int, int], tuple[nn.Module, str, str, torch.Tensor]] = {}
        self._warned: set[str] = set()

    # -- public helpers ---------------------------------------------------------
    def reset(self) -> None:
        """Forget the cached statistics (the next call collects them again)."""
        self._key = None
        self._stats.clear()

    @property
    def statistics_used(self) -> dict[str, str]:
        """Consumer name -> the statistics mode its cached Gram was built with."""
        return {name: mode for _, name, mode, _ in self._stats.values()}

    def consumers(self, group) -> list[str]:
        """Names of the Conv2d/Linear layers that read ``group``'s channels."""
        return [ln.reader.name for ln in _links(group)]

    @torch.no_grad()
    def gram(self, group) -> tuple[Optional[torch.Tensor], list[str]]:
        """The group's Gram matrix (C×C, in the order of the root idxs): the sum of its
        consumers' Grams restricted to the group's channels, and the consumers' names.
        ``(None, [])`` when nothing reads the channels."""
        links = _links(group)
        if not links:
            return None, []
        model = group._DG.model
        self._ensure(model, [ln.reader for ln in links], group._DG)
        n = len(root_idxs(group[0]))
        G = None
        for ln in links:
            Gc = self._stats[ln.reader.key][3]
            if G is None:
                G = Gc.new_zeros(n, n)
            ch = ln.channels.to(Gc.device)
            sub = Gc.index_select(0, ch).index_select(1, ch).to(G.device)
            p = ln.positions.to(G.device)
            G.index_put_((p[:, None].expand_as(sub), p[None, :].expand_as(sub)), sub, accumulate=True)
        return G, [ln.reader.name for ln in links]

    @torch.no_grad()
    def __call__(self, group) -> Optional[torch.Tensor]:
        G, _ = self.gram(group)
        if G is None:
            root = graph_name(group._DG, group[0][0].target.module)
            if root not in self._warned:
                self._warned.add(root)
                warnings.warn(f"ThiNetImportance: no Conv2d/Linear layer reads the channels of the group rooted at "
                              f"`{root}` (they reach the model output); returning None, so Torch-Pruning leaves "
                              "the group unpruned. Add it to ignored_layers to silence this.", stacklevel=3)
            return None
        return self.rank(G)

    def rank(self, G: torch.Tensor) -> torch.Tensor:
        """ThiNet's per-channel scores for a Gram matrix (float32, on the CPU)."""
        n = G.shape[0]
        if n == 1:
            return torch.ones(1)
        scores = torch.full((n,), float(n - 1), dtype=torch.float32)
        ctx = SelectContext(backend=selection_backend(self.method, self.backend, G.device))
        order = get_method(self.method).rank(G, ctx).cpu()  # the first removed scores lowest
        if order.numel() != n - 1 or bool((order < 0).any()) or order.unique().numel() != n - 1:
            raise RuntimeError(f"method {self.method!r} returned an incomplete removal order {order.tolist()} "
                               f"for {n} channels")
        scores[order] = torch.arange(n - 1, dtype=torch.float32)
        return scores / (n - 1) if self.normalize else scores

    # -- statistics ---------------------------------------------------------------
    def _ensure(self, model: nn.Module, wanted: list[Reader], DG) -> None:
        key = _state_key(model)
        if key != self._key:
            self._stats.clear()
            self._key = key
        todo = {c.key: c for c in wanted if c.key not in self._stats}
        if not todo:
            return
        if self.prefetch:
            for c in self._all_consumers(DG):
                if c.key not in self._stats:
                    todo.setdefault(c.key, c)
        self._collect(model, list(todo.values()))
        self._key = _state_key(model)  # unchanged by a forward in eval mode; re-read to be safe

    def _all_consumers(self, DG) -> list[Reader]:
        ignored = [m for layer in self.ignored_layers if isinstance(layer, nn.Module) for m in layer.modules()]
        out = []
        for g in DG.get_all_groups(ignored_layers=ignored, root_module_types=self.root_module_types):
            try:
                out += [ln.reader for ln in _links(g)]
            except UnsupportedGroupError:
                continue  # reported when (if) that group is asked for
        return out

    def _collect(self, model: nn.Module, consumers: list[Reader]) -> None:
        spec = StatsSpec(statistics=self.statistics, num_images=self.num_images,
                         samples_per_image=self.samples_per_image, seed=self.seed, acc_dtype=self.dtype,
                         backend=self.backend, count_zeros=False)
        sinks: dict[nn.Module, list] = {}
        names = {}
        accs = []
        for c in consumers:
            acc = spec.accumulator(c.module.weight, c.geometry, channels=c.channels, index=0)
            accs.append((c, acc))
            sinks.setdefault(c.module, []).append(_tokens_as_samples(acc.update) if c.kind == "linear" else acc.update)
            names[c.module] = c.name
        feed(model, sinks, iter_batches(self.data, self.num_images, model_device(model)), names=names)
        reduce_accumulators([acc for _, acc in accs])
        for c, acc in accs:
            self._stats[c.key] = (c.module, c.name, acc.statistics, acc.result().gram)
        self.collections += 1


def _tokens_as_samples(update):
    def sink(x, keys):  # a Linear on tokens: every position is a sample, keyed by image and position
        if x.dim() > 2:
            L = x.numel() // (x.shape[0] * x.shape[-1])
            keys = position_keys(keys.repeat_interleave(L) * 1_000_003 + torch.arange(L).repeat(x.shape[0]))
            x = x.reshape(-1, x.shape[-1])
        update(x, keys)
    return sink


# ----------------------------------------------------------------- convenience
def thinet_pruner(model: nn.Module, example_inputs, data, pruning_ratio: float = 0.5,
                  ignored_layers: Optional[Sequence[nn.Module]] = None, *, num_images: int = 1000,
                  samples_per_image: Optional[int] = 10, statistics: str = "auto", method: str = "thinet",
                  seed: int = 0, backend: str = "auto", dtype: torch.dtype = torch.float32, normalize: bool = True,
                  prefetch: bool = True, **tp_kwargs):
    """A Torch-Pruning pruner (``tp.pruner.BasePruner``, formerly ``MetaPruner``) that
    ranks channels with :class:`ThiNetImportance`.

    ``pruning_ratio``, ``ignored_layers`` and ``**tp_kwargs`` (``global_pruning``,
    ``iterative_steps``, ``pruning_ratio_dict``, ``round_to``, ...) go to the pruner; the
    other keywords to the importance. ``pruner.step()`` prunes ``model`` in place. Groups
    nothing reads (the classifier) are left alone with a warning; list them in
    ``ignored_layers`` to silence it.
    """
    pruner_cls = getattr(tp.pruner, "BasePruner", None) or getattr(tp.pruner, "MetaPruner")
    imp = ThiNetImportance(data, num_images=num_images, samples_per_image=samples_per_image, statistics=statistics,
                           method=method, seed=seed, backend=backend, dtype=dtype, normalize=normalize,
                           prefetch=prefetch, ignored_layers=ignored_layers,
                           root_module_types=tp_kwargs.get("root_module_types"))
    return pruner_cls(model, example_inputs, importance=imp, pruning_ratio=pruning_ratio,
                      ignored_layers=list(ignored_layers) if ignored_layers is not None else None, **tp_kwargs)

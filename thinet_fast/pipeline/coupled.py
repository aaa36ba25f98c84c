"""Coupled groups (``coupled="prune"``): ThiNet selection on the sum of every reader's
Gram over the group's channels, and every reader reconstructed from its own statistics.

The sequential schedule takes one group at a time, on statistics of the model as the
earlier groups left it; the one-shot schedule decides every group from one pass and
refits each reader once, on the channels it keeps from all the groups it reads (a
concat's reader keeps the union). A reader's new weights are written in its full input
space; then Torch-Pruning cuts the group (producers, followers, readers) physically.

A *normalised* group (a LayerNorm over its channels, or attention reading and writing
them: a transformer's residual stream) is selected the same way, then cut, then its
readers are refitted on what they see after the cut, towards their output before it
(:mod:`~thinet_fast.pipeline.towards`; the full refit whatever ``reconstruction`` is,
except "none": a per-channel scale cannot undo a renormalisation). Such groups are taken
one at a time under either schedule, after the one-shot pass's groups.
"""
from __future__ import annotations

import copy
import dataclasses
import time

import torch
from torch import nn

from ..groups import ChannelGroup, Reader, analyse, find_groups, input_shapes
from ..regions import check_widths, output_widths
from ..ops.reconstruct import channel_taps
from ..ops.stats import Statistics
from ..records import UnitRecord
from ..units import Unit, get_module
from .collect import StatsSpec, collect_accumulators, iter_batches, progress_bar
from .decide import decide
from .heads import run_heads
from .keeps import block_multiple, n_keep_for, round_multiple
from .methods import SelectContext, get_method, selection_backend
from .towards import refit_readers

__all__ = ["run_coupled", "group_statistics", "reader_unit", "bias_home"]


def reader_unit(group: ChannelGroup, reader: Reader) -> Unit:
    """The reader as the consumer of a :class:`Unit` (what ``decide`` reconstructs)."""
    m = reader.module
    if reader.kind == "conv":
        return Unit(group.name, (), reader.name, reader.channels, reader.taps, "conv", consumer_out=m.out_channels,
                    kernel_size=tuple(m.kernel_size), stride=tuple(m.stride),
                    padding=m.padding if isinstance(m.padding, str) else tuple(m.padding),
                    dilation=tuple(m.dilation), padding_mode=m.padding_mode)
    return Unit(group.name, (), reader.name, reader.channels, reader.taps, "linear", flatten=reader.taps > 1,
                tokens=reader.tokens, consumer_out=m.out_features)


def group_statistics(group: ChannelGroup, stats: dict) -> Statistics:
    """The group's statistics over its block positions: each reader's Gram (and zero
    counts) over the group's channels, summed, then summed over the ``blocks``."""
    C, n = group.channels, group.channels // group.blocks
    G = zeros = None
    count = elements = 0
    for ln in group.links:
        st = stats[ln.reader.key]
        if G is None:
            G = st.gram.new_zeros(C, C, dtype=torch.float64)
            zeros = torch.zeros(C, dtype=torch.float64)
        ch, p = ln.channels.to(st.gram.device), ln.positions.to(st.gram.device)
        sub = st.gram.index_select(0, ch).index_select(1, ch).double()
        G.index_put_((p[:, None].expand_as(sub), p[None, :].expand_as(sub)), sub, accumulate=True)
        zeros.index_add_(0, ln.positions, st.zeros.index_select(0, ln.channels.to(st.zeros.device)).double().cpu())
        count, elements = count + st.count, max(elements, st.elements)
    if group.blocks > 1:  # removing position p removes it from every block
        G = G.reshape(group.blocks, n, group.blocks, n).sum((0, 2))
        zeros = zeros.reshape(group.blocks, n).sum(0)
    first = stats[group.links[0].reader.key]
    return Statistics(statistics=first.statistics, gram=G, count=count, patch_count=count,
                      patch_sum=G.new_zeros(n, 1), zeros=zeros, elements=elements * group.blocks,
                      backend=first.backend)


class _Producers(nn.Module):
    """What a method reading ``ctx.producer.weight`` sees for a group: one row per
    position, the L1 norm of every producer's filters there."""

    def __init__(self, group: ChannelGroup, modules: dict):
        super().__init__()
        n = group.channels // group.blocks
        score = torch.zeros(n, dtype=torch.float64)
        for name in group.producers:
            w = modules[name].weight.detach().double()
            score += w.abs().reshape(w.shape[0], -1).sum(1).reshape(-1, n).sum(0) if w.shape[0] == group.channels \
                else 0.0
        self.weight = nn.Parameter(score[:, None], requires_grad=False)


def _select(group, stats, n_keep, modules, cfg, device):
    method = get_method(cfg.method)
    ctx = SelectContext(_Producers(group, modules), cfg.seed, selection_backend(cfg.method, cfg.backend, device),
                        cfg.ridge)
    gs = group_statistics(group, stats)
    n = gs.channels
    if n_keep >= n:
        return torch.arange(group.channels), gs, None
    sel = method.select(gs, n_keep, ctx)
    local = sel.keep.cpu().sort().values
    kept = (torch.arange(group.blocks)[:, None] * n + local[None, :]).reshape(-1)
    return kept, gs, sel.curve


def _write(reader: Reader, keep: torch.Tensor, new_w: torch.Tensor, new_b, DG) -> str:
    """Put the refitted weights into the reader's full input space (columns it loses
    get zeros and are cut by Torch-Pruning); a bias correction goes into the bias, the
    BatchNorm right after the reader, or a new bias. Returns a note, or ''."""
    m, note = reader.module, ""
    with torch.no_grad():
        w = m.weight
        new_w = new_w.to(w).reshape((w.shape[0], keep.numel()) + tuple(w.shape[2:]) if reader.kind == "conv"
                                    else (w.shape[0], -1))
        if reader.kind == "conv" and reader.groups > 1:
            K, n, g = w.shape[0], reader.channels // reader.groups, reader.groups
            rows = K // g
            for a in range(g):
                in_block = (keep >= a * n) & (keep < (a + 1) * n)
                cols = keep[in_block] - a * n
                w[a * rows:(a + 1) * rows].zero_()
                w[a * rows:(a + 1) * rows, cols.to(w.device)] = new_w[a * rows:(a + 1) * rows][:, in_block.to(w.device)]
        elif reader.kind == "conv":
            w.zero_()
            w[:, keep.to(w.device)] = new_w
        else:
            t = reader.taps
            cols = channel_taps(keep, t).to(w.device)
            w.zero_()
            w[:, cols] = new_w.reshape(w.shape[0], -1).to(w)
        if new_b is None:
            return note
        if m.bias is not None:
            m.bias.copy_(new_b.to(m.bias))
            return note
        bn = bias_home(m, DG)
        if bn is not None:
            bn.running_mean.sub_(new_b.to(bn.running_mean))  # BN(y + b) = BN'(y)
            return note
        m.bias = nn.Parameter(new_b.to(w).clone())
        return f"`{reader.name}` gained a bias (bias compensation)"


def bias_home(module: nn.Module, DG):
    """The BatchNorm that alone reads ``module``'s output, which takes a bias correction
    into its running mean; None when the module must gain a bias instead."""
    node = DG.module2node.get(module)
    outs = [o.module for o in node.outputs] if node is not None else []
    if len(outs) == 1 and isinstance(outs[0], nn.modules.batchnorm._BatchNorm) and \
            outs[0].running_mean is not None and outs[0].num_features == module.weight.shape[0]:
        return outs[0]
    return None


class CoupledStage:
    """The coupled groups as one step of a schedule: ``run(model)`` prunes them, then
    the attention heads (:mod:`thinet_fast.pipeline.heads`), and keeps the refused roots
    in ``refused`` (a resumed run restores them instead). ``counts``: a budget's widths
    (group name -> positions per block, site -> heads), which must name exactly the
    groups and sites the stage finds (RuntimeError otherwise: the budget's counts would
    not be the model's)."""

    def __init__(self, example, data, cfg, device, spec, timer, *, skip=(), counts=None):
        self._args = (example, data, cfg, device, spec, timer)
        self.cfg, self.skip, self.counts = cfg, skip, counts
        self.refused: list[tuple[str, str]] = []

    def run(self, model: nn.Module) -> list[UnitRecord]:
        # the ignored modules are looked up now: a unit cut may have replaced them
        ignored = [get_module(model, f) for f in self.cfg.ignored_layers]
        records, self.refused = run_coupled(model, *self._args, skip=self.skip, ignored_layers=ignored,
                                            counts=self.counts)
        heads, refused = run_heads(model, *self._args, first_index=len(records), counts=self.counts)
        unused = sorted(set(self.counts or ()) - {r.producer for r in records + heads})
        if unused:
            raise RuntimeError(f"the budget set widths for {unused}, which the coupled stage did not find on the "
                               "model as the plain units left it; please report the model (the caller's model is "
                               "unchanged)")
        self.refused += refused
        return records + heads


def run_coupled(model: nn.Module, example, data, cfg, device, spec: StatsSpec, timer, *, skip=(),
                ignored_layers=(), counts=None) -> tuple[list[UnitRecord], list[tuple[str, str]]]:
    """Prune every coupled group of ``model`` in place. Returns the group records and
    the refused roots ``(fqn, reason)``.

    ``cfg.schedule == "sequential"`` (the paper's): one group at a time, front to back,
    each on statistics of the model as the earlier groups left it (one pass per group,
    cut short after its last reader), its readers refitted on what they keep now.
    ``"oneshot"``: one pass for every group; each reader refitted once on the channels
    it keeps from all the groups it reads. ``counts``: see :class:`CoupledStage`."""
    with timer.phase("groups"):
        groups, refused = find_groups(model, example, ignored_layers=ignored_layers, skip=skip)
        groups = [g for g in groups if group_wanted(g, cfg, model)]
    if counts is not None:  # budget_stats.budget_items leaves normalised groups out
        refused += [(g.name, "a flops_target/params_target budget keeps a normalised group (LayerNorm or attention "
                             "over its channels) whole; prune it with keep=") for g in groups if g.normalised]
        groups = [g for g in groups if not g.normalised]
    if not groups:
        return [], refused
    widths = output_widths(model, example)
    if cfg.schedule == "sequential":
        shapes = input_shapes(model, example)
        records = []
        for i, g in enumerate(groups):
            records.append(_one_group(model, _fresh(g, shapes), data, cfg, device, spec, timer,
                                      f"[{i + 1}/{len(groups)}]", _n_keep(g, cfg, device, counts)))
            _check_forward(model, example, widths, [g.name])
        return records, refused
    later = [g for g in groups if g.normalised]
    groups = [g for g in groups if not g.normalised]
    records = _oneshot(model, groups, data, cfg, device, spec, timer, counts, example, widths) if groups else []
    shapes = input_shapes(model, example) if later else None
    for i, g in enumerate(later):
        records.append(_one_group(model, _fresh(g, shapes), data, cfg, device, spec, timer,
                                  f"[{i + 1}/{len(later)}]", _n_keep(g, cfg, device, counts)))
        _check_forward(model, example, widths, [g.name])
    return records, refused


def _oneshot(model, groups, data, cfg, device, spec, timer, counts, example, widths) -> list[UnitRecord]:
    readers = {r.key: r for g in groups for r in g.readers}
    graph_of = {r.key: g.graph for g in groups for r in g.readers}
    with progress_bar(spec.pass_images, "statistics (groups)", cfg.progress) as bar:
        stats = collect_accumulators(model, list(readers.values()), iter_batches(data, spec.num_images, device),
                                     spec, bar=bar, timer=timer)
    modules = dict(model.named_modules())
    removed: dict = {key: set() for key in readers}
    chosen = []
    for g in groups:
        t0 = time.perf_counter()
        kept, gs, _ = _select(g, stats, _n_keep(g, cfg, device, counts), modules, cfg, device)
        drop = _dropped(g, kept)
        for ln in g.links:
            removed[ln.reader.key].update(ln.channels[drop[ln.positions]].tolist())
        chosen.append((g, kept, gs, time.perf_counter() - t0))
    errors, notes_of = {}, {}
    for key, reader in readers.items():
        errors[key], notes_of[key] = _refit(chosen[0][0], reader, removed[key], stats[key], cfg, graph_of[key])
    records = []
    with timer.phase("rewrite"):
        for g, kept, gs, seconds in chosen:
            g.prune(sorted(set(range(g.channels)) - set(kept.tolist())))
            records.append(_record(g, kept, gs, seconds, errors, notes_of, cfg))
    _check_forward(model, example, widths, [g.name for g in groups])
    return records


def _check_forward(model, example, widths, names) -> None:
    check_widths(model, example, widths, f"the coupled group(s) {', '.join(names)}",
                 ": the graph missed a layer that reads these channels. Add the group's root to ignored_layers "
                 "(the caller's model is unchanged), and please report the model")


def _fresh(g: ChannelGroup, shapes) -> ChannelGroup:
    """``g`` analysed again on the model as it is now (earlier cuts renumber its readers'
    input channels)."""
    DG = g.graph
    width = DG.get_pruner_of_module(g.root).get_out_channels(g.root)
    fresh = analyse(DG.get_pruning_group(g.root, g.root_fn, list(range(width))), shapes)
    fresh.graph = DG
    return fresh


def _one_group(model, g: ChannelGroup, data, cfg, device, spec, timer, tag: str, n_keep: int) -> UnitRecord:
    readers = {r.key: r for r in g.readers}
    with progress_bar(spec.pass_images, f"{tag} group {g.name}", cfg.progress) as bar:
        stats = collect_accumulators(model, list(readers.values()), iter_batches(data, spec.num_images, device),
                                     spec, bar=bar, timer=timer)
    t0 = time.perf_counter()
    kept, gs, _ = _select(g, stats, n_keep, dict(model.named_modules()), cfg, device)
    if g.normalised:
        return _normalised(model, g, kept, gs, data, cfg, device, spec, timer, tag, t0)
    drop = _dropped(g, kept)
    errors, notes_of = {}, {}
    for ln in g.links:
        key = ln.reader.key
        errors[key], notes_of[key] = _refit(g, ln.reader, set(ln.channels[drop[ln.positions]].tolist()),
                                            stats[key], cfg, g.graph)
    seconds = time.perf_counter() - t0
    with timer.phase("rewrite"):
        g.prune(sorted(set(range(g.channels)) - set(kept.tolist())))
    return _record(g, kept, gs, seconds, errors, notes_of, cfg)


def _normalised(model, g: ChannelGroup, kept, gs, data, cfg, device, spec, timer, tag, t0) -> UnitRecord:
    """Cut ``g``, then refit its readers towards the model before the cut."""
    seconds = time.perf_counter() - t0
    before = copy.deepcopy(model) if kept.numel() < g.channels else None
    with timer.phase("rewrite"):
        g.prune(sorted(set(range(g.channels)) - set(kept.tolist())))
    errors, notes_of = {}, {}
    recon = "none" if cfg.reconstruction == "none" else "full"
    if before is not None:
        names = [ln.reader.name for ln in g.links]
        with progress_bar(spec.pass_images * len(names), f"{tag} refit {g.name}", cfg.progress) as bar, \
                timer.phase("reconstruction"):
            fits = refit_readers(before, model, names, lambda: iter_batches(data, spec.num_images, device),
                                 reconstruction=recon, ridge=cfg.ridge, bias_compensation=cfg.bias_compensation,
                                 holdout=cfg.holdout, seed=cfg.seed, bar=bar)
        del before
        for ln in g.links:
            errors[ln.reader.key] = fits[ln.reader.name] + (recon,)
            notes_of[ln.reader.key] = []
    else:
        for ln in g.links:
            errors[ln.reader.key], notes_of[ln.reader.key] = (0.0, 0.0, 1.0, recon), []
    rec = _record(g, kept, gs, seconds, errors, notes_of, cfg)
    how = (f"LayerNorm {', '.join(g.norms)}" if g.norms else "") + \
        ("; " if g.norms and g.attention else "") + (f"attention {', '.join(g.attention)}" if g.attention else "")
    note = f"normalised group ({how}): readers refitted after the cut, towards their output before it"
    return dataclasses.replace(rec, notes=(note,) + tuple(rec.notes))


def _n_keep(g: ChannelGroup, cfg, device, counts=None) -> int:
    """Kept positions per block: a budget's ``counts``, else ``keep``. With ``round_to=N``
    a block keeps a multiple of N / gcd(N, blocks) (:func:`~.keeps.block_multiple`), so
    the group's whole width (positions × blocks) is one of N."""
    if counts is not None:
        if g.name not in counts:
            if g.channels // g.blocks < 2:
                return g.channels // g.blocks  # one position per block: not an item of the budget
            raise RuntimeError(f"the budget has no width for the coupled group `{g.name}`, found after the plain "
                               "units were cut; please report the model (the caller's model is unchanged)")
        return int(counts[g.name])
    multiple = block_multiple(round_multiple(cfg.round_to, device), g.blocks)
    return n_keep_for(g.channels // g.blocks, _fraction(g, cfg), f"keep for group `{g.name}`", multiple)


def _dropped(g: ChannelGroup, kept: torch.Tensor) -> torch.Tensor:
    drop = torch.ones(g.channels, dtype=torch.bool)
    drop[kept] = False
    return drop


def _refit(g: ChannelGroup, reader: Reader, removed: set, stats, cfg, DG):
    """Reconstruct ``reader`` on the input channels it keeps; returns (errors, notes)."""
    keep = torch.tensor(sorted(set(range(reader.channels)) - removed), dtype=torch.long)
    recon = "scale" if reader.groups > 1 and cfg.reconstruction == "full" else cfg.reconstruction
    d = decide(reader_unit(g, reader), stats, keep.numel(), None, _dense(reader),
               method=cfg.method, reconstruction=recon, bias_compensation=cfg.bias_compensation,
               seed=cfg.seed, backend=cfg.backend, ridge=cfg.ridge, selection=(keep, None))
    note = _write(reader, keep, d.consumer_weight, d.consumer_bias, DG)
    energy = float(stats.gram.double().sum())
    notes = list(d.notes) + ([note] if note else []) + (
        ["grouped conv: scale only (a full refit would mix its groups)"] if recon != cfg.reconstruction else [])
    return (d.error_selected, d.error_reconstructed, energy, d.reconstruction), notes


def _dense(reader: Reader) -> nn.Module:
    """A module ``decide`` can read: the reader, or a dense stand-in for a grouped conv
    or a Linear on tokens (its weight as the kernel of the statistics)."""
    if reader.groups == 1 and not reader.tokens:
        return reader.module
    stand = nn.Module()
    stand.weight = nn.Parameter(reader.kernel(), requires_grad=False)
    stand.bias = reader.module.bias
    return stand


def group_wanted(g: ChannelGroup, cfg, model) -> bool:
    if cfg.units is not None:
        return any(p in cfg.units for p in g.producers)
    if isinstance(cfg.keep, dict):
        return any(p in cfg.keep for p in g.producers)
    if cfg.filter_fn is not None:
        modules = dict(model.named_modules())
        # attention whose width the group cuts is asked too: the filter may keep it whole
        return all(cfg.filter_fn(modules[p], p) for p in g.producers + g.attention if p in modules)
    return True


def _fraction(g: ChannelGroup, cfg):
    if isinstance(cfg.keep, dict):
        named = [cfg.keep[p] for p in g.producers if p in cfg.keep]
        value = named[0]
        return max(1, value // g.blocks) if isinstance(value, int) else value
    return 0.5 if cfg.keep is None else cfg.keep


def _record(g, kept, gs, seconds, errors, notes_of, cfg) -> UnitRecord:
    keys = [ln.reader.key for ln in g.links]
    total = sum(errors[k][2] for k in keys) or 1.0
    err_sel = sum(errors[k][0] * errors[k][2] for k in keys) / total
    err_rec = sum(errors[k][1] * errors[k][2] for k in keys) / total
    recons = sorted({errors[k][3] for k in keys})
    notes = [f"coupled group: producers {', '.join(g.producers)}"]
    if g.followers:
        notes.append(f"followers: {', '.join(g.followers)}")
    if g.blocks > 1:
        notes.append(f"{g.blocks} aligned blocks (grouped convs / GroupNorm)")
    notes += list(g.notes)
    for k in keys:
        notes += notes_of[k]
    return UnitRecord(producer=g.name, consumer=", ".join(ln.reader.name for ln in g.links), channels=g.channels,
                      kept=int(kept.numel()), method=cfg.method, statistics=gs.statistics,
                      reconstruction="/".join(recons), error_selected=float(err_sel),
                      error_reconstructed=float(err_rec), seconds=seconds, notes=tuple(dict.fromkeys(notes)),
                      statistics_backend=gs.backend)

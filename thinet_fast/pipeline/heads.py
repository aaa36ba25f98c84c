"""Attention heads (``coupled="prune"``): ThiNet selection over whole heads, and the
output projection reconstructed from its own statistics.

A head's contribution to the projection's output is the sum of its channels'
contributions, so the head-level Gram is the channel-level Gram of the projection's
input (the concatenated heads, every token a sample) summed over each head's block.
The chosen method selects heads on it; :func:`~thinet_fast.pipeline.decide.decide`
then refits the projection on the kept heads' channels as it refits any Linear, towards
the attention output of the model as it is when the site is reached. Sites are taken
one at a time (sequential schedule) or from one pass (one-shot).
"""
from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from ..attention import HeadSite, cut_heads, find_heads, pre_projection
from ..ops.patches import ConsumerGeometry, tokens_as_map
from ..ops.reconstruct import channel_taps
from ..ops.stats import Statistics
from ..records import UnitRecord
from ..regions import check_widths, output_widths
from ..units import Unit
from .collect import _collect, iter_batches, progress_bar
from .decide import decide
from .keeps import n_keep_for
from .methods import SelectContext, get_method, selection_backend

__all__ = ["run_heads", "head_watch", "head_statistics", "head_gram", "heads_kept", "wanted"]


def head_gram(stats: Statistics, heads: int) -> Statistics:
    """The statistics of whole heads: every (head, head) block of the channel Gram
    summed, zero counts summed per head."""
    d = stats.channels // heads
    G = stats.gram.double().reshape(heads, d, heads, d).sum((1, 3))
    zeros = stats.zeros.double().reshape(heads, d).sum(1)
    return Statistics(statistics=stats.statistics, gram=G, count=stats.count, patch_count=stats.count,
                      patch_sum=G.new_zeros(heads, 1), zeros=zeros, elements=stats.elements * d,
                      backend=stats.backend)


def _unit(site: HeadSite) -> Unit:
    proj = site.projection
    return Unit(site.name, (), f"{site.name}.{site.projection_name}", proj.in_features, 1, "linear", tokens=True,
                consumer_out=proj.out_features)


def head_watch(sites: list[HeadSite], spec, first_index: int = 0) -> tuple[list, list]:
    """What a pass watches for ``sites`` (their projections' input, keyed by site name;
    site j seeded as unit ``first_index + j``), and the hooks that feed it: remove them
    after the pass."""
    watched, handles = [], []
    try:
        for j, site in enumerate(sites):
            proj = site.projection
            acc = spec.accumulator(proj.weight.detach()[:, :, None, None], ConsumerGeometry.conv(1),
                                   channels=proj.in_features, index=first_index + j)
            probe = nn.Identity()  # what the collector watches: called with the heads' output

            def hook(module, args, kwargs, out, site=site, probe=probe):
                with pre_projection(site):
                    z = module.forward(*args, **kwargs)
                z = z[0] if isinstance(z, tuple) else z
                if isinstance(module, nn.MultiheadAttention) and not module.batch_first and z.dim() == 3:
                    z = z.transpose(0, 1)  # (L, N, E): images first
                probe(z)
            handles.append(site.module.register_forward_hook(hook, with_kwargs=True))
            sink = (lambda a: lambda x, keys: a.update(tokens_as_map(x), keys))(acc)
            watched.append((site.name, probe, site.name, acc, sink))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return watched, handles


def head_statistics(model: nn.Module, sites: list[HeadSite], batches, spec, *, first_index: int = 0, bar=None,
                    timer=None) -> dict[str, Statistics]:
    """Statistics of each site's projection input (its heads before the projection),
    keyed by site name; site j is seeded as unit ``first_index + j``."""
    watched, handles = head_watch(sites, spec, first_index)
    try:
        return _collect(model, watched, batches, None, True, bar, timer)
    finally:
        for h in handles:
            h.remove()


class _HeadNorms(nn.Module):
    """What a method reading ``ctx.producer.weight`` sees: one row per head, the L1
    norm of its value rows (the weights that write what the projection reads)."""

    def __init__(self, site: HeadSite):
        super().__init__()
        H, d = site.heads, site.head_dim
        v = site.qkv_weight.detach().double()[2 * H * d:3 * H * d].abs().reshape(H, -1).sum(1)
        self.weight = nn.Parameter(v[:, None], requires_grad=False)


def wanted(site: HeadSite, cfg) -> bool:
    """Whether ``cfg`` (units=, a keep dict, filter_fn) selects the site."""
    if cfg.units is not None:
        return site.name in cfg.units
    if isinstance(cfg.keep, dict):
        return site.name in cfg.keep
    return cfg.filter_fn is None or bool(cfg.filter_fn(site.module, site.name))


def heads_kept(site: HeadSite, cfg, counts=None) -> int:
    """Heads the site keeps: a budget's ``counts``, else ``keep`` (a fraction, or a
    count in a keep dict) of them."""
    if counts is not None:
        if site.name not in counts and site.heads >= 2:
            raise RuntimeError(f"the budget has no head count for `{site.name}`; please report the model (the "
                               "caller's model is unchanged)")
        return int(counts.get(site.name, site.heads))
    fraction = cfg.keep.get(site.name, 0.5) if isinstance(cfg.keep, dict) else (0.5 if cfg.keep is None
                                                                              else cfg.keep)
    return n_keep_for(site.heads, fraction, f"keep for the heads of `{site.name}`")


def _decide_site(model, site: HeadSite, stats: Statistics, cfg, device, counts=None) -> UnitRecord:
    t0 = time.perf_counter()
    n_keep = heads_kept(site, cfg, counts)
    hs = head_gram(stats, site.heads)
    if n_keep >= site.heads:
        keep, curve = torch.arange(site.heads), None
    else:
        ctx = SelectContext(_HeadNorms(site), cfg.seed, selection_backend(cfg.method, cfg.backend, device),
                            cfg.ridge)
        sel = get_method(cfg.method).select(hs, n_keep, ctx)
        keep, curve = sel.keep.cpu().sort().values, sel.curve
    d = site.head_dim
    channels = channel_taps(keep, d)
    proj = site.projection
    unit = _unit(site)
    dec = decide(unit, stats, channels.numel(), None, proj, method=cfg.method, reconstruction=cfg.reconstruction,
                 bias_compensation=cfg.bias_compensation, seed=cfg.seed, backend=cfg.backend, ridge=cfg.ridge,
                 selection=(channels, None))
    weight = dec.consumer_weight.reshape(proj.out_features, -1)
    bias = dec.consumer_bias if dec.consumer_bias is not None else (None if proj.bias is None else proj.bias)
    cut_heads(model, site, keep, weight, bias)
    record = dec.record()
    note = f"attention heads: kept {keep.numel()} of {site.heads} (head_dim {d}); the projection refitted"
    return dataclasses.replace(record, channels=site.heads, kept=int(keep.numel()),
                               notes=(note,) + tuple(record.notes), seconds=time.perf_counter() - t0,
                               error_curve=() if curve is None else curve.double().cpu().tolist())


def run_heads(model: nn.Module, example, data, cfg, device, spec, timer, *, first_index: int = 0, counts=None
              ) -> tuple[list[UnitRecord], list[tuple[str, str]]]:
    """Prune the heads of every supported attention module in place; returns the
    records and the refused modules ``(fqn, reason)``. ``counts``: a budget's heads per
    site (:class:`~thinet_fast.pipeline.coupled.CoupledStage`)."""
    with timer.phase("groups"):
        sites, refused = find_heads(model, cfg.ignored_layers)
        sites = [s for s in sites if wanted(s, cfg)]
    if not sites:
        return [], refused
    widths = output_widths(model, example)
    records = []
    if cfg.schedule == "sequential":
        for i, site in enumerate(sites):
            with progress_bar(spec.pass_images, f"[{i + 1}/{len(sites)}] heads {site.name}", cfg.progress) as bar:
                stats = head_statistics(model, [site], iter_batches(data, spec.num_images, device), spec,
                                        first_index=first_index + i, bar=bar, timer=timer)
            records.append(_decide_site(model, site, stats[site.name], cfg, device, counts))
    else:
        with progress_bar(spec.pass_images, "statistics (heads)", cfg.progress) as bar:
            stats = head_statistics(model, sites, iter_batches(data, spec.num_images, device), spec,
                                    first_index=first_index, bar=bar, timer=timer)
        for i, site in enumerate(sites):
            records.append(_decide_site(model, site, stats[site.name], cfg, device, counts))
    check_widths(model, example, widths, f"the attention heads of {', '.join(s.name for s in sites)}",
                 ". Add them to ignored_layers (the caller's model is unchanged), and please report the model")
    return records, refused

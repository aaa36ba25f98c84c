"""Selection and reconstruction for one unit: statistics in, a decision out."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops import cross, reconstruct
from ..ops.stats import Statistics
from ..records import UnitRecord
from ..units import Unit
from .methods import SelectContext, get_method, selection_backend, selection_resolution


@dataclass
class Decision:
    """What to cut and what to write into the consumer, plus the numbers for the report."""

    unit: Unit
    indices: torch.Tensor                    # sorted kept channel indices (a count is n_keep)
    consumer_weight: torch.Tensor            # (K, |S|, kh, kw) or (K, |S|·t), consumer dtype
    consumer_bias: torch.Tensor | None
    method: str
    statistics: str
    reconstruction: str
    error_selected: float                    # relative error of the kept set, w = 1 (in sample)
    error_reconstructed: float               # after reconstruction: on held-out images when there are any
    error_curve: torch.Tensor | None = None  # E(n)/E(all removed), n = 1..C-1 (thinet only)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    selection_backend: str = "torch"
    statistics_backend: str = "torch"
    heldout_images: int = 0                  # images behind error_reconstructed (0: it is in sample)
    ridge: float | None = None               # the relative ridge of the reconstruction's solve

    def record(self) -> UnitRecord:
        u = self.unit
        return UnitRecord(
            producer=u.producer, consumer=u.consumer, channels=u.channels, kept=int(self.indices.numel()),
            method=self.method, statistics=self.statistics, reconstruction=self.reconstruction,
            error_selected=self.error_selected, error_reconstructed=self.error_reconstructed,
            seconds=self.seconds, notes=tuple(self.notes), statistics_backend=self.statistics_backend,
            selection_backend=self.selection_backend, heldout_images=self.heldout_images, ridge=self.ridge,
            error_curve=() if self.error_curve is None else self.error_curve.double().cpu().tolist())


def select(method: str, stats: Statistics, n_keep: int, producer: nn.Module, *, seed: int = 0,
           backend: str = "auto", ridge: float = 1e-8):
    """Kept indices (sorted) and, where the method has one, the error curve."""
    G, C = stats.gram, stats.channels
    if n_keep == C:
        return torch.arange(C, device=G.device), None
    ctx = SelectContext(producer, seed, selection_backend(method, backend, G.device), ridge)
    sel = get_method(method).select(stats, n_keep, ctx)
    return sel.keep, sel.curve


def decide(unit: Unit, stats: Statistics, n_keep: int, producer: nn.Module, consumer: nn.Module, *,
           method: str, reconstruction: str, bias_compensation: bool, seed: int = 0,
           backend: str = "auto", ridge: float = 1e-8, selection=None, towards=None,
           gain: torch.Tensor | None = None) -> Decision:
    """Select (unless ``selection`` = (keep, curve) is given) and reconstruct; with
    ``towards`` (:class:`~thinet_fast.pipeline.target.Towards`) the reconstruction fits
    the unpruned model's output instead of the current one. With ``gain`` (K,) (the
    consumer's BatchNorm, :func:`~thinet_fast.pipeline.collect.norm_gain`; the
    statistics must have been taken with it) everything is fitted and scored on the
    output scaled by it, and the new weight and bias are scaled back."""
    t0 = time.perf_counter()
    chosen = selection_resolution(method, backend, stats.gram.device)  # once per unit
    if selection is None:
        selection = select(method, stats, n_keep, producer, seed=seed, backend=chosen.backend, ridge=ridge)
    keep, curve = selection
    keep_dev = keep.to(consumer.weight.device)
    K = consumer.weight.shape[0]
    W = consumer.weight.detach().reshape(K, unit.channels, -1)   # (K, C, t)
    if gain is not None:
        gain = gain.to(device=W.device, dtype=torch.float64)
        W = (W.double() * gain[:, None, None]).to(W.dtype)
    notes = [f"statistics backend: {stats.backend_note}"] if stats.backend_note else []
    if chosen.reason:
        notes.append(f"selection backend: {chosen.reason}")
    recon = reconstruction
    if recon == "full" and stats.cov is None and stats.patches is None:
        recon = "scale"
        notes.append(f"full refit needs the patch covariance, too large here (C·t = {unit.channels * unit.taps}); used scale")
    held = _fold(stats)
    # on the held-out fold when there is one, like error_reconstructed
    err_sel = float(reconstruct.scale_error(held.gram if held is not None else stats.gram, keep))
    bias = consumer.bias.detach() if consumer.bias is not None else None
    if gain is not None and bias is not None:
        bias = bias.double() * gain
    if towards is not None and recon != "none":
        Wn, err_rec = _fit_towards(W, keep_dev, recon, towards, ridge)
        used_ridge, n_held = ridge, 0
        notes.append(f"target unpruned: fitted towards the unpruned model's output ({towards.count} samples)")
        if bias_compensation:  # E[W z] = E[W'_S z'_S] + Δb
            W64 = W.double().reshape(W.shape[0], -1)
            shift = W64 @ towards.mean_ref.reshape(-1).to(W64) \
                - Wn.reshape(W.shape[0], -1) @ towards.mean_cur[keep.cpu()].reshape(-1).to(W64)
            bias = (bias.double() if bias is not None else torch.zeros_like(shift)) + shift.to(W.device)
    else:
        Wn, err_rec, recon, used_ridge, n_held = _reconstruct(unit, stats, held, W, keep_dev, recon,
                                                              bias_compensation, ridge, err_sel, notes)
        if bias_compensation:
            bias = reconstruct.bias_compensation(W, Wn, keep, stats.mean.to(W.device), bias)
    if gain is not None:
        Wn = Wn / gain[:, None, None]
        bias = bias / gain if bias is not None else None
    if not torch.isfinite(Wn).all() or (bias is not None and not torch.isfinite(bias).all()):
        raise FloatingPointError(f"reconstruction of {unit.consumer!r} produced non-finite weights; "
                                 "check the calibration data (NaN activations?)")
    dtype = consumer.weight.dtype
    new_w = Wn.to(dtype).reshape((K, keep.numel()) + tuple(consumer.weight.shape[2:])) \
        if isinstance(consumer, nn.Conv2d) else Wn.to(dtype).reshape(K, -1)
    new_b = bias.to(dtype) if bias is not None else None
    return Decision(unit, keep.cpu(), new_w, new_b, method, stats.statistics, recon, err_sel, err_rec,
                    curve.cpu() if curve is not None else None, time.perf_counter() - t0, notes,
                    chosen.backend, stats.backend, n_held, used_ridge)


def _fit_towards(W: torch.Tensor, keep: torch.Tensor, recon: str, tw, ridge: float):
    """(new weight (K, |S|, t) float64, relative error against the unpruned output)."""
    K, C, t = W.shape
    P, Q, Pr = (m.to(W.device) for m in (tw.P_cur, tw.Q, tw.P_ref))
    if recon == "full":
        Wn = cross.refit_towards(W, P, Q, keep, ridge=ridge)
        taps = (keep[:, None] * t + torch.arange(t, device=W.device)).reshape(-1)
        A, B = Wn.reshape(K, -1), W.double().reshape(K, -1)
        yy = torch.einsum("kd,de,ke->", B, Pr.double(), B)
        err = torch.einsum("kd,de,ke->", A, P.double()[taps][:, taps], A) \
            - 2 * torch.einsum("kd,de,ke->", A, Q.double()[taps], B) + yy
        return Wn, float((err / yy.clamp_min(torch.finfo(torch.float64).tiny)).clamp_min(0))
    G, H, Gr = cross.channel_gram(W, P), cross.channel_gram(W, Q), cross.channel_gram(W, Pr)
    w = cross.scale_towards(G, H, keep, ridge=ridge)
    return W[:, keep].double() * w.to(W.device)[None, :, None], float(cross.towards_error(G, H, Gr, keep, w))


def _fold(stats: Statistics):
    """The held-out fold, if it has images and leaves some samples to fit on."""
    held = stats.heldout
    return held if held is not None and held.images and held.count < stats.count else None


def _reconstruct(unit: Unit, stats: Statistics, held, W: torch.Tensor, keep: torch.Tensor, recon: str,
                 bias_compensation: bool, ridge: float, err_sel: float, notes: list):
    """(new weight (K, |S|, t) float64, its error, the reconstruction used, ridge, the
    held-out images behind that error (0: in sample)).

    With a held-out fold ``held`` (DESIGN §5) the ridge is chosen on it, the error is
    the fold's, and a full refit that does not beat the scale fit there falls back to
    scale."""
    G = stats.gram
    n_held = held.images if held is not None else 0
    ridges = tuple(r for r in reconstruct.RIDGES if r > ridge) + (ridge,)
    if recon == "none":
        return W[:, keep].double(), err_sel, recon, None, n_held
    unknowns = keep.numel() * (unit.taps if recon == "full" else 1) + (recon == "full" and bias_compensation)
    samples = stats.patch_count if recon == "full" else stats.count
    if samples < unknowns:  # prune() warns once for all such units
        notes.append(f"{samples} calibration samples for {unknowns} unknowns per output ({recon} reconstruction)"
                     + (": the ridge was chosen on held-out images" if held is not None
                        else ", and no held-out images to choose a ridge on"))
    G_fit = (G - held.gram.to(G.device)) if held is not None else G
    r_scale = ridge
    if held is not None:
        r_scale, err_scale = reconstruct.choose_scale_ridge(G_fit, held.gram.to(G.device), keep, ridges)
    scaled = lambda w: W[:, keep].double() * w.to(W.device)[None, :, None]  # noqa: E731
    if recon == "scale":
        w = reconstruct.ls_scale(G, keep, ridge=r_scale)
        err = err_scale if held is not None else float(reconstruct.scale_error(G, keep, w))
        return scaled(w), err, recon, r_scale, n_held
    mean = stats.mean if bias_compensation else None
    count = stats.patch_count if bias_compensation else None
    Z = held.patches if held is not None else None
    if (Z is None or not 0 < Z.shape[0] < stats.patch_count) and samples < 2 * unknowns:
        # no held-out images to choose a ridge on, and barely more samples than unknowns
        # (or fewer): a full refit would (nearly) interpolate them, so the scale fit it is
        notes.append(f"used scale: a full refit from {samples} samples for {unknowns} unknowns needs "
                     "held-out images (none were drawn) or twice as many samples")
        w = reconstruct.ls_scale(G, keep, ridge=r_scale)
        return scaled(w), float(reconstruct.scale_error(G, keep, w)), "scale", r_scale, 0
    if Z is None or not 0 < Z.shape[0] < stats.patch_count:
        cov = stats.covariance()
        Wn = reconstruct.refit_full(W, cov, keep, mean=mean, count=count, ridge=ridge).to(W.device)
        return Wn, float(reconstruct.refit_error(W, Wn, keep, cov, mean, count)), recon, ridge, 0
    if stats.patches is not None and held.rows is not None and stats.patches.shape[0] < keep.numel() * unit.taps:
        # fewer samples than unknowns: the same fit through S×S solves
        Wn, r_full, err_full = reconstruct.refit_full_dual(W, stats.patches, keep, held.rows,
                                                           centred=bias_compensation, ridges=ridges)
    else:
        Wn, r_full, err_full = reconstruct.refit_full_cv(
            W, stats.covariance(), keep, Z, count=stats.patch_count,
            patch_sum=stats.patch_sum if bias_compensation else None, ridges=ridges)
    # the scale fit, scored the same way on the same held-out patches
    mu_fit = ((stats.patch_sum.reshape(-1).double() - Z.double().sum(0).to(stats.patch_sum.device))
              / (stats.patch_count - Z.shape[0])) if bias_compensation else None
    w_fit = reconstruct.ls_scale(G_fit, keep, ridge=r_scale)
    err_scale = float(reconstruct.heldout_error(W, scaled(w_fit), keep, Z, mu_fit))
    if err_scale <= err_full:
        notes.append(f"full refit scored {err_full:.3g} on held-out images against {err_scale:.3g} for scale; "
                     "used scale")
        return scaled(reconstruct.ls_scale(G, keep, ridge=r_scale)), err_scale, "scale", r_scale, n_held
    return Wn.to(W.device), err_full, recon, r_full, n_held

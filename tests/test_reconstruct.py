"""Reconstruction (DESIGN.md §5): least-squares scales, full refit, bias compensation.

Expectations come from ``numpy.linalg.lstsq`` on explicit sample matrices (X for the
scales, the unfold patches for the refit) and from the real ``F.conv2d`` output of the
pruned consumer. Inputs are fresh random draws (post-ReLU where a mean matters); the
error is printed before each assert.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from thinet_fast.ops.draws import keyed_locations, position_keys
import torch.nn.functional as F

from thinet_fast.ops.patches import ConsumerGeometry
from thinet_fast.ops.reconstruct import bias_compensation, ls_scale, refit_error, refit_full, scale_error
from thinet_fast.ops.stats import StatsAccumulator


def rand_X(rng, m, C):
    return rng.standard_normal((m, C)) * rng.uniform(0.3, 2.0, C) + rng.standard_normal((m, 2)) @ rng.standard_normal((2, C))


def lstsq(A, b):
    return np.linalg.lstsq(A, b, rcond=None)[0]


def relerr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# ------------------------------------------------------------------ a conv consumer
class Consumer:
    """A 3×3/pad 1 conv consumer fed post-ReLU inputs (non-zero mean)."""

    def __init__(self, seed, N=6, C=8, K=6, H=7, W=7, kernel=3, padding=1):
        gen = torch.Generator().manual_seed(seed)
        self.geo = ConsumerGeometry.conv(kernel, padding=padding)
        self.C, self.K, self.t = C, K, kernel * kernel
        self.weight = torch.randn(K, C, kernel, kernel, generator=gen, dtype=torch.float64) * 0.3
        self.bias = torch.randn(K, generator=gen, dtype=torch.float64)
        self.x = torch.relu(torch.randn(N, C, H, W, generator=gen, dtype=torch.float64) + 0.5)

    def stats(self, x=None, **kw):
        acc = StatsAccumulator(self.weight, self.geo, acc_dtype=torch.float64, **kw)
        acc.update(self.x if x is None else x)
        return acc.result()

    def patches(self, x=None):
        """Z (S, C·t) over every output position, from F.unfold."""
        x = self.x if x is None else x
        cols = F.unfold(x, self.geo.kernel_size, padding=self.geo.padding)
        return cols.permute(0, 2, 1).reshape(-1, self.C * self.t)

    def out(self, weight, bias=None, keep=None, x=None):
        """The real layer: F.conv2d on (the kept channels of) the input."""
        x = self.x if x is None else x
        if keep is not None:
            x = x[:, keep]
        return F.conv2d(x, weight.reshape(self.K, -1, *self.geo.kernel_size), bias, padding=self.geo.padding)

    def taps(self, keep):
        keep = torch.as_tensor(keep)
        return (keep[:, None] * self.t + torch.arange(self.t)).reshape(-1).numpy()


KEEP = [6, 0, 3, 5, 1]  # unsorted on purpose: outputs follow keep's order


# ------------------------------------------------------------------ ls_scale
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ls_scale_equals_numpy_lstsq(seed):
    rng = np.random.default_rng(seed)
    X = rand_X(rng, 400, 16)
    y = X.sum(axis=1)
    keep = rng.permutation(16)[:9]
    w = ls_scale(torch.from_numpy(X.T @ X), torch.from_numpy(keep))
    w32 = ls_scale(torch.from_numpy(X.T @ X).float(), keep.tolist())
    w_ls = lstsq(X[:, keep], y)
    e, e32 = relerr(w.numpy(), w_ls), relerr(w32.numpy(), w_ls)
    print(f"seed {seed}: ls_scale vs lstsq rel err {e:.2e} (float64 G), {e32:.2e} (float32 G)")
    assert w.dtype == torch.float64 and w.shape == (9,)
    assert e < 1e-6 and e32 < 1e-3


def test_scale_error_equals_explicit_residual():
    rng = np.random.default_rng(3)
    X = rand_X(rng, 300, 12)
    y = X.sum(axis=1)
    G = torch.from_numpy(X.T @ X)
    keep = [2, 7, 9, 0]
    w = ls_scale(G, keep)
    for ww, label in ((None, "w=1"), (w, "w=lstsq"), (torch.from_numpy(rng.standard_normal(4)), "random w")):
        wv = np.ones(4) if ww is None else ww.numpy()
        exp = float(np.sum((y - X[:, keep] @ wv) ** 2) / (y @ y))
        got = float(scale_error(G, keep, ww))
        print(f"{label}: scale_error {got:.8g} vs explicit {exp:.8g}")
        assert abs(got - exp) <= 1e-9 * max(exp, 1e-3)
    assert float(scale_error(G, keep, w)) <= float(scale_error(G, keep))


# ------------------------------------------------------------------ full refit
def test_refit_full_is_the_least_squares_optimum():
    cons = Consumer(seed=4)
    stats = cons.stats(mode="full", samples_per_image=None)
    Z = cons.patches().numpy()
    Wf = cons.weight.reshape(cons.K, -1).numpy()
    Y = Z @ Wf.T
    y_conv = cons.out(cons.weight)
    e_conv = relerr(y_conv.permute(0, 2, 3, 1).reshape(-1, cons.K).numpy(), Y)
    Wn = refit_full(cons.weight, stats.cov, KEEP)
    W_ls = lstsq(Z[:, cons.taps(KEEP)], Y).T.reshape(cons.K, len(KEEP), cons.t)
    e = relerr(Wn.numpy(), W_ls)
    print(f"unfold target vs F.conv2d {e_conv:.2e}; refit_full vs lstsq of the taps regression {e:.2e}")
    assert Wn.shape == (cons.K, len(KEEP), cons.t) and Wn.dtype == torch.float64
    assert e_conv < 1e-12 and e < 1e-6

    def err(W):  # through the real conv on the pruned input
        return float(((cons.out(W, keep=KEEP) - y_conv) ** 2).sum())

    base = err(Wn)
    gen = torch.Generator().manual_seed(5)
    worse = []
    for _ in range(8):
        d = torch.randn(Wn.shape, generator=gen, dtype=torch.float64) * 1e-3 * float(Wn.abs().max())
        worse.append(err(Wn + d) - base)
    print(f"E(W') = {base:.6g}; increase under random perturbations: min {min(worse):.3g}")
    assert min(worse) > 0
    # refit_error (from P alone) equals the conv-measured relative residual
    r = float(refit_error(cons.weight, Wn, KEEP, stats.cov))
    exp = base / float((y_conv ** 2).sum())
    print(f"refit_error {r:.8g} vs explicit {exp:.8g}")
    assert abs(r - exp) <= 1e-9 * exp
    # the scale-only reconstruction is one point of the refit's family: never better
    w = ls_scale(stats.gram, KEEP)
    W_scale = cons.weight[:, KEEP] * w[None, :, None, None]
    print(f"E(scale) = {err(W_scale):.6g} >= E(refit) = {base:.6g}")
    assert err(W_scale) >= base * (1 - 1e-12)


# ------------------------------------------------------------------ bias compensation
def _pruned_kernels(cons, stats, keep):
    w = ls_scale(stats.gram, keep)
    return {
        "plain": cons.weight[:, keep],
        "scale": cons.weight[:, keep] * w[None, :, None, None],
        "refit": refit_full(cons.weight, stats.cov, keep).reshape(cons.K, len(keep), 3, 3),
    }


def test_bias_compensation_preserves_the_mean_output_all_positions():
    cons = Consumer(seed=6)
    stats = cons.stats(mode="full", samples_per_image=None)
    y = cons.out(cons.weight, cons.bias)
    target = y.mean(dim=(0, 2, 3))
    for label, Wn in _pruned_kernels(cons, stats, KEEP).items():
        b_new = bias_compensation(cons.weight, Wn, KEEP, stats.mean, cons.bias)
        y_new = cons.out(Wn, b_new, keep=KEEP)
        y_unc = cons.out(Wn, cons.bias, keep=KEEP)
        d = float((y_new.mean(dim=(0, 2, 3)) - target).abs().max())
        d_unc = float((y_unc.mean(dim=(0, 2, 3)) - target).abs().max())
        print(f"{label}: mean shift with compensation {d:.2e}, without {d_unc:.3g}")
        assert torch.isfinite(b_new).all()
        assert d < 1e-10 * float(target.abs().max())
        if label != "refit":  # the uncentred refit fits part of the mean already
            assert d_unc > 1e-3


def test_bias_compensation_on_sampled_patches():
    """Sampled statistics: μ is the mean of the sampled patches, so E[y] is kept over
    exactly those positions (drawn again from the same keys: the images' positions)."""
    cons = Consumer(seed=7)
    L, seed = 5, 21
    stats = cons.stats(mode="sampled", samples_per_image=L, seed=seed)
    N = cons.x.shape[0]
    img, oy, ox = keyed_locations(position_keys(torch.arange(N)), seed, (7, 7), L)
    pos = oy * 7 + ox
    keep = [4, 2, 7]
    Wn = cons.weight[:, keep] * ls_scale(stats.gram, keep)[None, :, None, None]
    b_new = bias_compensation(cons.weight, Wn, keep, stats.mean, cons.bias)
    y = cons.out(cons.weight, cons.bias).reshape(N, cons.K, -1)[img, :, pos]
    y_new = cons.out(Wn, b_new, keep=keep).reshape(N, cons.K, -1)[img, :, pos]
    d = float((y_new.mean(0) - y.mean(0)).abs().max())
    print(f"mean output over the {img.numel()} sampled positions: max shift {d:.2e}")
    assert d < 1e-10 * float(y.mean(0).abs().max())


def test_centred_refit_plus_bias_is_the_optimal_affine_fit():
    cons = Consumer(seed=8)
    stats = cons.stats(mode="full", samples_per_image=None)
    Z = cons.patches().numpy()
    Y = Z @ cons.weight.reshape(cons.K, -1).numpy().T + cons.bias.numpy()
    A = np.concatenate([Z[:, cons.taps(KEEP)], np.ones((Z.shape[0], 1))], axis=1)
    coef = lstsq(A, Y)
    Wc = refit_full(cons.weight, stats.cov, KEEP, mean=stats.mean, count=stats.patch_count)
    bc = bias_compensation(cons.weight, Wc, KEEP, stats.mean, cons.bias)
    eW = relerr(Wc.numpy(), coef[:-1].T.reshape(cons.K, len(KEEP), cons.t))
    eb = relerr(bc.numpy(), coef[-1])
    print(f"centred refit vs affine lstsq: W rel err {eW:.2e}, bias rel err {eb:.2e}")
    assert eW < 1e-6 and eb < 1e-6
    # and it beats the uncentred refit + compensation (equal only if the mean were 0)
    y = cons.out(cons.weight, cons.bias)
    Wu = refit_full(cons.weight, stats.cov, KEEP)
    bu = bias_compensation(cons.weight, Wu, KEEP, stats.mean, cons.bias)
    e_aff = float(((cons.out(Wc, bc, keep=KEEP) - y) ** 2).sum())
    e_unc = float(((cons.out(Wu, bu, keep=KEEP) - y) ** 2).sum())
    print(f"affine fit error {e_aff:.6g} <= uncentred refit + compensation {e_unc:.6g}")
    assert e_aff <= e_unc * (1 + 1e-12)
    # centred refit_error agrees with the explicit centred residual
    Zc = Z - Z.mean(0)
    D = cons.weight.numpy().reshape(cons.K, cons.C, cons.t).copy()
    D[:, KEEP] -= Wc.numpy()
    num = np.sum((Zc @ D.reshape(cons.K, -1).T) ** 2)
    den = np.sum((Zc @ cons.weight.reshape(cons.K, -1).numpy().T) ** 2)
    r = float(refit_error(cons.weight, Wc, KEEP, stats.cov, stats.mean, stats.patch_count))
    print(f"centred refit_error {r:.8g} vs explicit {num / den:.8g}")
    assert abs(r - num / den) <= 1e-9 * (num / den)


# ------------------------------------------------------------------ singular inputs
def _singular_consumers():
    base = Consumer(seed=9)
    dead = base.x.clone()
    dead[:, [1, 5]] = 0.0
    dup = base.x.clone()
    dup[:, 6] = dup[:, 0]
    dup[:, 3] = dup[:, 0]
    tiny = base.x[:1, :, :2, :2].clone()  # 4 positions < |S|·t taps: rank deficient
    return base, {"dead": dead, "duplicated": dup, "rank_deficient": tiny, "all_zero": torch.zeros_like(base.x)}


@pytest.mark.parametrize("case", ["dead", "duplicated", "rank_deficient", "all_zero"])
def test_singular_statistics_give_finite_optimal_weights(case):
    cons, xs = _singular_consumers()
    x = xs[case]
    keep = [0, 1, 3, 5, 6]  # holds the dead / duplicated channels
    stats = cons.stats(x, mode="full", samples_per_image=None)
    y = cons.out(cons.weight, cons.bias, x=x)
    yy = max(float((y ** 2).sum()), 1e-300)
    # scale: finite and as good as lstsq on explicit X
    rows = torch.einsum("kcu,scu->skc", cons.weight.reshape(cons.K, cons.C, -1),
                        cons.patches(x).reshape(-1, cons.C, cons.t)).reshape(-1, cons.C).numpy()
    yv = rows.sum(axis=1)
    for gdtype in (torch.float64, torch.float32):
        w = ls_scale(stats.gram.to(gdtype), keep)
        res = float(np.sum((yv - rows[:, keep] @ w.numpy()) ** 2))
        opt = float(np.sum((yv - rows[:, keep] @ lstsq(rows[:, keep], yv)) ** 2))
        print(f"{case} ls_scale ({gdtype}): finite {bool(torch.isfinite(w).all())}, residual {res:.4g} vs lstsq {opt:.4g}")
        assert torch.isfinite(w).all()
        assert res <= opt + 1e-5 * max(float(yv @ yv), 1e-300) + 1e-12
    for centred in (False, True):
        kw = dict(mean=stats.mean, count=stats.patch_count) if centred else {}
        Wn = refit_full(cons.weight, stats.cov, keep, **kw)
        b = bias_compensation(cons.weight, Wn, keep, stats.mean, cons.bias)
        y_new = cons.out(Wn, b, keep=keep, x=x)
        e = float(((y_new - y) ** 2).sum()) / yy
        Z = cons.patches(x).numpy()
        Y = Z @ cons.weight.reshape(cons.K, -1).numpy().T  # the bias is common to both sides
        Zs = Z[:, cons.taps(keep)]
        if centred:  # optimal affine fit
            Zs = np.concatenate([Zs, np.ones((Zs.shape[0], 1))], axis=1)
        # uncentred: lstsq with the old bias; b' then removes the mean residual, never worse
        opt = float(np.sum((Zs @ lstsq(Zs, Y) - Y) ** 2)) / yy
        print(f"{case} refit (centred={centred}): finite W {bool(torch.isfinite(Wn).all())}, b "
              f"{bool(torch.isfinite(b).all())}; relative error {e:.3e} vs lstsq {opt:.3e}")
        assert torch.isfinite(Wn).all() and torch.isfinite(b).all()
        assert e <= opt + 1e-6


def test_all_zero_gram_gives_finite_scales():
    G = torch.zeros(7, 7, dtype=torch.float64)
    w = ls_scale(G, [1, 4, 6])
    e = scale_error(G, [1, 4, 6], w)
    print(f"all-zero G: w {w.tolist()}, scale_error {float(e)}")
    assert torch.isfinite(w).all() and torch.isfinite(e)


# ------------------------------------------------------------------ error paths
def test_bad_inputs_raise_with_the_argument_named():
    rng = np.random.default_rng(10)
    X = rand_X(rng, 50, 6)
    G = torch.from_numpy(X.T @ X)
    bad = G.clone()
    bad[1, 2] = float("nan")
    cons = Consumer(seed=11)
    stats = cons.stats(mode="full", samples_per_image=None)
    bad_cov = stats.cov.clone()
    bad_cov[0, 0] = float("inf")
    cases = [
        (lambda: ls_scale(G, []), ValueError, "keep"),
        (lambda: ls_scale(G, [0, 6]), ValueError, "keep"),
        (lambda: ls_scale(G, [-1, 2]), ValueError, "keep"),
        (lambda: ls_scale(G, [2, 2]), ValueError, "keep"),
        (lambda: ls_scale(bad, [0, 1, 2]), ValueError, "gram"),
        (lambda: ls_scale(G[:, :5], [0, 1]), ValueError, "gram"),
        (lambda: ls_scale(G[0], [0, 1]), ValueError, "gram"),
        (lambda: scale_error(bad, [0, 1]), ValueError, "gram"),
        (lambda: refit_full(cons.weight, stats.cov[:-1, :-1], [0, 1]), ValueError, "cov"),
        (lambda: refit_full(cons.weight, bad_cov, [0, 1]), ValueError, "cov"),
        (lambda: refit_full(cons.weight, stats.cov, [0, 8]), ValueError, "keep"),
        (lambda: refit_full(cons.weight, stats.cov, [0, 1], mean=stats.mean), ValueError, "count"),
        (lambda: bias_compensation(cons.weight, cons.weight[:, :2], [0, 0], stats.mean), ValueError, "keep"),
        (lambda: bias_compensation(cons.weight, cons.weight[:, :2], [0, 1], stats.mean * float("nan")), ValueError,
         "mean"),
    ]
    for j, (call, exc, pattern) in enumerate(cases):
        with pytest.raises(exc, match=pattern) as info:
            call()
        print(f"case {j}: {exc.__name__}: {info.value}")

"""Reconstruction towards the unpruned model: the cross-moment ops against their
references, the references against brute force, and the "current" fits as the special
case z' = z."""
from __future__ import annotations

import torch

from thinet_fast.ops import cross, reconstruct
from thinet_fast.ops.patches import ConsumerGeometry, contributions, gather_patches_ref


def _setup(seed=0, C=5, K=4, n=6, hw=6):
    g = torch.Generator().manual_seed(seed)
    geo = ConsumerGeometry.conv(3, 1, 1)
    x_ref = torch.randn(n, C, hw, hw, generator=g, dtype=torch.float64)
    x_cur = x_ref + 0.3 * torch.randn(n, C, hw, hw, generator=g, dtype=torch.float64)  # upstream drift
    kernel = torch.randn(K, C, 3, 3, generator=g, dtype=torch.float64)
    img = torch.arange(n).repeat_interleave(hw * hw)
    oy = torch.arange(hw).repeat_interleave(hw).repeat(n)
    ox = torch.arange(hw).repeat(hw * n)
    return geo, x_cur, x_ref, kernel, (img, oy, ox)


def test_cross_moments_match_their_reference():
    geo, xc, xr, _, pos = _setup()
    got, want = cross.cross_moments(xc, xr, geo, *pos), cross.cross_moments_ref(xc, xr, geo, *pos)
    for a, b in zip(got, want):
        print("max abs err", float((a - b).abs().max()))
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9)


def test_channel_gram_is_the_gram_of_contributions():
    geo, xc, xr, W, pos = _setup(1, C=3, K=2, n=2, hw=4)
    P, Q, _ = cross.cross_moments(xc, xr, geo, *pos)
    Zc, Zr = gather_patches_ref(xc, geo, *pos), gather_patches_ref(xr, geo, *pos)
    Xc, Xr = contributions(Zc, W), contributions(Zr, W)            # (S, K, C)
    H_brute = torch.einsum("skc,skd->cd", Xc, Xr)
    for fast, ref, brute in ((cross.channel_gram(W, P), cross.channel_gram_ref(W, P),
                              torch.einsum("skc,skd->cd", Xc, Xc)),
                             (cross.channel_gram(W, Q), cross.channel_gram_ref(W, Q), H_brute)):
        print("fast vs ref", float((fast - ref).abs().max()), "ref vs brute", float((ref - brute).abs().max()))
        assert torch.allclose(fast, ref, atol=1e-8) and torch.allclose(ref, brute, atol=1e-8)


def test_channel_gram_in_several_row_blocks():
    """C·t large enough that channel_gram works in several blocks of channel rows; a
    non-symmetric M (a cross-moment) checks that no symmetry is assumed."""
    g = torch.Generator().manual_seed(5)
    C, t, K = 300, 9, 3
    W = torch.randn(K, C, 3, 3, generator=g, dtype=torch.float64)
    M = torch.randn(C * t, C * t, generator=g, dtype=torch.float64)
    want = torch.einsum("kcu,cudv,kdv->cd", W.reshape(K, C, t), M.reshape(C, t, C, t), W.reshape(K, C, t))
    got = cross.channel_gram(W, M)
    print("max abs err", float((got - want).abs().max()), "max |want|", float(want.abs().max()))
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-9)


def test_refit_towards_matches_least_squares_on_the_patches():
    geo, xc, xr, W, pos = _setup(2)
    P, Q, _ = cross.cross_moments(xc, xr, geo, *pos)
    Zc, Zr = gather_patches_ref(xc, geo, *pos), gather_patches_ref(xr, geo, *pos)
    keep = torch.tensor([0, 2, 3])
    for ridge in (1e-8, 1e-2):
        got = cross.refit_towards(W, P, Q, keep, ridge=ridge)
        want = cross.refit_towards_ref(W, Zc, Zr, keep, ridge=ridge)
        print(ridge, "max abs err", float((got - want).abs().max()))
        assert torch.allclose(got, want, atol=1e-7, rtol=1e-6)
    # it beats the "current" refit on the unpruned target, which is what it is for
    cur = reconstruct.refit_full(W, P, keep)
    Y = Zr.reshape(Zr.shape[0], -1) @ W.reshape(W.shape[0], -1).T
    res = lambda Wn: float((Zc[:, keep].reshape(Zc.shape[0], -1) @ Wn.reshape(W.shape[0], -1).T - Y).norm())  # noqa
    print("towards", res(got), "current", res(cur))
    assert res(got) < res(cur)


def test_scale_towards_and_its_error_match_brute_force():
    geo, xc, xr, W, pos = _setup(3)
    P, Q, Pr = cross.cross_moments(xc, xr, geo, *pos)
    Gc, H, Gr = cross.channel_gram(W, P), cross.channel_gram(W, Q), cross.channel_gram(W, Pr)
    Zc, Zr = gather_patches_ref(xc, geo, *pos), gather_patches_ref(xr, geo, *pos)
    Xc = contributions(Zc, W).reshape(-1, W.shape[1])
    Xr = contributions(Zr, W).reshape(-1, W.shape[1])
    keep = torch.tensor([1, 2, 4])
    w = cross.scale_towards(Gc, H, keep)
    w_ref = cross.scale_towards_ref(Xc, Xr, keep)
    print("w err", float((w - w_ref).abs().max()))
    assert torch.allclose(w, w_ref, atol=1e-8, rtol=1e-7)
    y = Xr.sum(1)
    brute = float((Xc[:, keep] @ w - y).pow(2).sum() / y.pow(2).sum())
    got = float(cross.towards_error(Gc, H, Gr, keep, w))
    print("error", got, brute)
    assert abs(got - brute) < 1e-9


def test_without_upstream_pruning_the_targets_agree():
    geo, _, xr, W, pos = _setup(4)
    P, Q, Pr = cross.cross_moments(xr, xr, geo, *pos)
    keep = torch.tensor([0, 1, 4])
    a, b = cross.refit_towards(W, P, Q, keep), reconstruct.refit_full(W, P, keep)
    G, H = cross.channel_gram(W, P), cross.channel_gram(W, Q)
    print("refit", float((a - b).abs().max()), "scale",
          float((cross.scale_towards(G, H, keep) - reconstruct.ls_scale(G, keep)).abs().max()))
    assert torch.allclose(a, b, atol=1e-9)
    assert torch.allclose(cross.scale_towards(G, H, keep), reconstruct.ls_scale(G, keep), atol=1e-9)
    assert torch.allclose(cross.towards_error(G, H, cross.channel_gram(W, Pr), keep),
                          reconstruct.scale_error(G, keep), atol=1e-12)


def test_refit_across_matches_least_squares_and_undoes_a_renormalisation():
    """A Linear behind a LayerNorm whose channels a cut halved: fitted on the kept
    channels renormalised, towards its output on the full ones."""
    g = torch.Generator().manual_seed(7)
    N, m, K = 200, 12, 5
    x = torch.randn(N, m, generator=g, dtype=torch.float64) @ torch.randn(m, m, generator=g, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 5, 8, 9, 11])
    one = torch.ones(N, 1, dtype=torch.float64)
    z = torch.cat([torch.nn.functional.layer_norm(x, (m,)), one], 1)                  # before the cut
    zc = torch.cat([torch.nn.functional.layer_norm(x[:, keep], (keep.numel(),)), one], 1)  # after it
    W = torch.randn(K, m + 1, generator=g, dtype=torch.float64)                        # last column: bias
    prior = W[:, torch.cat([keep, torch.tensor([m])])]
    for ridge in (1e-9, 1e-2):
        got = cross.refit_across(W, zc.T @ zc, zc.T @ z, z.T @ z, prior, ridge=ridge)
        want = cross.refit_across_ref(W, zc, z, prior, ridge=ridge)
        # the renormalised features sum to zero: Θ is unique only up to that direction,
        # so the outputs are compared
        out_err = float((zc @ (got[0] - want[0]).T).abs().max())
        print(ridge, "output err", out_err, "errors", got[1:], want[1:])
        assert out_err < 1e-6
        assert abs(got[1] - want[1]) < 1e-9 and abs(got[2] - want[2]) < 1e-9
    # brute force: no Θ on these samples does better than the (almost unridged) fit
    theta = cross.refit_across(W, zc.T @ zc, zc.T @ z, z.T @ z, prior, ridge=1e-12)[0]
    Y = z @ W.T
    best = float(((zc @ theta.T - Y) ** 2).sum())
    for _ in range(20):
        other = theta + 1e-3 * torch.randn(theta.shape, generator=g, dtype=torch.float64)
        assert float(((zc @ other.T - Y) ** 2).sum()) >= best
    assert got[2] < got[1]  # the refit beats the cut's own weights

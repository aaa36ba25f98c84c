"""Baseline criteria (DESIGN.md §4): random, weight sum, APoZ, LASSO, and top_k.

Expectations are computed independently (python sorting with an explicit tie rule,
explicit loops over filters, the LASSO optimality (KKT) conditions, a planted
support). Inputs are fresh random draws; the error is printed before each assert.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from thinet_fast.ops.baselines import (
    apoz_scores, lasso_coefficients, lasso_keep, random_scores, top_k, weight_sum_scores,
)
from thinet_fast.ops.patches import ConsumerGeometry
from thinet_fast.ops.stats import StatsAccumulator


def top_k_python(scores, n):
    """Highest scores first, ties to the lowest index; returned sorted."""
    s = [float(v) for v in scores]
    return sorted(sorted(range(len(s)), key=lambda i: (-s[i], i))[:n])


# ------------------------------------------------------------------ top_k
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_top_k_ties_break_to_the_lowest_index(dtype):
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        C = int(torch.randint(2, 40, (1,), generator=gen))
        scores = torch.randint(0, 4, (C,), generator=gen).to(dtype)  # many exact ties
        if dtype.is_floating_point and trial % 2:
            scores = scores * 0.37 + 1.5
        for n in sorted({1, C // 2 or 1, C}):
            got = top_k(scores, n)
            exp = top_k_python(scores, n)
            if got.tolist() != exp:
                print(f"trial {trial}: scores {scores.tolist()} n={n}: {got.tolist()} vs {exp}")
            assert got.tolist() == exp and got.dtype == torch.int64


def test_top_k_distinct_scores_and_errors():
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(25, generator=gen)
    got = top_k(s, 10)
    thr = float(s[got].min())
    print(f"kept {got.tolist()}; smallest kept {thr:.4f}, largest dropped "
          f"{float(s[[i for i in range(25) if i not in got.tolist()]].max()):.4f}")
    assert got.tolist() == top_k_python(s, 10)
    for n in (0, 26, -3):
        with pytest.raises(ValueError, match="n_keep") as info:
            top_k(s, n)
        print(info.value)


# ------------------------------------------------------------------ random
def test_random_scores_are_seeded():
    a, b, c = random_scores(64, seed=5), random_scores(64, seed=5), random_scores(64, seed=6)
    d = float((a - c).abs().max())
    print(f"same seed identical {torch.equal(a, b)}, other seed max diff {d:.3f}, range [{float(a.min()):.3f}, "
          f"{float(a.max()):.3f})")
    assert torch.equal(a, b) and d > 0
    assert a.shape == (64,) and a.dtype == torch.float64
    assert float(a.min()) >= 0 and float(a.max()) < 1
    assert len(set(a.tolist())) == 64
    keep = top_k(a, 16)
    assert keep.tolist() == top_k(b, 16).tolist() == top_k_python(a, 16)


# ------------------------------------------------------------------ weight sum
@pytest.mark.parametrize("shape", [(12, 5, 3, 3), (9, 20), (7, 4, 1, 1)])
def test_weight_sum_is_the_l1_norm_of_each_filter(shape):
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(*shape, generator=gen)
    got = weight_sum_scores(W)
    exp = [sum(abs(float(v)) for v in W[c].reshape(-1)) for c in range(shape[0])]
    e = float(np.max(np.abs(got.numpy() - np.array(exp)) / np.array(exp)))
    print(f"{shape}: weight sum vs explicit L1 max rel err {e:.2e}")
    assert got.dtype == torch.float64 and got.shape == (shape[0],)
    assert e < 1e-6
    n = shape[0] // 2
    assert top_k(got, n).tolist() == top_k_python(exp, n)


def test_weight_sum_does_not_touch_autograd():
    W = torch.randn(6, 3, 3, 3, requires_grad=True)
    s = weight_sum_scores(W)
    print(f"requires_grad of the scores: {s.requires_grad}")
    assert not s.requires_grad


# ------------------------------------------------------------------ APoZ
@pytest.mark.parametrize("linear", [False, True])
def test_apoz_from_statistics(linear):
    gen = torch.Generator().manual_seed(3)
    C, K = 8, 5
    offset = torch.linspace(-1.0, 1.0, C)[torch.randperm(C, generator=gen)]  # channel sparsities differ
    if linear:
        t = 4
        geo = ConsumerGeometry.dense(t)
        W = torch.randn(K, C * t, generator=gen)
        xs = [torch.relu(torch.randn(n, C, t, generator=gen) + offset[:, None]).reshape(n, C * t) for n in (30, 20)]
        zero = torch.cat([(x.reshape(x.shape[0], C, t) == 0) for x in xs]).double().mean(dim=(0, 2))
    else:
        geo = ConsumerGeometry.conv(3, padding=1)
        W = torch.randn(K, C, 3, 3, generator=gen)
        xs = [torch.relu(torch.randn(n, C, 6, 5, generator=gen) + offset[:, None, None]) for n in (4, 3)]
        zero = torch.cat([(x == 0) for x in xs]).double().mean(dim=(0, 2, 3))
    acc = StatsAccumulator(W, geo, statistics="sampled", samples_per_image=3)
    for x in xs:
        acc.update(x)
    zf = acc.result().zero_fraction
    e = float((zf - zero).abs().max())
    print(f"linear={linear}: APoZ {[round(v, 3) for v in zf.tolist()]}, max diff to explicit {e:.2e}")
    assert e < 1e-15
    scores = apoz_scores(zf)
    keep = top_k(scores, 5)
    exp = sorted(sorted(range(C), key=lambda i: (float(zero[i]), i))[:5])  # the least-zero channels
    print(f"kept {keep.tolist()} vs {exp}")
    assert keep.tolist() == exp
    assert torch.allclose(scores, 1 - zero, rtol=0, atol=1e-15)


# ------------------------------------------------------------------ LASSO
def _rand_G(seed, m, C):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((m, C)) * rng.uniform(0.3, 2.0, C) + rng.standard_normal((m, 2)) @ rng.standard_normal((2, C))
    return X, torch.from_numpy(X.T @ X)


def test_lasso_at_zero_penalty_is_least_squares():
    """y = X·1 = Σ ‖x_c‖ x̂_c with unit columns x̂_c: at λ = 0, β_c = ‖x_c‖."""
    X, G = _rand_G(4, 300, 10)
    beta = lasso_coefficients(G, 0.0, max_iter=20000, tol=1e-13)
    exp = np.linalg.norm(X, axis=0)
    e = float(np.max(np.abs(beta.numpy() - exp) / exp))
    print(f"λ=0: β vs column norms max rel err {e:.2e}")
    assert e < 1e-5


@pytest.mark.parametrize("frac", [0.05, 0.2, 0.5])
def test_lasso_coefficients_satisfy_kkt(frac):
    X, G = _rand_G(5, 400, 14)
    d = np.sqrt(np.diag(G.numpy()))
    Gn = G.numpy() / np.outer(d, d)
    b = Gn @ d
    lam = frac * 2 * np.abs(b).max()
    beta = lasso_coefficients(G, lam, max_iter=20000, tol=1e-14).numpy()
    g = 2 * (Gn @ beta - b)  # gradient of the smooth part
    on = beta != 0
    viol_on = float(np.max(np.abs(g[on] + lam * np.sign(beta[on])))) if on.any() else 0.0
    viol_off = float(np.max(np.abs(g[~on]) - lam)) if (~on).any() else -np.inf
    print(f"λ={lam:.4g}: {int(on.sum())} non-zero; |∇+λ sign β| on support {viol_on:.2e}, "
          f"max |∇|-λ off support {viol_off:.2e}")
    assert on.any()
    assert viol_on < 1e-5 * lam and viol_off < 1e-5 * lam


@pytest.mark.parametrize("seed", [6, 7, 8])
def test_lasso_keep_finds_the_planted_support(seed):
    """y is carried by a few channels; the others have LARGER norms but come in pairs
    (x, -x + ε) that cancel in y. The LASSO must keep the carriers — a norm criterion
    (the diagonal of G) would keep the noise pairs."""
    rng = np.random.default_rng(seed)
    m, C, n_true = 800, 21, 5
    perm = rng.permutation(C)
    carriers, rest = np.sort(perm[:n_true]), perm[n_true:]
    X = np.empty((m, C))
    X[:, carriers] = rng.standard_normal((m, n_true)) * rng.uniform(2.5, 3.5, n_true)
    for p, q in zip(rest[0::2], rest[1::2]):
        X[:, p] = rng.standard_normal(m) * 5.0
        X[:, q] = -X[:, p] + rng.standard_normal(m) * 0.05
    if len(rest) % 2:
        X[:, rest[-1]] = rng.standard_normal(m) * 0.05
    G = torch.from_numpy(X.T @ X)
    keep, beta = lasso_keep(G, n_true)
    by_norm = top_k(G.diagonal(), n_true)
    print(f"planted {carriers.tolist()}, lasso {keep.tolist()}, largest norms {by_norm.tolist()}, "
          f"nnz(β)={int((beta != 0).sum())}")
    assert keep.tolist() == carriers.tolist()
    assert set(by_norm.tolist()) != set(carriers.tolist())  # the check is not trivially a norm ranking


@pytest.mark.parametrize("n_keep", [1, 3, 8, 13, 16])
def test_lasso_keep_returns_exactly_n_keep(n_keep):
    _, G = _rand_G(9, 200, 16)
    keep, beta = lasso_keep(G, n_keep)
    print(f"n_keep={n_keep}: kept {keep.tolist()}, nnz(β)={int((beta != 0).sum())}")
    assert keep.numel() == n_keep and keep.tolist() == sorted(set(keep.tolist()))
    assert 0 <= int(keep.min()) and int(keep.max()) < 16
    assert int((beta != 0).sum()) >= n_keep
    assert torch.isfinite(beta).all()
    # the kept channels are those with the largest |β| of the final λ
    assert keep.tolist() == top_k_python(beta.abs(), n_keep)


def _singular_grams():
    rng = np.random.default_rng(10)
    X = rng.standard_normal((150, 12)) * rng.uniform(0.5, 2.0, 12)
    dead = X.copy()
    dead[:, [3, 8]] = 0
    dup = X.copy()
    dup[:, 7] = dup[:, 2]
    dup[:, 10] = dup[:, 2]
    low = rng.standard_normal((4, 12))
    return {"dead": dead.T @ dead, "duplicated": dup.T @ dup, "rank_deficient": low.T @ low,
            "all_zero": np.zeros((12, 12))}


@pytest.mark.parametrize("case", ["dead", "duplicated", "rank_deficient", "all_zero"])
def test_lasso_keep_singular_inputs_stay_finite(case):
    G = torch.from_numpy(_singular_grams()[case])
    for n_keep in (1, 5, 12):
        keep, beta = lasso_keep(G, n_keep, max_bisect=25, max_iter=500)
        print(f"{case} n_keep={n_keep}: kept {keep.tolist()}, β finite {bool(torch.isfinite(beta).all())}")
        assert torch.isfinite(beta).all()
        assert keep.numel() == n_keep and len(set(keep.tolist())) == n_keep
        assert 0 <= int(keep.min()) and int(keep.max()) < 12
    if case == "dead":  # a dead channel carries nothing: it is never among the first kept
        keep, _ = lasso_keep(G, 5)
        assert not ({3, 8} & set(keep.tolist()))


def test_lasso_bad_inputs_raise_with_the_argument_named():
    _, G = _rand_G(11, 60, 6)
    bad = G.clone()
    bad[0, 1] = float("nan")
    cases = [
        (lambda: lasso_keep(G, 0), ValueError, "n_keep"),
        (lambda: lasso_keep(G, 7), ValueError, "n_keep"),
        (lambda: lasso_keep(bad, 2), ValueError, "gram"),
        (lambda: lasso_keep(G[:, :4], 2), ValueError, "gram"),
        (lambda: lasso_coefficients(bad, 0.1), ValueError, "gram"),
        (lambda: lasso_coefficients(G, -1.0), ValueError, "lam"),
    ]
    for j, (call, exc, pattern) in enumerate(cases):
        with pytest.raises(exc, match=pattern) as info:
            call()
        print(f"case {j}: {exc.__name__}: {info.value}")

"""Selection on G (DESIGN.md §4): ThiNet greedy removal and forward least squares.

Every expectation is computed independently from an explicit sample matrix X (m × C)
with numpy: the greedy objective ‖Σ_{i∈T} x_i‖², the forward selection with
``numpy.linalg.lstsq``. Inputs are fresh random draws (never zeros); the error is
printed before each assert.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from thinet_fast.ops.greedy import (
    greedy_keep_ls, greedy_keep_ls_ref, greedy_remove, greedy_remove_ref, prepare_batch, removal_to_keep,
)


# ----------------------------------------------------------------------------- data
def rand_X(rng: np.random.Generator, m: int, C: int, *, nonneg: bool = False) -> np.ndarray:
    """Channel contributions with uneven scales and a few shared factors (so the
    running sum interacts with the candidates, as real contributions do)."""
    scales = rng.uniform(0.3, 2.0, C)
    X = rng.standard_normal((m, C)) * scales + rng.standard_normal((m, 3)) @ rng.standard_normal((3, C)) * 0.7
    if nonneg:
        X = np.abs(X)
    return X


def gram_of(X: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    return torch.from_numpy(X.T @ X).to(dtype)


def objective(X: np.ndarray, T) -> float:
    """‖Σ_{i∈T} x_i‖²: the change of the consumer output when the channels T are removed."""
    T = list(T)
    if not T:
        return 0.0
    s = X[:, T].sum(axis=1)
    return float(s @ s)


def exhaustive_greedy(X: np.ndarray, n: int):
    """Each step tries every remaining j, evaluates ‖Σ_{T∪{j}} x‖² over explicit X and
    keeps the first minimum (ties: lowest index)."""
    C = X.shape[1]
    T, errs = [], []
    for _ in range(n):
        best, best_j = np.inf, -1
        for j in range(C):
            if j in T:
                continue
            v = objective(X, T + [j])
            if v < best:
                best, best_j = v, j
        T.append(best_j)
        errs.append(best)
    return T, errs


def brute_force_greedy_kept(X: np.ndarray, n: int):
    """Independent formulation for tiny C: enumerate every kept set K of size C-|T|-1
    that is a subset of the current kept set and measure ‖y - X_K 1‖² with y = X 1
    (the real pruned-output error); take the best, ties to the lowest removed index."""
    C = X.shape[1]
    y = X.sum(axis=1)
    kept = list(range(C))
    order, errs = [], []
    for _ in range(n):
        cands = []
        for K in itertools.combinations(kept, len(kept) - 1):
            removed_now = (set(kept) - set(K)).pop()
            r = y - X[:, list(K)].sum(axis=1) if K else y
            cands.append((float(r @ r), removed_now))
        best = min(v for v, _ in cands)
        j = min(r for v, r in cands if v == best)
        order.append(j)
        errs.append(best)
        kept.remove(j)
    return order, errs


def forward_ls_numpy(X: np.ndarray, n: int):
    """The journal's forward selection, written from its definition with lstsq:
    w_S = argmin ‖y - X_S w‖, c = Xᵀ(y - X_S w_S), pick argmax c_i²/‖x_i‖²."""
    y = X.sum(axis=1)
    d = (X * X).sum(axis=0)
    S: list[int] = []
    for _ in range(n):
        r = y if not S else y - X[:, S] @ np.linalg.lstsq(X[:, S], y, rcond=None)[0]
        c = X.T @ r
        score = c * c / d
        score[S] = -np.inf
        S.append(int(np.argmax(score)))  # first maximum
    w = np.linalg.lstsq(X[:, S], y, rcond=None)[0]
    return S, w


# -------------------------------------------------------------------- greedy removal
@pytest.mark.parametrize("fn", [greedy_remove, greedy_remove_ref], ids=["fast", "ref"])
@pytest.mark.parametrize("seed,m,C", [(0, 400, 24), (1, 60, 40), (2, 2000, 64)])
def test_greedy_remove_equals_exhaustive_search(fn, seed, m, C):
    X = rand_X(np.random.default_rng(seed), m, C)
    n = C  # the whole order: every prefix is a greedy answer for that ratio
    exp_order, exp_err = exhaustive_greedy(X, n)
    order, errors = fn(gram_of(X), n, return_errors=True)
    mism = int((order.numpy() != np.array(exp_order)).sum())
    rel = float(np.max(np.abs(errors.numpy() - exp_err) / np.maximum(np.abs(exp_err), 1e-300)))
    print(f"C={C} m={m}: order mismatches {mism}, max rel error of E(n) {rel:.2e}")
    assert mism == 0
    assert rel < 1e-9


@pytest.mark.parametrize("seed,C", [(3, 4), (4, 7), (5, 10)])
def test_greedy_remove_equals_brute_force_small(seed, C):
    X = rand_X(np.random.default_rng(seed), 50, C)
    exp_order, exp_err = brute_force_greedy_kept(X, C)
    for fn in (greedy_remove, greedy_remove_ref):
        order, errors = fn(gram_of(X), C, return_errors=True)
        rel = float(np.max(np.abs(errors.numpy() - exp_err) / np.maximum(np.abs(exp_err), 1e-300)))
        print(f"{fn.__name__} C={C}: order {order.tolist()} vs brute force {exp_order}; max rel err {rel:.2e}")
        assert order.tolist() == exp_order
        assert rel < 1e-9


@pytest.mark.parametrize("seed,C", [(6, 8), (7, 10)])
def test_greedy_error_bounded_by_optimal_subset(seed, C):
    """Greedy can only be worse than the best subset of the same size, equal for one
    removal (a single step is exhaustive) and for removing everything."""
    X = rand_X(np.random.default_rng(seed), 80, C)
    _, errors = greedy_remove(gram_of(X), C, return_errors=True)
    for n in range(1, C + 1):
        opt = min(objective(X, T) for T in itertools.combinations(range(C), n))
        gap = float(errors[n - 1]) - opt
        print(f"n={n}: greedy {float(errors[n - 1]):.6g}, optimum {opt:.6g}, gap {gap:.3g}")
        assert gap >= -1e-9 * max(opt, 1.0)
        if n in (1, C):
            assert abs(gap) <= 1e-9 * max(opt, 1.0)


def test_greedy_errors_equal_explicit_objective():
    rng = np.random.default_rng(8)
    X = rand_X(rng, 700, 33)
    n = 20
    order, errors = greedy_remove(gram_of(X), n, return_errors=True)
    explicit = np.array([objective(X, order[: j + 1].tolist()) for j in range(n)])
    rel = np.max(np.abs(errors.numpy() - explicit) / explicit)
    print(f"max rel diff between returned E(n) and ‖Σ_T x‖² from X: {rel:.2e}")
    assert rel < 1e-10
    # the increment is the step's min score G_ii + 2 a_i, i.e. min_j ‖r + x_j‖² - ‖r‖²
    G = X.T @ X
    a = np.zeros(33)
    inc_err = 0.0
    removed: list[int] = []
    for j in range(n):
        i = int(order[j])
        cand = [k for k in range(33) if k not in removed]
        score = np.diag(G) + 2 * a
        inc_err = max(inc_err, abs(score[i] - min(score[cand])) / abs(score[i]))
        a += G[:, i]
        removed.append(i)
    print(f"chosen score vs min score over candidates: rel diff {inc_err:.2e}")
    assert inc_err < 1e-12


@pytest.mark.parametrize("seed", [9, 10])
def test_greedy_error_curve_non_decreasing(seed):
    """With non-negative contributions (all G_ij >= 0) every increment G_ii + 2a_i >= 0."""
    X = rand_X(np.random.default_rng(seed), 300, 30, nonneg=True)
    _, errors = greedy_remove(gram_of(X), 30, return_errors=True)
    d = np.diff(errors.numpy())
    print(f"smallest increment of E(n): {d.min():.4g} (E(1)={float(errors[0]):.4g})")
    assert float(errors[0]) > 0
    assert d.min() >= 0


def test_greedy_error_curve_is_signed_not_clamped():
    """Mixed-sign contributions can cancel: removing x and then -x + tiny brings E back
    down. The curve must follow the true objective, not a clamped one."""
    rng = np.random.default_rng(11)
    X = rand_X(rng, 200, 12) * 5
    X[:, 4] = rng.standard_normal(200) * 0.1          # the smallest channel goes first
    X[:, 9] = -X[:, 4] + rng.standard_normal(200) * 1e-3  # and its negative cancels it
    order, errors = greedy_remove(gram_of(X), 3, return_errors=True)
    explicit = [objective(X, order[: j + 1].tolist()) for j in range(3)]
    print(f"order {order.tolist()}, E {errors.tolist()}, explicit {explicit}")
    assert sorted(order[:2].tolist()) == [4, 9]
    assert float(errors[1]) < float(errors[0])
    assert np.allclose(errors.numpy(), explicit, rtol=1e-9)


def test_greedy_ties_break_to_lowest_index_duplicated_columns():
    rng = np.random.default_rng(12)
    X = rand_X(rng, 300, 16)
    lo, hi = 3, 11
    X[:, hi] = rng.standard_normal(300) * 0.05
    X[:, lo] = X[:, hi]  # exact duplicates, and the smallest channels
    G = gram_of(X)
    G[lo, :], G[:, lo] = G[hi, :], G[:, hi]  # make G's duplication bit-exact too
    G[lo, lo] = G[hi, hi]
    exp_order, _ = exhaustive_greedy(X, 16)
    for fn in (greedy_remove, greedy_remove_ref):
        order = fn(G, 16)
        print(f"{fn.__name__}: first removals {order[:4].tolist()}, exhaustive {exp_order[:4]}")
        assert int(order[0]) == min(lo, hi)
        assert order.tolist() == exp_order


def test_greedy_ties_all_equal_scores():
    """G = c·I: every step is an exact tie among all remaining channels."""
    c = float(torch.rand(1, generator=torch.Generator().manual_seed(13))) + 0.5
    C = 9
    G = c * torch.eye(C, dtype=torch.float64)
    X = np.sqrt(c) * np.eye(C)  # XᵀX = G
    exp_order, exp_err = exhaustive_greedy(X, C)
    for fn in (greedy_remove, greedy_remove_ref):
        order, errors = fn(G, C, return_errors=True)
        print(f"{fn.__name__}: {order.tolist()} vs {exp_order}; errors {errors.tolist()}")
        assert order.tolist() == exp_order == sorted(exp_order)
        assert np.allclose(errors.numpy(), exp_err)


def _problems(seed, sizes):
    rng = np.random.default_rng(seed)
    return [gram_of(rand_X(rng, 120, c)) for c in sizes]


@pytest.mark.parametrize("fn", [greedy_remove, greedy_remove_ref], ids=["fast", "ref"])
def test_greedy_remove_batched_equals_looped(fn):
    sizes = [7, 19, 12, 1, 19]
    n_remove = [3, 18, 12, 0, 5]
    mats = _problems(14, sizes)
    single = [fn(g, n, return_errors=True) for g, n in zip(mats, n_remove)]
    # padded batch whose padding holds finite garbage that must be ignored
    Cmax = max(sizes)
    gen = torch.Generator().manual_seed(15)
    Gb = torch.randn(len(sizes), Cmax, Cmax, generator=gen, dtype=torch.float64) * 1e3
    for j, g in enumerate(mats):
        Gb[j, : sizes[j], : sizes[j]] = g
    order_b, err_b = fn(Gb, torch.tensor(n_remove), return_errors=True, sizes=sizes)
    order_l, err_l = fn(mats, n_remove, return_errors=True)
    for j, (o, e) in enumerate(single):
        n = n_remove[j]
        pad_ok = bool((order_b[j, n:] == -1).all()) and bool(torch.isinf(err_b[j, n:]).all())
        d = float((err_b[j, :n] - e).abs().max()) if n else 0.0
        print(f"problem {j} (C={sizes[j]}, n={n}): batch err diff {d:.2e}, padding ok {pad_ok}")
        assert order_b[j, :n].tolist() == o.tolist()
        assert order_l[j].tolist() == o.tolist()
        assert torch.equal(err_l[j], e) and d == 0.0
        assert pad_ok


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_greedy_remove_fast_equals_ref(dtype):
    mats = [m.to(dtype) for m in _problems(16, [5, 33, 64, 17])]
    for g in mats:
        n = g.shape[0] - 1
        o1, e1 = greedy_remove(g, n, return_errors=True)
        o2, e2 = greedy_remove_ref(g, n, return_errors=True)
        rel = float(((e1 - e2).abs() / e2.abs()).max())
        print(f"C={g.shape[0]} {dtype}: orders equal {torch.equal(o1, o2)}, max rel err diff {rel:.2e}")
        assert torch.equal(o1, o2)
        assert rel < (1e-4 if dtype == torch.float32 else 1e-12)


def test_removal_to_keep_is_the_complement():
    rng = np.random.default_rng(17)
    X = rand_X(rng, 90, 21)
    order = greedy_remove(gram_of(X), 20)
    for n_keep in (1, 8, 21):
        keep = removal_to_keep(order, 21, n_keep)
        exp = sorted(set(range(21)) - set(order[: 21 - n_keep].tolist()))
        print(f"n_keep={n_keep}: {keep.tolist()} vs {exp}")
        assert keep.tolist() == exp
    with pytest.raises(ValueError, match="removal order"):
        removal_to_keep(order[:3], 21, 5)


# --------------------------------------------------------- forward least squares
@pytest.mark.parametrize("fn", [greedy_keep_ls, greedy_keep_ls_ref], ids=["fast", "ref"])
@pytest.mark.parametrize("seed,m,C,n", [(20, 400, 24, 12), (21, 150, 40, 25), (22, 1000, 16, 16)])
def test_keep_ls_equals_numpy_forward_selection(fn, seed, m, C, n):
    X = rand_X(np.random.default_rng(seed), m, C)
    exp_keep, exp_w = forward_ls_numpy(X, n)
    keep, w = fn(gram_of(X), n, return_weights=True)
    wrel = float(np.max(np.abs(w.numpy() - exp_w)) / np.max(np.abs(exp_w)))
    print(f"C={C} n={n}: keep equal {keep.tolist() == exp_keep}, weight rel err {wrel:.2e}")
    assert keep.tolist() == exp_keep
    assert w.dtype == torch.float64
    assert wrel < 1e-6


def test_keep_ls_weights_are_lstsq_on_kept_set():
    rng = np.random.default_rng(23)
    X = rand_X(rng, 500, 30)
    y = X.sum(axis=1)
    for n in (1, 5, 17, 30):
        keep, w = greedy_keep_ls(gram_of(X), n, return_weights=True)
        w_ls = np.linalg.lstsq(X[:, keep.numpy()], y, rcond=None)[0]
        rel = float(np.max(np.abs(w.numpy() - w_ls)) / np.max(np.abs(w_ls)))
        print(f"n={n}: max rel diff to lstsq weights {rel:.2e}")
        assert len(set(keep.tolist())) == n
        assert rel < 1e-6


@pytest.mark.parametrize("fn", [greedy_keep_ls, greedy_keep_ls_ref], ids=["fast", "ref"])
def test_keep_ls_batched_equals_looped(fn):
    sizes = [6, 15, 11, 15]
    n_keep = [2, 15, 5, 1]
    mats = _problems(24, sizes)
    single = [fn(g, n, return_weights=True) for g, n in zip(mats, n_keep)]
    Cmax = max(sizes)
    Gb = torch.randn(len(sizes), Cmax, Cmax, generator=torch.Generator().manual_seed(25), dtype=torch.float64)
    for j, g in enumerate(mats):
        Gb[j, : sizes[j], : sizes[j]] = g
    kb, wb = fn(Gb, n_keep, return_weights=True, sizes=sizes)
    kl, wl = fn(mats, n_keep, return_weights=True)
    for j, (k, w) in enumerate(single):
        n = n_keep[j]
        d = float((wb[j, :n] - w).abs().max())
        print(f"problem {j}: keep {k.tolist()}, batch weight diff {d:.2e}")
        assert kb[j, :n].tolist() == k.tolist() == kl[j].tolist()
        assert bool((kb[j, n:] == -1).all())
        assert d < 1e-12 and float((wl[j] - w).abs().max()) < 1e-12


def test_keep_ls_fast_equals_ref_float32():
    for g in _problems(26, [9, 31, 50]):
        g32 = g.float()
        n = g.shape[0] // 2
        k1, w1 = greedy_keep_ls(g32, n, return_weights=True)
        k2, w2 = greedy_keep_ls_ref(g32, n, return_weights=True)
        d = float((w1 - w2).abs().max() / w2.abs().max())
        print(f"C={g.shape[0]}: keeps equal {torch.equal(k1, k2)}, weight rel diff {d:.2e}")
        assert torch.equal(k1, k2)
        assert d < 1e-6


# --------------------------------------------------------------- singular inputs
def _singular_grams():
    rng = np.random.default_rng(27)
    X = rand_X(rng, 200, 14)
    dead = X.copy()
    dead[:, [2, 9]] = 0.0
    dup = X.copy()
    dup[:, 5] = dup[:, 1]
    dup[:, 12] = dup[:, 1]
    lowrank = rand_X(rng, 5, 14)  # m < C: rank 5
    return {
        "dead": (dead, gram_of(dead)),
        "duplicated": (dup, gram_of(dup)),
        "rank_deficient": (lowrank, gram_of(lowrank)),
        "all_zero": (np.zeros((10, 14)), torch.zeros(14, 14, dtype=torch.float64)),
    }


@pytest.mark.parametrize("case", ["dead", "duplicated", "rank_deficient", "all_zero"])
def test_singular_inputs_stay_finite(case):
    X, G = _singular_grams()[case]
    C = G.shape[0]
    for fn in (greedy_remove, greedy_remove_ref):
        order, errors = fn(G, C, return_errors=True)
        explicit = np.array([objective(X, order[: j + 1].tolist()) for j in range(C)])
        err = float(np.max(np.abs(errors.numpy() - explicit))) / max(float(np.abs(explicit).max()), 1.0)
        print(f"{case} {fn.__name__}: finite {bool(torch.isfinite(errors).all())}, "
              f"permutation {sorted(order.tolist()) == list(range(C))}, objective err {err:.2e}")
        assert bool(torch.isfinite(errors).all())
        assert sorted(order.tolist()) == list(range(C))
        assert err < 1e-9
    y = X.sum(axis=1)
    for fn in (greedy_keep_ls, greedy_keep_ls_ref):
        for dtype in (torch.float64, torch.float32):
            keep, w = fn(G.to(dtype), 8, return_weights=True)
            Xs = X[:, keep.numpy()]
            res = float(np.sum((y - Xs @ w.numpy()) ** 2))
            opt = float(np.sum((y - Xs @ np.linalg.lstsq(Xs, y, rcond=None)[0]) ** 2))
            scale = max(float(y @ y), 1e-300)
            print(f"{case} {fn.__name__} {dtype}: keep {keep.tolist()}, finite {bool(torch.isfinite(w).all())}, "
                  f"residual {res / scale:.3e} vs lstsq optimum {opt / scale:.3e}")
            assert bool(torch.isfinite(w).all())
            assert len(set(keep.tolist())) == 8 and 0 <= int(keep.min()) and int(keep.max()) < C
            assert res <= opt + 1e-5 * scale + 1e-12


# --------------------------------------------------------------------- error paths
def test_bad_inputs_raise_with_the_argument_named():
    g = gram_of(rand_X(np.random.default_rng(28), 40, 6))
    bad = g.clone()
    bad[2, 3] = float("nan")
    cases = [
        (lambda: greedy_remove(torch.rand(5, dtype=torch.float64) + 1, 2), ValueError, "gram"),
        (lambda: greedy_remove(torch.rand(3, 4, dtype=torch.float64) + 1, 2), ValueError, "gram"),
        (lambda: greedy_remove(torch.rand(2, 3, 4, dtype=torch.float64) + 1, 2), ValueError, "gram"),
        (lambda: greedy_remove(torch.ones(4, 4, dtype=torch.int64), 2), TypeError, "gram"),
        (lambda: greedy_remove(bad, 2), ValueError, "gram"),
        (lambda: greedy_remove(g, 7), ValueError, "n_remove"),
        (lambda: greedy_remove(g, -1), ValueError, "n_remove"),
        (lambda: greedy_remove(torch.stack([g, g]), [1, 2, 3]), ValueError, "n_remove"),
        (lambda: greedy_remove(torch.stack([g, g]), 2, sizes=[6, 9]), ValueError, "sizes"),
        (lambda: greedy_remove(torch.stack([g, g]), 2, sizes=[6]), ValueError, "sizes"),
        (lambda: greedy_remove(torch.stack([g, g]), [2, 5], sizes=[6, 4]), ValueError, "n_remove"),
        (lambda: greedy_remove([g, g[:3, :3]], 2, sizes=[6, 3]), ValueError, "sizes"),
        (lambda: greedy_remove([g, g[:3, :4]], 2), ValueError, r"gram\[1\]"),
        (lambda: greedy_remove([], 2), ValueError, "gram"),
        (lambda: greedy_remove_ref(bad, 2), ValueError, "gram"),
        (lambda: greedy_keep_ls(g, 7), ValueError, "n_keep"),
        (lambda: greedy_keep_ls(bad, 2), ValueError, "gram"),
        (lambda: greedy_keep_ls(torch.ones(4, 4, dtype=torch.int32), 2), TypeError, "gram"),
        (lambda: greedy_keep_ls_ref(g, -2), ValueError, "n_keep"),
        (lambda: greedy_remove(g, 2, backend="no-such-backend"), ValueError, "backend"),
    ]
    for j, (call, exc, pattern) in enumerate(cases):
        with pytest.raises(exc, match=pattern) as info:
            call()
        print(f"case {j}: {exc.__name__}: {info.value}")


def test_prepare_batch_broadcasts_a_scalar_count():
    mats = _problems(29, [4, 6])
    G, sizes, counts, layout = prepare_batch(mats, 3)
    print(f"sizes {sizes.tolist()}, counts {counts.tolist()}, layout {layout}, shape {tuple(G.shape)}")
    assert layout == "list" and sizes.tolist() == [4, 6] and counts.tolist() == [3, 3]
    assert torch.equal(G[0, :4, :4], mats[0]) and torch.equal(G[1], mats[1])
    assert float(G[0, 4:].abs().sum()) == 0.0

"""Reconstruction of the consumer after pruning (DESIGN.md §5).

All solves run in float64 with a ridge ``ridge * mean(diag)``, so singular statistics
(dead or duplicated channels) give finite weights, never NaN.
"""
from __future__ import annotations

import torch

__all__ = ["ls_scale", "refit_full", "bias_compensation", "scale_error", "refit_error", "heldout_error",
           "choose_scale_ridge", "refit_full_cv", "refit_full_dual", "channel_taps", "DEFAULT_RIDGE", "RIDGES"]

DEFAULT_RIDGE = 1e-8
# relative ridges tried on the held-out fold, strongest first; inf keeps the unpruned
# weights of the kept channels (no reconstruction), which the data may well prefer
RIDGES = (float("inf"), 1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-6)


def _keep_index(keep, C: int, device) -> torch.Tensor:
    keep = torch.as_tensor(keep, dtype=torch.int64, device=device).reshape(-1)
    if keep.numel() == 0:
        raise ValueError("keep is empty: at least one channel must be kept")
    if int(keep.min()) < 0 or int(keep.max()) >= C:
        raise ValueError(f"keep has indices outside [0, {C})")
    if torch.unique(keep).numel() != keep.numel():
        raise ValueError("keep has duplicated indices")
    return keep


def _check_square(A, name: str) -> None:
    """A must be a finite square matrix: NaN/Inf statistics would otherwise come back as
    silently zeroed weights (the solve's NaN guard), hiding a diverged model."""
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"{name} must be a square (n, n) tensor; got shape {tuple(getattr(A, 'shape', ()))}")
    if not torch.isfinite(A.sum()):  # any NaN/Inf reaches the sum: one pass, no (n, n) mask
        raise ValueError(f"{name} contains NaN or Inf; check the statistics (a diverged model or an fp16 overflow)")


def channel_taps(S: torch.Tensor, t: int) -> torch.Tensor:
    """Columns of vec(z) (channel-major) that belong to the channels S."""
    return (S[:, None] * t + torch.arange(t, device=S.device)).reshape(-1)


def _kept_rows(kernel: torch.Tensor, cov: torch.Tensor, keep):
    """The refit's shared start: W (K, C, t) float64, S, its taps, and the uncentred
    ``P_{S,:} Wᵀ`` (|S|t, K) and ``P_SS`` in float64, from only the kept rows of P (no
    float64 copy of the whole (C·t)² matrix; the one large product in the statistics' dtype)."""
    K, C = kernel.shape[0], kernel.shape[1]
    W = kernel.reshape(K, C, -1).double()
    t = W.shape[2]
    if cov.shape != (C * t, C * t):
        raise ValueError(f"cov has shape {tuple(cov.shape)}; expected ({C * t}, {C * t}) for C={C}, t={t}")
    _check_square(cov, "cov")
    S = _keep_index(keep, C, kernel.device)
    taps = channel_taps(S, t)
    rows = cov.to(kernel.device)[taps]
    rhs = (rows @ kernel.reshape(K, C * t).to(rows.dtype).T).double()
    return W, S, taps, rhs, rows[:, taps].double()


def _best_ridge(ridges, score, *, default: float, stop_on_rise: bool = True) -> tuple[float, float]:
    """(ridge, error) with the least ``score(ridge)`` (None: that ridge could not be
    solved). Ridges come strongest first; with ``stop_on_rise`` the search ends at the
    first rise past a finite minimum (the held-out error is unimodal in log ridge in
    practice)."""
    best = (default, float("inf"))
    for r in ridges:
        err = score(r)
        if err is None:
            continue
        if err < best[1]:
            best = (r, err)
        elif stop_on_rise and best[1] < float("inf"):
            break
    return best


def _lam(A: torch.Tensor, ridge: float) -> float:
    lam = ridge * float(A.diagonal().mean().clamp_min(0))
    if not lam > 0:
        lam = 1e-12 if float(A.abs().max()) == 0 else ridge * float(A.abs().max())
    return lam


def _ridge_solve(A: torch.Tensor, B: torch.Tensor, ridge: float, prior: torch.Tensor | None = None) -> torch.Tensor:
    """(A + λI)⁻¹ (B + λ·prior) for symmetric PSD A, λ = ridge·mean(diag A); float64.

    The ridge pulls towards ``prior`` (the unpruned weights) rather than zero, so
    directions the data never excites keep their original values, and keeping every
    channel gives back the original weights exactly."""
    A = A.double()
    if ridge == float("inf"):  # all the way to the prior
        return torch.zeros_like(B, dtype=torch.float64) if prior is None else prior.double().expand_as(B).clone()
    lam = _lam(A, ridge)
    B = B.double() if prior is None else B.double() + lam * prior.double()
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    lam0 = lam
    # not numerically PD (rank-deficient float32 statistics): grow the ridge, then eigh;
    # never an SVD-based lstsq on the hot path
    for step in range(4):
        L, info = torch.linalg.cholesky_ex(A + lam * eye)
        if int(info) == 0:
            if step and prior is not None:  # the larger ridge pulls harder towards the prior
                B = B + (lam - lam0) * prior.double()
            return torch.nan_to_num(torch.cholesky_solve(B, L), nan=0.0, posinf=0.0, neginf=0.0)
        lam *= 100.0
    lam = lam0
    evals, evecs = torch.linalg.eigh(A)
    inv = 1.0 / (evals.clamp_min(0) + lam)
    X = evecs @ (inv[:, None] * (evecs.T @ B))
    return torch.nan_to_num(X, nan=0.0, posinf=0.0, neginf=0.0)


def ls_scale(gram: torch.Tensor, keep, *, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """The paper's rescaling: ``w = G_SS⁻¹ (G_{S,:} 1)`` (float64, one weight per kept channel).

    Multiplying the consumer's input channel ``keep[j]`` by ``w[j]`` minimises
    ``‖y - X_S w‖²`` where y is the unpruned (bias-free) output.
    """
    _check_square(gram, "gram")
    C = gram.shape[0]
    S = _keep_index(keep, C, gram.device)
    G = gram.double()
    b = G[S].sum(dim=1, keepdim=True)
    return _ridge_solve(G[S][:, S], b, ridge, prior=torch.ones_like(b)).squeeze(1)


def scale_error(gram: torch.Tensor, keep, w: torch.Tensor | None = None) -> torch.Tensor:
    """Relative residual ``‖y - X_S w‖² / ‖y‖²`` from G alone (w = 1 if not given)."""
    _check_square(gram, "gram")
    S = _keep_index(keep, gram.shape[0], gram.device)
    G = gram.double()
    w = torch.ones(S.numel(), dtype=torch.float64, device=G.device) if w is None else w.double()
    yy = G.sum()
    err = yy - 2 * (G[S].sum(dim=1) @ w) + w @ G[S][:, S] @ w
    return (err / yy.clamp_min(torch.finfo(torch.float64).tiny)).clamp_min(0)


def refit_full(kernel: torch.Tensor, cov: torch.Tensor, keep, *, mean: torch.Tensor | None = None,
               count: int | None = None, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """Least-squares refit of the whole consumer weight on the kept channels' taps.

    ``W'_Sᵀ = P_SS⁻¹ P_{S,:} Wᵀ`` with P the patch covariance (C·t × C·t). With
    ``mean`` (C, t) and ``count`` the statistics are centred first, which together with
    :func:`bias_compensation` gives the optimal affine fit.

    Args:
        kernel: consumer weight (K, C, kh, kw) or (K, C, t).
    Returns:
        the new weight (K, |S|, t), float64.
    """
    W, S, taps, rhs, P_SS = _kept_rows(kernel, cov, keep)
    K, C, t = W.shape
    if mean is not None:  # centred block-wise
        if not count:
            raise ValueError("centred statistics need the patch count")
        mu = mean.reshape(-1).double().to(kernel.device)
        rhs = rhs / count - torch.outer(mu[taps], mu @ W.reshape(K, C * t).T)
        P_SS = P_SS / count - torch.outer(mu[taps], mu[taps])
    prior = W.reshape(K, C * t)[:, taps].T
    Wn = _ridge_solve(P_SS, rhs, ridge, prior=prior).T
    return Wn.reshape(K, S.numel(), t)


def bias_compensation(kernel: torch.Tensor, new_kernel: torch.Tensor, keep, mean: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``b' = b + W·μ - W'_S·μ_S``: keeps E[y] when the removed channels had a non-zero
    mean (after ReLU they always do). Returns (K,) float64."""
    K, C = kernel.shape[0], kernel.shape[1]
    W = kernel.reshape(K, C, -1).double()
    Wn = new_kernel.reshape(K, -1, W.shape[2]).double()
    S = _keep_index(keep, C, kernel.device)
    mu = mean.reshape(C, -1).double().to(kernel.device)
    if not torch.isfinite(mu).all():
        raise ValueError("mean contains NaN or Inf; check the statistics")
    shift = torch.einsum("kcu,cu->k", W, mu) - torch.einsum("kcu,cu->k", Wn, mu[S])
    b = torch.zeros(K, dtype=torch.float64, device=kernel.device) if bias is None else bias.double()
    return b + shift


def refit_error(kernel: torch.Tensor, new_kernel: torch.Tensor, keep, cov: torch.Tensor,
                mean: torch.Tensor | None = None, count: int | None = None) -> torch.Tensor:
    """Relative residual ``Σ_s ‖W z_s - W'_S z_{s,S}‖² / Σ_s ‖W z_s‖²`` from P alone."""
    K, C = kernel.shape[0], kernel.shape[1]
    W = kernel.reshape(K, C, -1).double()
    t = W.shape[2]
    S = _keep_index(keep, C, kernel.device)
    D = W.clone()
    D[:, S] -= new_kernel.reshape(K, -1, t).double()
    Df, Wf = D.reshape(K, -1), W.reshape(K, -1)
    P = cov.to(kernel.device)

    def quad(M):  # tr(M P Mᵀ), centred when the mean is given: two products, no einsum
        q = ((M.to(P.dtype) @ P).double() * M).sum()
        if mean is None:
            return q
        if not count:
            raise ValueError("centred statistics need the patch count")
        return q / count - (M @ mean.reshape(-1).double().to(M.device)).square().sum()
    num, den = quad(Df), quad(Wf)
    return (num / den.clamp_min(torch.finfo(torch.float64).tiny)).clamp_min(0)


def heldout_error(kernel: torch.Tensor, new_kernel: torch.Tensor, keep, patches: torch.Tensor,
                  mean: torch.Tensor | None = None) -> torch.Tensor:
    """Relative error ``Σ_s ‖D(z_s - μ)‖² / Σ_s ‖W(z_s - μ)‖²`` on patches (m, C·t) the fit
    never saw, D = W - W'_S; ``mean`` is the fit's μ (with bias compensation), else 0."""
    K, C = kernel.shape[0], kernel.shape[1]
    W = kernel.reshape(K, C, -1).double()
    S = _keep_index(keep, C, kernel.device)
    D = W.clone()
    D[:, S] -= new_kernel.reshape(K, -1, W.shape[2]).double().to(W.device)
    Z = patches.to(kernel.device).double()
    if mean is not None:
        Z = Z - mean.reshape(-1).double().to(Z.device)
    num = (Z @ D.reshape(K, -1).T).square().sum()
    den = (Z @ W.reshape(K, -1).T).square().sum()
    return num / den.clamp_min(torch.finfo(torch.float64).tiny)


def choose_scale_ridge(gram_fit: torch.Tensor, gram_held: torch.Tensor, keep, ridges=RIDGES):
    """The ridge whose scale fit on ``gram_fit`` has the least error on ``gram_held``.
    Returns (ridge, held-out error)."""
    return _best_ridge(ridges, lambda r: float(scale_error(gram_held, keep, ls_scale(gram_fit, keep, ridge=r))),
                       default=float("inf"), stop_on_rise=False)


def refit_full_cv(kernel: torch.Tensor, cov: torch.Tensor, keep, patches: torch.Tensor, *, count: int,
                  patch_sum: torch.Tensor | None = None, ridges=RIDGES):
    """:func:`refit_full` with the ridge chosen on a held-out fold.

    ``patches`` (m, C·t) are the held-out patches, which ``cov`` (and ``patch_sum``,
    ``count``) include: the fit fold is the totals minus them. Each ridge (strongest
    first; the search stops once the error rises) is fitted on the fit fold
    and scored on the held-out patches, with one Cholesky and m right-hand sides, not K.
    The chosen ridge is then refitted on all samples. With ``patch_sum`` the fits are
    centred (bias compensation).

    Returns (new weight (K, |S|, t) float64, ridge, held-out error of the fold's fit).
    """
    m = patches.shape[0]
    if not 0 < m < count:
        raise ValueError(f"need 0 < held-out patches < count; got {m} and {count}")
    W, S, taps, rhs_all, A_all = _kept_rows(kernel, cov, keep)
    K, C, t = W.shape
    Wf = W.reshape(K, C * t)
    Zd = patches.to(kernel.device).double()
    ZS, old = Zd[:, taps], Zd @ Wf.T                     # held-out patches on S; their unpruned outputs
    # in-place updates of the (d, d) matrices: they are large and memory-bound
    A_fit = torch.sub(A_all, ZS.T @ ZS)
    rhs_fit = torch.sub(rhs_all, ZS.T @ old)
    n_all, n_fit = count, count - m
    if patch_sum is not None:  # centre each fold on its own mean
        s_all = patch_sum.reshape(-1).double().to(Zd.device)
        mu_all, mu_fit = s_all / n_all, (s_all - Zd.sum(0)) / n_fit
        A_all.div_(n_all).sub_(torch.outer(mu_all[taps], mu_all[taps]))
        rhs_all.div_(n_all).sub_(torch.outer(mu_all[taps], Wf @ mu_all))
        A_fit.div_(n_fit).sub_(torch.outer(mu_fit[taps], mu_fit[taps]))
        rhs_fit.div_(n_fit).sub_(torch.outer(mu_fit[taps], Wf @ mu_fit))
        old = old - Wf @ mu_fit
        ZS = ZS - mu_fit[taps]
    prior = Wf[:, taps].T
    energy = old.square().sum().clamp_min(torch.finfo(torch.float64).tiny)

    def score(r):
        if r == float("inf"):
            return float((old - ZS @ prior).square().sum() / energy)
        lam = _lam(A_fit, r)
        M = A_fit.clone()
        M.diagonal().add_(lam)
        L, info = torch.linalg.cholesky_ex(M)
        if int(info):
            return None
        Y = torch.cholesky_solve(ZS.T.contiguous(), L)  # (d, m)
        return float((old - Y.T @ (rhs_fit + lam * prior)).square().sum() / energy)

    best = _best_ridge(ridges, score, default=ridges[-1])
    Wn = _ridge_solve(A_all, rhs_all, best[0], prior=prior).T
    return Wn.reshape(K, S.numel(), t), best[0], best[1]


def refit_full_dual(kernel: torch.Tensor, patches: torch.Tensor, keep, held: torch.Tensor, *,
                    centred: bool = False, ridges=RIDGES):
    """:func:`refit_full_cv` from the patches themselves (S, C·t), for S below the unknowns.

    Same fits, same ridge, same result (the push-through identity
    ``(ZᵀZ + cI)⁻¹ Zᵀ = Zᵀ (ZZᵀ + cI)⁻¹``), but each solve is S×S instead of
    |S|t×|S|t, and one eigendecomposition of the fit fold's S×S kernel scores every
    ridge. ``held`` indexes the held-out rows of ``patches``; ``centred`` centres each
    fold on its own mean (bias compensation).

    Returns (new weight (K, |S|, t) float64, ridge, held-out error of the fold's fit).
    """
    K, C = kernel.shape[0], kernel.shape[1]
    W = kernel.reshape(K, C, -1).double()
    t = W.shape[2]
    Z = patches.to(kernel.device).double()
    if Z.dim() != 2 or Z.shape[1] != C * t:
        raise ValueError(f"patches has shape {tuple(Z.shape)}; expected (S, {C * t}) for C={C}, t={t}")
    if not torch.isfinite(Z.sum()):
        raise ValueError("patches contain NaN or Inf; check the statistics (a diverged model or an fp16 overflow)")
    S = _keep_index(keep, C, kernel.device)
    taps = channel_taps(S, t)
    fit = torch.ones(Z.shape[0], dtype=torch.bool, device=Z.device)
    fit[held.to(Z.device)] = False
    if not 0 < int(fit.sum()) < Z.shape[0]:
        raise ValueError(f"need both fit and held-out rows; got {int(fit.sum())} fit rows of {Z.shape[0]}")
    Wf = W.reshape(K, C * t)
    P0 = Wf[:, taps].T                                   # (d, K) the prior: the unpruned weights
    # the two products with K columns, once for all rows; centring only shifts them
    Y, B = Z @ Wf.T, Z[:, taps] @ P0                     # unpruned outputs; the prior's outputs
    mu_a = Z.mean(0) if centred else torch.zeros(Z.shape[1], dtype=Z.dtype, device=Z.device)
    mu_f = Z[fit].mean(0) if centred else mu_a
    Zf, Zh = Z[fit] - mu_f, Z[~fit] - mu_f
    ZfS, ZhS = Zf[:, taps], Zh[:, taps]
    yf, bf = Wf @ mu_f, P0.T @ mu_f[taps]
    Rf = (Y[fit] - yf) - (B[fit] - bf)                   # (n, K) what the prior leaves unexplained
    old = Y[~fit] - yf
    base = B[~fit] - bf
    energy = old.square().sum().clamp_min(torch.finfo(torch.float64).tiny)
    evals, U = torch.linalg.eigh(ZfS @ ZfS.T)
    evals = evals.clamp_min(0)
    Q, H = U.T @ Rf, (ZhS @ ZfS.T) @ U
    scale = float(ZfS.square().sum()) / ZfS.shape[1]     # c = ridge · mean diag(ZᵀZ)

    def score(r):
        if r == float("inf"):
            pred = base
        else:
            c = r * scale if r * scale > 0 else 1e-12
            pred = base + H @ (Q / (evals + c)[:, None])
        return float((old - pred).square().sum() / energy)

    best = _best_ridge(ridges, score, default=ridges[-1])
    r = best[0]
    if r == float("inf"):
        return P0.T.reshape(K, S.numel(), t).clone(), r, best[1]
    ZaS = Z[:, taps] - mu_a[taps]
    Ra = (Y - Wf @ mu_a) - (B - P0.T @ mu_a[taps])
    c = r * float(ZaS.square().sum()) / ZaS.shape[1]
    Ka = ZaS @ ZaS.T
    Ka.diagonal().add_(c if c > 0 else 1e-12)
    L, info = torch.linalg.cholesky_ex(Ka)
    if int(info) == 0:
        coef = torch.cholesky_solve(Ra, L)
    else:  # a numerically singular kernel at a tiny ridge: eigh of the S×S matrix is cheap
        e, V = torch.linalg.eigh(Ka)
        coef = V @ ((V.T @ Ra) / e.clamp_min(torch.finfo(torch.float64).eps * float(e.max().clamp_min(1)))[:, None])
    X = P0 + ZaS.T @ coef
    return torch.nan_to_num(X.T, nan=0.0, posinf=0.0, neginf=0.0).reshape(K, S.numel(), t), r, best[1]

"""Reconstruction of the consumer after pruning (DESIGN.md §5).

All solves run in float64 with a ridge ``ridge * mean(diag)``, so singular statistics
(dead or duplicated channels) give finite weights, never NaN.
"""
from __future__ import annotations

import torch

__all__ = ["ls_scale", "refit_full", "bias_compensation", "scale_error", "refit_error", "DEFAULT_RIDGE"]

DEFAULT_RIDGE = 1e-8


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
    if not torch.isfinite(A).all():
        raise ValueError(f"{name} contains NaN or Inf; check the statistics (a diverged model or an fp16 overflow)")


def _ridge_solve(A: torch.Tensor, B: torch.Tensor, ridge: float, prior: torch.Tensor | None = None) -> torch.Tensor:
    """(A + λI)⁻¹ (B + λ·prior) for symmetric PSD A, λ = ridge·mean(diag A); float64.

    The ridge pulls towards ``prior`` (the unpruned weights) rather than zero, so
    directions the data never excites keep their original values, and keeping every
    channel gives back the original weights exactly."""
    A = A.double()
    lam = ridge * float(A.diagonal().mean().clamp_min(0))
    if not lam > 0:
        lam = 1e-12 if float(A.abs().max()) == 0 else ridge * float(A.abs().max())
    B = B.double() if prior is None else B.double() + lam * prior.double()
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    # not numerically PD (rank-deficient float32 statistics): grow the ridge, then eigh;
    # never an SVD-based lstsq on the hot path
    for step in range(4):
        L, info = torch.linalg.cholesky_ex(A + lam * eye)
        if int(info) == 0:
            if step and prior is not None:  # the larger ridge pulls harder towards the prior
                B = B + (lam - lam0) * prior.double()
            return torch.nan_to_num(torch.cholesky_solve(B, L), nan=0.0, posinf=0.0, neginf=0.0)
        lam0 = lam if step == 0 else lam0
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
    K, C = kernel.shape[0], kernel.shape[1]
    W = kernel.reshape(K, C, -1).double()
    t = W.shape[2]
    if cov.shape != (C * t, C * t):
        raise ValueError(f"cov has shape {tuple(cov.shape)}; expected ({C * t}, {C * t}) for C={C}, t={t}")
    _check_square(cov, "cov")
    S = _keep_index(keep, C, kernel.device)
    taps = (S[:, None] * t + torch.arange(t, device=S.device)).reshape(-1)
    # only the kept rows of P, centred block-wise: no float64 copy of the whole (C·t)² matrix
    rows = cov.to(kernel.device)[taps]
    rhs = (rows @ kernel.reshape(K, C * t).to(rows.dtype).T).double()  # (|S|t, K) in the statistics' dtype
    P_SS = rows[:, taps].double()
    if mean is not None:
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

"""Baseline channel selection criteria the paper compares against (DESIGN.md §4).

Each criterion gives an importance score per channel (higher = keep), following
Torch-Pruning's ``Importance`` contract; :func:`top_k` turns scores into kept
indices with ties broken towards the lowest index.
"""
from __future__ import annotations

import torch

__all__ = ["top_k", "random_scores", "weight_sum_scores", "apoz_scores", "lasso_coefficients", "lasso_keep"]


def top_k(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Sorted indices of the ``n_keep`` largest scores (ties: lowest index wins)."""
    C = scores.numel()
    if not 1 <= n_keep <= C:
        raise ValueError(f"n_keep must lie in [1, {C}]; got {n_keep}")
    order = torch.sort(scores.double().cpu(), descending=True, stable=True).indices
    return order[:n_keep].sort().values.to(scores.device)


def random_scores(channels: int, seed: int = 0) -> torch.Tensor:
    """Uniform random scores from a seeded CPU generator."""
    return torch.rand(channels, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)


def weight_sum_scores(producer_weight: torch.Tensor) -> torch.Tensor:
    """Li et al. (2017): the L1 norm of each producer filter."""
    return producer_weight.detach().double().abs().reshape(producer_weight.shape[0], -1).sum(1)


def apoz_scores(zero_fraction: torch.Tensor) -> torch.Tensor:
    """Hu et al. (2016): channels that are mostly zero go first, so score = 1 - APoZ."""
    return 1.0 - zero_fraction.double()


def _check_gram(gram) -> None:
    if not isinstance(gram, torch.Tensor) or gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square (C, C) tensor; got shape {tuple(getattr(gram, 'shape', ()))}")
    if not torch.isfinite(gram).all():
        raise ValueError("gram contains NaN or Inf; check the statistics (a diverged model or an fp16 overflow)")


def _soft(x: torch.Tensor, thr: float) -> torch.Tensor:
    return torch.sign(x) * (x.abs() - thr).clamp_min(0)


def lasso_coefficients(gram: torch.Tensor, lam: float, *, beta0: torch.Tensor | None = None,
                       max_iter: int = 2000, tol: float = 1e-9) -> torch.Tensor:
    """``argmin_β βᵀGβ - 2bᵀβ + λ‖β‖₁`` with ``b = G 1`` by FISTA, on G normalised to a
    unit diagonal (He et al. normalise the channels; otherwise large channels win).
    Returns β in the normalised scale (float64)."""
    _check_gram(gram)
    if not (lam >= 0 and lam < float("inf")):
        raise ValueError(f"lam must be a finite number >= 0; got {lam}")
    G = gram.double()
    d = G.diagonal().clamp_min(1e-12 * float(G.diagonal().abs().max().clamp_min(1e-300)))
    s = d.rsqrt()
    Gn = G * s[:, None] * s[None, :]
    b = Gn @ (1.0 / s)  # y = X 1 = Xn (1/s)
    L = 2 * float(torch.linalg.eigvalsh(Gn)[-1].clamp_min(1e-300))
    beta = torch.zeros_like(b) if beta0 is None else beta0.clone()
    z, tk = beta.clone(), 1.0
    for _ in range(max_iter):
        grad = 2 * (Gn @ z - b)
        nb = _soft(z - grad / L, lam / L)
        tn = (1 + (1 + 4 * tk * tk) ** 0.5) / 2
        z = nb + ((tk - 1) / tn) * (nb - beta)
        done = float((nb - beta).abs().max()) <= tol * max(1.0, float(nb.abs().max()))
        beta, tk = nb, tn
        if done:
            break
    return beta


def lasso_keep(gram: torch.Tensor, n_keep: int, *, max_bisect: int = 40, max_iter: int = 2000):
    """He et al. (2017) channel selection on G: bisect λ until exactly ``n_keep``
    coefficients are non-zero (or the closest count above it, then the largest
    ``|β|``). Returns (sorted kept indices, β of the final λ)."""
    _check_gram(gram)
    C = gram.shape[0]
    if not 1 <= n_keep <= C:
        raise ValueError(f"n_keep must lie in [1, {C}]; got {n_keep}")
    G = gram.double()
    d = G.diagonal().clamp_min(1e-300)
    b = (G * d.rsqrt()[:, None] * d.rsqrt()[None, :]) @ d.sqrt()
    lo, hi = 0.0, 2 * float(b.abs().max()) + 1e-12  # above hi every β is 0
    best = lasso_coefficients(G, lo, max_iter=max_iter)
    warm = best
    for _ in range(max_bisect):
        if int((best != 0).sum()) == n_keep:
            break
        mid = 0.5 * (lo + hi)
        beta = lasso_coefficients(G, mid, beta0=warm, max_iter=max_iter)
        nnz = int((beta != 0).sum())
        if nnz >= n_keep:
            lo, best, warm = mid, beta, beta
        else:
            hi = mid
    return top_k(best.abs(), n_keep), best

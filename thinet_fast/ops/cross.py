"""Reconstruction towards the unpruned model (``target="unpruned"``, He et al. 2017).

Sequential pruning changes a consumer's input before its own unit is reached: at unit i
the consumer sees patches z' from the partly pruned model where the unpruned model saw z
at the same images and locations. Refitting on z' alone (``target="current"``) copies
the upstream errors into the target; fitting ``W'_S z'_S ≈ W z`` corrects them.

That needs the cross-moment of the two inputs, ``Q = Σ z' zᵀ`` (C·t × C·t; rows the
current model, columns the unpruned one), next to ``P' = Σ z' z'ᵀ``:

- full refit: ``W'_S (P'_SS + λI) = W Q_{S,:}ᵀ + λ W_S`` (float64, the ridge of
  :mod:`~thinet_fast.ops.reconstruct`, towards the unpruned weights);
- scale (ThiNet's w): with ``G' = Σ_k W_k P' W_kᵀ`` per channel pair and the cross
  ``H = Σ_k W_k Q W_kᵀ`` (current × unpruned channels), ``w = G'_SS⁻¹ H_{S,:} 1``.

When nothing upstream was pruned z' = z, Q = P' and both reduce to the ``"current"``
fits. Each op has a ``*_ref`` twin built from explicit patches.

:func:`refit_across` is the same full refit for a Linear whose input changed width and
meaning (a LayerNorm renormalising the channels a cut kept): z' has n features, z has m,
``Q`` is n × m, and a constant feature appended to both carries the bias.
"""
from __future__ import annotations

import torch

from .patches import ConsumerGeometry, gather_patches, gather_patches_ref
from .reconstruct import DEFAULT_RIDGE, _check_square, _keep_index, _lam, _ridge_solve, channel_taps

__all__ = ["cross_moments", "cross_moments_ref", "channel_gram", "channel_gram_ref", "refit_towards",
           "refit_towards_ref", "scale_towards", "scale_towards_ref", "towards_error",
           "refit_across", "refit_across_ref", "across_error"]


def cross_moments(x_cur: torch.Tensor, x_ref: torch.Tensor, geometry: ConsumerGeometry, img, oy, ox, *,
                  acc_dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P', Q, P)`` over the sampled positions: Σ z'z'ᵀ, Σ z'zᵀ, Σ zzᵀ (C·t square)."""
    if x_cur.shape != x_ref.shape:
        raise ValueError(f"x_cur {tuple(x_cur.shape)} and x_ref {tuple(x_ref.shape)} must be the same images "
                         "at the same layer")
    zc = gather_patches(x_cur, geometry, img, oy, ox).reshape(img.numel(), -1).to(acc_dtype)
    zr = gather_patches(x_ref, geometry, img, oy, ox).reshape(img.numel(), -1).to(acc_dtype)
    return zc.T @ zc, zc.T @ zr, zr.T @ zr


def cross_moments_ref(x_cur, x_ref, geometry, img, oy, ox, *, acc_dtype=torch.float64):
    """Reference: one outer product per sample, from ``F.unfold`` patches."""
    zc = gather_patches_ref(x_cur, geometry, img, oy, ox).reshape(img.numel(), -1).to(acc_dtype)
    zr = gather_patches_ref(x_ref, geometry, img, oy, ox).reshape(img.numel(), -1).to(acc_dtype)
    D = zc.shape[1]
    out = [torch.zeros(D, D, dtype=acc_dtype) for _ in range(3)]
    for a, b in zip(zc, zr):
        out[0] += torch.outer(a, a)
        out[1] += torch.outer(a, b)
        out[2] += torch.outer(b, b)
    return tuple(out)


def channel_gram(kernel: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``G_cd = Σ_k Σ_uv W[k,c,u] M[(c,u),(d,v)] W[k,d,v]`` (C, C), float64: the Gram of
    per-channel contributions from a patch moment (P' gives G', Q gives H)."""
    K, C = kernel.shape[:2]
    Wf = kernel.reshape(K, -1).double()
    t = Wf.shape[1] // C
    D = C * t
    if M.shape != (D, D):
        raise ValueError(f"M has shape {tuple(M.shape)}; expected ({D}, {D})")
    # (WᵀW ∘ M) summed over each tap block, a block of channel rows at a time: one
    # K-deep product, where the three-operand einsum took ~30x longer at C=512, t=9
    out = torch.empty(C, C, dtype=torch.float64, device=Wf.device)
    step = max(1, min(C, (1 << 22) // max(D * t, 1)))
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        rows = slice(c0 * t, c1 * t)
        block = (Wf[:, rows].T @ Wf).mul_(M[rows].to(Wf))
        out[c0:c1] = block.view(c1 - c0, t, C, t).sum(3).sum(1)
    return out


def channel_gram_ref(kernel: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    K, C = kernel.shape[:2]
    W = kernel.reshape(K, C, -1).double()
    t = W.shape[2]
    G = torch.zeros(C, C, dtype=torch.float64)
    for c in range(C):
        for d in range(C):
            block = M.double()[c * t:(c + 1) * t, d * t:(d + 1) * t]
            G[c, d] = sum(W[k, c] @ block @ W[k, d] for k in range(K))
    return G


def refit_towards(kernel: torch.Tensor, P_cur: torch.Tensor, Q: torch.Tensor, keep, *,
                  ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """The refit of the kept taps that makes the current input give the unpruned
    output: ``W'_S`` (K, |S|, t), float64."""
    _check_square(P_cur, "P_cur")
    _check_square(Q, "Q")
    K, C = kernel.shape[:2]
    W = kernel.reshape(K, C, -1).double()
    t = W.shape[2]
    S = _keep_index(keep, C, kernel.device)
    taps = channel_taps(S, t)
    A = P_cur.double()[taps][:, taps]
    B = Q.double()[taps] @ W.reshape(K, C * t).T           # Σ z'_S (W z)ᵀ
    prior = W.reshape(K, C * t)[:, taps].T
    return _ridge_solve(A, B, ridge, prior=prior).T.reshape(K, S.numel(), t)


def refit_towards_ref(kernel: torch.Tensor, Z_cur: torch.Tensor, Z_ref: torch.Tensor, keep, *,
                      ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """Reference: least squares on the explicit patches (S, C, t), with the ridge as
    extra rows ``√λ (W'_S − W_S) = 0``."""
    K, C = kernel.shape[:2]
    W = kernel.reshape(K, C, -1).double()
    t = W.shape[2]
    S = torch.as_tensor(keep).reshape(-1)
    Zs = Z_cur.double()[:, S].reshape(Z_cur.shape[0], -1)
    Y = Z_ref.double().reshape(Z_ref.shape[0], -1) @ W.reshape(K, -1).T
    lam = _lam(Zs.T @ Zs, ridge)
    prior = W[:, S].reshape(K, -1).T
    A = torch.cat([Zs, lam ** 0.5 * torch.eye(Zs.shape[1], dtype=torch.float64)])
    B = torch.cat([Y, lam ** 0.5 * prior])
    return torch.linalg.lstsq(A, B).solution.T.reshape(K, S.numel(), t)


def scale_towards(G_cur: torch.Tensor, H: torch.Tensor, keep, *, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """ThiNet's per-channel scales towards the unpruned output: ``w = G'_SS⁻¹ H_{S,:} 1``."""
    _check_square(G_cur, "G_cur")
    S = _keep_index(keep, G_cur.shape[0], G_cur.device)
    b = H.double()[S].sum(dim=1, keepdim=True)
    return _ridge_solve(G_cur.double()[S][:, S], b, ridge, prior=torch.ones_like(b)).squeeze(1)


def scale_towards_ref(X_cur: torch.Tensor, X_ref: torch.Tensor, keep, *, ridge: float = DEFAULT_RIDGE):
    """Reference from the contributions (samples, C): least squares of Σ_c X_ref[:, c]
    on the kept columns of X_cur, ridge rows towards w = 1."""
    S = torch.as_tensor(keep).reshape(-1)
    A, y = X_cur.double()[:, S], X_ref.double().sum(1, keepdim=True)
    lam = _lam(A.T @ A, ridge)
    A = torch.cat([A, lam ** 0.5 * torch.eye(S.numel(), dtype=torch.float64)])
    y = torch.cat([y, lam ** 0.5 * torch.ones(S.numel(), 1, dtype=torch.float64)])
    return torch.linalg.lstsq(A, y).solution.squeeze(1)


def towards_error(G_cur: torch.Tensor, H: torch.Tensor, G_ref: torch.Tensor, keep, w=None) -> torch.Tensor:
    """``‖X'_S w − X 1‖² / ‖X 1‖²``: the relative error against the unpruned output."""
    S = _keep_index(keep, G_cur.shape[0], G_cur.device)
    w = torch.ones(S.numel(), dtype=torch.float64) if w is None else w.double()
    yy = G_ref.double().sum()
    err = w @ G_cur.double()[S][:, S] @ w - 2 * (H.double()[S].sum(1) @ w) + yy
    return (err / yy.clamp_min(torch.finfo(torch.float64).tiny)).clamp_min(0)


def refit_across(weight: torch.Tensor, P_cur: torch.Tensor, Q: torch.Tensor, P_ref: torch.Tensor,
                 prior: torch.Tensor, *, ridge: float = DEFAULT_RIDGE) -> tuple[torch.Tensor, float, float]:
    """``Θ`` (K, n) with ``Θ z' ≈ W z``: ``Θ (P' + λI) = W Qᵀ + λ·prior`` (float64; ``prior``
    is the cut's own weights, where the ridge pulls). ``weight`` (K, m), ``P_cur`` = Σ z'z'ᵀ
    (n, n), ``Q`` = Σ z'zᵀ (n, m), ``P_ref`` = Σ zzᵀ (m, m). Returns ``(Θ, error of prior,
    error of Θ)``, each ``‖Θz' − Wz‖² / ‖Wz‖²`` over the samples."""
    _check_square(P_cur, "P_cur")
    _check_square(P_ref, "P_ref")
    W, A = weight.double(), P_cur.double()
    n, m = A.shape[0], P_ref.shape[0]
    if Q.shape != (n, m) or W.shape[1] != m or prior.shape != (W.shape[0], n):
        raise ValueError(f"shapes do not agree: weight {tuple(weight.shape)}, P_cur {tuple(P_cur.shape)}, Q "
                         f"{tuple(Q.shape)}, P_ref {tuple(P_ref.shape)}, prior {tuple(prior.shape)}")
    B = Q.double().to(W.device) @ W.T                          # Σ z' (W z)ᵀ, (n, K)
    theta = _ridge_solve(A.to(W.device), B, ridge, prior=prior.double().to(W.device).T).T
    return theta, across_error(prior, W, A, Q, P_ref), across_error(theta, W, A, Q, P_ref)


def across_error(theta: torch.Tensor, weight: torch.Tensor, P_cur: torch.Tensor, Q: torch.Tensor,
                 P_ref: torch.Tensor) -> float:
    """``‖Θz' − Wz‖² / ‖Wz‖²`` over the samples behind the moments of :func:`refit_across`."""
    W = weight.double()
    T = theta.double().to(W.device)
    A, Qd, R = (M.double().to(W.device) for M in (P_cur, Q, P_ref))
    yy = float((W @ R * W).sum())
    e = float((T @ A * T).sum()) - 2 * float((T @ Qd * W).sum()) + yy
    return max(e, 0.0) / max(yy, torch.finfo(torch.float64).tiny)


def refit_across_ref(weight: torch.Tensor, Z_cur: torch.Tensor, Z_ref: torch.Tensor, prior: torch.Tensor, *,
                     ridge: float = DEFAULT_RIDGE) -> tuple[torch.Tensor, float, float]:
    """Reference: least squares on the samples (N, n) and (N, m), the ridge as extra rows
    ``√λ (Θ − prior) = 0``; the errors from the outputs themselves."""
    Zc, W = Z_cur.double(), weight.double()
    Y = Z_ref.double() @ W.T
    lam = _lam(Zc.T @ Zc, ridge)
    A = torch.cat([Zc, lam ** 0.5 * torch.eye(Zc.shape[1], dtype=torch.float64)])
    B = torch.cat([Y, lam ** 0.5 * prior.double().T])
    theta = torch.linalg.lstsq(A, B).solution.T
    yy = float((Y ** 2).sum())
    return theta, float(((Zc @ prior.double().T - Y) ** 2).sum()) / yy, float(((Zc @ theta.T - Y) ** 2).sum()) / yy

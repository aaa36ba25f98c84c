"""Gram-matrix kernels (DESIGN.md §3), each beside its ``*_ref`` twin.

* ``sampled_gram``: G = XᵀX with X[s, c] = Σ_u W[k_s, c, u] z_s[c, u] (paper's sampling).
* ``patch_moments``: P = Σ_s vec(z_s) vec(z_s)ᵀ and Σ_s z_s.
* ``gram_from_cov``: G[c, c'] = Σ_{u,v} (WᵀW)[(c,u),(c',v)] · P[(c,u),(c',v)] (all outputs).
* ``direct_gram``: XᵀX over every (or several sampled) outputs per sample, for large t.

The torch paths gather only the sampled patches and work in bounded chunks; the
references build the whole im2col with ``F.unfold``. Triton versions live in
``ops/triton`` with the same signatures.
"""
from __future__ import annotations

import torch

from . import dispatch
from .patches import ConsumerGeometry, contributions, gather_patches, gather_patches_ref

__all__ = [
    "sampled_gram", "sampled_gram_ref", "patch_moments", "patch_moments_ref", "add_upper_gram_", "mirror_upper_",
    "gram_from_cov", "gram_from_cov_ref", "gram_from_covs", "gram_from_covs_ref", "direct_gram", "direct_gram_ref",
]

_CHUNK_ELEMS = 1 << 24  # bound on the elements one chunk of patches or contributions may hold
_TRITON_FIRST = ("triton", "torch")


def _chunks(n: int, per_item: int):
    step = max(1, _CHUNK_ELEMS // max(per_item, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _backend(op: str, backend: str, device, dtype) -> str:
    """The resolver's choice for ``op``; an explicit backend it cannot honour is an
    error, never a silent switch."""
    return dispatch.resolve(op, backend, device, dtype, strict=True).backend


def _triton(name: str):
    from . import triton as tri  # lazy: triton is optional
    return getattr(tri, name)


# ------------------------------------------------------------------ sampled
def sampled_gram(x, kernel, geometry: ConsumerGeometry, img, oy, ox, k, *,
                 acc_dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """XᵀX for one sampled output channel ``k[s]`` per sample (S,). x is (N, C, H, W), or
    (N, C·t) for a Linear consumer (``geometry.linear``)."""
    x, kernel = geometry.as_map(x), geometry.as_kernel(kernel)
    name = _backend("sampled_gram", backend, x.device, acc_dtype)
    if name == "triton":
        return _triton("sampled_gram_triton")(x, kernel, geometry, img, oy, ox, k, acc_dtype=acc_dtype)
    C, t = x.shape[1], geometry.taps
    G = torch.zeros(C, C, dtype=acc_dtype, device=x.device)
    for sl in _chunks(img.numel(), C * t):
        z = gather_patches(x, geometry, img[sl], oy[sl], ox[sl]).to(acc_dtype)
        X = contributions(z, kernel, k[sl])
        G += X.T @ X
    return G


def sampled_gram_ref(x, kernel, geometry: ConsumerGeometry, img, oy, ox, k, *,
                     acc_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x, kernel = geometry.as_map(x), geometry.as_kernel(kernel)
    z = gather_patches_ref(x.to(acc_dtype), geometry, img, oy, ox)
    X = contributions(z, kernel.to(acc_dtype), k)
    return X.T @ X


# ------------------------------------------------------------------ patch moments
def patch_moments(x, geometry: ConsumerGeometry, img, oy, ox, *,
                  acc_dtype: torch.dtype = torch.float32, backend: str = "auto"):
    """(P, zsum): P = Σ_s vec(z_s) vec(z_s)ᵀ of shape (C·t, C·t), zsum = Σ_s vec(z_s)."""
    x = geometry.as_map(x)
    name = _backend("patch_moments", backend, x.device, acc_dtype)
    if name == "triton":
        return _triton("patch_moments_triton")(x, geometry, img, oy, ox, acc_dtype=acc_dtype)
    D = x.shape[1] * geometry.taps
    P = torch.zeros(D, D, dtype=acc_dtype, device=x.device)
    zsum = torch.zeros(D, dtype=acc_dtype, device=x.device)
    for sl in _chunks(img.numel(), D):
        Z = gather_patches(x, geometry, img[sl], oy[sl], ox[sl]).reshape(-1, D).to(acc_dtype)
        P += Z.T @ Z
        zsum += Z.sum(0)
    return P, zsum


def patch_moments_ref(x, geometry: ConsumerGeometry, img, oy, ox, *, acc_dtype: torch.dtype = torch.float32):
    x = geometry.as_map(x)
    Z = gather_patches_ref(x.to(acc_dtype), geometry, img, oy, ox).reshape(img.numel(), -1)
    return Z.T @ Z, Z.sum(0)


def patch_sum(x, geometry: ConsumerGeometry, img, oy, ox, *, acc_dtype: torch.dtype = torch.float32):
    """Σ_s vec(z_s), in bounded chunks (the first moment for bias compensation)."""
    x = geometry.as_map(x)
    D = x.shape[1] * geometry.taps
    zsum = torch.zeros(D, dtype=acc_dtype, device=x.device)
    for sl in _chunks(img.numel(), D):
        zsum += gather_patches(x, geometry, img[sl], oy[sl], ox[sl]).reshape(-1, D).to(acc_dtype).sum(0)
    return zsum


def add_upper_gram_(P: torch.Tensor, Z: torch.Tensor, block: int = 512) -> torch.Tensor:
    """P += ZᵀZ on P's upper block rows only (a symmetric rank-k update, about half the
    flops of the full product); the blocks below the diagonal blocks are left as they
    were. Returns P."""
    D = P.shape[0]
    for r0 in range(0, D, block):
        r1 = min(D, r0 + block)
        P[r0:r1, r0:].addmm_(Z[:, r0:r1].T, Z[:, r0:])
    return P


def mirror_upper_(P: torch.Tensor, block: int = 512) -> torch.Tensor:
    """Copy P's upper block rows (as :func:`add_upper_gram_` leaves them) onto its lower half."""
    D = P.shape[0]
    for r0 in range(0, D, block):
        r1 = min(D, r0 + block)
        P[r1:, r0:r1] = P[r0:r1, r1:].T
        d = P[r0:r1, r0:r1]
        d.copy_(d.triu() + d.triu(1).T)  # exactly symmetric, from its upper triangle
    return P


# ------------------------------------------------------------------ G from P
def gram_from_cov(kernel, P, *, backend: str = "auto") -> torch.Tensor:
    """Exact G summed over every output channel, from the patch covariance P."""
    return gram_from_covs(kernel, [P], backend=backend)[0]


def gram_from_covs(kernel, Ps, *, backend: str = "auto", patches=()) -> list[torch.Tensor]:
    """:func:`gram_from_cov` for several symmetric P with the same kernel, and for the
    P = ZᵀZ of each (S, C·t) matrix in ``patches`` (results in that order). The torch
    path forms WᵀW once, and only its upper half, a block of channels at a time; the P
    of ``patches`` are formed block by block too, never whole."""
    Ps, patches = list(Ps), list(patches)
    if not Ps and not patches:
        return []
    like = (Ps or patches)[0]
    dtypes = {P.dtype for P in Ps + patches}
    name = _backend("gram_from_cov", backend, like.device, dtypes.pop() if len(dtypes) == 1 else None)
    if name == "triton":
        return [_triton("gram_from_cov_triton")(kernel, P) for P in Ps + [Z.T @ Z for Z in patches]]
    K, C = kernel.shape[0], kernel.shape[1]
    Wf = kernel.reshape(K, -1).to(like.dtype)
    t = Wf.shape[1] // C
    D = C * t
    # A = WᵀW, P and so G are symmetric: only the upper block rows of A are formed (half
    # the product, and cache-sized temporaries)
    step = max(1, min(C, (1 << 22) // max(D * t, 1)))
    n = len(Ps) + len(patches)
    out = [torch.zeros(C, C, dtype=like.dtype, device=like.device) for _ in range(n)]
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        rows, cols = slice(c0 * t, c1 * t), slice(c0 * t, D)
        Ar = Wf[:, rows].T @ Wf[:, cols]
        blocks = [P[rows, cols] for P in Ps] + [Z[:, rows].T @ Z[:, cols] for Z in patches]
        for i, B in enumerate(blocks):
            M = Ar.mul_(B) if i == n - 1 else Ar * B
            out[i][c0:c1, c0:] = M.view(c1 - c0, t, C - c0, t).sum(3).sum(1)
    return [G.triu() + G.triu(1).T for G in out]


def gram_from_covs_ref(kernel, Ps, patches=()) -> list[torch.Tensor]:
    return [gram_from_cov_ref(kernel, P) for P in list(Ps) + [Z.T @ Z for Z in patches]]


def gram_from_cov_ref(kernel, P) -> torch.Tensor:
    K, C = kernel.shape[0], kernel.shape[1]
    W = kernel.reshape(K, C, -1).to(P.dtype)
    t = W.shape[2]
    return torch.einsum("kcu,kdv,cudv->cd", W, W, P.reshape(C, t, C, t))


# ------------------------------------------------------------------ direct
def direct_gram(x, kernel, geometry: ConsumerGeometry, img, oy, ox, k=None, *,
                acc_dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """Σ_s Σ_{k in K_s} x̂_{s,k} x̂_{s,k}ᵀ: every output (``k=None``) or the (S, R)
    sampled outputs ``k`` of each sample. Memory stays O(C²) whatever t is."""
    dispatch.choose(backend, x.device, dispatch.OPS["direct_gram"][0], "direct_gram")
    x, kernel = geometry.as_map(x), geometry.as_kernel(kernel)
    C, t = x.shape[1], geometry.taps
    W = kernel.reshape(kernel.shape[0], C, t).to(acc_dtype)
    R = W.shape[0] if k is None else k.shape[1]
    G = torch.zeros(C, C, dtype=acc_dtype, device=x.device)
    # sampled outputs gather (S, R, C, t) filter rows; all outputs only (S, K, C)
    per_item = R * C + C * t if k is None else R * C * t + C * t
    for sl in _chunks(img.numel(), per_item):
        z = gather_patches(x, geometry, img[sl], oy[sl], ox[sl]).to(acc_dtype)
        if k is None:
            X = contributions(z, W)  # (S, K, C)
        else:
            X = (W[k[sl].to(x.device)] * z[:, None]).sum(-1)  # (S, R, C)
        X = X.reshape(-1, C)
        G += X.T @ X
    return G


def direct_gram_ref(x, kernel, geometry: ConsumerGeometry, img, oy, ox, k=None, *,
                    acc_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x, kernel = geometry.as_map(x), geometry.as_kernel(kernel)
    z = gather_patches_ref(x.to(acc_dtype), geometry, img, oy, ox)
    X = contributions(z, kernel.to(acc_dtype))  # (S, K, C)
    if k is not None:
        X = X[torch.arange(X.shape[0], device=X.device)[:, None], k.to(X.device)]
    X = X.reshape(-1, X.shape[-1])
    return X.T @ X

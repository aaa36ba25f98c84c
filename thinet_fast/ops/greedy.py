"""Channel selection on the Gram matrix G (DESIGN.md §4).

* ``greedy_remove``: ThiNet's greedy removal (ICCV 2017, Algorithm 1) on G.
* ``greedy_keep_ls``: the journal version's forward selection with a least-squares refit.

Both accept one problem ``(C, C)``, a batch ``(B, C, C)`` whose problems may be
smaller than C (``sizes``; the padding is masked), or a list of square tensors of
different sizes. Ties break to the lowest index. The ``*_ref`` twins are the
specification; fast paths live in ``_C`` (CPU/CUDA), cupy and Triton and must return
the same order.
"""
from __future__ import annotations

import torch

from . import dispatch
from .reconstruct import DEFAULT_RIDGE

__all__ = [
    "greedy_remove", "greedy_remove_ref", "greedy_keep_ls", "greedy_keep_ls_ref",
    "prepare_batch", "removal_to_keep", "DEFAULT_RIDGE", "GREEDY_REMOVE_BACKENDS", "KEEP_LS_BACKENDS",
]

GREEDY_REMOVE_BACKENDS = dispatch.OPS["greedy_remove"][0]
KEEP_LS_BACKENDS = dispatch.OPS["greedy_keep_ls"][0]


# ---------------------------------------------------------------------------- input
def prepare_batch(gram, counts, sizes=None, *, what: str = "n_remove"):
    """Normalise (gram, counts, sizes) to a padded batch.

    Returns ``(G[B,C,C], sizes[B] int64 cpu, counts[B] int64 cpu, layout)`` where
    ``layout`` is "single", "batch" or "list" and tells how to shape outputs.
    """
    if isinstance(gram, (list, tuple)):
        if len(gram) == 0:
            raise ValueError("gram: got an empty list of problems")
        mats = [torch.as_tensor(g) for g in gram]
        for j, g in enumerate(mats):
            if g.dim() != 2 or g.shape[0] != g.shape[1]:
                raise ValueError(f"gram[{j}] must be square (C, C); got shape {tuple(g.shape)}")
        if sizes is not None:
            raise ValueError("sizes= is implied by a list of problems; pass one or the other")
        cmax = max(g.shape[0] for g in mats)
        dtype = mats[0].dtype
        G = mats[0].new_zeros((len(mats), cmax, cmax), dtype=dtype)
        for j, g in enumerate(mats):
            G[j, : g.shape[0], : g.shape[0]] = g.to(dtype)
        sizes_t = torch.tensor([g.shape[0] for g in mats], dtype=torch.int64)
        layout = "list"
    else:
        if not isinstance(gram, torch.Tensor):
            gram = torch.as_tensor(gram)
        if gram.dim() == 2:
            G, layout = gram.unsqueeze(0), "single"
        elif gram.dim() == 3:
            G, layout = gram, "batch"
        else:
            raise ValueError(f"gram must be (C, C) or (B, C, C); got shape {tuple(gram.shape)}")
        if G.shape[-1] != G.shape[-2]:
            raise ValueError(f"gram must be square in its last two dims; got shape {tuple(gram.shape)}")
        B, C = G.shape[0], G.shape[-1]
        if sizes is None:
            sizes_t = torch.full((B,), C, dtype=torch.int64)
        else:
            sizes_t = torch.as_tensor(sizes, dtype=torch.int64).reshape(-1).cpu()
            if sizes_t.numel() != B:
                raise ValueError(f"sizes has {sizes_t.numel()} entries for a batch of {B} problems")
            if (sizes_t < 1).any() or (sizes_t > C).any():
                raise ValueError(f"sizes must lie in [1, {C}]; got {sizes_t.tolist()}")
    if not G.dtype.is_floating_point:
        raise TypeError(f"gram must be a floating tensor; got {G.dtype}")
    if G.dtype in (torch.float16, torch.bfloat16):
        G = G.float()
    B = G.shape[0]
    counts_t = torch.as_tensor(counts, dtype=torch.int64).reshape(-1).cpu()
    if counts_t.numel() == 1 and B > 1:
        counts_t = counts_t.expand(B).clone()
    if counts_t.numel() != B:
        raise ValueError(f"{what} has {counts_t.numel()} entries for {B} problems")
    if (counts_t < 0).any() or (counts_t > sizes_t).any():
        raise ValueError(f"{what} must lie in [0, C] for each problem; got {counts_t.tolist()} with C={sizes_t.tolist()}")
    if not torch.isfinite(G).all():
        raise ValueError("gram contains NaN or Inf; check the statistics (a diverged model or an fp16 overflow)")
    return G.contiguous(), sizes_t, counts_t, layout


def _shape_out(x: torch.Tensor, counts: torch.Tensor, layout: str):
    if layout == "single":
        return x[0]
    if layout == "list":
        return [x[j, : int(counts[j])] for j in range(x.shape[0])]
    return x


# ---------------------------------------------------------------- greedy removal
def _greedy_remove_core_ref(G: torch.Tensor, sizes: torch.Tensor, n_remove: torch.Tensor):
    """Batched Algorithm 1 on padded G. Returns order (B, nmax) int64 (-1 padded) and
    cumulative errors (B, nmax) in G's dtype (+inf padded)."""
    B, C, _ = G.shape
    dev = G.device
    nmax = int(n_remove.max()) if B else 0
    diag = G.diagonal(dim1=1, dim2=2)
    removed = torch.arange(C, device=dev)[None, :] >= sizes.to(dev)[:, None]
    a = torch.zeros(B, C, dtype=G.dtype, device=dev)
    E = torch.zeros(B, dtype=G.dtype, device=dev)
    order = torch.full((B, nmax), -1, dtype=torch.int64, device=dev)
    errors = torch.full((B, nmax), float("inf"), dtype=G.dtype, device=dev)
    rows = torch.arange(B, device=dev)
    n_dev = n_remove.to(dev)
    inf = torch.tensor(float("inf"), dtype=G.dtype, device=dev)
    for j in range(nmax):
        active = n_dev > j
        score = torch.where(removed, inf, diag + 2 * a)
        i = score.argmin(dim=1)  # first minimum: ties go to the lowest index
        s = score[rows, i]
        E = torch.where(active, E + s, E)
        a = torch.where(active[:, None], a + G[rows, :, i], a)
        removed[rows[active], i[active]] = True
        order[:, j] = torch.where(active, i, order[:, j])
        errors[:, j] = torch.where(active, E, errors[:, j])
    return order, errors


def _greedy_remove_impl(backend: str):
    if backend == "torch":
        return _greedy_remove_core_ref
    if backend in ("cpu", "cuda"):
        from .cext import greedy_remove_cext
        return greedy_remove_cext
    if backend == "cupy":
        from .cupy_backend import greedy_remove_cupy
        return greedy_remove_cupy
    if backend == "triton":
        from .triton.greedy import greedy_remove_triton
        return greedy_remove_triton
    raise AssertionError(backend)


def greedy_remove(gram, n_remove, return_errors: bool = False, *, sizes=None, backend: str = "auto"):
    """ThiNet greedy removal on the Gram matrix.

    Each step removes ``i* = argmin_{i not removed} G_ii + 2 a_i`` and then
    ``a += G[:, i*]``; the objective grows by that score. Running to ``C - 1`` gives
    the removal order for every keep ratio at once.

    Args:
        gram: (C, C), (B, C, C) or a list of square tensors (problems of any size).
        n_remove: channels to remove; an int or one per problem.
        return_errors: also return the cumulative error E after each removal.
        sizes: the true C of each problem in a padded (B, C, C) batch.
        backend: "auto", "torch", "cpu", "cuda", "cupy" or "triton".

    Returns:
        order (int64, removal order; -1 padded in a batch) and, if asked, errors
        (the objective after 1, 2, ... removals; +inf padded).
    """
    G, sizes_t, n_t, layout = prepare_batch(gram, n_remove, sizes, what="n_remove")
    name = dispatch.choose(backend, G.device, GREEDY_REMOVE_BACKENDS, "greedy_remove")
    order, errors = _greedy_remove_impl(name)(G, sizes_t, n_t)
    order = _shape_out(order, n_t, layout)
    if return_errors:
        return order, _shape_out(errors, n_t, layout)
    return order


def greedy_remove_ref(gram, n_remove, return_errors: bool = False, *, sizes=None):
    """Pure-torch reference of :func:`greedy_remove` (same arguments, no backend)."""
    G, sizes_t, n_t, layout = prepare_batch(gram, n_remove, sizes, what="n_remove")
    order, errors = _greedy_remove_core_ref(G, sizes_t, n_t)
    order = _shape_out(order, n_t, layout)
    return (order, _shape_out(errors, n_t, layout)) if return_errors else order


# ------------------------------------------------------- forward least squares
def _keep_ls_one(G: torch.Tensor, n: int, ridge: float):
    """Forward selection for one problem (float64). Returns (keep[n], weights[n])."""
    C = G.shape[0]
    diag = G.diagonal()
    lam = ridge * float(diag.mean()) if C else 0.0
    lam = lam if lam > 0 else torch.finfo(torch.float64).tiny
    b = G.sum(dim=1)  # X^T y with y = X 1
    c = b.clone()
    denom = diag.clamp_min(lam)
    L = torch.zeros(n, n, dtype=G.dtype, device=G.device)
    chosen = torch.zeros(C, dtype=torch.bool, device=G.device)
    keep = torch.empty(n, dtype=torch.int64, device=G.device)
    w = G.new_zeros(0)
    for j in range(n):
        score = torch.where(chosen, torch.tensor(-1.0, dtype=G.dtype, device=G.device), c * c / denom)
        i = int(score.argmax())  # first maximum: ties go to the lowest index
        # incremental Cholesky of (G_SS + lam I)
        if j:
            col = G[keep[:j], i].unsqueeze(1)
            l = torch.linalg.solve_triangular(L[:j, :j], col, upper=False).squeeze(1)
            L[j, :j] = l
            d2 = float(G[i, i]) + lam - float(l @ l)
        else:
            d2 = float(G[i, i]) + lam
        L[j, j] = max(d2, lam) ** 0.5
        keep[j] = i
        chosen[i] = True
        S = keep[: j + 1]
        rhs = b[S].unsqueeze(1)
        y = torch.linalg.solve_triangular(L[: j + 1, : j + 1], rhs, upper=False)
        w = torch.linalg.solve_triangular(L[: j + 1, : j + 1].T, y, upper=True).squeeze(1)
        c = b - G[:, S] @ w
    return keep, w


def _greedy_keep_ls_core_ref(G: torch.Tensor, sizes: torch.Tensor, n_keep: torch.Tensor, ridge: float):
    B = G.shape[0]
    nmax = int(n_keep.max()) if B else 0
    keep = torch.full((B, nmax), -1, dtype=torch.int64, device=G.device)
    weights = torch.zeros((B, nmax), dtype=torch.float64, device=G.device)
    for j in range(B):
        C, n = int(sizes[j]), int(n_keep[j])
        k, w = _keep_ls_one(G[j, :C, :C].double(), n, ridge)
        keep[j, :n], weights[j, :n] = k, w
    return keep, weights


def _keep_ls_impl(backend: str):
    if backend == "torch":
        return _greedy_keep_ls_core_ref
    if backend in ("cpu", "cuda"):
        from .cext import greedy_keep_ls_cext
        return greedy_keep_ls_cext
    if backend == "cupy":
        from .cupy_backend import greedy_keep_ls_cupy
        return greedy_keep_ls_cupy
    raise AssertionError(backend)


def greedy_keep_ls(gram, n_keep, return_weights: bool = False, *, sizes=None,
                   ridge: float = DEFAULT_RIDGE, backend: str = "auto"):
    """Forward selection with a least-squares refit (ThiNet, journal version).

    Grows the kept set S: with ``b = G 1``, ``w_S = (G_SS + ridge*mean(diag) I)^-1 b_S``
    and ``c = b - G[:, S] w_S``, pick ``argmax_{i not in S} c_i^2 / G_ii``. An
    incremental Cholesky factor makes a step O(C |S|).

    Returns the kept indices in the order they were chosen (int64, -1 padded in a
    batch) and, if asked, the float64 least-squares scales of the final set.
    """
    G, sizes_t, n_t, layout = prepare_batch(gram, n_keep, sizes, what="n_keep")
    _check_psd(G, sizes_t)
    name = dispatch.choose(backend, G.device, KEEP_LS_BACKENDS, "greedy_keep_ls")
    keep, weights = _keep_ls_impl(name)(G, sizes_t, n_t, ridge)
    keep = _shape_out(keep, n_t, layout)
    return (keep, _shape_out(weights, n_t, layout)) if return_weights else keep


def greedy_keep_ls_ref(gram, n_keep, return_weights: bool = False, *, sizes=None, ridge: float = DEFAULT_RIDGE):
    """Pure-torch reference of :func:`greedy_keep_ls` (same arguments, no backend)."""
    G, sizes_t, n_t, layout = prepare_batch(gram, n_keep, sizes, what="n_keep")
    _check_psd(G, sizes_t)
    keep, weights = _greedy_keep_ls_core_ref(G, sizes_t, n_t, ridge)
    keep = _shape_out(keep, n_t, layout)
    return (keep, _shape_out(weights, n_t, layout)) if return_weights else keep


def _check_psd(G: torch.Tensor, sizes: torch.Tensor, rel: float = 1e-5) -> None:
    """Refuse a Gram that is not positive semi-definite up to float error (a Cholesky of
    G + rel·max(diag)·I fails): least squares on it gives ±inf weights."""
    for b in range(G.shape[0]):
        n = int(sizes[b])
        g = G[b, :n, :n].double()
        d = g.diagonal()
        if not bool(torch.isfinite(g).all()) or bool((d < 0).any()):
            raise ValueError(f"gram[{b}] has non-finite or negative diagonal entries; it is not a Gram matrix")
        jitter = rel * float(d.max().clamp_min(1e-300))
        if not torch.allclose(g, g.T, rtol=1e-4, atol=jitter):
            raise ValueError(f"gram[{b}] is not symmetric; pass G = XᵀX")
        _, info = torch.linalg.cholesky_ex(g + jitter * torch.eye(n, dtype=g.dtype, device=g.device))
        if int(info):
            raise ValueError(f"gram[{b}] is not positive semi-definite (a Cholesky of G + {rel:g}·max(diag)·I "
                             "fails); pass G = XᵀX, e.g. from thinet_fast.collect_statistics")


def removal_to_keep(order: torch.Tensor, C: int, n_keep: int) -> torch.Tensor:
    """Sorted kept indices given a full-enough removal order."""
    if not 0 <= n_keep <= C:
        raise ValueError(f"n_keep={n_keep} must lie in [0, C={C}]")
    n_remove = C - n_keep
    if bool((order[:n_remove] < 0).any()) or bool((order[:n_remove] >= C).any()):
        raise ValueError(f"the removal order holds indices outside [0, {C}) (padded -1 rows of a batched "
                         "result?); pass the order of this problem only")
    if order[:n_remove].unique().numel() != min(n_remove, order.numel()):
        raise ValueError("the removal order repeats a channel")
    if order.numel() < n_remove:
        raise ValueError(f"the removal order has {order.numel()} entries; {n_remove} are needed to keep {n_keep} of {C}")
    mask = torch.ones(C, dtype=torch.bool, device=order.device)
    mask[order[:n_remove]] = False
    return mask.nonzero().squeeze(1)


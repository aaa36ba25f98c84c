"""Triton: batched ThiNet greedy removal (DESIGN.md §4, ICCV 2017 Algorithm 1).

Twin of :func:`thinet_fast.ops.greedy._greedy_remove_core_ref` (same arguments, same
outputs, same order).

One program per problem. The program keeps diag(G), the running a and the removed mask
of its problem in registers (one BLOCK_C = next_pow2(C) vector) and runs its own number
of steps. Each step: ``score = where(removed, inf, diag + 2·a)``, ``m = min(score)``,
``i* = min{i : score_i == m}`` (ties to the lowest index), ``E += m``, ``a += G[:, i*]``.
The host passes Gᵀ so that column i* is one contiguous row. The arithmetic is the
reference's, operation for operation (2·a is exact, so a fused multiply-add rounds the
same), hence the same order bit for bit. float32 and float64 are supported.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["greedy_remove_triton", "MAX_C"]

MAX_C = 16384  # one problem's vectors live in registers


@triton.jit
def _greedy_remove_kernel(gt_ptr, sizes_ptr, nrem_ptr, order_ptr, err_ptr, C, nmax,
                          BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    size = tl.load(sizes_ptr + b)
    n = tl.load(nrem_ptr + b)
    offs = tl.arange(0, BLOCK_C)
    in_c = offs < C
    base = gt_ptr + b * C * C
    diag = tl.load(base + offs.to(tl.int64) * (C + 1), mask=in_c, other=0.0)
    a = tl.zeros_like(diag)
    inf = tl.full((BLOCK_C,), float("inf"), diag.dtype)
    removed = offs >= size
    E = tl.sum(a, axis=0)  # a zero scalar of G's dtype
    for j in range(0, n):
        score = tl.where(removed, inf, diag + 2.0 * a)
        m = tl.min(score, axis=0)
        i = tl.min(tl.where(score == m, offs, BLOCK_C), axis=0)
        E += m
        a += tl.load(base + i.to(tl.int64) * C + offs, mask=in_c, other=0.0)
        removed = removed | (offs == i)
        tl.store(order_ptr + b * nmax + j, i.to(tl.int64))
        tl.store(err_ptr + b * nmax + j, E)


def greedy_remove_triton(G: torch.Tensor, sizes: torch.Tensor, n_remove: torch.Tensor,
                         *, num_warps: int | None = None):
    """Greedy removal for a padded batch ``G`` (B, C, C) float32/float64.

    ``sizes`` and ``n_remove`` are int64 (B,) tensors (CPU or on G's device). Returns
    order (B, nmax) int64 padded with -1 and cumulative errors (B, nmax) in G's dtype
    padded with +inf, nmax = max(n_remove).
    """
    from .gram import check_device  # shared device / interpreter check

    op = "greedy_remove_triton"
    if G.dim() != 3 or G.shape[1] != G.shape[2]:
        raise ValueError(f"{op}: G must be (B, C, C); got {tuple(G.shape)}")
    if G.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: G must be float32 or float64; got {G.dtype}")
    dev = check_device(op, G)
    B, C, _ = G.shape
    if C > MAX_C:
        raise ValueError(f"{op}: C={C} exceeds MAX_C={MAX_C} (one problem is held in registers); "
                         "use backend='cpu', 'cuda' or 'torch'")
    sizes = torch.as_tensor(sizes, dtype=torch.int64).reshape(-1)
    n_remove = torch.as_tensor(n_remove, dtype=torch.int64).reshape(-1)
    if sizes.numel() != B or n_remove.numel() != B:
        raise ValueError(f"{op}: sizes and n_remove need {B} entries")
    nmax = int(n_remove.max()) if B else 0
    order = torch.full((B, nmax), -1, dtype=torch.int64, device=dev)
    errors = torch.full((B, nmax), float("inf"), dtype=G.dtype, device=dev)
    if B == 0 or nmax == 0:
        return order, errors
    Gt = G.transpose(1, 2).contiguous()  # column i of G is row i of Gt
    block_c = max(16, triton.next_power_of_2(C))
    if num_warps is None:
        num_warps = 1 if block_c <= 256 else (4 if block_c <= 2048 else 8)
    _greedy_remove_kernel[(B,)](
        Gt, sizes.to(dev).contiguous(), n_remove.to(dev).contiguous(), order, errors, C, nmax,
        BLOCK_C=block_c, num_warps=num_warps,
    )
    return order, errors

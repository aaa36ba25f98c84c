"""Triton: patch moments by implicit im2col, and G from the patch covariance
(DESIGN.md §3, "Full (all k)").

* :func:`patch_moments_triton` is the twin of
  :func:`thinet_fast.ops.gram.patch_moments_ref`: P = Σ_s vec(z_s) vec(z_s)ᵀ (C·t × C·t)
  and zsum = Σ_s vec(z_s), with vec index (c, u) -> c·t + u. No unfold tensor is built:
  a program owns one (BLOCK_D × BLOCK_D) tile (ti ≤ tj) of the upper triangle of P and a
  slice of the samples; for each block of samples it gathers the two (BLOCK_S × BLOCK_D)
  column blocks of the patch matrix straight from the map (padding by masks) and
  accumulates ``Z_iᵀ Z_j`` with ``tl.dot`` in float32. Diagonal tiles also sum their
  columns into zsum. Sample slices write disjoint partials summed on the host; the lower
  triangle is mirrored. float16/bfloat16 maps feed ``tl.dot`` in their own precision on
  a GPU: the products of two 16-bit numbers are exact in float32, so this is as exact as
  converting first, and it runs on the tensor cores. float32 maps use
  ``input_precision="ieee"`` by default.
* :func:`gram_from_cov_triton` is the twin of
  :func:`thinet_fast.ops.gram.gram_from_cov_ref`:
  G[c, c'] = Σ_{u,v} A[(c,u),(c',v)] · P[(c,u),(c',v)] with A = WᵀW.
  Choice: both steps are fused by default (``fuse_a=True``). A program owns one
  (BLOCK_C × BLOCK_C) tile of G; for every tap pair (u, v) it forms the A-tile
  W[:, c, u]ᵀ W[:, c', v] with ``tl.dot`` over K in chunks and multiplies it into the
  strided P-tile. The (C·t)² matrix A is never written (85 MB for VGG conv5, C·t = 4608),
  at the same K·(C·t)² multiply-adds as ``Wᵀ @ W``. ``fuse_a=False`` computes A with a
  torch matmul and fuses only the block reduction (same kernel, A loaded instead).
  All tiles of G are computed (no mirroring), so a non-symmetric P is handled as the
  reference does.

GPU tiles (module constants): patch moments BLOCK_S=32, BLOCK_D=64; gram_from_cov
BLOCK_C=32, BLOCK_K=32; 8 warps. These were chosen so that ptxas reports no register
spills for sm_90; their speed has not been measured on a GPU yet. The interpreter
defaults to one large tile (D or C up to 128) and 256-sample blocks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gram import (as_index, check_acc_dtype, check_device, check_input_dtype, interpreted,
                   maybe_channels_last, mirror_upper, pick_block, tile_plan, tile_setup)

__all__ = ["patch_moments_triton", "gram_from_cov_triton",
           "COV_BLOCK_S", "COV_BLOCK_D", "G_BLOCK_C", "G_BLOCK_K", "DOT_PRECISION"]

COV_BLOCK_S = 32
COV_BLOCK_D = 64
G_BLOCK_C = 32
G_BLOCK_K = 32
NUM_WARPS = 8  # the default tiles compile without register spills on sm_90 (ptxas -v)
DOT_PRECISION = "ieee"
INTERP_BLOCK_S = 256
INTERP_BLOCK_D_MAX = 128
INTERP_BLOCK_K_MAX = 256


# ------------------------------------------------------------------ patch moments
@triton.jit
def _patch_cols(x_ptr, img, oy, ox, ms, offs_d, md, H, W, sxn, sxc, sxh, sxw,
                T: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                C_OFF64: tl.constexpr):
    """The (BLOCK_S, BLOCK_D) block Z[s, d] = z_s[d // t, d % t] in the map's dtype.

    ``oy``/``ox`` are int32; only the per-sample image base is 64-bit, unless the
    offsets inside one image need it (``C_OFF64``).
    """
    c = offs_d // T
    u = offs_d % T
    dy = (u // KW) * DH - PH
    dx = (u % KW) * DW - PW
    iy = (oy * SH)[:, None] + dy[None, :]
    ix = (ox * SW)[:, None] + dx[None, :]
    ok = ms[:, None] & md[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    if C_OFF64:
        off = (c.to(tl.int64) * sxc)[None, :] + iy.to(tl.int64) * sxh + ix.to(tl.int64) * sxw
    else:
        off = (c * sxc)[None, :] + iy * sxh + ix * sxw
    return tl.load((x_ptr + img * sxn)[:, None] + off, mask=ok, other=0.0)


@triton.jit
def _patch_moments_kernel(x_ptr, img_ptr, oy_ptr, ox_ptr, p_ptr, zs_ptr, ti_ptr, tj_ptr,
                          S, D, H, W, s_per_split, sxn, sxc, sxh, sxw,
                          T: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                          PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                          NATIVE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, C_OFF64: tl.constexpr):
    pid_s, ti, tj, offs_i, offs_j, mi, mj, s_begin, s_end = tile_setup(ti_ptr, tj_ptr, D, S, s_per_split, BLOCK_D)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    zacc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for s0 in range(s_begin, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ms = offs_s < s_end
        img = tl.load(img_ptr + offs_s, mask=ms, other=0)
        oy = tl.load(oy_ptr + offs_s, mask=ms, other=0).to(tl.int32)
        ox = tl.load(ox_ptr + offs_s, mask=ms, other=0).to(tl.int32)
        zi = _patch_cols(x_ptr, img, oy, ox, ms, offs_i, mi, H, W, sxn, sxc, sxh, sxw,
                         T, KW, SH, SW, PH, PW, DH, DW, C_OFF64)
        if ti == tj:
            zj = zi
        else:
            zj = _patch_cols(x_ptr, img, oy, ox, ms, offs_j, mj, H, W, sxn, sxc, sxh, sxw,
                             T, KW, SH, SW, PH, PW, DH, DW, C_OFF64)
        if NATIVE_DOT:
            acc = tl.dot(tl.trans(zi), zj, acc)
        else:
            acc = tl.dot(tl.trans(zi.to(tl.float32)), zj.to(tl.float32), acc, input_precision=DOT_PRECISION)
        zacc += tl.sum(zi.to(tl.float32), axis=0)
    base = pid_s.to(tl.int64) * D
    tl.store(p_ptr + base * D + offs_i.to(tl.int64)[:, None] * D + offs_j[None, :], acc,
             mask=mi[:, None] & mj[None, :])
    tl.store(zs_ptr + base + offs_i, zacc, mask=mi & (ti == tj))


def patch_moments_triton(x, geometry, img, oy, ox, *, acc_dtype: torch.dtype = torch.float32,
                         block_s: int | None = None, block_d: int | None = None,
                         input_precision: str | None = None, native_dot: bool | None = None,
                         num_warps: int | None = None, channels_last: bool | None = None):
    """(P, zsum): P (C·t, C·t) = Σ_s vec(z_s) vec(z_s)ᵀ and zsum = Σ_s vec(z_s), float32.

    ``native_dot`` (default: on a GPU for float16/bfloat16 maps) feeds the 16-bit values
    to ``tl.dot`` directly; the interpreter always converts to float32 first.
    """
    op = "patch_moments_triton"
    check_acc_dtype(op, acc_dtype)
    x = geometry.as_map(x)
    check_input_dtype(op, x)
    dev = check_device(op, x)
    N, C, H, W = x.shape
    T = geometry.taps
    D = C * T
    oh, ow = geometry.out_size(H, W)
    img, oy, ox = (as_index(v, dev, n, b) for v, n, b in ((img, "img", N), (oy, "oy", oh), (ox, "ox", ow)))
    S = img.numel()
    if not (oy.numel() == ox.numel() == S):
        raise ValueError(f"{op}: img, oy and ox must have the same length")
    P = torch.zeros(D, D, dtype=torch.float32, device=dev)
    zsum = torch.zeros(D, dtype=torch.float32, device=dev)
    if S == 0 or D == 0:
        return P, zsum
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry.kernel_size, geometry.stride, geometry.padding, geometry.dilation
    interp = interpreted()
    block_d = pick_block(op, "block_d", block_d, D, INTERP_BLOCK_D_MAX, COV_BLOCK_D)
    block_s = pick_block(op, "block_s", block_s, S, INTERP_BLOCK_S, COV_BLOCK_S)
    if native_dot is None:
        native_dot = x.dtype in (torch.float16, torch.bfloat16) and not interp
    if interp:
        native_dot = False  # numpy has no bfloat16 matmul
    x = maybe_channels_last(x, S * D, channels_last)
    ti, tj, n_split, s_per_split = tile_plan(D, block_d, S, block_s, dev)
    if n_split > 1:
        p_out = torch.zeros(n_split, D, D, dtype=torch.float32, device=dev)
        z_out = torch.zeros(n_split, D, dtype=torch.float32, device=dev)
    else:
        p_out, z_out = P.unsqueeze(0), zsum.unsqueeze(0)
    _patch_moments_kernel[(ti.numel(), n_split)](
        x, img, oy, ox, p_out, z_out, ti, tj,
        S, D, H, W, s_per_split, x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        T=T, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw,
        BLOCK_S=block_s, BLOCK_D=block_d, NATIVE_DOT=bool(native_dot),
        DOT_PRECISION=input_precision or DOT_PRECISION, num_warps=num_warps or NUM_WARPS,
        C_OFF64=C * abs(x.stride(1)) + H * abs(x.stride(2)) + W * abs(x.stride(3)) >= 2**31,
    )
    if n_split > 1:
        P, zsum = p_out.sum(0), z_out.sum(0)
    return mirror_upper(P), zsum


# ------------------------------------------------------------------ G from P
@triton.jit
def _gram_from_cov_kernel(w_ptr, a_ptr, p_ptr, g_ptr, K, C, D, swk, swu,
                          T: tl.constexpr, FUSE_A: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_i = pid_i * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_j = pid_j * BLOCK_C + tl.arange(0, BLOCK_C)
    mi = offs_i < C
    mj = offs_j < C
    mij = mi[:, None] & mj[None, :]
    rows = offs_i.to(tl.int64) * T  # P / A row of (c, u = 0)
    cols = offs_j.to(tl.int64) * T
    acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
    for u in range(T):
        for v in range(T):
            if FUSE_A:
                a = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    mk = offs_k < K
                    kb = offs_k.to(tl.int64)[:, None] * swk
                    wu = tl.load(w_ptr + kb + u * swu + offs_i[None, :], mask=mk[:, None] & mi[None, :], other=0.0)
                    wv = tl.load(w_ptr + kb + v * swu + offs_j[None, :], mask=mk[:, None] & mj[None, :], other=0.0)
                    a = tl.dot(tl.trans(wu), wv, a, input_precision=DOT_PRECISION)
            else:
                a = tl.load(a_ptr + (rows + u)[:, None] * D + (cols + v)[None, :], mask=mij, other=0.0)
            p = tl.load(p_ptr + (rows + u)[:, None] * D + (cols + v)[None, :], mask=mij, other=0.0)
            acc += a * p
    tl.store(g_ptr + offs_i.to(tl.int64)[:, None] * C + offs_j[None, :], acc, mask=mij)


def gram_from_cov_triton(kernel, P, *, fuse_a: bool = True, block_c: int | None = None,
                         block_k: int | None = None, input_precision: str | None = None,
                         num_warps: int | None = None) -> torch.Tensor:
    """G (C, C) float32 summed over every output channel, from P (C·t, C·t) float32."""
    op = "gram_from_cov_triton"
    if P.dtype != torch.float32:
        raise TypeError(f"{op}: P must be float32; got {P.dtype} (use backend='torch' for other dtypes)")
    K, C = kernel.shape[0], kernel.shape[1]
    Wf = kernel.reshape(K, C, -1)
    T = Wf.shape[2]
    D = C * T
    if P.shape != (D, D):
        raise ValueError(f"{op}: P must be ({D}, {D}) for a kernel with C={C}, t={T}; got {tuple(P.shape)}")
    dev = check_device(op, P, kernel)
    P = P.contiguous()
    G = torch.empty(C, C, dtype=torch.float32, device=dev)
    if C == 0:
        return G
    block_c = pick_block(op, "block_c", block_c, C, INTERP_BLOCK_D_MAX, G_BLOCK_C)
    block_k = pick_block(op, "block_k", block_k, K, INTERP_BLOCK_K_MAX, G_BLOCK_K)
    if fuse_a:
        Wt = Wf.to(torch.float32).permute(0, 2, 1).contiguous()  # (K, t, C): channels contiguous
        A = P  # unused
        swk, swu = Wt.stride(0), Wt.stride(1)
    else:
        W2 = Wf.reshape(K, D).to(torch.float32)
        A = (W2.T @ W2).contiguous()
        Wt, swk, swu = P, 0, 0  # unused
    grid = (triton.cdiv(C, block_c), triton.cdiv(C, block_c))
    _gram_from_cov_kernel[grid](
        Wt, A, P, G, K, C, D, swk, swu,
        T=T, FUSE_A=bool(fuse_a), BLOCK_C=block_c, BLOCK_K=block_k,
        DOT_PRECISION=input_precision or DOT_PRECISION, num_warps=num_warps or NUM_WARPS,
    )
    return G

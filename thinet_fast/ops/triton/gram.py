"""Triton: fused sampled Gram matrix G = XᵀX (DESIGN.md §3, "Sampled").

Twin of :func:`thinet_fast.ops.gram.sampled_gram_ref`.

X[s, c] = Σ_u W[k_s, c, u] · z_s[c, u], where z_s is the zero-padded, strided, dilated
receptive field of sample s = (img, oy, ox) and k_s its sampled output channel. The
kernel never writes X: every program owns one (BLOCK_C × BLOCK_C) tile (ti ≤ tj) of the
upper triangle of G and one slice of the samples. For each block of BLOCK_S samples it
gathers the patch taps straight from the input map (implicit im2col, padding handled by
masks), forms the two (BLOCK_S × BLOCK_C) blocks of X in registers with the per-channel
tap dot, and accumulates ``X_iᵀ X_j`` with ``tl.dot`` in float32. The sample slices of a
tile write disjoint float32 partials that the host sums (deterministic, no atomics); the
lower triangle is mirrored from the upper one.

The price of not writing X: each tile pair forms its own two blocks of X, so the gather
and tap dot run about ceil(C / BLOCK_C) times per sample (8 times for C = 512), against
C²/2 multiply-adds of the Gram product per sample. The alternative (write X for bounded
sample chunks, then one matmul) has not been measured against it yet.

Tiles: on a GPU BLOCK_S=32, BLOCK_C=64, 8 warps (module constants), ``tl.dot`` with
``input_precision="ieee"`` (exact fp32 products; pass "tf32x3" or "tf32" to trade
accuracy for tensor-core speed). This tile compiles without register spills for sm_90
(ptxas -v; 4 warps spilled); its speed has not been measured on a GPU yet. Maps whose
channels are strided are copied to channels-last first on a GPU when the gather is large
enough to pay for it (``maybe_channels_last``). In the interpreter (TRITON_INTERPRET=1)
the defaults become one tile covering all of C (up to 128) and 256-sample blocks, since
every block-iteration costs milliseconds there.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["sampled_gram_triton", "BLOCK_S", "BLOCK_C", "DOT_PRECISION",
           "INTERP_BLOCK_S", "INTERP_BLOCK_C_MAX"]

# GPU defaults.
BLOCK_S = 32
BLOCK_C = 64
NUM_WARPS = 8  # 32x64 tiles: no register spills on sm_90 (ptxas -v); 4 warps spill
DOT_PRECISION = "ieee"
# Interpreter defaults (large blocks: few iterations).
INTERP_BLOCK_S = 256
INTERP_BLOCK_C_MAX = 128


# ------------------------------------------------------------------ helpers (shared)
def interpreted() -> bool:
    """True when this module's kernels were decorated under TRITON_INTERPRET=1."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover - very old / new triton layouts
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return isinstance(_sampled_gram_kernel, InterpretedFunction)


def check_device(op: str, *tensors: torch.Tensor) -> torch.device:
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise ValueError(f"{op}: tensors are on different devices ({dev} and {t.device})")
    if dev.type == "cpu" and not interpreted():
        raise RuntimeError(
            f"{op}: the Triton kernels got CPU tensors but were compiled for a GPU. Run on a CUDA "
            "device, or set TRITON_INTERPRET=1 before importing thinet_fast to use the (slow) interpreter.")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: unsupported device {dev}")
    return dev


def check_acc_dtype(op: str, acc_dtype: torch.dtype) -> None:
    if acc_dtype != torch.float32:
        raise ValueError(f"{op}: the Triton kernels accumulate in float32 only; got acc_dtype={acc_dtype} "
                         "(use backend='torch' for float64 accumulation)")


def check_input_dtype(op: str, x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: input must be float32, float16 or bfloat16; got {x.dtype}")


def upper_tiles(n_tiles: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile coordinates (ti, tj) with ti <= tj, as int32 tensors."""
    ti, tj = torch.triu_indices(n_tiles, n_tiles)
    return ti.to(torch.int32).to(device), tj.to(torch.int32).to(device)


def sample_splits(S: int, block_s: int, n_tiles: int, device: torch.device) -> tuple[int, int]:
    """(n_split, samples per split): enough programs to fill the GPU, one split in the interpreter."""
    n_blocks = max(1, triton.cdiv(S, block_s))
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        n_split = max(1, min(n_blocks, triton.cdiv(4 * sms, max(n_tiles, 1))))
    else:
        n_split = 1
    blocks_per_split = triton.cdiv(n_blocks, n_split)
    n_split = triton.cdiv(n_blocks, blocks_per_split)
    return n_split, blocks_per_split * block_s


def mirror_upper(G: torch.Tensor) -> torch.Tensor:
    return torch.triu(G) + torch.triu(G, 1).T


def check_block(op: str, name: str, value: int) -> int:
    """Blocks are powers of two (tl.arange) and at least 16 (tl.dot's minimum on a GPU)."""
    value = int(value)
    if value < 16 or value & (value - 1):
        raise ValueError(f"{op}: {name}={value} must be a power of two >= 16")
    return value


def pick_block(op: str, name: str, value: int | None, n: int, interp_max: int, gpu_default: int) -> int:
    """``value`` (checked by :func:`check_block`), or by default ``gpu_default`` on a GPU and
    in the interpreter one block covering ``n`` (a power of two, 16 to ``interp_max``)."""
    if value is None:
        value = min(interp_max, max(16, triton.next_power_of_2(n))) if interpreted() else gpu_default
    return check_block(op, name, value)


def tile_plan(n: int, block: int, S: int, block_s: int, device: torch.device):
    """(ti, tj, n_split, samples per split) for an (n x n) output in (block x block) tiles of
    the upper triangle and S samples: :func:`upper_tiles`, then :func:`sample_splits`."""
    ti, tj = upper_tiles(triton.cdiv(n, block), device)
    n_split, s_per_split = sample_splits(S, block_s, ti.numel(), device)
    return ti, tj, n_split, s_per_split


def maybe_channels_last(x: torch.Tensor, gathered: int, channels_last: bool | None) -> torch.Tensor:
    """Make the channels of the (N, C, H, W) map contiguous for the gathers.

    ``None`` decides by an estimate (not measured here): a gather along a strided channel
    axis costs about one 32-byte sector per element, while converting reads and writes
    the map once, so convert on a GPU when ``gathered`` elements x 4 >= the map's size.
    The interpreter never converts by default. Strides are generic either way.
    """
    if x.stride(1) == 1 or x.shape[1] == 1:
        return x
    if channels_last is None:
        channels_last = x.device.type == "cuda" and 4 * gathered >= x.numel()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def as_index(v: torch.Tensor, device, name: str, bound: int | None = None) -> torch.Tensor:
    """int64 contiguous indices on ``device``. Host indices (sample_locations draws them on
    the CPU) are checked against ``bound`` for free; the kernels mask out-of-map rows and
    columns but trust the image and output-channel indices."""
    v = torch.as_tensor(v)
    if v.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor; got {v.dtype}")
    if bound is not None and v.device.type == "cpu" and v.numel() and (int(v.min()) < 0 or int(v.max()) >= bound):
        raise IndexError(f"{name} holds indices outside [0, {bound})")
    return v.reshape(-1).to(device=device, dtype=torch.int64).contiguous()


# ------------------------------------------------------------------ kernel
@triton.jit
def tile_setup(ti_ptr, tj_ptr, N, S, s_per_split, BLOCK: tl.constexpr):
    """This program's tile (ti, tj) of the upper triangle of an (N x N) output, with its
    row/column offsets and masks, and its slice [s_begin, s_end) of the S samples.
    Returns (pid_s, ti, tj, offs_i, offs_j, mi, mj, s_begin, s_end)."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    ti = tl.load(ti_ptr + pid_t)
    tj = tl.load(tj_ptr + pid_t)
    offs_i = ti * BLOCK + tl.arange(0, BLOCK)
    offs_j = tj * BLOCK + tl.arange(0, BLOCK)
    s_begin = pid_s * s_per_split
    s_end = tl.minimum(s_begin + s_per_split, S)
    return pid_s, ti, tj, offs_i, offs_j, offs_i < N, offs_j < N, s_begin, s_end


@triton.jit
def _contrib_block(x_ptr, w_ptr, img, oy, ox, kk, ms, offs_c, mc, H, W,
                   sxn, sxc, sxh, sxw, swk, swh, sww,
                   KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                   PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                   BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, C_OFF64: tl.constexpr):
    """X[s, c] = Σ_u W[k_s, c, u] z_s[c, u] for one (BLOCK_S, BLOCK_C) block, in fp32.

    The taps run in a (not unrolled) loop and the only 2-D index math is one channel
    offset per tensor, which keeps the register footprint small on a GPU.
    """
    if C_OFF64:
        xoff_c = offs_c.to(tl.int64) * sxc
    else:
        xoff_c = offs_c * sxc
    mcol = mc[None, :]
    wmask = ms[:, None] & mcol
    xrow = x_ptr + img * sxn + (oy * SH - PH) * sxh + (ox * SW - PW) * sxw  # (BLOCK_S,) pointers
    wrow = w_ptr + kk * swk
    iy0 = oy * SH - PH
    ix0 = ox * SW - PW
    X = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
    for u in range(KH * KW):
        ky = u // KW
        kx = u % KW
        iy = iy0 + ky * DH
        ix = ix0 + kx * DW
        ok = ms & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        z = tl.load((xrow + (ky * DH * sxh + kx * DW * sxw))[:, None] + xoff_c[None, :],
                    mask=ok[:, None] & mcol, other=0.0).to(tl.float32)
        w = tl.load((wrow + (ky * swh + kx * sww))[:, None] + offs_c[None, :],
                    mask=wmask, other=0.0).to(tl.float32)
        X += w * z
    return X


@triton.jit
def _sampled_gram_kernel(x_ptr, w_ptr, img_ptr, oy_ptr, ox_ptr, k_ptr, out_ptr, ti_ptr, tj_ptr,
                         S, C, H, W, s_per_split,
                         sxn, sxc, sxh, sxw, swk, swh, sww,
                         KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                         PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                         BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         C_OFF64: tl.constexpr):
    pid_s, ti, tj, offs_i, offs_j, mi, mj, s_begin, s_end = tile_setup(ti_ptr, tj_ptr, C, S, s_per_split, BLOCK_C)
    acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
    for s0 in range(s_begin, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ms = offs_s < s_end
        img = tl.load(img_ptr + offs_s, mask=ms, other=0)
        oy = tl.load(oy_ptr + offs_s, mask=ms, other=0)
        ox = tl.load(ox_ptr + offs_s, mask=ms, other=0)
        kk = tl.load(k_ptr + offs_s, mask=ms, other=0)
        xi = _contrib_block(x_ptr, w_ptr, img, oy, ox, kk, ms, offs_i, mi, H, W,
                            sxn, sxc, sxh, sxw, swk, swh, sww,
                            KH, KW, SH, SW, PH, PW, DH, DW, BLOCK_S, BLOCK_C, C_OFF64)
        if ti == tj:
            xj = xi
        else:
            xj = _contrib_block(x_ptr, w_ptr, img, oy, ox, kk, ms, offs_j, mj, H, W,
                                sxn, sxc, sxh, sxw, swk, swh, sww,
                                KH, KW, SH, SW, PH, PW, DH, DW, BLOCK_S, BLOCK_C, C_OFF64)
        acc = tl.dot(tl.trans(xi), xj, acc, input_precision=DOT_PRECISION)
    out = out_ptr + pid_s.to(tl.int64) * C * C
    tl.store(out + offs_i.to(tl.int64)[:, None] * C + offs_j[None, :], acc, mask=mi[:, None] & mj[None, :])


# ------------------------------------------------------------------ wrapper
def sampled_gram_triton(x, kernel, geometry, img, oy, ox, k, *, acc_dtype: torch.dtype = torch.float32,
                        block_s: int | None = None, block_c: int | None = None,
                        input_precision: str | None = None, num_warps: int | None = None,
                        channels_last: bool | None = None) -> torch.Tensor:
    """Fused gather + per-channel dot + XᵀX accumulation. Returns G (C, C) float32.

    ``x`` is the consumer input (a map, or (N, C*t) for a Linear consumer), ``kernel`` the
    consumer weight, ``img``/``oy``/``ox``/``k`` int64 (S,) sample indices. Block sizes,
    the ``tl.dot`` input precision and warps default to the module constants;
    ``channels_last`` see :func:`maybe_channels_last`.
    """
    op = "sampled_gram_triton"
    check_acc_dtype(op, acc_dtype)
    x = geometry.as_map(x)
    kernel = geometry.as_kernel(kernel)
    check_input_dtype(op, x)
    dev = check_device(op, x, kernel)
    N, C, H, W = x.shape
    K = kernel.shape[0]
    if kernel.shape[1] != C:
        raise ValueError(f"{op}: the kernel reads {kernel.shape[1]} channels but the input has {C}")
    oh, ow = geometry.out_size(H, W)
    img, oy, ox, k = (as_index(v, dev, n, b) for v, n, b in
                      ((img, "img", N), (oy, "oy", oh), (ox, "ox", ow), (k, "k", K)))
    S = img.numel()
    if not (oy.numel() == ox.numel() == k.numel() == S):
        raise ValueError(f"{op}: img, oy, ox and k must have the same length")
    G = torch.zeros(C, C, dtype=torch.float32, device=dev)
    if S == 0 or C == 0:
        return G
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry.kernel_size, geometry.stride, geometry.padding, geometry.dilation
    # The weight as (K, kh, kw, C): the per-sample gather of W[k_s, :, u] reads contiguous channels.
    Wp = kernel.to(torch.float32).permute(0, 2, 3, 1).contiguous()
    block_c = pick_block(op, "block_c", block_c, C, INTERP_BLOCK_C_MAX, BLOCK_C)
    block_s = pick_block(op, "block_s", block_s, S, INTERP_BLOCK_S, BLOCK_S)
    x = maybe_channels_last(x, S * geometry.taps * C, channels_last)
    ti, tj, n_split, s_per_split = tile_plan(C, block_c, S, block_s, dev)
    out = torch.zeros(n_split, C, C, dtype=torch.float32, device=dev) if n_split > 1 else G.unsqueeze(0)
    grid = (ti.numel(), n_split)
    _sampled_gram_kernel[grid](
        x, Wp, img, oy, ox, k, out, ti, tj,
        S, C, H, W, s_per_split,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        Wp.stride(0), Wp.stride(1), Wp.stride(2),
        KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw,
        BLOCK_S=block_s, BLOCK_C=block_c, DOT_PRECISION=input_precision or DOT_PRECISION,
        C_OFF64=C * abs(x.stride(1)) >= 2**31, num_warps=num_warps or NUM_WARPS,
    )
    if n_split > 1:
        G = out.sum(0)
    return mirror_upper(G)

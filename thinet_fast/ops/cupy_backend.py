"""The cupy/NVRTC path (DESIGN.md §9): compile the CUDA kernels at run time.

When ``_C`` was built without nvcc (or for a GPU its archs do not cover), the same
kernel source (``csrc/greedy_core.cuh`` + ``csrc/greedy_kernels.cuh``) is compiled with
NVRTC for the device in hand through ``cupy.RawModule`` and launched on torch or cupy
arrays.

The module is split so that everything except the launch is plain Python that runs and
is tested on a machine without a GPU or cupy:

* source loading/concatenation: :func:`find_source_dir`, :func:`assemble_source`,
  :func:`load_source`;
* NVRTC options and kernel names: :func:`nvrtc_options`, :func:`kernel_names`;
* launch geometry and scratch sizes: :func:`block_size`, :func:`remove_launch_config`,
  :func:`keep_ls_launch_config` (mirrors of the C++ in greedy_core.cuh/greedy_api.h);
* kernel-argument packing: :func:`pack_remove_args`, :func:`pack_keep_ls_args` (must
  match the kernel signatures in greedy_kernels.cuh).

Importing this module never imports cupy; :func:`greedy_remove_cupy` and
:func:`greedy_keep_ls_cupy` do.
"""
from __future__ import annotations

import functools
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "KERNEL_FILES", "source_dirs", "find_source_dir", "assemble_source", "load_source",
    "nvrtc_options", "kernel_names", "block_size", "greedy_remove_scratch_bytes",
    "keep_ls_scratch_bytes", "LaunchConfig", "remove_launch_config", "keep_ls_launch_config",
    "pack_remove_args", "pack_keep_ls_args", "get_module", "greedy_remove_cupy",
    "greedy_keep_ls_cupy",
]

#: The files NVRTC needs, in dependency order; greedy_kernels.cuh includes greedy_core.cuh.
KERNEL_FILES = ("greedy_core.cuh", "greedy_kernels.cuh")
_ENTRY = "greedy_kernels.cuh"
SOURCE_ENV = "THINET_FAST_CSRC"  # optional override of the source directory


# ------------------------------------------------------------------- sources
def source_dirs() -> list[Path]:
    """Candidate directories holding the kernel sources, best first: $THINET_FAST_CSRC,
    the installed package data next to this package (``thinet_fast/csrc`` in a wheel),
    the checkout's ``csrc/`` (editable installs run from the checkout), then
    ``thinet_fast/csrc`` in any ``sys.path`` entry."""
    here = Path(__file__).resolve()
    pkg = here.parents[1]  # .../thinet_fast
    out: list[Path] = []
    env = os.environ.get(SOURCE_ENV)
    if env:
        out.append(Path(env))
    out.append(pkg / "csrc")  # wheel install
    out.append(pkg.parent / "csrc")  # source checkout / editable install: <repo>/csrc
    for entry in sys.path:  # package data of an editable install lives in site-packages
        if entry:
            out.append(Path(entry) / "thinet_fast" / "csrc")
    seen, uniq = set(), []
    for p in out:
        key = str(p)
        if key not in seen:
            seen.add(key)
            uniq.append(p)
    return uniq


def find_source_dir(candidates=None) -> Path:
    """The first candidate directory that holds every file of :data:`KERNEL_FILES`."""
    candidates = source_dirs() if candidates is None else [Path(c) for c in candidates]
    for d in candidates:
        if all((d / f).is_file() for f in KERNEL_FILES):
            return d
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"cannot find the kernel sources {KERNEL_FILES} (tried: {tried}). Reinstall thinet-fast "
        f"(the wheel ships them as thinet_fast/csrc) or set {SOURCE_ENV} to the checkout's csrc/.")


_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.M)
_PRAGMA_ONCE_RE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", re.M)


def assemble_source(files: dict[str, str], entry: str = _ENTRY) -> str:
    """One translation unit for NVRTC: ``entry`` with its quoted local includes inlined
    (each file once, recursively) and ``#pragma once`` dropped. System includes stay;
    the sources guard them with ``__CUDACC_RTC__``."""
    done: set[str] = set()

    def expand(name: str, stack: tuple[str, ...]) -> str:
        if name not in files:
            raise KeyError(f"{stack[-1] if stack else '<entry>'} includes {name!r}, which is not among {sorted(files)}")
        if name in stack:
            raise ValueError(f"include cycle: {' -> '.join(stack + (name,))}")
        if name in done:
            return f"// ({name} already included)\n"
        done.add(name)
        text = _PRAGMA_ONCE_RE.sub("", files[name])

        def repl(m: re.Match) -> str:
            return expand(m.group(1), stack + (name,))

        return f"// ---- begin {name}\n" + _INCLUDE_RE.sub(repl, text) + f"\n// ---- end {name}\n"

    return expand(entry, ())


def load_source(directory=None) -> str:
    """Read :data:`KERNEL_FILES` from ``directory`` (default: :func:`find_source_dir`) and
    assemble them."""
    d = Path(directory) if directory is not None else find_source_dir()
    files = {f: (d / f).read_text() for f in KERNEL_FILES}
    return assemble_source(files)


def nvrtc_options(extra=()) -> tuple[str, ...]:
    """NVRTC options. No -arch: cupy adds the one of the device in hand. No fast math:
    greedy removal must stay bit-exact."""
    return ("--std=c++17", "-DTHINET_FAST_NVRTC=1") + tuple(extra)


def _dtype_name(dtype) -> str:
    """'float' or 'double' (the kernel template argument) for a torch/numpy/cupy dtype."""
    name = str(dtype).replace("torch.", "")
    if name in ("float32", "float"):
        return "float"
    if name in ("float64", "double"):
        return "double"
    raise ValueError(f"the cupy kernels take float32 or float64 G; got {dtype}")


def kernel_names(dtype) -> dict[str, str]:
    """The name expressions of the kernel instantiations for G's dtype."""
    t = _dtype_name(dtype)
    return {"remove": f"tf::tf_greedy_remove_kernel<{t}>", "keep_ls": f"tf::tf_keep_ls_kernel<{t}>"}


# --------------------------------------------------------- launch geometry
def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def block_size(C: int) -> int:
    """Threads per block for a batch of width C (mirror of tf::block_size_for)."""
    return int(min(max(_align(int(C), 32), 32), 512))


def greedy_remove_scratch_bytes(C: int, itemsize: int) -> int:
    """Mirror of tf::greedy_remove_scratch_bytes: a[C], diag[C] (itemsize), removed[C]."""
    return 2 * _align(C * itemsize, 16) + _align(C, 16)


def keep_ls_scratch_bytes(C: int, nmax: int) -> int:
    """Mirror of tf::keep_ls_scratch_bytes: Q[C*nmax], b, c, denom[C], y, d[nmax], flags."""
    return _align(8 * (C * nmax + 3 * C + 2 * nmax) + C, 16) + 256


@dataclass(frozen=True)
class LaunchConfig:
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int      # dynamic shared memory bytes
    use_smem: bool       # scratch in shared memory (else global, ws_stride bytes per problem)
    ws_stride: int       # bytes between problems in the global scratch
    ws_bytes: int        # global scratch to allocate (>= 1 so the pointer is valid)


def remove_launch_config(B: int, C: int, itemsize: int, smem_limit: int) -> LaunchConfig:
    """Greedy-removal launch: one block per problem; running sums in shared memory when
    they fit in ``smem_limit`` bytes (the device's opt-in limit minus the kernel's static
    shared memory; 0 forces the global scratch)."""
    scratch = greedy_remove_scratch_bytes(C, itemsize)
    stride = _align(scratch, 256)
    use_smem = scratch <= smem_limit
    return LaunchConfig(
        grid=(max(int(B), 1), 1, 1), block=(block_size(C), 1, 1),
        shared_mem=scratch if use_smem else 0, use_smem=use_smem, ws_stride=stride,
        ws_bytes=1 if use_smem else max(int(B) * stride, 1))


def keep_ls_launch_config(B: int, C: int, nmax: int) -> LaunchConfig:
    """Forward-LS launch: one block per problem, scratch always in global memory."""
    stride = _align(keep_ls_scratch_bytes(C, nmax), 256)
    return LaunchConfig(grid=(max(int(B), 1), 1, 1), block=(block_size(C), 1, 1), shared_mem=0,
                        use_smem=False, ws_stride=stride, ws_bytes=max(int(B) * stride, 1))


# ---------------------------------------------------------- argument packing
def pack_remove_args(G, C: int, sizes, counts, nmax: int, order, errors, ws, cfg: LaunchConfig) -> tuple:
    """Arguments of tf_greedy_remove_kernel<T>(const T* G, long long C, const long long*
    sizes, const long long* counts, long long nmax, long long* order, T* errors,
    unsigned char* ws, long long ws_stride, int use_smem). Arrays pass through."""
    return (G, np.int64(C), sizes, counts, np.int64(nmax), order, errors, ws,
            np.int64(cfg.ws_stride), np.int32(1 if cfg.use_smem else 0))


def pack_keep_ls_args(G, C: int, sizes, counts, nmax: int, ridge: float, keep, weights, ws,
                      cfg: LaunchConfig) -> tuple:
    """Arguments of tf_keep_ls_kernel<T>(const T* G, long long C, const long long* sizes,
    const long long* counts, long long nmax, double ridge, long long* keep, double*
    weights, unsigned char* ws, long long ws_stride)."""
    return (G, np.int64(C), sizes, counts, np.int64(nmax), np.float64(ridge), keep, weights, ws,
            np.int64(cfg.ws_stride))


# ------------------------------------------------------------- GPU part
_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _cached_source() -> str:
    return load_source()


@functools.lru_cache(maxsize=None)
def _module(device_id: int, tname: str):
    import cupy

    names = kernel_names(tname)
    with cupy.cuda.Device(device_id):
        mod = cupy.RawModule(code=_cached_source(), options=nvrtc_options(),
                             name_expressions=list(names.values()))
        mod.compile()
    return mod, names


def get_module(device_id: int, dtype):
    """The compiled RawModule for (device, dtype) and its kernel names, cached."""
    with _lock:
        return _module(int(device_id), _dtype_name(dtype))


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _prepare(G, sizes, counts):
    """(G as cupy, device id, torch stream ptr or None, sizes/counts as int64 numpy)."""
    import cupy

    stream_ptr = None
    if _is_torch(G):
        import torch

        if G.device.type != "cuda":
            raise ValueError(f"the cupy backend needs CUDA tensors; got {G.device}")
        if G.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"G must be float32 or float64; got {G.dtype}")
        G = G.detach().contiguous()
        dev = G.device.index if G.device.index is not None else torch.cuda.current_device()
        stream_ptr = int(torch.cuda.current_stream(G.device).cuda_stream)
        Gc = cupy.asarray(G)
    else:
        Gc = cupy.ascontiguousarray(cupy.asarray(G))
        dev = Gc.device.id
    if Gc.ndim != 3 or Gc.shape[1] != Gc.shape[2]:
        raise ValueError(f"G must be a (B, C, C) batch; got shape {tuple(Gc.shape)}")
    s = np.ascontiguousarray(np.asarray(_to_host(sizes), dtype=np.int64).reshape(-1))
    c = np.ascontiguousarray(np.asarray(_to_host(counts), dtype=np.int64).reshape(-1))
    B, C = Gc.shape[0], Gc.shape[1]
    if s.shape != (B,) or c.shape != (B,):
        raise ValueError(f"sizes and counts need {B} entries; got {s.shape} and {c.shape}")
    if ((s < 0) | (s > C)).any() or ((c < 0) | (c > s)).any():
        raise ValueError(f"need 0 <= count <= size <= {C}; got sizes {s.tolist()}, counts {c.tolist()}")
    return Gc, G, dev, stream_ptr, s, c


def _to_host(x):
    if _is_torch(x):
        return x.detach().cpu().numpy()
    if hasattr(x, "get"):  # cupy array
        return x.get()
    return x


def _launch_ctx(dev: int, stream_ptr):
    import contextlib

    import cupy

    stack = contextlib.ExitStack()
    stack.enter_context(cupy.cuda.Device(dev))
    if stream_ptr is not None:
        stack.enter_context(cupy.cuda.ExternalStream(stream_ptr))
    return stack


def _empty_like_backend(orig, shape, dtype_np, fill, dev):
    """Output in the caller's array library (torch or cupy) plus a cupy view of it."""
    import cupy

    if _is_torch(orig):
        import torch

        tdt = {np.dtype(np.int64): torch.int64, np.dtype(np.float64): torch.float64,
               np.dtype(np.float32): torch.float32}[np.dtype(dtype_np)]
        t = torch.full(shape, fill, dtype=tdt, device=orig.device)
        return t, cupy.asarray(t)
    a = cupy.full(shape, fill, dtype=dtype_np)
    return a, a


def greedy_remove_cupy(G, sizes, n_remove, *, max_shared_bytes: int | None = None):
    """Batched greedy removal through NVRTC. Same arguments and returns as
    ``_greedy_remove_core_ref`` (torch in, torch out; cupy arrays work too)."""
    import cupy

    Gc, orig, dev, stream_ptr, s, c = _prepare(G, sizes, n_remove)
    B, C = Gc.shape[0], Gc.shape[1]
    nmax = int(c.max()) if B else 0
    with _launch_ctx(dev, stream_ptr):
        order, order_c = _empty_like_backend(orig, (B, nmax), np.int64, -1, dev)
        errors, errors_c = _empty_like_backend(orig, (B, nmax), Gc.dtype, float("inf"), dev)
        if B == 0 or nmax == 0:
            return order, errors
        mod, names = get_module(dev, Gc.dtype)
        kern = mod.get_function(names["remove"])
        if max_shared_bytes is None:
            optin = cupy.cuda.Device(dev).attributes["MaxSharedMemoryPerBlockOptin"]
            limit = int(optin) - int(kern.shared_size_bytes)
        else:
            limit = int(max_shared_bytes)
        cfg = remove_launch_config(B, C, Gc.dtype.itemsize, limit)
        if cfg.shared_mem > 48 * 1024:
            kern.max_dynamic_shared_size_bytes = cfg.shared_mem
        ws = cupy.empty(cfg.ws_bytes, dtype=cupy.uint8)
        sd, cd = cupy.asarray(s), cupy.asarray(c)
        kern(cfg.grid, cfg.block, pack_remove_args(Gc, C, sd, cd, nmax, order_c, errors_c, ws, cfg),
             shared_mem=cfg.shared_mem)
    return order, errors


def greedy_keep_ls_cupy(G, sizes, n_keep, ridge):
    """Batched forward least-squares selection through NVRTC. Same arguments and returns
    as ``_greedy_keep_ls_core_ref``."""
    import cupy

    Gc, orig, dev, stream_ptr, s, c = _prepare(G, sizes, n_keep)
    B, C = Gc.shape[0], Gc.shape[1]
    nmax = int(c.max()) if B else 0
    with _launch_ctx(dev, stream_ptr):
        keep, keep_c = _empty_like_backend(orig, (B, nmax), np.int64, -1, dev)
        weights, weights_c = _empty_like_backend(orig, (B, nmax), np.float64, 0.0, dev)
        if B == 0 or nmax == 0:
            return keep, weights
        mod, names = get_module(dev, Gc.dtype)
        kern = mod.get_function(names["keep_ls"])
        cfg = keep_ls_launch_config(B, C, nmax)
        ws = cupy.empty(cfg.ws_bytes, dtype=cupy.uint8)
        sd, cd = cupy.asarray(s), cupy.asarray(c)
        kern(cfg.grid, cfg.block,
             pack_keep_ls_args(Gc, C, sd, cd, nmax, float(ridge), keep_c, weights_c, ws, cfg))
    return keep, weights

"""Glue between torch tensors and the compiled extension ``thinet_fast._C``.

``_C`` takes arrays through ``__array_interface__`` (host) and
``__cuda_array_interface__`` (device) and writes into caller-allocated outputs; this
module allocates those outputs with torch and queues device work on the current torch
CUDA stream. ``_C`` is imported lazily (``dispatch.cext()``), so importing this module
never fails: a missing extension raises ``BackendUnavailable`` at call time.

Both functions take the normalised batch of :func:`thinet_fast.ops.greedy.prepare_batch`
(G contiguous (B, C, C) float32/float64 on the CPU or a CUDA device; sizes and counts
int64 CPU tensors of length B) and return the same as the torch references
``_greedy_remove_core_ref`` / ``_greedy_keep_ls_core_ref``.
"""
from __future__ import annotations

import numpy as np
import torch

from . import dispatch

__all__ = ["greedy_remove_cext", "greedy_keep_ls_cext"]


def _host_counts(x: torch.Tensor, name: str) -> np.ndarray:
    """int64 CPU tensor -> contiguous numpy array (shares memory when possible)."""
    x = torch.as_tensor(x)
    if x.device.type != "cpu":
        x = x.cpu()
    return np.ascontiguousarray(x.detach().to(torch.int64).reshape(-1).numpy())


def _check_G(G: torch.Tensor) -> torch.Tensor:
    if not isinstance(G, torch.Tensor):
        G = torch.as_tensor(G)
    if G.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"G must be float32 or float64 for the compiled backend; got {G.dtype}")
    if G.dim() != 3 or G.shape[1] != G.shape[2]:
        raise ValueError(f"G must be a (B, C, C) batch; got shape {tuple(G.shape)}")
    return G.detach().contiguous()


def _stream_of(device: torch.device) -> int:
    return int(torch.cuda.current_stream(device).cuda_stream)


def _run(name: str, G, sizes, counts, count_name: str, val_fill: float, val_dtype, *scalars):
    """Shared body of the two entry points: check G, build the host sizes/counts, allocate
    the outputs (int64 indices filled with -1, values filled with ``val_fill`` in
    ``val_dtype``, G's dtype when None; both (B, nmax) with nmax = max(counts)) and call
    ``_C.<name>_device`` (CUDA tensors, current stream) or ``_C.<name>_host`` (CPU) with
    ``scalars`` (converted by float() in the call) between the counts and the outputs."""
    C = dispatch.cext()
    G = _check_G(G)
    sizes_np = _host_counts(sizes, "sizes")
    counts_np = _host_counts(counts, count_name)
    B = G.shape[0]
    nmax = int(counts_np.max()) if B else 0
    idx = torch.full((B, nmax), -1, dtype=torch.int64, device=G.device)
    val = torch.full((B, nmax), val_fill, dtype=G.dtype if val_dtype is None else val_dtype, device=G.device)
    if B == 0 or nmax == 0:
        return idx, val
    if G.device.type == "cuda":
        with torch.cuda.device(G.device):
            getattr(C, name + "_device")(G, sizes_np, counts_np, *map(float, scalars), idx, val,
                                         _stream_of(G.device))
    elif G.device.type == "cpu":
        getattr(C, name + "_host")(G.numpy(), sizes_np, counts_np, *map(float, scalars), idx.numpy(), val.numpy())
    else:
        raise ValueError(f"the compiled backend runs on cpu or cuda tensors; got {G.device}")
    return idx, val


def greedy_remove_cext(G: torch.Tensor, sizes: torch.Tensor, n_remove: torch.Tensor):
    """Batched ThiNet greedy removal on ``_C`` (host path for CPU tensors, CUDA kernels
    for CUDA tensors). Returns order (B, nmax) int64 (-1 padded) and cumulative errors
    (B, nmax) in G's dtype (+inf padded), bit-for-bit equal to the torch reference."""
    return _run("greedy_remove", G, sizes, n_remove, "n_remove", float("inf"), None)


def greedy_keep_ls_cext(G: torch.Tensor, sizes: torch.Tensor, n_keep: torch.Tensor, ridge: float):
    """Batched forward least-squares selection on ``_C``. Returns keep (B, nmax) int64
    (-1 padded, in the order chosen) and float64 weights (B, nmax) (0 padded)."""
    return _run("greedy_keep_ls", G, sizes, n_keep, "n_keep", 0.0, torch.float64, ridge)

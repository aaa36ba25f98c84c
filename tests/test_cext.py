"""The compiled extension thinet_fast._C against the torch references (DESIGN.md §9).

Greedy removal must match ``_greedy_remove_core_ref`` bit for bit (order and errors) in
float64 and float32; forward least squares must give the same keep order and weights
equal to rounding. The CUDA tests run only where _C has CUDA and a device is visible.
Set THINET_FAST_REQUIRE_CEXT=1 (CI does) to fail instead of skip when _C is missing.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import thinet_fast
from thinet_fast.ops import dispatch
from thinet_fast.ops.greedy import (
    _greedy_keep_ls_core_ref, _greedy_remove_core_ref, greedy_keep_ls, greedy_remove)


def _load_cext():
    try:
        return dispatch.cext()
    except dispatch.BackendUnavailable as exc:
        if os.environ.get("THINET_FAST_REQUIRE_CEXT") == "1":
            pytest.fail(f"THINET_FAST_REQUIRE_CEXT=1 but {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def C_():
    return _load_cext()


DTYPES = [torch.float64, torch.float32]


# ------------------------------------------------------------------ problems
def random_gram(c: int, dtype, gen: torch.Generator, rows: int | None = None) -> torch.Tensor:
    X = torch.randn(rows or 3 * c, c, generator=gen, dtype=torch.float64)
    X = X * torch.rand(c, generator=gen, dtype=torch.float64).add(0.1)  # uneven channel scales
    return (X.T @ X).to(dtype)


def sampled_tie_gram(c: int, dtype, gen: torch.Generator) -> torch.Tensor:
    """X^T X where X has duplicated and all-zero columns (what dead or copied filters give)."""
    X = torch.randn(4 * c, c, generator=gen, dtype=torch.float64)
    dup = X[:, 1::5]
    X[:, 1::5] = X[:, 0::5][:, : dup.shape[1]]
    X[:, 3::7] = 0
    return (X.T @ X).to(dtype)


def indexed_tie_gram(c: int, dtype, gen: torch.Generator):
    """G0[idx][:, idx] with repeated indices and zero channels: bitwise-identical rows, so
    every tie is exact. Returns (G, rank)."""
    base = max(2, c // 2)
    G0 = random_gram(base, torch.float64, gen)
    idx = torch.randint(0, base, (c,), generator=gen)
    G = G0[idx][:, idx].clone()
    zero = torch.rand(c, generator=gen) < 0.15
    G[zero, :] = 0
    G[:, zero] = 0
    rank = len(set(idx[~zero].tolist()))
    return G.to(dtype), rank


def integer_gram(c: int, dtype, gen: torch.Generator) -> torch.Tensor:
    """Small-integer X: exact arithmetic everywhere, so scores tie often."""
    X = torch.randint(-2, 3, (2 * c, c), generator=gen).to(torch.float64)
    return (X.T @ X).to(dtype)


def pad_batch(mats, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    cmax = max(m.shape[0] for m in mats)
    G = torch.zeros(len(mats), cmax, cmax, dtype=dtype)
    for j, m in enumerate(mats):
        G[j, : m.shape[0], : m.shape[0]] = m
    return G, torch.tensor([m.shape[0] for m in mats], dtype=torch.int64)


def run_remove_host(C_, G, sizes, n, num_threads=0):
    nmax = int(n.max())
    order = torch.empty(G.shape[0], nmax, dtype=torch.int64)
    errors = torch.empty(G.shape[0], nmax, dtype=G.dtype)
    C_.greedy_remove_host(G.numpy(), sizes.numpy(), n.numpy(), order.numpy(), errors.numpy(), num_threads)
    return order, errors


def run_keep_host(C_, G, sizes, n, ridge=1e-8):
    nmax = int(n.max())
    keep = torch.empty(G.shape[0], nmax, dtype=torch.int64)
    weights = torch.empty(G.shape[0], nmax, dtype=torch.float64)
    C_.greedy_keep_ls_host(G.numpy(), sizes.numpy(), n.numpy(), ridge, keep.numpy(), weights.numpy())
    return keep, weights


def assert_remove_equal(order, errors, o_ref, e_ref, what=""):
    fin = torch.isfinite(e_ref)
    err = (errors[fin].double() - e_ref[fin].double()).abs().max().item() if fin.any() else 0.0
    mism = int((order != o_ref).sum())
    print(f"{what}: order mismatches {mism}, max |errors - ref| = {err:.3e}")
    assert torch.equal(order, o_ref)
    assert torch.equal(errors, e_ref)  # bit for bit, including the +inf padding


def ls_objective(G: torch.Tensor, keep: torch.Tensor, w: torch.Tensor) -> float:
    """||y - X_S w||^2 from G: 1'G1 - 2 b_S'w + w'G_SS w."""
    G = G.double()
    b = G.sum(dim=1)
    GSS = G[keep][:, keep]
    return float(G.sum() - 2 * b[keep] @ w + w @ GSS @ w)


# ------------------------------------------------------------ greedy removal
@pytest.mark.parametrize("dtype", DTYPES)
def test_remove_random_batched_bit_exact(C_, dtype):
    gen = torch.Generator().manual_seed(1)
    sizes_list = [1, 2, 7, 33, 64, 100, 128, 5]
    mats = [random_gram(c, dtype, gen) for c in sizes_list]
    G, sizes = pad_batch(mats, dtype)
    # 0, partial (short: column reads without the transposed copy), and full runs.
    n = torch.tensor([1, 0, 7, 32, 10, 100, 127, 3], dtype=torch.int64)
    o_ref, e_ref = _greedy_remove_core_ref(G, sizes, n)
    order, errors = run_remove_host(C_, G, sizes, n)
    assert_remove_equal(order, errors, o_ref, e_ref, f"random {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["sampled_tie", "indexed_tie", "integer"])
def test_remove_ties_bit_exact(C_, dtype, kind):
    gen = torch.Generator().manual_seed(2)
    mats = []
    for c in (5, 20, 50, 64):
        if kind == "sampled_tie":
            mats.append(sampled_tie_gram(c, dtype, gen))
        elif kind == "indexed_tie":
            mats.append(indexed_tie_gram(c, dtype, gen)[0])
        else:
            mats.append(integer_gram(c, dtype, gen))
    G, sizes = pad_batch(mats, dtype)
    n = sizes.clone()  # everything, down to the last channel
    o_ref, e_ref = _greedy_remove_core_ref(G, sizes, n)
    order, errors = run_remove_host(C_, G, sizes, n)
    assert_remove_equal(order, errors, o_ref, e_ref, f"{kind} {dtype}")
    # every valid channel appears exactly once
    for j, c in enumerate(sizes.tolist()):
        assert sorted(order[j, :c].tolist()) == list(range(c))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sim_threads", [32, 96, 512])
def test_cuda_decomposition_on_host(C_, dtype, sim_threads):
    """The CUDA kernels' split (strided per-thread scans of the shared step code, then a
    block reduction) run serially on the CPU: same bit-exact removal, same keep order."""
    gen = torch.Generator().manual_seed(11)
    mats = [random_gram(c, dtype, gen) for c in (3, 40, 130)]
    mats += [sampled_tie_gram(50, dtype, gen), indexed_tie_gram(70, dtype, gen)[0], integer_gram(33, dtype, gen)]
    G, sizes = pad_batch(mats, dtype)
    n = sizes.clone()
    o_ref, e_ref = _greedy_remove_core_ref(G, sizes, n)
    order = torch.empty_like(o_ref)
    errors = torch.empty_like(e_ref)
    C_.greedy_remove_host(G.numpy(), sizes.numpy(), n.numpy(), order.numpy(), errors.numpy(), 0, sim_threads)
    assert_remove_equal(order, errors, o_ref, e_ref, f"simulated block of {sim_threads} {dtype}")

    G, sizes = pad_batch([random_gram(c, dtype, gen) for c in (3, 40, 130)], dtype)
    nk = torch.tensor([2, 30, 90])
    k_ref, w_ref = _greedy_keep_ls_core_ref(G, sizes, nk, 1e-8)
    keep = torch.empty_like(k_ref)
    w = torch.empty_like(w_ref)
    C_.greedy_keep_ls_host(G.numpy(), sizes.numpy(), nk.numpy(), 1e-8, keep.numpy(), w.numpy(), 0, sim_threads)
    print(f"keep_ls simulated block: order mismatches {int((keep != k_ref).sum())}, "
          f"max |w - ref| = {(w - w_ref).abs().max().item():.3e}")
    assert torch.equal(keep, k_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-7, atol=1e-9)


def test_remove_all_zero_problem(C_):
    G = torch.zeros(2, 6, 6, dtype=torch.float64)
    sizes = torch.tensor([6, 4])
    n = torch.tensor([6, 4])
    o_ref, e_ref = _greedy_remove_core_ref(G, sizes, n)
    order, errors = run_remove_host(C_, G, sizes, n)
    assert_remove_equal(order, errors, o_ref, e_ref, "zeros")
    assert order[0].tolist() == list(range(6))


def test_remove_threads_agree(C_):
    gen = torch.Generator().manual_seed(3)
    G, sizes = pad_batch([random_gram(c, torch.float64, gen) for c in (40, 80, 20, 60, 10)], torch.float64)
    n = sizes - 1
    o1, e1 = run_remove_host(C_, G, sizes, n, num_threads=1)
    o2, e2 = run_remove_host(C_, G, sizes, n, num_threads=0)
    print("threads: order mismatches", int((o1 != o2).sum()))
    assert torch.equal(o1, o2) and torch.equal(e1, e2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_api_cpu_backend(C_, dtype):
    gen = torch.Generator().manual_seed(4)
    mats = [random_gram(c, dtype, gen) for c in (12, 30, 7)]
    ref_o, ref_e = greedy_remove(mats, [11, 29, 3], return_errors=True, backend="torch")
    o, e = greedy_remove(mats, [11, 29, 3], return_errors=True, backend="cpu")
    for j in range(3):
        print(f"list problem {j}: max |errors - ref| = {(e[j] - ref_e[j]).abs().max().item():.3e}")
        assert torch.equal(o[j], ref_o[j]) and torch.equal(e[j], ref_e[j])
    single = mats[1]
    assert torch.equal(greedy_remove(single, 29, backend="cpu"), greedy_remove(single, 29, backend="torch"))
    k_ref, w_ref = greedy_keep_ls(single, 10, return_weights=True, backend="torch")
    k, w = greedy_keep_ls(single, 10, return_weights=True, backend="cpu")
    print(f"keep_ls public api: max |w - ref| = {(w - w_ref).abs().max().item():.3e}")
    assert torch.equal(k, k_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------- forward least squares
@pytest.mark.parametrize("dtype", DTYPES)
def test_keep_ls_random_batched(C_, dtype):
    gen = torch.Generator().manual_seed(5)
    sizes_list = [1, 3, 17, 64, 96, 128]
    G, sizes = pad_batch([random_gram(c, dtype, gen) for c in sizes_list], dtype)
    n = torch.tensor([1, 2, 9, 64, 40, 100], dtype=torch.int64)
    for ridge in (1e-8, 1e-3, 0.0):
        k_ref, w_ref = _greedy_keep_ls_core_ref(G, sizes, n, ridge)
        keep, w = run_keep_host(C_, G, sizes, n, ridge)
        err = (w - w_ref).abs().max().item()
        print(f"keep_ls random {dtype} ridge={ridge}: order mismatches {int((keep != k_ref).sum())}, "
              f"max |w - ref| = {err:.3e}")
        assert torch.equal(keep, k_ref)
        torch.testing.assert_close(w, w_ref, rtol=1e-7, atol=1e-9)
        assert torch.all(w[keep < 0] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_keep_ls_exact_ties(C_, dtype):
    """Duplicated (bitwise identical) and zero channels: the same order up to the rank;
    beyond it the choice among numerically dependent channels is rounding noise, so only
    finiteness and the objective are compared."""
    gen = torch.Generator().manual_seed(6)
    probs = [indexed_tie_gram(c, dtype, gen) for c in (6, 24, 40, 64)]
    G, sizes = pad_batch([p[0] for p in probs], dtype)
    ranks = torch.tensor([p[1] for p in probs])
    n = ranks.clamp(min=1)
    k_ref, w_ref = _greedy_keep_ls_core_ref(G, sizes, n, 1e-8)
    keep, w = run_keep_host(C_, G, sizes, n, 1e-8)
    print(f"keep_ls ties {dtype}: ranks {ranks.tolist()}, order mismatches {int((keep != k_ref).sum())}, "
          f"max |w - ref| = {(w - w_ref).abs().max().item():.3e}")
    assert torch.equal(keep, k_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-8)

    full = sizes.clone()
    k_ref, w_ref = _greedy_keep_ls_core_ref(G, sizes, full, 1e-8)
    keep, w = run_keep_host(C_, G, sizes, full, 1e-8)
    assert torch.isfinite(w).all()
    for j, c in enumerate(sizes.tolist()):
        assert sorted(keep[j, :c].tolist()) == list(range(c))
        Gj = G[j, :c, :c]
        f, f_ref = ls_objective(Gj, keep[j, :c], w[j, :c]), ls_objective(Gj, k_ref[j, :c], w_ref[j, :c])
        scale = float(Gj.double().sum().abs()) + 1.0
        print(f"  problem {j}: objective {f:.3e} vs ref {f_ref:.3e} (scale {scale:.3e})")
        assert abs(f - f_ref) <= 1e-6 * scale


@pytest.mark.parametrize("dtype", DTYPES)
def test_keep_ls_sampled_ties_finite(C_, dtype):
    gen = torch.Generator().manual_seed(7)
    G, sizes = pad_batch([sampled_tie_gram(c, dtype, gen) for c in (10, 30, 50)], dtype)
    keep, w = run_keep_host(C_, G, sizes, sizes.clone(), 1e-8)
    print("sampled ties: max |w| =", w.abs().max().item())
    assert torch.isfinite(w).all()
    for j, c in enumerate(sizes.tolist()):
        assert sorted(keep[j, :c].tolist()) == list(range(c))


# ---------------------------------------------------------------- bad input
def _good(C_):
    G = random_gram(8, torch.float64, torch.Generator().manual_seed(8))[None].numpy()
    sizes = np.array([8], dtype=np.int64)
    n = np.array([3], dtype=np.int64)
    order = np.empty((1, 3), dtype=np.int64)
    errors = np.empty((1, 3), dtype=np.float64)
    return G, sizes, n, order, errors


def test_good_input_passes(C_):
    G, sizes, n, order, errors = _good(C_)
    C_.greedy_remove_host(G, sizes, n, order, errors)
    assert (order >= 0).all()


@pytest.mark.parametrize("case", [
    "G_float16", "G_int64", "G_noncontig", "G_nonsquare", "G_2d", "sizes_int32", "sizes_shape",
    "n_too_big", "size_too_big", "order_dtype", "errors_dtype", "order_shape", "errors_shape",
    "order_readonly", "not_an_array", "nmax_too_small",
])
def test_bad_input_raises_value_error(C_, case):
    G, sizes, n, order, errors = _good(C_)
    if case == "G_float16":
        G = G.astype(np.float16)
    elif case == "G_int64":
        G = G.astype(np.int64)
    elif case == "G_noncontig":
        G = np.ascontiguousarray(np.concatenate([G, G], axis=2))[:, :, ::2]
    elif case == "G_nonsquare":
        G = np.ascontiguousarray(G[:, :, :7])
    elif case == "G_2d":
        G = np.ascontiguousarray(G[0])
    elif case == "sizes_int32":
        sizes = sizes.astype(np.int32)
    elif case == "sizes_shape":
        sizes = np.array([8, 8], dtype=np.int64)
    elif case == "n_too_big":
        n = np.array([9], dtype=np.int64)
        order = np.empty((1, 9), dtype=np.int64)
        errors = np.empty((1, 9), dtype=np.float64)
    elif case == "size_too_big":
        sizes = np.array([9], dtype=np.int64)
    elif case == "order_dtype":
        order = order.astype(np.int32)
    elif case == "errors_dtype":
        errors = np.empty((1, 3), dtype=np.float32)
    elif case == "order_shape":
        order = np.empty((2, 3), dtype=np.int64)
    elif case == "errors_shape":
        errors = np.empty((1, 4), dtype=np.float64)
    elif case == "order_readonly":
        order.setflags(write=False)
    elif case == "not_an_array":
        G = G.tolist()
    elif case == "nmax_too_small":
        order = np.empty((1, 2), dtype=np.int64)
        errors = np.empty((1, 2), dtype=np.float64)
    with pytest.raises(ValueError) as info:
        C_.greedy_remove_host(G, sizes, n, order, errors)
    print(f"{case}: {info.value}")


def test_bad_input_keep_ls(C_):
    G, sizes, n, _, _ = _good(C_)
    keep = np.empty((1, 3), dtype=np.int64)
    with pytest.raises(ValueError, match="float64"):
        C_.greedy_keep_ls_host(G, sizes, n, 1e-8, keep, np.empty((1, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        Gt = np.ascontiguousarray(np.concatenate([G, G], axis=1))[:, ::2, :]
        C_.greedy_keep_ls_host(Gt, sizes, n, 1e-8, keep, np.empty((1, 3)))
    with pytest.raises(ValueError, match="square"):
        C_.greedy_keep_ls_host(np.zeros((1, 8, 9)), sizes, n, 1e-8, keep, np.empty((1, 3)))


def test_device_functions_reject_host_arrays(C_):
    G, sizes, n, order, errors = _good(C_)
    if not C_.built_with_cuda():
        with pytest.raises(RuntimeError, match="without CUDA"):
            C_.greedy_remove_device(G, sizes, n, order, errors, 0)
        return
    with pytest.raises(ValueError, match="__cuda_array_interface__"):
        C_.greedy_remove_device(G, sizes, n, order, errors, 0)
    with pytest.raises(ValueError, match="__cuda_array_interface__"):
        C_.greedy_keep_ls_device(G, sizes, n, 1e-8, order, errors.astype(np.float64), 0)


def test_cext_glue_rejects_bad_dtype(C_):
    from thinet_fast.ops.cext import greedy_remove_cext
    with pytest.raises(ValueError, match="float32 or float64"):
        greedy_remove_cext(torch.zeros(1, 3, 3, dtype=torch.float16), torch.tensor([3]), torch.tensor([1]))


# ----------------------------------------------------------------- backends
def test_cpu_backend_available_when_built(C_):
    info = thinet_fast.backends()["cpu"]
    print("cpu backend:", info)
    assert info.available
    assert C_.omp_max_threads() >= 1
    assert isinstance(C_.cuda_archs(), str)
    assert C_.built_with_cuda() == (C_.cuda_archs() != "")


def test_scratch_mirrors(C_):
    from thinet_fast.ops import cupy_backend as cb
    for c in (1, 31, 32, 33, 64, 500, 512, 513, 4096):
        assert cb.block_size(c) == C_.block_size_for(c)
        for itemsize in (4, 8):
            assert cb.greedy_remove_scratch_bytes(c, itemsize) == C_.greedy_remove_scratch_bytes(c, itemsize)
        for nmax in (1, 7, c):
            assert cb.keep_ls_scratch_bytes(c, nmax) == C_.keep_ls_scratch_bytes(c, nmax)


# ---------------------------------------------------------------- CUDA path
def _cuda_or_skip(C_):
    if not C_.built_with_cuda():
        pytest.skip("_C was built without CUDA")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_shared", [-1, 0])  # 0 forces the global-memory scratch
def test_cuda_remove_bit_exact(C_, dtype, max_shared):
    _cuda_or_skip(C_)
    gen = torch.Generator().manual_seed(9)
    mats = [random_gram(c, dtype, gen) for c in (3, 64, 200, 512, 1100)]
    mats += [sampled_tie_gram(50, dtype, gen), indexed_tie_gram(70, dtype, gen)[0], integer_gram(40, dtype, gen)]
    G, sizes = pad_batch(mats, dtype)
    n = sizes.clone()
    n[1] = 10
    o_ref, e_ref = _greedy_remove_core_ref(G, sizes, n)
    Gd = G.cuda()
    order = torch.empty(o_ref.shape, dtype=torch.int64, device="cuda")
    errors = torch.empty(e_ref.shape, dtype=dtype, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    C_.greedy_remove_device(Gd, sizes.numpy(), n.numpy(), order, errors, stream, max_shared)
    torch.cuda.synchronize()
    assert_remove_equal(order.cpu(), errors.cpu(), o_ref, e_ref, f"cuda {dtype} max_shared={max_shared}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_keep_ls(C_, dtype):
    _cuda_or_skip(C_)
    gen = torch.Generator().manual_seed(10)
    G, sizes = pad_batch([random_gram(c, dtype, gen) for c in (2, 17, 64, 128, 300)], dtype)
    n = torch.tensor([1, 9, 64, 100, 150])
    k_ref, w_ref = _greedy_keep_ls_core_ref(G, sizes, n, 1e-8)
    from thinet_fast.ops.cext import greedy_keep_ls_cext, greedy_remove_cext
    keep, w = greedy_keep_ls_cext(G.cuda(), sizes, n, 1e-8)
    keep, w = keep.cpu(), w.cpu()
    print(f"cuda keep_ls {dtype}: order mismatches {int((keep != k_ref).sum())}, "
          f"max |w - ref| = {(w - w_ref).abs().max().item():.3e}")
    assert torch.equal(keep, k_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-7, atol=1e-9)
    o, e = greedy_remove_cext(G.cuda(), sizes, sizes - 1)
    o_ref, e_ref = _greedy_remove_core_ref(G, sizes, sizes - 1)
    assert_remove_equal(o.cpu(), e.cpu(), o_ref, e_ref, f"cuda glue {dtype}")

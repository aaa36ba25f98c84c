"""_C host path vs the torch reference on the 13 VGG-16 conv units (pytest-benchmark).

One padded batch of 13 problems, C = 64, 64, 128, 128, 256, 256, 256, 512 x 6, float64
Gram matrices X^T X of random X; greedy removal runs to the end (n = C - 1), forward
least squares keeps an eighth (the reference needs seconds per problem beyond that). Correctness is checked before anything is timed; the speed-up
over the reference is stored in the benchmark's extra_info ("speedup_vs_ref").

    .venv/bin/python -m pytest bench/test_bench_cext.py --benchmark-only -q
"""
from __future__ import annotations

import time

import pytest
import torch

from thinet_fast.ops import dispatch
from thinet_fast.ops.greedy import _greedy_keep_ls_core_ref, _greedy_remove_core_ref

VGG16_C = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


@pytest.fixture(scope="module")
def cext():
    try:
        return dispatch.cext()
    except dispatch.BackendUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def vgg_batch():
    gen = torch.Generator().manual_seed(0)
    cmax = max(VGG16_C)
    G = torch.zeros(len(VGG16_C), cmax, cmax, dtype=torch.float64)
    for j, c in enumerate(VGG16_C):
        X = torch.randn(2 * c, c, generator=gen, dtype=torch.float64)
        G[j, :c, :c] = X.T @ X
    sizes = torch.tensor(VGG16_C, dtype=torch.int64)
    return G, sizes


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def test_bench_greedy_remove_cext_vs_ref(benchmark, cext, vgg_batch):
    from thinet_fast.ops.cext import greedy_remove_cext

    G, sizes = vgg_batch
    n = sizes - 1
    o_ref, e_ref = _greedy_remove_core_ref(G, sizes, n)
    o, e = greedy_remove_cext(G, sizes, n)
    print(f"\ngreedy removal: order mismatches {int((o != o_ref).sum())}, "
          f"errors bit-equal {torch.equal(e, e_ref)}")
    assert torch.equal(o, o_ref) and torch.equal(e, e_ref)

    t_ref = _median_seconds(lambda: _greedy_remove_core_ref(G, sizes, n), repeats=3)
    benchmark.group = "greedy_remove VGG-16 batch (13 problems, float64, n = C-1)"
    benchmark.pedantic(greedy_remove_cext, args=(G, sizes, n), rounds=20, iterations=1, warmup_rounds=2)
    t_c = benchmark.stats.stats.median if benchmark.stats is not None else float("nan")
    benchmark.extra_info.update(ref_median_s=t_ref, cext_median_s=t_c, speedup_vs_ref=t_ref / t_c,
                                omp_threads=cext.omp_max_threads())
    print(f"torch ref {t_ref * 1e3:.1f} ms, _C host {t_c * 1e3:.2f} ms "
          f"({cext.omp_max_threads()} threads): {t_ref / t_c:.1f}x")


def test_bench_keep_ls_cext_vs_ref(benchmark, cext, vgg_batch):
    from thinet_fast.ops.cext import greedy_keep_ls_cext

    G, sizes = vgg_batch
    n = sizes // 8
    t0 = time.perf_counter()
    k_ref, w_ref = _greedy_keep_ls_core_ref(G, sizes, n, 1e-8)
    t_ref = time.perf_counter() - t0  # one run: the reference is slow
    k, w = greedy_keep_ls_cext(G, sizes, n, 1e-8)
    print(f"\nkeep_ls: order mismatches {int((k != k_ref).sum())}, "
          f"max |w - ref| = {(w - w_ref).abs().max().item():.3e}")
    assert torch.equal(k, k_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-9)

    benchmark.group = "keep_ls VGG-16 batch (13 problems, float64, n = C/8)"
    benchmark.pedantic(greedy_keep_ls_cext, args=(G, sizes, n, 1e-8), rounds=10, iterations=1, warmup_rounds=1)
    t_c = benchmark.stats.stats.median if benchmark.stats is not None else float("nan")
    benchmark.extra_info.update(ref_s=t_ref, cext_median_s=t_c, speedup_vs_ref=t_ref / t_c,
                                omp_threads=cext.omp_max_threads())
    print(f"torch ref {t_ref * 1e3:.1f} ms, _C host {t_c * 1e3:.2f} ms: {t_ref / t_c:.1f}x")

"""Every backend of every op against its pure-torch ``_ref`` on the same fresh random
cases (DESIGN.md §9). A backend that cannot run here is skipped with the reason; the
kernel-specific edge cases (block sizes, padding rows) stay in the per-backend files."""
from __future__ import annotations

import pytest
import torch
from conftest import backend_runs

from thinet_fast.ops import dispatch, gram, greedy
from thinet_fast.ops.patches import ConsumerGeometry

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _cases(op):
    for backend in dispatch.OPS[op][0]:
        yield pytest.param(backend, id=backend,
                           marks=pytest.mark.skipif(not backend_runs(backend), reason=f"{backend} cannot run here"))


def _rel(got, ref):
    err = float((got.double() - ref.double()).abs().max())
    scale = float(ref.double().abs().max())
    print(f"max abs err {err:.3e}, max |ref| {scale:.3e}")
    return err / max(scale, 1e-300)


@pytest.mark.parametrize("backend", list(_cases("greedy_remove")))
def test_greedy_remove(backend, random_gram):
    G = torch.stack([random_gram(12, seed=s) for s in range(3)]).to(DEV)
    order, err = greedy.greedy_remove(G, 11, return_errors=True, backend=backend)
    order_ref, err_ref = greedy.greedy_remove_ref(G, 11, return_errors=True)
    assert torch.equal(order.cpu(), order_ref.cpu())
    assert _rel(err, err_ref) < 1e-10


@pytest.mark.parametrize("backend", list(_cases("greedy_keep_ls")))
def test_greedy_keep_ls(backend, random_gram):
    G = random_gram(10, seed=4).to(DEV)
    keep, w = greedy.greedy_keep_ls(G, 6, return_weights=True, backend=backend)
    keep_ref, w_ref = greedy.greedy_keep_ls_ref(G, 6, return_weights=True)
    assert torch.equal(keep.cpu(), keep_ref.cpu())
    assert _rel(w, w_ref) < 1e-8


def _conv_case(seed=0, linear=False):
    g = torch.Generator().manual_seed(seed)
    if linear:
        geo, C, t = ConsumerGeometry.dense(3), 5, 3
        x = torch.randn(7, C * t, generator=g)
        kernel = torch.randn(4, C * t, generator=g)
        oh = ow = 1
        N = 7
    else:
        geo, C = ConsumerGeometry.conv(3, stride=2, padding=1), 6
        x = torch.randn(3, C, 9, 8, generator=g)
        kernel = torch.randn(5, C, 3, 3, generator=g)
        oh, ow = geo.out_size(9, 8)
        N = 3
    S = 29
    img, oy, ox = (torch.randint(n, (S,), generator=g) for n in (N, oh, ow))
    k = torch.randint(kernel.shape[0], (S,), generator=g)
    return geo, x.to(DEV), kernel.to(DEV), img, oy, ox, k


@pytest.mark.parametrize("linear", [False, True], ids=["conv", "linear"])
@pytest.mark.parametrize("backend", list(_cases("sampled_gram")))
def test_sampled_gram(backend, linear):
    geo, x, kernel, img, oy, ox, k = _conv_case(1, linear)
    got = gram.sampled_gram(x, kernel, geo, img, oy, ox, k, backend=backend)
    ref = gram.sampled_gram_ref(x, kernel, geo, img, oy, ox, k)  # same inputs as the op
    assert _rel(got, ref) < 2e-5


@pytest.mark.parametrize("linear", [False, True], ids=["conv", "linear"])
@pytest.mark.parametrize("backend", list(_cases("patch_moments")))
def test_patch_moments(backend, linear):
    geo, x, kernel, img, oy, ox, _ = _conv_case(2, linear)
    P, z = gram.patch_moments(x, geo, img, oy, ox, backend=backend)
    P_ref, z_ref = gram.patch_moments_ref(x, geo, img, oy, ox)
    assert _rel(P, P_ref) < 2e-5 and _rel(z, z_ref) < 2e-5


@pytest.mark.parametrize("backend", list(_cases("gram_from_cov")))
def test_gram_from_cov(backend):
    geo, x, kernel, img, oy, ox, _ = _conv_case(3)
    P, _ = gram.patch_moments_ref(x, geo, img, oy, ox)
    got = gram.gram_from_cov(kernel, P, backend=backend)
    assert _rel(got, gram.gram_from_cov_ref(kernel, P)) < 2e-5


@pytest.mark.parametrize("linear", [False, True], ids=["conv", "linear"])
@pytest.mark.parametrize("backend", list(_cases("direct_gram")))
def test_direct_gram(backend, linear):
    geo, x, kernel, img, oy, ox, _ = _conv_case(4, linear)
    got = gram.direct_gram(x, kernel, geo, img, oy, ox, backend=backend)
    assert _rel(got, gram.direct_gram_ref(x, kernel, geo, img, oy, ox)) < 2e-5


def test_every_op_with_backends_is_covered():
    covered = {"greedy_remove", "greedy_keep_ls", "sampled_gram", "patch_moments", "gram_from_cov", "direct_gram",
               "statistics"}  # statistics: the accumulator, tested whole in test_triton's prune test
    assert set(dispatch.OPS) <= covered

"""Triton kernels against their ``*_ref`` twins (DESIGN.md §9).

Without a GPU the kernels run in triton's interpreter: TRITON_INTERPRET=1 is set here
before thinet_fast (and so the kernels) is imported. Shapes are small and blocks large,
since the interpreter costs milliseconds per block-iteration; a few cases force small
blocks (16) so that C, C·t and the sample count are not multiples of the block.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the install
    pytest.skip(f"triton is not importable ({type(exc).__name__}: {exc})", allow_module_level=True)

from thinet_fast.ops import dispatch  # noqa: E402
from thinet_fast.ops import gram as gram_ops  # noqa: E402
from thinet_fast.ops.greedy import _greedy_remove_core_ref, greedy_remove, greedy_remove_ref  # noqa: E402
from thinet_fast.ops.patches import ConsumerGeometry  # noqa: E402

dispatch.clear_caches()  # the env var may have been set after an earlier probe

from thinet_fast.ops import triton as tri  # noqa: E402
from thinet_fast.ops.triton import gram as tri_gram  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _interpreter_ready() -> bool:
    """Our kernels and triton.language's own @jit helpers (tl.zeros, tl.sum, ...) must all
    have been decorated under TRITON_INTERPRET=1. When another test module imported
    triton first (torchvision -> torch._inductor does), they were not."""
    try:
        import triton.language.standard as std
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:
        return False
    return tri_gram.interpreted() and isinstance(std.zeros, InterpretedFunction)


# Without a GPU and with triton imported too early, the tests below re-run this file in a
# fresh interpreter (test_in_fresh_process) instead of failing.
FRESH_PROCESS_NEEDED = DEV == "cpu" and not _interpreter_ready()


@pytest.fixture(autouse=True)
def _needs_ready_interpreter(request):
    if FRESH_PROCESS_NEEDED and request.node.originalname != "test_in_fresh_process":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set in this process; "
                    "covered by test_in_fresh_process")


def test_in_fresh_process():
    if not FRESH_PROCESS_NEEDED:
        pytest.skip("this process runs the kernels directly")
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
                         capture_output=True, text=True, env=env, cwd=root, timeout=900)
    print(res.stdout[-4000:], res.stderr[-2000:])
    assert res.returncode == 0, "the Triton tests failed in a fresh process (output above)"


# Both sides see the same (upcast) input values and multiply in float32, so 16-bit inputs
# differ from the reference only by float32 summation order, as float32 inputs do.
# Scale-relative tolerance: max|err| <= TOL * max|ref|.
TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}

# name: (geometry, N, C, H, W, K, S, block overrides for sampled_gram / patch_moments)
CASES = {
    "3x3_pad1_C13": (ConsumerGeometry.conv(3, padding=1), 3, 13, 7, 6, 6, 40, {}),
    "1x1_C5": (ConsumerGeometry.conv(1), 2, 5, 5, 5, 4, 30, {}),
    "3x3_stride2_pad1_C40_blk16": (ConsumerGeometry.conv(3, stride=2, padding=1), 2, 40, 9, 8, 5, 37,
                                   {"block_c": 16, "block_s": 16}),
    "3x3_dil2_pad2_C13": (ConsumerGeometry.conv(3, padding=2, dilation=2), 2, 13, 8, 7, 3, 33, {"block_s": 16}),
    "3x3_stride2_dil2_C6": (ConsumerGeometry.conv(3, stride=2, dilation=2), 2, 6, 11, 9, 7, 25, {}),
    "2x3_stride2x1_pad1x0_C5": (ConsumerGeometry.conv((2, 3), stride=(2, 1), padding=(1, 0)), 2, 5, 6, 7, 3, 20, {}),
    "linear_t4_C5": (ConsumerGeometry.dense(4), 12, 5, None, None, 6, 12, {}),
    "linear_t1_C13": (ConsumerGeometry.dense(1), 20, 13, None, None, 7, 20, {}),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(case, dtype, seed=0):
    geo, N, C, H, W, K, S, blocks = CASES[case]
    g = torch.Generator().manual_seed(seed)
    t = geo.taps
    if geo.linear:
        x = torch.randn(N, C * t, generator=g)
        kernel = torch.randn(K, C * t, generator=g)
        oh = ow = 1
    else:
        x = torch.randn(N, C, H, W, generator=g)
        kernel = torch.randn(K, C, *geo.kernel_size, generator=g)
        oh, ow = geo.out_size(H, W)
    img = torch.randint(N, (S,), generator=g)
    oy = torch.randint(oh, (S,), generator=g)
    ox = torch.randint(ow, (S,), generator=g)
    k = torch.randint(K, (S,), generator=g)
    to = lambda v: v.to(DEV)  # noqa: E731
    return geo, to(x).to(dtype), to(kernel), to(img), to(oy), to(ox), to(k), blocks


def _ref_map(geo, x):
    return geo.as_map(x) if geo.linear else x


def _report(name, got, ref):
    err = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    rel = err / max(scale, 1e-30)
    print(f"{name}: max abs err {err:.3e}, max |ref| {scale:.3e}, rel {rel:.3e}")
    return rel


# ----------------------------------------------------------------- sampled gram
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(CASES))
def test_sampled_gram(case, dtype):
    geo, x, kernel, img, oy, ox, k, blocks = _inputs(case, dtype)
    kw = {n: v for n, v in blocks.items() if n in ("block_c", "block_s")}
    G = tri.sampled_gram_triton(x, kernel, geo, img, oy, ox, k, **kw)
    R = gram_ops.sampled_gram_ref(_ref_map(geo, x), geo.as_kernel(kernel), geo, img, oy, ox, k)
    assert G.shape == R.shape and G.dtype == torch.float32
    rel = _report(f"sampled_gram[{case},{dtype}]", G, R)
    assert rel <= TOL[dtype]
    assert torch.equal(G, G.T)


def test_sampled_gram_public_dispatch():
    geo, x, kernel, img, oy, ox, k, _ = _inputs("3x3_stride2_pad1_C40_blk16", torch.float32, seed=1)
    G = gram_ops.sampled_gram(x, kernel, geo, img, oy, ox, k, backend="triton")
    R = gram_ops.sampled_gram_ref(x, kernel, geo, img, oy, ox, k)
    rel = _report("sampled_gram(backend='triton')", G, R)
    assert rel <= TOL[torch.float32]


@pytest.mark.parametrize("case", ["3x3_stride2_pad1_C40_blk16", "linear_t4_C5"])
def test_channels_last_and_strided_inputs(case):
    """Generic strides: a channels-last copy (what a GPU run converts to) and a strided view."""
    geo, x, kernel, img, oy, ox, k, _ = _inputs(case, torch.float16, seed=8)
    xm = _ref_map(geo, x)
    R = gram_ops.sampled_gram_ref(xm, geo.as_kernel(kernel), geo, img, oy, ox, k)
    Pr, zr = gram_ops.patch_moments_ref(xm, geo, img, oy, ox)
    G = tri.sampled_gram_triton(x, kernel, geo, img, oy, ox, k, channels_last=True)
    P, z = tri.patch_moments_triton(x, geo, img, oy, ox, channels_last=True)
    wide = torch.cat([xm, xm.flip(1)], dim=1)[:, : xm.shape[1]]  # a non-contiguous view equal to xm
    G2 = tri.sampled_gram_triton(wide, geo.as_kernel(kernel), ConsumerGeometry(**{
        f: getattr(geo, f) for f in ("kernel_size", "stride", "padding", "dilation")}), img, oy, ox, k)
    rels = [_report(f"channels_last sampled_gram[{case}]", G, R), _report(f"channels_last P[{case}]", P, Pr),
            _report(f"channels_last zsum[{case}]", z, zr), _report(f"strided view sampled_gram[{case}]", G2, R)]
    assert max(rels) <= TOL[torch.float16]


def test_bad_arguments_rejected():
    geo, x, kernel, img, oy, ox, k, _ = _inputs("1x1_C5", torch.float32)
    with pytest.raises(ValueError, match="power of two"):
        tri.sampled_gram_triton(x, kernel, geo, img, oy, ox, k, block_c=24)
    with pytest.raises(IndexError, match="img"):
        tri.sampled_gram_triton(x, kernel, geo, img.cpu() + x.shape[0], oy, ox, k)
    with pytest.raises(IndexError, match="k holds"):
        tri.sampled_gram_triton(x, kernel, geo, img, oy, ox, k.cpu() + kernel.shape[0])


# ----------------------------------------------------------------- patch moments
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(CASES))
def test_patch_moments(case, dtype):
    geo, x, kernel, img, oy, ox, k, blocks = _inputs(case, dtype)
    kw = {}
    if "block_c" in blocks:  # several tiles: C·t = 360 is not a multiple of the block
        kw["block_d"] = 128
    if "block_s" in blocks:
        kw["block_s"] = blocks["block_s"]
    P, zsum = tri.patch_moments_triton(x, geo, img, oy, ox, **kw)
    Pr, zr = gram_ops.patch_moments_ref(_ref_map(geo, x), geo, img, oy, ox)
    rel_p = _report(f"patch_moments.P[{case},{dtype}]", P, Pr)
    rel_z = _report(f"patch_moments.zsum[{case},{dtype}]", zsum, zr)
    assert P.shape == Pr.shape and zsum.shape == zr.shape
    assert rel_p <= TOL[dtype] and rel_z <= TOL[dtype]


def test_patch_moments_public_dispatch():
    geo, x, kernel, img, oy, ox, k, _ = _inputs("3x3_dil2_pad2_C13", torch.bfloat16, seed=2)
    P, zsum = gram_ops.patch_moments(x, geo, img, oy, ox, backend="triton")
    Pr, zr = gram_ops.patch_moments_ref(x, geo, img, oy, ox)
    rel_p = _report("patch_moments(backend='triton').P", P, Pr)
    rel_z = _report("patch_moments(backend='triton').zsum", zsum, zr)
    assert rel_p <= TOL[torch.bfloat16] and rel_z <= TOL[torch.bfloat16]


# ----------------------------------------------------------------- G from P
GFC_CASES = {  # name: (K, C, kernel tail shape, overrides)
    "3x3_C13": (6, 13, (3, 3), {}),
    "3x3_C20_K21_blk16": (21, 20, (3, 3), {"block_c": 16, "block_k": 16}),  # C and K not multiples of 16
    "1x1_C5": (4, 5, (1, 1), {}),
    "linear_t4_C5": (9, 5, (4, 1), {}),
    "linear_t1_C13": (7, 13, (1, 1), {}),
}


@pytest.mark.parametrize("fuse_a", [True, False], ids=["fused", "torch_A"])
@pytest.mark.parametrize("case", list(GFC_CASES))
def test_gram_from_cov(case, fuse_a):
    K, C, tail, kw = GFC_CASES[case]
    g = torch.Generator().manual_seed(3)
    kernel = torch.randn(K, C, *tail, generator=g).to(DEV)
    D = C * tail[0] * tail[1]
    Z = torch.randn(3 * D, D, generator=g).to(DEV)
    P = Z.T @ Z  # a covariance
    G = tri.gram_from_cov_triton(kernel, P, fuse_a=fuse_a, **kw)
    R = gram_ops.gram_from_cov_ref(kernel, P)
    rel = _report(f"gram_from_cov[{case},fuse_a={fuse_a}]", G, R)
    assert G.shape == (C, C) and rel <= TOL[torch.float32]


def test_gram_from_cov_public_dispatch_nonsymmetric_P():
    g = torch.Generator().manual_seed(4)
    kernel = torch.randn(5, 7, 3, 3, generator=g).to(DEV)
    P = torch.randn(63, 63, generator=g).to(DEV)  # not symmetric: every tile of G is computed
    G = gram_ops.gram_from_cov(kernel, P, backend="triton")
    R = gram_ops.gram_from_cov_ref(kernel, P)
    rel = _report("gram_from_cov(backend='triton'), non-symmetric P", G, R)
    assert rel <= 1e-4  # random signs: cancellation makes the relative error larger


def test_full_pipeline_matches_direct():
    """patch_moments -> gram_from_cov equals Σ over every output channel (direct_gram_ref)."""
    geo, x, kernel, img, oy, ox, k, _ = _inputs("3x3_pad1_C13", torch.float32, seed=5)
    P, _ = tri.patch_moments_triton(x, geo, img, oy, ox)
    G = tri.gram_from_cov_triton(kernel, P)
    R = gram_ops.direct_gram_ref(x, kernel, geo, img, oy, ox)
    rel = _report("gram_from_cov(patch_moments) vs direct_gram_ref", G, R)
    assert rel <= 1e-4


# ----------------------------------------------------------------- greedy
def _padded_grams(sizes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    C = max(sizes)
    G = torch.zeros(len(sizes), C, C, dtype=dtype)
    for b, n in enumerate(sizes):
        Y = torch.randn(2 * n + 3, n, generator=g, dtype=dtype)
        if n >= 6:  # duplicated channels: equal scores, ties must go to the lower index
            Y[:, n - 1] = Y[:, 2]
            Y[:, n - 2] = Y[:, 0]
        G[b, :n, :n] = Y.T @ Y
        G[b, n:, :] = torch.randn(C - n, C, generator=g, dtype=dtype)  # junk padding, must be ignored
    return G.to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_greedy_remove_batch(dtype):
    sizes = torch.tensor([37, 5, 20, 1, 13, 16])
    n_remove = torch.tensor([36, 4, 11, 0, 13, 7])
    G = _padded_grams(sizes.tolist(), dtype, seed=6)
    order, errors = tri.greedy_remove_triton(G, sizes, n_remove)
    ro, re = _greedy_remove_core_ref(G, sizes, n_remove)
    fin = torch.isfinite(re)
    err = (errors[fin] - re[fin]).abs().max().item()
    print(f"greedy[{dtype}]: orders equal {torch.equal(order, ro)}, max abs error diff {err:.3e}, "
          f"max error {re[fin].abs().max().item():.3e}")
    assert order.dtype == torch.int64 and errors.dtype == dtype
    assert torch.equal(order, ro)
    assert torch.equal(torch.isfinite(errors), fin)
    assert torch.allclose(errors[fin], re[fin], rtol=1e-6 if dtype == torch.float32 else 1e-12)


def test_greedy_remove_public_dispatch_list():
    g = torch.Generator().manual_seed(7)
    mats = []
    for n in (9, 24, 3):
        Y = torch.randn(40, n, generator=g)
        mats.append((Y.T @ Y).to(DEV))
    counts = [8, 20, 2]
    order, errors = greedy_remove(mats, counts, return_errors=True, backend="triton")
    ro, re = greedy_remove_ref(mats, counts, return_errors=True)
    for j in range(len(mats)):
        d = (errors[j] - re[j]).abs().max().item()
        print(f"greedy list[{j}]: orders equal {torch.equal(order[j], ro[j])}, max abs error diff {d:.3e}")
        assert torch.equal(order[j], ro[j])
        assert torch.allclose(errors[j], re[j], rtol=1e-6)


def test_import_without_triton(tmp_path):
    """Importing the package never needs triton; calling a kernel then raises ImportError."""
    import subprocess
    import sys
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import thinet_fast.ops.triton as tri\n"
        "assert not tri.AVAILABLE\n"
        "try:\n"
        "    tri.sampled_gram_triton(None, None, None, None, None, None, None)\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    print(res.stdout, res.stderr)
    assert res.returncode == 0 and "needs triton" in res.stdout


# ----------------------------------------------------------------- whole prune() on both backends
class _ConvKinds(torch.nn.Module):
    """3x3, 1x1, strided and dilated conv consumers, then a Linear after global pooling."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 1)                         # 1x1 consumer of c1
        self.c3 = nn.Conv2d(8, 10, 3, stride=2, padding=1)   # strided consumer of c2
        self.c4 = nn.Conv2d(10, 10, 3, padding=2, dilation=2)  # dilated consumer of c3
        self.c5 = nn.Conv2d(10, 9, 3, padding=1)             # 3x3 consumer of c4
        self.fc = nn.Linear(9, 5)                            # Linear after global pooling

    def forward(self, x):
        for c in (self.c1, self.c2, self.c3, self.c4, self.c5):
            x = torch.relu(c(x))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


class _FlatLinear(torch.nn.Module):
    """A Linear after flatten (4 taps per channel), a Linear -> Linear pair, and a
    Linear -> Linear pair on tokens."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.c1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(6, 7, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(7 * 2 * 2, 12)
        self.fc2 = nn.Linear(12, 4)
        self.tok = nn.Linear(6, 6)   # reads (N, L, 6) tokens of c1's output
        self.tok2 = nn.Linear(6, 4)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        t = self.tok2(torch.relu(self.tok(y.flatten(2).transpose(1, 2)))).mean(1)
        z = torch.relu(self.c2(y.detach() * 1.0))
        return self.fc2(torch.relu(self.fc1(torch.flatten(z, 1)))) + t.sum(1, keepdim=True)


@pytest.mark.parametrize("model_cls", [_ConvKinds, _FlatLinear], ids=["conv-kinds", "flatten-linear"])
@pytest.mark.parametrize("statistics", ["sampled", "full", "direct", "auto"])
def test_prune_same_model_on_triton_and_torch(model_cls, statistics):
    import thinet_fast as tf
    torch.manual_seed(0)
    model = model_cls().eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(6, 3, 8, 8, generator=g) for _ in range(2)]
    kw = dict(keep=0.5, num_images=12, samples_per_image=4, progress=False, statistics=statistics,
              reconstruction="full", bias_compensation=True, schedule="sequential", seed=3)
    a = tf.prune(model, data, backend="torch", **kw)
    b = tf.prune(model, data, backend="triton", **kw)
    used = {u["producer"]: u["statistics_backend"] for u in b.report.units}
    print(used)
    assert [u["producer"] for u in a.report.units] == [u["producer"] for u in b.report.units]
    if statistics != "direct":  # the Triton kernels ran (no direct-mode kernel: torch, and the report says so)
        assert "triton" in used.values()
    else:
        assert set(used.values()) == {"torch"}
    if model_cls is _FlatLinear:  # the Linear on tokens is a unit on both paths
        assert a.plan["tok"].tokens and b.plan["tok"].tokens
    for ua, ub in zip(a.report.units, b.report.units):
        assert ua["kept"] == ub["kept"]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    worst = 0.0
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        if sa[k].is_floating_point():
            worst = max(worst, float((sa[k] - sb[k]).abs().max() / sa[k].abs().max().clamp_min(1e-12)))
    print(f"{model_cls.__name__} {statistics}: max relative weight difference {worst:.2e}")
    assert worst < 1e-4

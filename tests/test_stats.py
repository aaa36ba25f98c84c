"""Statistics (DESIGN.md §2–§3): patches, Gram kernels and the streaming accumulator.

The expected values are built independently: patches with ``F.unfold``, contributions
x̂_{s,k}[c] = Σ_u W[k,c,u] z_s[c,u] with an einsum over the unfold output, and the
consumer output y with the real ``F.conv2d`` / ``F.linear``. Every input is a fresh
random draw (post-ReLU, so it has zeros but is never all zeros); the error is printed
before each assert.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from thinet_fast.ops.gram import (
    add_upper_gram_, direct_gram, direct_gram_ref, gram_from_cov, gram_from_cov_ref, gram_from_covs, gram_from_covs_ref,
    mirror_upper_,
    patch_moments, patch_moments_ref,
    sampled_gram, sampled_gram_ref,
)
from thinet_fast.ops.draws import image_keys, keyed, keyed_locations, position_keys
from thinet_fast.ops.patches import ConsumerGeometry, gather_patches, gather_patches_ref, sample_locations
from thinet_fast.ops.stats import MAX_COV_DIM, StatsAccumulator, choose_mode


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# ------------------------------------------------------------------ the cases
# name -> (geometry kwargs or ("linear", taps), C, K, H, W)
CASES = {
    "conv1x1": (dict(kernel_size=1), 5, 4, 6, 7),
    "conv3x3_pad1": (dict(kernel_size=3, padding=1), 4, 6, 7, 6),
    "conv3x3_stride2": (dict(kernel_size=3, stride=2, padding=1), 5, 3, 9, 8),
    "conv3x3_dil2": (dict(kernel_size=3, dilation=2, padding=2), 3, 5, 8, 9),
    "conv2x3_mixed": (dict(kernel_size=(2, 3), stride=(2, 1), padding=(0, 1), dilation=(1, 2)), 4, 4, 7, 8),
    "linear_pool": (("linear", 1), 7, 5, None, None),
    "linear_flatten": (("linear", 4), 6, 5, 2, 2),
}
BATCHES = (3, 4)


class Case:
    def __init__(self, name: str, seed: int = 0):
        spec, C, K, H, W = CASES[name]
        gen = torch.Generator().manual_seed(1000 + seed + 17 * len(name))
        self.name, self.C, self.K = name, C, K
        if isinstance(spec, tuple):
            self.t = spec[1]
            self.geo = ConsumerGeometry.dense(self.t)
            self.linear = True
            self.weight = torch.randn(K, C * self.t, generator=gen)
            shape = lambda n: (n, C * self.t)  # noqa: E731
        else:
            self.geo = ConsumerGeometry.conv(**spec)
            self.linear = False
            self.t = self.geo.taps
            self.weight = torch.randn(K, C, *self.geo.kernel_size, generator=gen)
            shape = lambda n: (n, C, H, W)  # noqa: E731
        # post-ReLU inputs with a non-zero mean and plenty of exact zeros
        self.batches = [torch.relu(torch.randn(*shape(n), generator=gen) + 0.3) for n in BATCHES]

    def explicit(self, x: torch.Tensor):
        """(Z (N, L, C, t), x̂ (N, L, K, C), y (N, L, K)) in float64; y from the real layer."""
        xd, Wd = x.double(), self.weight.double()
        N, C, K, t = x.shape[0], self.C, self.K, self.t
        if self.linear:
            Z = xd.reshape(N, 1, C, t)
            y = F.linear(xd, Wd).reshape(N, 1, K)
        else:
            g = self.geo
            cols = F.unfold(xd, g.kernel_size, dilation=g.dilation, padding=g.padding, stride=g.stride)
            Z = cols.reshape(N, C, t, -1).permute(0, 3, 1, 2)
            out = F.conv2d(xd, Wd, stride=g.stride, padding=g.padding, dilation=g.dilation)
            y = out.reshape(N, K, -1).permute(0, 2, 1)
        xhat = torch.einsum("nlcu,kcu->nlkc", Z, Wd.reshape(K, C, t))
        return Z, xhat, y

    def n_locations(self) -> int:
        return self.explicit(self.batches[0][:1])[0].shape[1]


def replay(seed, case: Case, per_image, mode, R=None):
    """The accumulator's draws, made again from the same keys (fed without image keys,
    an image's key comes from its position in the stream): per image, per_image
    positions (with replacement), then one output per sample (sampled) or R (direct)."""
    L = case.n_locations()
    out, seen = [], 0
    for x in case.batches:
        N = x.shape[0]
        keys = position_keys(seen + torch.arange(N))
        seen += N
        if per_image is None:
            img, pos = torch.arange(N).repeat_interleave(L), torch.arange(L).repeat(N)
        else:
            img = torch.arange(N).repeat_interleave(per_image)
            pos = (keyed(keys, seed, "location", per_image) % L).reshape(-1)
        per = img.numel() // N
        k = None
        if mode == "sampled":
            k = (keyed(keys, seed, "output", per) % case.K).reshape(-1)
        elif mode == "direct" and R is not None:
            k = (keyed(keys, seed, "outputs", per * R) % case.K).reshape(-1, R)
        out.append((img, pos, k))
    return out


def accumulate(case: Case, **kw) -> StatsAccumulator:
    acc = StatsAccumulator(case.weight, case.geo, **kw)
    for x in case.batches:
        acc.update(x)
    return acc


ALL = list(CASES)


def test_explicit_contributions_sum_to_the_real_layer_output():
    for name in ALL:
        case = Case(name)
        _, xhat, y = case.explicit(case.batches[0])
        err = rel(xhat.sum(-1), y)
        print(f"{name}: Σ_c x̂ vs F.conv2d/F.linear output rel err {err:.2e}")
        assert err < 1e-12


# ------------------------------------------------------------------ sampled
@pytest.mark.parametrize("name", ALL)
def test_sampled_accumulator_equals_explicit_unfold(name):
    case = Case(name)
    L = 6
    seed = 41
    stats = accumulate(case, statistics="sampled", samples_per_image=L, seed=seed, acc_dtype=torch.float64).result()
    rows, ys, zs = [], [], []
    for x, (img, pos, k) in zip(case.batches, replay(seed, case, L, "sampled")):
        Z, xhat, y = case.explicit(x)
        rows.append(xhat[img, pos, k])   # (S, C): X
        ys.append(y[img, pos, k])        # (S,): the real layer's bias-free output
        zs.append(Z[img, pos])
    X, yv, Zs = torch.cat(rows), torch.cat(ys), torch.cat(zs)
    G_exp = X.T @ X
    e_g = rel(stats.gram, G_exp)
    e_xy = rel(stats.gram.sum(1), X.T @ yv)
    e_yy = abs(float(stats.gram.sum()) - float(yv @ yv)) / float(yv @ yv)
    e_mu = rel(stats.mean, Zs.mean(0))
    print(f"{name}: G err {e_g:.2e}, G·1 vs Xᵀy {e_xy:.2e}, 1ᵀG1 vs yᵀy {e_yy:.2e}, mean err {e_mu:.2e}, "
          f"count {stats.count} vs {X.shape[0]}, mode {stats.mode}")
    assert stats.mode == "sampled"
    assert stats.count == X.shape[0] == stats.patch_count
    assert e_g < 1e-12 and e_xy < 1e-12 and e_yy < 1e-12 and e_mu < 1e-12


@pytest.mark.parametrize("name", ALL)
def test_sampled_gram_op_with_explicit_indices(name):
    """The op itself on indices we choose (corners included), against unfold."""
    case = Case(name, seed=1)
    x = case.batches[1]
    Z, xhat, y = case.explicit(x)
    N, L = x.shape[0], Z.shape[1]
    gen = torch.Generator().manual_seed(5)
    S = 40
    img = torch.randint(N, (S,), generator=gen)
    pos = torch.randint(L, (S,), generator=gen)
    pos[:2] = torch.tensor([0, L - 1])  # the padded corners
    k = torch.randint(case.K, (S,), generator=gen)
    ow = 1 if case.linear else case.geo.out_size(x.shape[2], x.shape[3])[1]
    kernel = case.geo.as_kernel(case.weight)
    xm = case.geo.as_map(x)
    G = sampled_gram(xm.double(), kernel, case.geo, img, pos // ow, pos % ow, k, acc_dtype=torch.float64)
    X = xhat[img, pos, k]
    e = rel(G, X.T @ X)
    e_y = rel(G.sum(1), X.T @ y[img, pos, k])
    print(f"{name}: sampled_gram vs unfold XᵀX {e:.2e}, G·1 vs Xᵀy {e_y:.2e}")
    assert e < 1e-12 and e_y < 1e-12


# ------------------------------------------------------------------ full
@pytest.mark.parametrize("per_image", [None, 5])
@pytest.mark.parametrize("name", ALL)
def test_full_accumulator_equals_all_k_explicit(name, per_image):
    case = Case(name, seed=2)
    seed = 43
    stats = accumulate(case, statistics="full", samples_per_image=per_image, seed=seed, acc_dtype=torch.float64).result()
    if case.linear:
        per_image = None  # one location per image: every sample is taken
    G_exp = torch.zeros(case.C, case.C, dtype=torch.float64)
    P_exp = torch.zeros(case.C * case.t, case.C * case.t, dtype=torch.float64)
    xy = torch.zeros(case.C, dtype=torch.float64)
    yy, S = 0.0, 0
    for x, (img, pos, _) in zip(case.batches, replay(seed, case, per_image, "full")):
        Z, xhat, y = case.explicit(x)
        Xall = xhat[img, pos].reshape(-1, case.C)   # every output k of each sample
        yall = y[img, pos].reshape(-1)
        G_exp += Xall.T @ Xall
        xy += Xall.T @ yall
        yy += float(yall @ yall)
        Zf = Z[img, pos].reshape(img.numel(), -1)
        P_exp += Zf.T @ Zf
        S += img.numel()
    e_g, e_p = rel(stats.gram, G_exp), rel(stats.cov, P_exp)
    e_xy = rel(stats.gram.sum(1), xy)
    e_yy = abs(float(stats.gram.sum()) - yy) / yy
    print(f"{name} per_image={per_image}: G err {e_g:.2e}, P err {e_p:.2e}, G·1 vs Xᵀy {e_xy:.2e}, "
          f"1ᵀG1 vs yᵀy {e_yy:.2e}, count {stats.count} vs {S * case.K}")
    assert stats.count == S * case.K and stats.patch_count == S
    assert e_g < 1e-12 and e_p < 1e-12 and e_xy < 1e-12 and e_yy < 1e-12


# ------------------------------------------------------------------ direct
@pytest.mark.parametrize("name", ALL)
def test_direct_equals_full_on_the_same_locations(name):
    case = Case(name, seed=3)
    full = accumulate(case, statistics="full", samples_per_image=4, seed=7, acc_dtype=torch.float64).result()
    direct = accumulate(case, statistics="direct", samples_per_image=4, seed=7, acc_dtype=torch.float64).result()
    e = rel(direct.gram, full.gram)
    e_mu = rel(direct.mean, full.mean)
    print(f"{name}: direct vs full G {e:.2e}, mean {e_mu:.2e}, counts {direct.count}/{full.count}")
    assert direct.count == full.count
    assert e < 1e-12 and e_mu < 1e-12


@pytest.mark.parametrize("name", ["conv3x3_pad1", "conv2x3_mixed", "linear_flatten"])
def test_direct_sampled_outputs_equal_explicit(name):
    case = Case(name, seed=4)
    R, seed, per_image = 3, 11, 5
    stats = accumulate(case, statistics="direct", samples_per_image=per_image, outputs_per_sample=R,
                       seed=seed, acc_dtype=torch.float64).result()
    if case.linear:
        per_image = None
    G_exp = torch.zeros(case.C, case.C, dtype=torch.float64)
    S = 0
    for x, (img, pos, k) in zip(case.batches, replay(seed, case, per_image, "direct", R)):
        _, xhat, _ = case.explicit(x)
        X = xhat[img[:, None], pos[:, None], k].reshape(-1, case.C)
        G_exp += X.T @ X
        S += img.numel()
    e = rel(stats.gram, G_exp)
    print(f"{name}: direct with R={R} vs explicit {e:.2e}, count {stats.count} vs {S * R}")
    assert stats.count == S * R
    assert e < 1e-12


# ------------------------------------------------------------------ precision, seeds
@pytest.mark.parametrize("mode", ["sampled", "full", "direct"])
def test_float32_accumulation_agrees_with_float64(mode):
    for name in ("conv3x3_pad1", "linear_flatten"):
        case = Case(name, seed=5)
        a = accumulate(case, statistics=mode, samples_per_image=8, seed=3, acc_dtype=torch.float32).result()
        b = accumulate(case, statistics=mode, samples_per_image=8, seed=3, acc_dtype=torch.float64).result()
        e, e_mu = rel(a.gram, b.gram), rel(a.mean, b.mean)
        print(f"{mode} {name}: float32 vs float64 G rel diff {e:.2e}, mean {e_mu:.2e}")
        assert a.gram.dtype == torch.float32 and b.gram.dtype == torch.float64
        assert e < 1e-5 and e_mu < 1e-5


@pytest.mark.parametrize("mode", ["sampled", "full", "direct"])
def test_seed_determinism(mode):
    case = Case("conv3x3_stride2", seed=6)
    kw = dict(statistics=mode, samples_per_image=3, outputs_per_sample=2 if mode == "direct" else None)
    a = accumulate(case, seed=123, **kw).result()
    b = accumulate(case, seed=123, **kw).result()
    c = accumulate(case, seed=124, **kw).result()
    d = float((a.gram - c.gram).abs().max())
    print(f"{mode}: same seed identical {torch.equal(a.gram, b.gram)}, other seed max diff {d:.3g}")
    assert torch.equal(a.gram, b.gram) and torch.equal(a.patch_sum, b.patch_sum)
    assert d > 0


# ------------------------------------------------------------------ merging
def _buffers(acc: StatsAccumulator):
    r = acc.result()
    return r, (r.count, r.patch_count, r.elements, acc.images_seen)


@pytest.mark.parametrize("mode", ["sampled", "full", "direct"])
@pytest.mark.parametrize("name", ["conv3x3_pad1", "linear_flatten"])
def test_merge_is_exact_additivity(name, mode):
    case = Case(name, seed=7)
    kw = dict(statistics=mode, samples_per_image=4, acc_dtype=torch.float64)
    a = StatsAccumulator(case.weight, case.geo, seed=1, **kw)
    b = StatsAccumulator(case.weight, case.geo, seed=2, **kw)
    a.update(case.batches[0])
    b.update(case.batches[1])
    (ra, ca), (rb, cb) = _buffers(a), _buffers(b)
    s = a + b
    rs, cs = _buffers(s)
    e_g = rel(rs.gram, ra.gram + rb.gram)
    e_cov = rel(rs.cov, ra.cov + rb.cov) if mode == "full" else 0.0
    print(f"{name} {mode}: (a+b).gram vs a.gram+b.gram {e_g:.2e}, cov {e_cov:.2e}, counts {cs} vs {ca}+{cb}")
    assert e_g < 1e-13 and e_cov < 1e-13
    assert cs == tuple(x + y for x, y in zip(ca, cb))
    assert torch.equal(rs.zeros, ra.zeros + rb.zeros)
    assert torch.allclose(rs.patch_sum, ra.patch_sum + rb.patch_sum, rtol=1e-14, atol=0)
    # + leaves its operands alone; merge adds in place and gives the same
    assert torch.equal(_buffers(a)[0].gram, ra.gram) and _buffers(a)[1] == ca
    a.merge(b)
    rm, cm = _buffers(a)
    print(f"merge in place vs +: max diff {float((rm.gram - rs.gram).abs().max()):.2e}")
    assert torch.equal(rm.gram, rs.gram) and cm == cs


@pytest.mark.parametrize("name", ["conv3x3_dil2", "linear_pool"])
def test_merge_equals_one_pass_when_sampling_is_deterministic(name):
    """Every location and every output (full mode, per_image=None) draws nothing, so
    two halves merged must equal one accumulator fed both halves."""
    case = Case(name, seed=8)
    kw = dict(statistics="full", samples_per_image=None, acc_dtype=torch.float64)
    one = accumulate(case, **kw)
    a = StatsAccumulator(case.weight, case.geo, **kw)
    b = StatsAccumulator(case.weight, case.geo, seed=99, **kw)
    a.update(case.batches[0])
    b.update(case.batches[1])
    r1, rm = one.result(), (a + b).result()
    e = rel(rm.gram, r1.gram)
    print(f"{name}: merged halves vs one pass G {e:.2e}, mean {rel(rm.mean, r1.mean):.2e}")
    assert e < 1e-13 and rel(rm.mean, r1.mean) < 1e-13 and rm.count == r1.count


@pytest.mark.parametrize("mode", ["sampled", "full"])
def test_tensors_round_trip_and_allreduce(mode):
    case = Case("conv3x3_stride2", seed=9)
    kw = dict(statistics=mode, samples_per_image=5, acc_dtype=torch.float64)
    a = StatsAccumulator(case.weight, case.geo, seed=3, **kw)
    b = StatsAccumulator(case.weight, case.geo, seed=4, **kw)
    a.update(case.batches[0])
    b.update(case.batches[1])
    fresh = StatsAccumulator(case.weight, case.geo, **kw)
    fresh.load_tensors([t.clone() for t in a.tensors()])
    (ra, ca), (rf, cf) = _buffers(a), _buffers(fresh)
    print(f"{mode}: round trip counts {cf} vs {ca}, gram equal {torch.equal(rf.gram, ra.gram)}")
    assert cf == ca and torch.equal(rf.gram, ra.gram) and torch.equal(rf.patch_sum, ra.patch_sum)
    assert torch.equal(rf.zeros, ra.zeros)
    # a simulated all-reduce: sum the buffer lists, load them, compare with a + b
    summed = [x + y for x, y in zip(a.tensors(), b.tensors())]
    red = StatsAccumulator(case.weight, case.geo, **kw)
    red.load_tensors(summed)
    (rr, cr), (rs, cs) = _buffers(red), _buffers(a + b)
    e = rel(rr.gram, rs.gram)
    print(f"{mode}: all-reduced vs a+b: G {e:.2e}, counts {cr} vs {cs}")
    assert e < 1e-14 and cr == cs


def test_merge_refuses_incompatible_accumulators():
    case = Case("conv3x3_pad1")
    a = StatsAccumulator(case.weight, case.geo, statistics="sampled")
    for other in (StatsAccumulator(case.weight, case.geo, statistics="full"),
                  StatsAccumulator(case.weight, case.geo, statistics="sampled", acc_dtype=torch.float64),
                  StatsAccumulator(case.weight[:2], case.geo, statistics="sampled")):
        with pytest.raises(ValueError, match="merged") as info:
            a.merge(other)
        print(info.value)


def test_with_cov_keeps_the_patch_covariance():
    if "with_cov" not in StatsAccumulator.__dataclass_fields__:
        pytest.skip("StatsAccumulator has no with_cov option")
    case = Case("conv3x3_pad1", seed=10)
    full = accumulate(case, statistics="full", samples_per_image=4, seed=5, acc_dtype=torch.float64).result()
    direct = accumulate(case, statistics="direct", samples_per_image=4, seed=5, acc_dtype=torch.float64,
                        with_cov=True).result()
    e = rel(direct.cov, full.cov)
    print(f"direct(with_cov) P vs full P on the same locations: {e:.2e}")
    assert e < 1e-13


# ------------------------------------------------------------------ APoZ
@pytest.mark.parametrize("name", ALL)
def test_zero_fraction_is_the_per_channel_mean_of_x_eq_0(name):
    case = Case(name, seed=11)
    stats = accumulate(case, statistics="sampled", samples_per_image=2).result()
    if case.linear:
        z = torch.cat([(x.reshape(x.shape[0], case.C, case.t) == 0) for x in case.batches])
        exp = z.double().mean(dim=(0, 2))
    else:
        z = torch.cat([(x == 0) for x in case.batches])
        exp = z.double().mean(dim=(0, 2, 3))
    e = float((stats.zero_fraction - exp).abs().max())
    print(f"{name}: APoZ {stats.zero_fraction.tolist()} vs explicit, max diff {e:.2e}")
    assert 0 < float(exp.mean()) < 1
    assert e < 1e-15


# ------------------------------------------------------------------ ops: fast vs ref
def _random_indices(x, geo, S, gen, K=None):
    N = x.shape[0]
    oh, ow = geo.out_size(x.shape[2], x.shape[3])
    img = torch.randint(N, (S,), generator=gen)
    oy = torch.randint(oh, (S,), generator=gen)
    ox = torch.randint(ow, (S,), generator=gen)
    return img, oy, ox


@pytest.mark.parametrize("name", ALL)
def test_fast_ops_equal_their_refs(name):
    case = Case(name, seed=12)
    gen = torch.Generator().manual_seed(77)
    x = case.geo.as_map(case.batches[1])
    kernel = case.geo.as_kernel(case.weight)
    img, oy, ox = _random_indices(x, case.geo, 37, gen)
    k = torch.randint(case.K, (37,), generator=gen)
    kR = torch.randint(case.K, (37, 3), generator=gen)
    errs = {
        "gather_patches": rel(gather_patches(x, case.geo, img, oy, ox), gather_patches_ref(x, case.geo, img, oy, ox)),
        "sampled_gram": rel(sampled_gram(x, kernel, case.geo, img, oy, ox, k),
                            sampled_gram_ref(x, kernel, case.geo, img, oy, ox, k)),
        "sampled_gram64": rel(sampled_gram(x, kernel, case.geo, img, oy, ox, k, acc_dtype=torch.float64),
                              sampled_gram_ref(x, kernel, case.geo, img, oy, ox, k, acc_dtype=torch.float64)),
        "direct_gram": rel(direct_gram(x, kernel, case.geo, img, oy, ox),
                           direct_gram_ref(x, kernel, case.geo, img, oy, ox)),
        "direct_gram_R": rel(direct_gram(x, kernel, case.geo, img, oy, ox, kR),
                             direct_gram_ref(x, kernel, case.geo, img, oy, ox, kR)),
    }
    P, zs = patch_moments(x, case.geo, img, oy, ox)
    P_ref, zs_ref = patch_moments_ref(x, case.geo, img, oy, ox)
    errs["patch_moments_P"], errs["patch_moments_sum"] = rel(P, P_ref), rel(zs, zs_ref)
    P_sym = (P_ref.double() + P_ref.double().T) / 2  # the op reads the upper half of a symmetric P
    errs["gram_from_cov"] = rel(gram_from_cov(kernel, P_sym), gram_from_cov_ref(kernel, P_sym))
    print(name, {k_: f"{v:.1e}" for k_, v in errs.items()})
    assert errs.pop("gather_patches") == 0.0
    for key, v in errs.items():
        assert v < (1e-12 if key in ("sampled_gram64", "gram_from_cov") else 1e-5), key


def test_chunked_op_paths_equal_refs(monkeypatch):
    """Force many small chunks so the chunk loop itself is exercised."""
    from thinet_fast.ops import gram as gram_mod
    monkeypatch.setattr(gram_mod, "_CHUNK_ELEMS", 64)
    case = Case("conv3x3_pad1", seed=13)
    x = case.batches[1]
    gen = torch.Generator().manual_seed(3)
    img, oy, ox = _random_indices(x, case.geo, 50, gen)
    k = torch.randint(case.K, (50,), generator=gen)
    e1 = rel(sampled_gram(x, case.weight, case.geo, img, oy, ox, k, acc_dtype=torch.float64),
             sampled_gram_ref(x, case.weight, case.geo, img, oy, ox, k, acc_dtype=torch.float64))
    e2 = rel(direct_gram(x, case.weight, case.geo, img, oy, ox, acc_dtype=torch.float64),
             direct_gram_ref(x, case.weight, case.geo, img, oy, ox, acc_dtype=torch.float64))
    P, _ = patch_moments(x, case.geo, img, oy, ox, acc_dtype=torch.float64)
    e3 = rel(P, patch_moments_ref(x, case.geo, img, oy, ox, acc_dtype=torch.float64)[0])
    print(f"chunked: sampled {e1:.2e}, direct {e2:.2e}, moments {e3:.2e}")
    assert max(e1, e2, e3) < 1e-12


# ------------------------------------------------------------------ refs vs brute force
def _brute_patch(x, geo, n, oy, ox):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel_size, geo.stride, geo.padding, geo.dilation
    C, H, W = x.shape[1:]
    z = torch.zeros(C, kh * kw, dtype=torch.float64)
    for c in range(C):
        for i in range(kh):
            for j in range(kw):
                r, q = oy * sh - ph + i * dh, ox * sw - pw + j * dw
                if 0 <= r < H and 0 <= q < W:
                    z[c, i * kw + j] = float(x[n, c, r, q])
    return z


@pytest.mark.parametrize("name", ["conv3x3_stride2", "conv2x3_mixed", "conv3x3_dil2"])
def test_refs_equal_brute_force_loops(name):
    case = Case(name, seed=14)
    x = case.batches[0][:2]
    Wk = case.weight.double().reshape(case.K, case.C, -1)
    gen = torch.Generator().manual_seed(9)
    img, oy, ox = _random_indices(x, case.geo, 6, gen)
    k = torch.randint(case.K, (6,), generator=gen)
    Zb = torch.stack([_brute_patch(x, case.geo, int(n), int(a), int(b)) for n, a, b in zip(img, oy, ox)])
    e_patch = rel(gather_patches_ref(x.double(), case.geo, img, oy, ox), Zb)
    # x̂ by loops, then the three Gram flavours
    Xs = torch.zeros(6, case.C, dtype=torch.float64)
    Xall = torch.zeros(6, case.K, case.C, dtype=torch.float64)
    for s in range(6):
        for c in range(case.C):
            for kk in range(case.K):
                Xall[s, kk, c] = sum(float(Wk[kk, c, u]) * float(Zb[s, c, u]) for u in range(case.t))
            Xs[s, c] = Xall[s, int(k[s]), c]
    Gs = torch.zeros(case.C, case.C, dtype=torch.float64)
    Gd = torch.zeros(case.C, case.C, dtype=torch.float64)
    for s in range(6):
        Gs += torch.outer(Xs[s], Xs[s])
        for kk in range(case.K):
            Gd += torch.outer(Xall[s, kk], Xall[s, kk])
    D = case.C * case.t
    P = torch.zeros(D, D, dtype=torch.float64)
    for s in range(6):
        v = Zb[s].reshape(-1)
        for i in range(D):
            for j in range(D):
                P[i, j] += float(v[i]) * float(v[j])
    Gc = torch.zeros(case.C, case.C, dtype=torch.float64)
    for c in range(case.C):
        for d in range(case.C):
            Gc[c, d] = sum(float(Wk[kk, c, u] * Wk[kk, d, v] * P[c * case.t + u, d * case.t + v])
                           for kk in range(case.K) for u in range(case.t) for v in range(case.t))
    errs = {
        "gather_patches_ref": e_patch,
        "sampled_gram_ref": rel(sampled_gram_ref(x, case.weight, case.geo, img, oy, ox, k, acc_dtype=torch.float64), Gs),
        "direct_gram_ref": rel(direct_gram_ref(x, case.weight, case.geo, img, oy, ox, acc_dtype=torch.float64), Gd),
        "patch_moments_ref": rel(patch_moments_ref(x, case.geo, img, oy, ox, acc_dtype=torch.float64)[0], P),
        "gram_from_cov_ref": rel(gram_from_cov_ref(case.weight, P), Gc),
        "gram_from_cov_ref_vs_direct": rel(Gc, Gd),
    }
    print(name, {k_: f"{v:.1e}" for k_, v in errs.items()})
    for key, v in errs.items():
        assert v < 1e-12, key


def test_sample_locations_cover_every_position_and_stay_in_range():
    gen = torch.Generator().manual_seed(2)
    img, oy, ox = sample_locations(gen, 3, (4, 5), None, image_offset=7)
    cells = set(zip(img.tolist(), oy.tolist(), ox.tolist()))
    print(f"all-locations mode: {len(cells)} distinct cells of {3 * 20}")
    assert len(cells) == 60 and min(img.tolist()) == 7 and max(img.tolist()) == 9
    img, oy, ox = sample_locations(gen, 50, (4, 5), 7)
    print(f"sampled: oy in [{int(oy.min())}, {int(oy.max())}], ox in [{int(ox.min())}, {int(ox.max())}]")
    assert img.numel() == 350 and int(oy.max()) < 4 and int(ox.max()) < 5 and int(oy.min()) >= 0
    assert torch.equal(torch.bincount(img), torch.full((50,), 7))


# ------------------------------------------------------------------ mode choice, errors
def test_choose_mode_cost_model():
    for C, t in [(64, 9), (512, 9), (512, 49), (4096, 1), (100, 100)]:
        mode = choose_mode(C, t)
        print(f"C={C} t={t}: (C·t)={C * t} -> {mode}")
        assert mode == ("full" if C * t <= MAX_COV_DIM else "direct")
    assert choose_mode(10, 10, max_cov_dim=99) == "direct" and choose_mode(10, 10, max_cov_dim=100) == "full"


def test_bad_inputs_raise_with_the_argument_named():
    case = Case("conv3x3_pad1")
    lin = Case("linear_flatten")
    cases = [
        (lambda: StatsAccumulator(case.weight, case.geo, statistics="bogus"), ValueError, "mode"),
        (lambda: StatsAccumulator(case.weight, case.geo, acc_dtype=torch.float16), ValueError, "dtype"),
        (lambda: StatsAccumulator(case.weight, case.geo, samples_per_image=0), ValueError, "samples_per_image"),
        (lambda: StatsAccumulator(case.weight, case.geo, statistics="direct", outputs_per_sample=0), ValueError,
         "outputs_per_sample"),
        (lambda: StatsAccumulator(case.weight, case.geo, samples_per_image=None), ValueError, "samples_per_image"),
        (lambda: StatsAccumulator(case.weight[:, :, :2], case.geo), ValueError, "weight"),
        (lambda: StatsAccumulator(case.weight, case.geo).update(case.batches[0][:, :2]), ValueError, "channels"),
        (lambda: StatsAccumulator(case.weight, case.geo).update(case.batches[0][0]), ValueError, "input"),
        (lambda: StatsAccumulator(lin.weight, lin.geo).update(lin.batches[0][:, :-1]), ValueError, "input"),
        (lambda: StatsAccumulator(lin.weight[:, :-1], lin.geo), ValueError, "weight"),
        (lambda: StatsAccumulator(case.weight, ConsumerGeometry.conv(3)).update(case.batches[0][:, :, :2, :2]),
         ValueError, "receptive field"),
        (lambda: ConsumerGeometry.conv(0), ValueError, "geometry"),
        (lambda: ConsumerGeometry.conv(3, padding=-1), ValueError, "geometry"),
        (lambda: ConsumerGeometry.conv(3, padding="same"), ValueError, "padding"),
        (lambda: ConsumerGeometry.conv((3, 3, 3)), ValueError, "pair"),
    ]
    for j, (call, exc, pattern) in enumerate(cases):
        with pytest.raises(exc, match=pattern) as info:
            call()
        print(f"case {j}: {exc.__name__}: {info.value}")


def test_gram_from_covs_matches_its_reference():
    gen = torch.Generator().manual_seed(21)
    kernel = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64)
    Zs = [torch.relu(torch.randn(n, 36, generator=gen, dtype=torch.float64)) for n in (7, 30)]
    Ps = [Z.T @ Z for Z in Zs]
    got, want = gram_from_covs(kernel, Ps, backend="torch"), gram_from_covs_ref(kernel, Ps)
    errs = [rel(g, w) for g, w in zip(got, want)]
    print("gram_from_covs errors", errs)
    assert len(got) == 2 and max(errs) < 1e-12
    assert gram_from_covs(kernel, []) == []


def test_upper_gram_and_mirror_match_the_full_product():
    gen = torch.Generator().manual_seed(8)
    Z = torch.randn(37, 1100, generator=gen, dtype=torch.float64)
    P0 = torch.randn(1100, 1100, generator=gen, dtype=torch.float64)
    P0 = P0 + P0.T
    P = add_upper_gram_(P0.clone(), Z, block=256)
    full = P0 + Z.T @ Z
    err_upper = (P.triu() - full.triu()).abs().max().item()
    blk = torch.arange(1100) // 256
    below = blk[:, None] > blk[None, :]  # the blocks under the diagonal blocks
    err_lower = (P - P0)[below].abs().max().item()
    err_mirror = (mirror_upper_(P, block=256) - full).abs().max().item()
    print("upper", err_upper, "lower untouched", err_lower, "mirrored", err_mirror)
    assert err_upper < 1e-10 and err_lower == 0.0 and err_mirror < 1e-10


def test_gram_from_covs_takes_patches_block_by_block():
    gen = torch.Generator().manual_seed(12)
    kernel = torch.randn(5, 300, 3, 3, generator=gen, dtype=torch.float64)  # C·t = 2700: several blocks
    Zs = [torch.relu(torch.randn(n, 2700, generator=gen, dtype=torch.float64)) for n in (9, 40)]
    P = Zs[0].T @ Zs[0]
    got = gram_from_covs(kernel, [P], patches=Zs, backend="torch")
    want = gram_from_covs_ref(kernel, [P], patches=Zs)
    errs = [rel(g, w) for g, w in zip(got, want)]
    print("gram_from_covs with patches", errs)
    assert len(got) == 3 and max(errs) < 1e-12 and all(torch.equal(g, g.T) for g in got)


def test_older_argument_names_are_aliases():
    """``mode=``/``dtype=`` (older names) build the same accumulator as
    ``statistics=``/``acc_dtype=``; giving both names is an error."""
    case = Case("conv3x3_pad1")
    old = accumulate(case, mode="full", dtype=torch.float64, samples_per_image=3, seed=2)
    new = accumulate(case, statistics="full", acc_dtype=torch.float64, samples_per_image=3, seed=2)
    a, b = old.result(), new.result()
    print("max |G_old - G_new|", (a.gram - b.gram).abs().max().item())
    assert old.statistics == "full" and old.acc_dtype == torch.float64 and a.gram.dtype == torch.float64
    assert torch.equal(a.gram, b.gram) and a.mode == a.statistics == "full" and old.mode == "full"
    with pytest.raises(TypeError, match="acc_dtype"):
        StatsAccumulator(case.weight, case.geo, acc_dtype=torch.float64, dtype=torch.float32)

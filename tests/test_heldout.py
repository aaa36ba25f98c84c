"""The held-out fold (DESIGN.md §5): regularisation chosen from data the fit did not see.

The accumulator's fold is checked against accumulators fed only the held-out or only the
other images (every location, so no sampling differs); the ridge search against a brute
force on explicit patch matrices; and whole prunes on scarce data against the real layer
outputs on fresh images, where a tiny fixed ridge interpolates the calibration samples.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import thinet_fast as tf
from thinet_fast.ops.draws import image_keys, keyed
from thinet_fast.ops.gram import gram_from_cov
from thinet_fast.ops.patches import ConsumerGeometry
from thinet_fast.ops.reconstruct import RIDGES, heldout_error, refit_full, refit_full_cv, refit_full_dual
from thinet_fast.ops.stats import StatsAccumulator


def _acc(weight, geo, batches, **kw):
    acc = StatsAccumulator(weight, geo, dtype=torch.float64, **kw)
    for x in batches:
        acc.update(x, image_keys(x))  # keyed by content, as the pipeline feeds it
    return acc


def _fold_of(x, every, seed=0):
    """Indices of the images the fold takes: about one in ``every``, by image key."""
    held = keyed(image_keys(x), seed, "holdout", 1)[:, 0] % every == 0
    return held.nonzero().squeeze(1).tolist()


# ------------------------------------------------------------------ the fold
@pytest.mark.parametrize("mode", ["full", "direct"])
def test_fold_is_chosen_by_image_key_and_totals_are_unchanged(mode):
    gen = torch.Generator().manual_seed(11)
    if mode == "full":
        geo, weight = ConsumerGeometry.conv(3, padding=1), torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64)
        x = torch.relu(torch.randn(13, 4, 6, 6, generator=gen, dtype=torch.float64))
    else:
        geo, weight = ConsumerGeometry.dense(6), torch.randn(7, 4 * 6, generator=gen, dtype=torch.float64)
        x = torch.relu(torch.randn(13, 4 * 6, generator=gen, dtype=torch.float64))
    batches = [x[:4], x[4:9], x[9:]]
    kw = dict(mode=mode, samples_per_image=None)
    acc = _acc(weight, geo, batches, holdout_every=3, **kw)
    held_idx = _fold_of(x, 3)
    rest_idx = [i for i in range(13) if i not in held_idx]
    assert 0 < len(held_idx) < 13
    # a whole-batch feed holds out the same images as the three batches
    assert _acc(weight, geo, [x], holdout_every=3, **kw).result().heldout.images == len(held_idx)
    plain = _acc(weight, geo, batches, holdout_every=0, **kw).result()
    held_only = _acc(weight, geo, [x[held_idx]], holdout_every=0, **kw).result()
    rest_only = _acc(weight, geo, [x[rest_idx]], holdout_every=0, **kw).result()
    st = acc.result()
    err_total = (st.gram - plain.gram).abs().max().item()
    err_held = ((st.heldout.gram - held_only.gram).abs().max() / held_only.gram.abs().max()).item()
    print(f"{mode}: total {err_total:.2e}, held gram {err_held:.2e}, images {st.heldout.images}")
    assert err_total == 0.0
    assert st.heldout.images == len(held_idx) and err_held < 1e-12
    assert st.heldout.count == held_only.count
    if mode == "full":
        Z = st.heldout.patches
        P_rest = st.cov - Z.T @ Z
        err_rest = ((P_rest - rest_only.cov).abs().max() / rest_only.cov.abs().max()).item()
        print(f"fit-fold P error {err_rest:.2e}")
        assert Z.shape[0] == held_only.patch_count and err_rest < 1e-12


def test_fold_gram_on_a_wide_consumer():
    """C·t = 2304: P and G are formed in several blocks (symmetric updates), which must
    still give the held-out fold's exact Gram."""
    gen = torch.Generator().manual_seed(5)
    geo, weight = ConsumerGeometry.conv(3, padding=1), torch.randn(6, 256, 3, 3, generator=gen, dtype=torch.float64)
    x = torch.relu(torch.randn(6, 256, 4, 4, generator=gen, dtype=torch.float64))
    kw = dict(mode="full", samples_per_image=None)
    st = _acc(weight, geo, [x[:3], x[3:]], holdout_every=2, **kw).result()
    assert 0 < len(_fold_of(x, 2)) < 6
    held_only = _acc(weight, geo, [x[_fold_of(x, 2)]], holdout_every=0, **kw).result()
    plain = _acc(weight, geo, [x], holdout_every=0, **kw).result()
    err_held = ((st.heldout.gram - held_only.gram).abs().max() / held_only.gram.abs().max()).item()
    err_total = ((st.gram - plain.gram).abs().max() / plain.gram.abs().max()).item()
    err_cov = ((st.cov - plain.cov).abs().max() / plain.cov.abs().max()).item()
    print(f"held gram {err_held:.2e}, total gram {err_total:.2e}, P {err_cov:.2e}")
    assert err_held < 1e-12 and err_total < 1e-12 and err_cov < 1e-12
    assert torch.equal(st.cov, st.cov.T)


def test_fold_stops_at_holdout_max_and_merges():
    gen = torch.Generator().manual_seed(3)
    geo, weight = ConsumerGeometry.conv(3, padding=1), torch.randn(4, 3, 3, 3, generator=gen)
    x = torch.relu(torch.randn(20, 3, 8, 8, generator=gen))
    acc = _acc(weight, geo, [x[:10], x[10:]], mode="full", samples_per_image=4, holdout_every=2, holdout_max=18)
    st = acc.result()
    print("held images", st.heldout.images, "samples", st.heldout.samples, "of", len(_fold_of(x, 2)))
    assert len(_fold_of(x, 2)) > 4
    assert st.heldout.images == 4 and st.heldout.samples == 16  # a fifth image would pass 18 samples
    y = torch.relu(torch.randn(6, 3, 8, 8, generator=gen))
    other = _acc(weight, geo, [y], mode="full", samples_per_image=4, holdout_every=2, seed=5)
    n_other = len(_fold_of(y, 2, seed=5))
    merged = acc.merge(other).result()
    assert merged.heldout.images == 4 + n_other and merged.heldout.samples == 16 + 4 * n_other


def test_holdout_arguments_are_checked():
    geo, weight = ConsumerGeometry.conv(1), torch.randn(2, 2, 1, 1)
    for bad in (1, -1):
        with pytest.raises(ValueError, match="holdout_every"):
            StatsAccumulator(weight, geo, holdout_every=bad)
    for bad in (1, -2, 2.5, True):
        with pytest.raises((ValueError, TypeError), match="holdout"):
            tf.PruneConfig(keep=0.5, holdout=bad)


# ------------------------------------------------------------------ the ridge search
def _brute_cv(W, Z_fit, Z_held, keep, centred, ridge):
    """Fit on explicit fit-fold patches, score on explicit held-out patches."""
    K, C, t = W.shape
    taps = (torch.as_tensor(keep)[:, None] * t + torch.arange(t)).reshape(-1)
    Wf = W.reshape(K, -1)
    mu = Z_fit.mean(0) if centred else torch.zeros(C * t, dtype=W.dtype)
    Zf, Zh = Z_fit - mu, Z_held - mu
    A, rhs = Zf[:, taps].T @ Zf[:, taps], Zf[:, taps].T @ (Zf @ Wf.T)
    if centred:
        A, rhs = A / Z_fit.shape[0], rhs / Z_fit.shape[0]
    prior = Wf[:, taps].T
    if ridge == float("inf"):
        Wn = prior
    else:
        lam = ridge * A.diagonal().mean()
        Wn = torch.linalg.solve(A + lam * torch.eye(A.shape[0], dtype=A.dtype), rhs + lam * prior)
    old, new = Zh @ Wf.T, Zh[:, taps] @ Wn
    return float((old - new).square().sum() / old.square().sum())


@pytest.mark.parametrize("centred", [False, True])
def test_refit_cv_matches_brute_force(centred):
    gen = torch.Generator().manual_seed(7 + centred)
    K, C, t = 6, 5, 4
    W = torch.randn(K, C, t, generator=gen, dtype=torch.float64)
    # fewer fit samples (12) than unknowns (3 kept · 4 taps = 12 + noise): a tiny ridge overfits
    mix = torch.randn(3, C * t, generator=gen, dtype=torch.float64)
    Z = torch.relu(torch.randn(18, 3, generator=gen, dtype=torch.float64) @ mix
                   + 0.7 * torch.randn(18, C * t, generator=gen, dtype=torch.float64))
    Z_fit, Z_held = Z[:12], Z[12:]
    keep = [0, 2, 3]
    cov, zsum = Z.T @ Z, Z.sum(0)
    Wn, r, err = refit_full_cv(W, cov, keep, Z_held, count=18, patch_sum=zsum if centred else None)
    brute = {rr: _brute_cv(W, Z_fit, Z_held, keep, centred, rr) for rr in RIDGES}
    print("chosen", r, err, "brute", brute)
    assert abs(err - brute[r]) <= 1e-9 * max(1.0, brute[r])
    # the search stops early only past a rise, so it never misses a better ridge before it
    tried = RIDGES[:RIDGES.index(r) + 1]
    assert err <= min(brute[q] for q in tried) + 1e-12
    mean = zsum / 18 if centred else None
    full = refit_full(W, cov, keep, mean=mean, count=18 if centred else None, ridge=r) if r != float("inf") \
        else W[:, keep].double()
    print("final refit vs refit_full", (Wn - full).abs().max().item())
    assert torch.allclose(Wn, full, rtol=1e-9, atol=1e-10)


def test_heldout_error_matches_layer_outputs():
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    Wn = torch.randn(4, 2, 9, generator=gen, dtype=torch.float64)
    x = torch.relu(torch.randn(3, 3, 5, 5, generator=gen, dtype=torch.float64))
    Z = F.unfold(x, 3, padding=1).permute(0, 2, 1).reshape(-1, 27)
    mu = Z.mean(0) * 0.9
    keep = [0, 2]
    y = F.conv2d(x, W, padding=1) - torch.einsum("kc,c->k", W.reshape(4, -1), mu)[None, :, None, None]
    yn = F.conv2d(x[:, keep], Wn.reshape(4, 2, 3, 3), padding=1) \
        - torch.einsum("kc,c->k", Wn.reshape(4, -1), mu.reshape(3, 9)[keep].reshape(-1))[None, :, None, None]
    want = float((y - yn).square().sum() / y.square().sum())
    got = float(heldout_error(W, Wn, keep, Z, mu))
    print("held-out error", got, "layer", want)
    assert abs(got - want) <= 1e-10 * want


# ------------------------------------------------------------------ scarce data, whole prunes
def _centred_error(y, y_ref):
    """Σ‖y - y_ref‖² over the centred energy of y_ref (per output channel)."""
    dims = [d for d in range(y_ref.dim()) if d != 1]
    return float((y - y_ref).square().sum() / (y_ref - y_ref.mean(dim=dims, keepdim=True)).square().sum())


def test_scarce_conv_unit_reports_honest_error_and_does_not_overfit():
    """The issue's case: a 64-channel unit fed 26 images at 16×16, full refit (289
    unknowns per output from 260 samples: 32 kept channels · 9 taps + a bias)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    gen = torch.Generator().manual_seed(1)
    calib = torch.randn(26, 3, 16, 16, generator=gen)
    fresh = torch.randn(64, 3, 16, 16, generator=gen)
    kw = dict(keep=0.5, units=["0"], num_images=26, schedule="oneshot", progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = tf.prune(model, [calib[:13], calib[13:]], reconstruction="full", **kw)
    message = [str(w.message) for w in caught if "unknowns" in str(w.message)]
    print(message)
    assert any("'2'" in m and "260 calibration samples for 289 unknowns" in m for m in message)
    scale = tf.prune(model, [calib[:13], calib[13:]], reconstruction="scale", **kw)
    reference = model[:3](fresh)
    with torch.no_grad():
        e_full = _centred_error(full.model[:3](fresh), reference)
        e_scale = _centred_error(scale.model[:3](fresh), reference)
    u = full.report.units[0]
    print(f"full: held-out {e_full:.4f} reported {u['error_reconstructed']:.4f} ({u['reconstruction']}, "
          f"ridge {u['ridge']}); scale held-out {e_scale:.4f}")
    assert u["heldout_images"] == len(_fold_of(calib, 5)) > 0
    assert e_full <= e_scale * 1.02
    assert 0.5 * e_full <= u["error_reconstructed"] <= 2.0 * e_full


def test_scarce_resnet18_full_refit_is_no_worse_than_scale():
    """The issue's second case: torchvision ResNet-18 and 16 calibration images."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    gen = torch.Generator().manual_seed(4)
    calib = torch.relu(torch.randn(16, 3, 64, 64, generator=gen))
    fresh = torch.relu(torch.randn(16, 3, 64, 64, generator=gen))
    kw = dict(keep=0.5, num_images=16, schedule="oneshot", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = tf.prune(model, [calib[:8], calib[8:]], reconstruction="full", **kw)
        scale = tf.prune(model, [calib[:8], calib[8:]], reconstruction="scale", **kw)
    with torch.no_grad():
        ref = model(fresh)
        e_full = _centred_error(full.model(fresh), ref)
        e_scale = _centred_error(scale.model(fresh), ref)
    units = full.report.units
    print(f"logits: full {e_full:.4f} scale {e_scale:.4f};",
          [(u["consumer"], u["reconstruction"], round(u["error_reconstructed"], 4)) for u in units])
    assert len(_fold_of(calib, 5)) > 0
    assert all(u["heldout_images"] == len(_fold_of(calib, 5)) for u in units)
    assert e_full <= e_scale * 1.05 and e_full < 1.0


def test_holdout_zero_reports_in_sample():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    x = torch.randn(12, 3, 8, 8)
    res = tf.prune(model, x, keep=0.5, num_images=12, holdout=0, progress=False)
    u = res.report.units[0]
    assert u["heldout_images"] == 0 and u["ridge"] == 1e-8
    assert "* in sample" in res.report.table()
    res = tf.prune(model, x, keep=0.5, num_images=12, progress=False)
    assert res.report.units[0]["heldout_images"] == len(_fold_of(x, 5)) > 0
    assert "* in sample" not in res.report.table()


@pytest.mark.parametrize("centred", [False, True])
def test_refit_dual_equals_the_primal_fit(centred):
    """Fewer samples (30) than unknowns (5 kept · 9 taps): the S×S path gives the
    primal's ridge, error and weights."""
    gen = torch.Generator().manual_seed(31 + centred)
    K, C, t = 7, 10, 9
    W = torch.randn(K, C, 3, 3, generator=gen, dtype=torch.float64)
    mix = torch.randn(4, C * t, generator=gen, dtype=torch.float64)
    Z = torch.relu(torch.randn(30, 4, generator=gen, dtype=torch.float64) @ mix
                   + 0.5 * torch.randn(30, C * t, generator=gen, dtype=torch.float64))
    held = torch.tensor([3, 8, 13, 18, 23, 28])
    keep = [0, 1, 4, 6, 9]
    fit_rows = torch.ones(30, dtype=torch.bool)
    fit_rows[held] = False
    Wd, rd, ed = refit_full_dual(W, Z, keep, held, centred=centred)
    Wp, rp, ep = refit_full_cv(W, Z.T @ Z, keep, Z[held], count=30, patch_sum=Z.sum(0) if centred else None)
    print(f"dual ridge {rd} err {ed:.6g}; primal ridge {rp} err {ep:.6g}; weights {(Wd - Wp).abs().max():.2e}")
    assert rd == rp and abs(ed - ep) <= 1e-8 * max(ep, 1e-12)
    assert torch.allclose(Wd, Wp, rtol=1e-7, atol=1e-9 * float(Wp.abs().max()))


def test_released_results_keep_patches_instead_of_P():
    gen = torch.Generator().manual_seed(9)
    geo, weight = ConsumerGeometry.conv(3, padding=1), torch.randn(4, 16, 3, 3, generator=gen, dtype=torch.float64)
    x = torch.relu(torch.randn(6, 16, 5, 5, generator=gen, dtype=torch.float64))
    kw = dict(mode="full", samples_per_image=3, seed=4)
    kept = _acc(weight, geo, [x], **kw).result()
    released = _acc(weight, geo, [x], **kw).result(release=True)
    assert kept.patches is not None and kept.cov is not None  # 18 samples < 144 / 2: every patch kept
    assert released.cov is None and torch.equal(released.patches, kept.patches)
    err = ((released.covariance() - kept.cov).abs().max() / kept.cov.abs().max()).item()
    print("P from patches vs accumulated P", err)
    assert err < 1e-12 and torch.equal(released.gram, kept.gram)


def test_fold_is_the_same_under_any_order_batching_or_sharding_when_the_cap_would_bind():
    """With the pass's image count known, the fold is thinned by key to fit holdout_max:
    shuffled, re-batched and sharded-then-merged feeds hold out the same images."""
    gen = torch.Generator().manual_seed(0)
    W, geo = torch.randn(4, 3, 3, 3, generator=gen), ConsumerGeometry.conv(3, padding=1)
    x = torch.randn(200, 3, 8, 8, generator=gen)
    keys = image_keys(x)

    def acc(batches):
        a = StatsAccumulator(W, geo, mode="sampled", samples_per_image=10, holdout_every=5, holdout_max=100,
                             expected_images=200)
        for xb, kb in batches:
            a.update(xb, kb)
        return a

    perm = torch.randperm(200, generator=gen)
    runs = {"one batch": acc([(x, keys)]), "shuffled": acc([(x[perm], keys[perm])]),
            "batches of 7": acc([(x[i:i + 7], keys[i:i + 7]) for i in range(0, 200, 7)]),
            "2 shards merged": acc([(x[0::2], keys[0::2])]) + acc([(x[1::2], keys[1::2])])}
    base = runs["one batch"].result().heldout
    print({k: a.result().heldout.images for k, a in runs.items()})
    assert 0 < base.images and base.samples <= 100  # the 40 images every 5th would be 400 samples
    for name, a in runs.items():
        held = a.result().heldout
        assert held.images == base.images, name
        torch.testing.assert_close(held.gram, base.gram, rtol=1e-5, atol=1e-4)


def test_fold_is_sized_by_the_images_the_data_really_holds():
    """num_images far above what the data holds must not thin the fold away."""
    from thinet_fast.pipeline.collect import images_in
    x = torch.randn(30, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8)
    assert images_in(x) == 30 and images_in([(x[:8],), (x[8:],)]) == 30 and images_in(loader) == 30
    assert images_in(iter([x])) is None
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 28 * 28, 4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = tf.prune(model, loader, keep=0.5, num_images=100_000, progress=False, reconstruction="full")
    assert res.report.units[0]["heldout_images"] == len(_fold_of(x, 5)) > 0

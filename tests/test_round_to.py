"""Hardware-friendly widths (``round_to``): kept counts become multiples of N."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

import thinet_fast as tf
from thinet_fast.models import DemoVGG
from thinet_fast.pipeline import keeps
from thinet_fast.pipeline.coupled import _n_keep
from thinet_fast.presets import Preset
from thinet_fast.units import find_units

# 6 < 8 channels, 20 and 100 not multiples of 8: every branch of the rule
WIDTHS, HIDDEN = (6, 16, 20, 40, 64), 100
KW = dict(num_images=16, samples_per_image=4, progress=False, schedule="oneshot")


def _data(n=16, batch=8, shape=(1, 28, 28), seed=0):
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    return [x[i:i + batch] for i in range(0, n, batch)]


def _vgg():
    torch.manual_seed(0)
    return DemoVGG(widths=WIDTHS, hidden=HIDDEN).eval()


def _kept(result):
    return {u.producer: (u.channels, u.kept) for u in result.report.units}


def _brute(count, channels, n, floor=1):
    """Nearest width w in [floor, C] with w % n == 0 or w == C (ties: the wider)."""
    if n <= 1 or channels < n:
        return count
    ok = [w for w in range(1, channels + 1) if (w % n == 0 or w == channels) and w >= floor]
    best = None
    for w in ok:
        if best is None or abs(w - count) < abs(best - count) or (abs(w - count) == abs(best - count) and w > best):
            best = w
    return best


def test_round_counts_matches_brute_force():
    rng = random.Random(1)
    for _ in range(400):
        k = rng.randint(1, 6)
        channels = [rng.randint(1, 90) for _ in range(k)]
        counts = [rng.randint(1, c) for c in channels]
        floors = [rng.randint(1, c) for c in channels]
        n = rng.choice([1, 2, 3, 4, 8, 16, 32])
        assert keeps.round_counts(counts, channels, n) == [_brute(c, C, n) for c, C in zip(counts, channels)]
        got = keeps.round_counts(counts, channels, n, floors)
        assert got == [_brute(c, C, n, f) for c, C, f in zip(counts, channels, floors)]
        for kept, c in zip(got, channels):
            assert 1 <= kept <= c
            if n > 1 and c >= n:
                assert kept % n == 0 or kept == c
    with pytest.raises(ValueError, match="counts"):
        keeps.round_counts([1, 2], [4], 8)


def test_lower_width_steps_through_valid_widths():
    assert keeps.lower_width(20, 20, 8) == 16
    assert keeps.lower_width(16, 20, 8) == 8
    assert keeps.lower_width(8, 20, 8) is None
    assert keeps.lower_width(16, 20, 8, floor=9) is None
    assert keeps.lower_width(5, 6, 8) == 4  # narrower than N: any width
    assert keeps.upper_width(8, 20, 8) == 16 and keeps.upper_width(16, 20, 8) == 20
    assert keeps.upper_width(20, 20, 8) is None


@pytest.mark.parametrize("n", [8, 16])
def test_counts_are_multiples_on_demo_vgg(n):
    model, data = _vgg(), _data()
    plain = _kept(tf.prune(model, data, keep=0.3, round_to=None, **KW))
    rounded = tf.prune(model, data, keep=0.3, round_to=n, **KW)
    got = _kept(rounded)
    assert got.keys() == plain.keys()
    for p, (c, kept) in got.items():
        if c < n:
            assert kept == plain[p][1], f"{p}: {c} channels < {n} must be untouched"
        else:
            assert (kept % n == 0 or kept == c) and n <= kept <= c, (p, c, kept)
            assert kept == _brute(plain[p][1], c, n)
    assert any(kept != plain[p][1] for p, (_, kept) in got.items()), "round_to changed nothing"
    x = data[0]
    assert rounded.model(x).shape == (x.shape[0], 10)
    assert rounded.report.config["round_to"] == n and rounded.report.config["round_to_multiple"] == n
    assert any(f"multiples of {n}" in note for note in rounded.report.notes)


def test_explicit_counts_in_a_dict_are_kept():
    model, data = _vgg(), _data()
    units = find_units(model, data[0][:1]).units
    a, b = units[2], units[3]  # 20 and 40 channels
    got = _kept(tf.prune(model, data, keep={a.producer: 11, b.producer: 0.3}, round_to=8, **KW))
    assert got[a.producer][1] == 11
    assert got[b.producer][1] == _brute(round(0.3 * b.channels), b.channels, 8)


def test_auto_is_a_noop_on_cpu():
    model, data = _vgg(), _data()
    auto = tf.prune(model, data, keep=0.3, **KW)  # the default is "auto"
    assert auto.config.round_to == "auto"
    assert _kept(auto) == _kept(tf.prune(model, data, keep=0.3, round_to=None, **KW))
    assert auto.report.config["round_to_multiple"] == 1


def test_auto_rounds_on_cuda_but_keeps_preset_widths():
    plan = find_units(_vgg(), torch.randn(1, 1, 28, 28))
    assert keeps.round_multiple("auto", "cuda") == keeps.AUTO_ROUND_TO == 8
    assert keeps.round_multiple("auto", torch.device("cpu")) == 1
    got = keeps.for_config(plan, tf.PruneConfig(keep=0.3), device="cuda")
    for u in plan.units:
        assert got[u.producer] == _brute(max(1, round(0.3 * u.channels)), u.channels, 8)
    preset = Preset("t", "vgg16", {u.producer: 0.7 for u in plan.units})
    paper = preset.keep_for(plan)
    by = {u.producer: u.channels for u in plan.units}
    assert any(_brute(v, by[p], 8) != v for p, v in paper.items()), "pick a preset that rounding changes"
    cfg = tf.PruneConfig()
    assert keeps.for_config(plan, cfg, preset, device="cuda") == paper
    assert keeps.for_config(plan, cfg.replace(round_to=8), preset, device="cpu") == \
        {p: _brute(v, by[p], 8) for p, v in paper.items()}


def _widened_flops(model, res, n, example):
    """FLOPs of the result with each unit in turn one valid width wider (or None)."""
    from thinet_fast.pipeline import budget_items as bi
    keep = {u.producer: u.kept for u in res.report.units}
    counter = bi.CountModel(bi.Shadow(model, example), bi.unit_items(res.plan.units, n))
    out = []
    for u in res.plan.units:
        w = keeps.upper_width(keep[u.producer], u.channels, n)
        out.append(None if w is None else counter.exact({**keep, u.producer: w}, ("flops",))["flops"])
    return out


@pytest.mark.parametrize("target,n", [(0.4, 8), (0.5, 8), (0.6, 16)])
def test_flops_target_still_met(target, n):
    model, data = _vgg(), _data()
    res = tf.prune(model, data, flops_target=target, round_to=n, **KW)
    rep = res.report
    assert rep.flops == tf.count_flops(res.model, data[0][:1])
    assert rep.flops <= target * rep.original.flops, (rep.flops / rep.original.flops, rep.notes)
    for u in rep.units:
        if u.channels >= n:
            assert u.kept % n == 0 or u.kept == u.channels, (u.producer, u.channels, u.kept)
    # no slack left that one more step of any unit would fit in
    for f in _widened_flops(model, res, n, data[0][:1]):
        assert f is None or f > target * rep.original.flops
    assert any("round_to" in note for note in rep.notes)


def test_flops_target_out_of_reach_stops_at_the_floors():
    model, data = _vgg(), _data()
    res = tf.prune(model, data, flops_target=0.25, round_to=16, **KW)
    rep = res.report
    floors = dict(zip([u.producer for u in res.plan.units], keeps.min_counts(res.plan.units, 0.1)))
    if rep.flops > 0.25 * rep.original.flops:  # 16-wide steps cannot reach it: every unit at its floor
        assert all(keeps.lower_width(u.kept, u.channels, 16, floors[u.producer]) is None for u in rep.units)
        assert any("could not be met" in note for note in rep.notes)
    for u in rep.units:
        assert u.channels < 16 or u.kept % 16 == 0 or u.kept == u.channels


def test_resnet18_coupled_groups_round():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    data = _data(n=8, batch=4, shape=(3, 64, 64))
    res = tf.prune(model, data, keep=0.3, coupled="prune", round_to=8, **{**KW, "num_images": 8})
    grouped = [u for u in res.report.units if "coupled group" in " ".join(u.notes)]
    assert grouped, "resnet18 has coupled residual streams"
    for u in res.report.units:
        assert u.kept % 8 == 0 or u.kept == u.channels, (u.producer, u.channels, u.kept)
        assert u.kept < u.channels
    assert res.model(data[0]).shape == (4, 10)


def test_coupled_blocks_round_the_whole_width():
    cfg = tf.PruneConfig(keep=0.3, round_to=8)
    for blocks, channels in [(1, 64), (2, 64), (4, 96), (16, 128)]:
        g = SimpleNamespace(channels=channels, blocks=blocks, name="g", producers=("p",))
        n = _n_keep(g, cfg, "cpu")
        assert (n * blocks) % 8 == 0 or n == channels // blocks, (blocks, channels, n)
    g = SimpleNamespace(channels=6, blocks=1, name="g", producers=("p",))
    assert _n_keep(g, cfg, "cpu") == round(0.3 * 6)  # narrower than N: untouched


@pytest.mark.parametrize("bad", [True, False, 0, -8, 8.0, "8", "fast", [8]])
def test_bad_values_are_rejected(bad):
    with pytest.raises(ValueError, match="round_to"):
        tf.PruneConfig(round_to=bad)


def test_round_to_in_the_fingerprint_and_resume_refuses_another(tmp_path):
    assert tf.PruneConfig().fingerprint()["round_to"] == "auto"
    assert tf.PruneConfig(round_to=16).fingerprint()["round_to"] == 16
    model, data = _vgg(), _data()
    path = tmp_path / "run.ckpt"
    kw = {**KW, "schedule": "sequential", "keep": 0.3, "resume": str(path)}
    tf.prune(model, data, round_to=8, **kw)
    assert path.exists()
    with pytest.raises(ValueError, match=r"run\.ckpt.*round_to"):
        tf.prune(model, data, round_to=16, **kw)
    tf.prune(model, data, round_to=8, **kw)  # the same option still resumes

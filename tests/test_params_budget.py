"""Parameter budgets (``params_target=``), FLOPs budgets as counts, and both together.

Guarantee tested: the exact count of the pruned model is at most the target, and no
unit that lost channels could keep one more without exceeding a target (with
``round_to=None``: one channel is the step).
"""
from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

import thinet_fast as tf
from thinet_fast.models import DemoVGG
from thinet_fast.ops.budget import allocate_budget, allocate_budgets
from thinet_fast.pipeline import keeps
from thinet_fast.pipeline.budget import error_curves
from thinet_fast.pipeline.collect import StatsSpec, collect_units, iter_batches
from thinet_fast.rewrite import prune_unit_

KW = dict(num_images=16, samples_per_image=4, progress=False, schedule="oneshot", device="cpu", round_to=None)


def _data(shape, n=16, batch=8, seed=0):
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    return [x[i:i + batch] for i in range(0, n, batch)]


def _vgg():
    torch.manual_seed(0)
    return DemoVGG().eval(), _data((1, 28, 28))


def _resnet():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval(), _data((3, 32, 32))


MODELS = {"vgg": _vgg, "resnet18": _resnet}


def _counts_with(model, units, keep, example, kinds):
    """Counts of ``model`` with each unit cut to ``keep`` (a meta copy: shapes only)."""
    shadow = copy.deepcopy(model).to("meta")
    for u in units:
        prune_unit_(shadow, u, torch.arange(keep[u.producer]))
    counts = {"flops": lambda: tf.count_flops(shadow, example.to("meta")), "params": lambda: tf.count_params(shadow)}
    return {k: counts[k]() for k in kinds}


def _kept(res):
    return {u.producer: u.kept for u in res.report.units}


def _assert_tight(model, res, example, limits):
    """No unit that lost a channel can take one back without exceeding some limit."""
    keep = _kept(res)
    for u in res.plan.units:
        if keep[u.producer] < u.channels:
            wider = _counts_with(model, res.plan.units, {**keep, u.producer: keep[u.producer] + 1}, example,
                                 tuple(limits))
            assert any(wider[k] > limits[k] for k in limits), (u.producer, wider, limits)


def _check_met(model, res, example, limits):
    counts = {"flops": tf.count_flops(res.model, example), "params": tf.count_params(res.model)}
    for kind, limit in limits.items():
        assert counts[kind] <= limit, (kind, counts[kind], limit, res.report.notes)
        assert res.report.config["budget"][kind]["achieved"] == counts[kind]  # the report counts exactly
    _assert_tight(model, res, example, limits)
    return counts


@pytest.mark.parametrize("name", ["vgg", "resnet18"])
@pytest.mark.parametrize("as_count", [False, True])
def test_params_target_met_within_one_channel(name, as_count):
    model, data = MODELS[name]()
    example = data[0][:1]
    total = tf.count_params(model)
    frac = 0.4 if name == "vgg" else 0.55
    target = int(frac * total) if as_count else frac
    res = tf.prune(model, data, params_target=target, **KW)
    limit = target if as_count else frac * total
    counts = _check_met(model, res, example, {"params": limit})
    assert counts["params"] >= 0.9 * limit, "far below the budget: channels were removed for nothing"
    assert res.config.params_target == target and res.report.config["params_target"] == target
    note = next(n for n in res.report.notes if "params budget" in n)
    assert f"params_target {target}: achieved {counts['params'] / total:.3f}" in note and "FLOPs kept" in note
    floors = dict(zip([u.producer for u in res.plan.units], keeps.min_counts(res.plan.units, 0.1)))
    assert all(u.kept >= floors[u.producer] for u in res.report.units)


def test_flops_target_as_a_count():
    model, data = _vgg()
    example = data[0][:1]
    target = int(0.45 * tf.count_flops(model, example))
    res = tf.prune(model, data, flops_target=target, **KW)
    counts = _check_met(model, res, example, {"flops": target})
    assert counts["flops"] >= 0.9 * target
    assert any(n.startswith("FLOPs budget: flops_target") for n in res.report.notes)


@pytest.mark.parametrize("name", ["vgg", "resnet18"])
def test_both_targets_met(name):
    model, data = MODELS[name]()
    example = data[0][:1]
    f_t, p_t = (0.4, 0.3) if name == "vgg" else (0.45, 0.3)
    limits = {"flops": f_t * tf.count_flops(model, example), "params": p_t * tf.count_params(model)}
    only_f = tf.prune(model, data, flops_target=f_t, **KW)
    only_p = tf.prune(model, data, params_target=p_t, **KW)
    # each target alone misses the other: so the joint result shows both were served
    assert tf.count_params(only_f.model) > limits["params"], "pick targets where both bind"
    assert tf.count_flops(only_p.model, example) > limits["flops"], "pick targets where both bind"
    res = tf.prune(model, data, flops_target=f_t, params_target=p_t, **KW)
    _check_met(model, res, example, limits)
    note = next(n for n in res.report.notes if "FLOPs and params budget" in n)
    assert "flops_target" in note and "params_target" in note and res.report.config["budget"]["met"]


def test_min_keep_is_respected():
    model, data = _vgg()
    res = tf.prune(model, data, params_target=0.45, min_keep=0.4, **KW)
    floors = dict(zip([u.producer for u in res.plan.units], keeps.min_counts(res.plan.units, 0.4)))
    assert all(u.kept >= floors[u.producer] for u in res.report.units)
    assert tf.count_params(res.model) <= 0.45 * tf.count_params(model)
    # out of reach: every unit ends at its floor and the report says the budget was missed
    res = tf.prune(model, data, params_target=0.05, min_keep=0.5, **KW)
    floors = dict(zip([u.producer for u in res.plan.units], keeps.min_counts(res.plan.units, 0.5)))
    assert {u.producer: u.kept for u in res.report.units} == floors
    assert not res.report.config["budget"]["met"]
    note = next(n for n in res.report.notes if "could not be met" in n and "params_target" in n)
    # at the floors the model has exactly what it returned: the note says so
    assert f"({tf.count_params(res.model) / tf.count_params(model):.3f})" in note.split("floor still leaves")[1]


def _curve_error(curves, units, keep):
    """Summed relative error of ``keep`` on the greedy curves (what the allocation minimises)."""
    return sum(float(c[u.channels - keep[u.producer] - 1]) if keep[u.producer] < u.channels else 0.0
               for c, u in zip(curves, units))


@pytest.mark.parametrize("name", ["vgg", "resnet18"])
def test_allocation_beats_uniform_at_equal_params(name):
    model, data = MODELS[name]()
    example = data[0][:1]
    res = tf.prune(model, data, params_target=0.5, **KW)
    units = res.plan.units
    fractions = [u.kept / u.channels for u in res.report.units]
    assert max(fractions) - min(fractions) > 0.15, f"the allocation is (almost) uniform: {fractions}"
    spec = StatsSpec.from_config(res.config).replace(images=16)
    stats = collect_units(copy.deepcopy(model), units, iter_batches(data, 16, "cpu"), spec)
    curves = error_curves(units, stats)
    params = tf.count_params(res.model)

    class Plan:  # keeps.uniform reads .units
        pass
    plan = Plan()
    plan.units = units
    # the smallest uniform keep with at least the allocation's parameters (a fair, generous rival)
    lo, hi = 0.0, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        if _counts_with(model, units, keeps.uniform(plan, mid), example, ("params",))["params"] >= params:
            hi = mid
        else:
            lo = mid
    uniform = keeps.uniform(plan, hi)
    p_uniform = _counts_with(model, units, uniform, example, ("params",))["params"]
    assert params <= p_uniform <= 1.05 * params
    e_alloc, e_uniform = _curve_error(curves, units, _kept(res)), _curve_error(curves, units, uniform)
    print(name, "alloc", e_alloc, "uniform", e_uniform, hi)
    assert e_alloc < e_uniform


@pytest.mark.parametrize("value", [0, -3, 0.0, 1.0, 1.5, -0.2, float("nan"), float("inf")])
@pytest.mark.parametrize("option", ["params_target", "flops_target"])
def test_bad_values_are_rejected(option, value):
    with pytest.raises(ValueError, match=option):
        tf.PruneConfig(**{option: value})


@pytest.mark.parametrize("value", [True, "0.4", [0.4], 1 + 2j])
def test_bad_types_are_rejected(value):
    with pytest.raises(TypeError, match="params_target"):
        tf.PruneConfig(params_target=value)


def test_bad_combinations_and_counts():
    with pytest.raises(ValueError, match="give one of keep=, preset="):
        tf.PruneConfig(params_target=0.5, keep=0.5)
    with pytest.raises(ValueError, match="params_target=.*pass an int, e.g. params_target=1000000"):
        tf.PruneConfig(params_target=1e6)
    cfg = tf.PruneConfig(params_target=np.int64(1000), flops_target=0.5)
    assert cfg.params_target == 1000 and type(cfg.params_target) is int
    assert cfg.fingerprint()["params_target"] == 1000
    assert tf.PruneConfig().fingerprint()["params_target"] is None
    model, data = _vgg()
    with pytest.raises(ValueError, match="params_target=.* not fewer than the model's"):
        tf.prune(model, data, params_target=tf.count_params(model), **KW)
    with pytest.raises(ValueError, match="flops_target=.* not fewer than the model's"):
        tf.prune(model, data, flops_target=tf.count_flops(model, data[0][:1]) + 1, **KW)
    with pytest.raises(ValueError, match="dry_run: params_target"):
        tf.dry_run(model, data[0][:1], params_target=0.5)


def _convex(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g, dtype=torch.float64).sort().values.cumsum(0)


def test_two_constraint_greedy_meets_both_and_reduces_to_one():
    curves = [_convex(7, s) for s in range(4)]  # 8 channels per unit
    flops, params = [4.0, 1.0, 2.0, 3.0], [1.0, 5.0, 2.0, 1.5]
    for tf_, tp in itertools.product((0.0, 6.0, 14.0), (0.0, 8.0, 20.0)):
        got = allocate_budgets(curves, [flops, params], [tf_, tp], scales=[sum(flops) * 8, sum(params) * 8])
        assert sum(c * r for c, r in zip(flops, got)) >= tf_ and sum(c * r for c, r in zip(params, got)) >= tp
        if tp == 0.0:  # a met constraint changes nothing: the one-constraint greedy
            assert got == allocate_budget(curves, flops, tf_)
    with pytest.raises(ValueError, match="params"):
        allocate_budgets(curves, [flops, params], [1.0, 1e9], names=["flops", "params"])


def test_checkpoint_records_params_target(tmp_path):
    model, data = _vgg()
    ckpt = str(tmp_path / "run.ckpt")
    kw = {**KW, "schedule": "sequential"}
    first = tf.prune(model, data, params_target=0.5, resume=ckpt, **kw)
    again = tf.prune(model, data, params_target=0.5, resume=ckpt, **kw)  # the same options resume
    assert _kept(again) == _kept(first)
    with pytest.raises(ValueError, match="different options.*params_target"):
        tf.prune(model, data, params_target=0.45, resume=ckpt, **kw)


def test_fit_is_exact_and_tight_even_with_wrong_neighbours():
    from types import SimpleNamespace
    from thinet_fast.pipeline.budget_fit import fit_widths
    units = [SimpleNamespace(producer=f"p{j}", channels=12) for j in range(4)]
    curves = [_convex(11, s) for s in range(4)]

    def count(keep):  # a chain: layer j+1 reads unit j and writes unit j+1 (bilinear, like convs)
        k = [keep[u.producer] for u in units]
        return {"params": 3 * k[0] + sum(k[j] * k[j + 1] for j in range(3)) + 5 * k[3]}

    limit = {"params": 150.0}
    # the last neighbours are wrong on purpose; from full widths (down, then up) and from narrow ones (up)
    for neighbours, start in itertools.product((None, [{1}, {0, 2}, {1, 3}, {2}], [set()] * 4), (12, 2)):
        keep, got = fit_widths(units, {u.producer: start for u in units}, curves, [1] * 4, 1, limit, count,
                               neighbours=neighbours)
        assert got == count(keep) and got["params"] <= limit["params"]
        for u in units:
            if keep[u.producer] < u.channels:
                assert count({**keep, u.producer: keep[u.producer] + 1})["params"] > limit["params"]


def test_layers_that_gain_a_bias_are_counted():
    """Bias compensation gives a consumer without a bias or a BatchNorm after it a bias:
    the budget counts those parameters too (the target holds on the returned model)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, bias=False), torch.nn.ReLU(), torch.nn.Conv2d(8, 12, 3, bias=False),
        torch.nn.ReLU(), torch.nn.Conv2d(12, 16, 3, bias=False), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(16, 10, bias=False)).eval()
    data = _data((1, 12, 12))
    limit = 0.5 * tf.count_params(model)
    res = tf.prune(model, data, params_target=0.5, **KW)
    got = tf.count_params(res.model)
    gained = [n for n, m in res.model.named_modules() if getattr(m, "bias", None) is not None]
    print(got, limit, gained, _kept(res))
    assert gained and got <= limit and res.report.config["budget"]["params"]["achieved"] == got
    off = tf.prune(model, data, params_target=0.5, bias_compensation=False, **KW)
    assert not [n for n, m in off.model.named_modules() if getattr(m, "bias", None) is not None]
    assert tf.count_params(off.model) <= limit


class _DataDependent(torch.nn.Module):
    """A forward that needs the data (as a detector's box selection): nothing runs it on
    the meta device, so the budget counts a real copy."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(1, 8, 3), torch.nn.Conv2d(8, 12, 3)
        self.fc = torch.nn.Linear(12, 4)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        rows = torch.nonzero(h.flatten(1).abs().sum(1) >= 0).squeeze(1)  # every row, but data-dependent
        return self.fc(h.index_select(0, rows).mean((2, 3)))


def test_a_model_the_meta_device_cannot_run_is_counted_on_a_real_copy():
    torch.manual_seed(0)
    model, data = _DataDependent().eval(), _data((1, 12, 12))
    with pytest.raises(NotImplementedError):
        copy.deepcopy(model).to("meta")(data[0].to("meta"))
    for coupled in ("refuse", "prune"):
        res = tf.prune(model, data, params_target=0.5, coupled=coupled, **KW)
        got = tf.count_params(res.model)
        print(coupled, got, 0.5 * tf.count_params(model), _kept(res))
        assert got <= 0.5 * tf.count_params(model) and res.report.config["budget"]["params"]["achieved"] == got

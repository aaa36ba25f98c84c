"""Budgets (flops_target= / params_target=) with coupled="prune": widths allocated over
plain units, coupled groups and attention heads, counted exactly."""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

pytest.importorskip("torch_pruning")

import thinet_fast as tf  # noqa: E402
from thinet_fast.pipeline import budget_items as bi  # noqa: E402
from thinet_fast.pipeline.budget_stats import budget_items, new_biases  # noqa: E402
from thinet_fast.pipeline.keeps import upper_width  # noqa: E402
from test_attention import _Tiny  # noqa: E402


class Net(nn.Module):
    """A plain unit, a residual group (stem + c2), a concat group (a | b) read by a
    grouped conv, and a unit into the classifier."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c1, self.c2 = nn.Conv2d(16, 12, 3, padding=1), nn.Conv2d(12, 16, 3, padding=1)
        self.a, self.b = nn.Conv2d(16, 12, 3, padding=1), nn.Conv2d(16, 8, 1)
        self.g = nn.Conv2d(20, 20, 3, padding=1, groups=4)
        self.out = nn.Conv2d(20, 24, 1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        s = torch.relu(self.bn(self.stem(x)))
        r = torch.relu(s + self.c2(torch.relu(self.c1(s))))
        c = torch.relu(torch.cat([self.a(r), self.b(r)], 1))
        return self.fc(torch.relu(self.out(torch.relu(self.g(c)))).mean((2, 3)))


def _case(kind):
    """The model and its data; ``*_nobias``: no layer has a bias, so bias compensation
    gives the refitted layers one (and a budget must count it)."""
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    if kind.startswith("conv"):
        model, x = Net().eval(), torch.randn(48, 3, 8, 8, generator=g)
    else:
        model, x = _Tiny(E=32, H=4, layers=2).eval(), torch.randn(48, 7, 6, generator=g)
    if kind.endswith("_nobias"):
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias = None
            elif isinstance(m, nn.MultiheadAttention):
                m.in_proj_bias = None
    return model, x


OPTS = dict(num_images=48, progress=False, coupled="prune", stats_dtype=torch.float64)


def _counter(model, x, cfg, plan):
    items = budget_items(model, plan, cfg, x[:1], "cpu")
    shadow = bi.Shadow(model, x[:1], ignored_layers=cfg.ignored_layers, skip=[u.producer for u in plan.units],
                       biases=new_biases(model, items, cfg))
    return items, bi.CountModel(shadow, items)


@pytest.mark.parametrize("kind", ["conv", "transformer"])
def test_counts_of_any_widths_are_the_cut_models_counts(kind):
    model, x = _case(kind)
    res = tf.prune(model, x, keep=0.5, **OPTS)  # for its plan and config
    items, counter = _counter(model, x, res.config, res.plan)
    kinds = {it.kind for it in items}
    # the transformer's MLPs are units or groups, whichever engine traces them
    assert kinds == {"unit", "group"} if kind == "conv" else "heads" in kinds and len(kinds) == 2, kinds
    assert not counter.exact_only
    rng = random.Random(0)
    for _ in range(12):
        keep = {it.producer: rng.randint(1, it.channels) for it in items}
        fast, exact = counter(keep), counter.exact(keep)
        print(keep, fast, exact)
        assert fast == exact


@pytest.mark.parametrize("kind,option,extra", [
    ("conv", "params_target", {}), ("conv", "flops_target", {}), ("transformer", "params_target", {}),
    ("transformer", "flops_target", {}), ("conv", "params_target", {"schedule": "oneshot"}),
    ("conv", "params_target", {"round_to": 4}), ("transformer", "flops_target", {"round_to": 4}),
    ("conv_nobias", "params_target", {}), ("transformer_nobias", "params_target", {}),
    ("conv_nobias", "flops_target", {"schedule": "oneshot"})])
def test_a_budget_over_groups_and_heads_is_met_exactly_and_tightly(kind, option, extra):
    model, x = _case(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = tf.prune(model, x, **{option: 0.45}, **extra, **OPTS)
    info = res.report.config["budget"]
    count = "params" if option == "params_target" else "flops"
    got = tf.count_params(res.model) if count == "params" else tf.count_flops(res.model, x[:1])
    limit = 0.45 * (tf.count_params(model) if count == "params" else tf.count_flops(model, x[:1]))
    print(option, got, limit, info["keep"])
    assert got <= limit and info[count]["achieved"] == got and info["met"]
    assert torch.isfinite(res.model(x)).all()
    for k, v in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, before[k]), k
    items, counter = _counter(model, x, res.config, res.plan)
    if kind.endswith("_nobias"):
        gained = [n for n, m in res.model.named_modules() if getattr(m, "bias", None) is not None]
        assert gained, "no layer gained a bias: the case tests nothing"
    keep = info["keep"]
    assert set(keep) == {it.producer for it in items}
    cut = {it.kind for it in items if keep[it.producer] < it.channels}
    assert cut - {"unit"}, f"the budget cut only plain units: {keep}"  # groups / heads take their share
    for it in items:  # no item can keep one more valid step within the target
        if "round_to" in extra and it.kind != "heads":  # the whole width a multiple of round_to, or all
            blocks = getattr(it.source, "blocks", 1)
            assert keep[it.producer] == it.channels or keep[it.producer] * blocks % extra["round_to"] == 0 or \
                it.channels * blocks < extra["round_to"], (it.producer, keep[it.producer])
        w = upper_width(keep[it.producer], it.channels, it.multiple)
        if w is not None:
            assert counter.exact({**keep, it.producer: w}, (count,))[count] > limit, it.producer
    # the widths the report gives are the model's
    for r in res.report.units:
        assert r.kept == (keep[r.producer] * (r.channels // next(it.channels for it in items
                                                                   if it.producer == r.producer))), r.producer


def test_the_exact_count_is_the_fallback_when_the_fast_one_disagrees(monkeypatch):
    model, x = _case("conv")
    real = bi.CountModel.__call__

    def off(self, keep, kinds=bi.COUNTED):  # a surrogate that undercounts parameters
        return {k: v - 500 if k == "params" else v for k, v in real(self, keep, kinds).items()}
    monkeypatch.setattr(bi.CountModel, "__call__", off)
    res = tf.prune(model, x, params_target=0.45, **OPTS)
    limit = 0.45 * tf.count_params(model)
    got = tf.count_params(res.model)
    assert got <= limit and res.report.config["budget"]["params"]["achieved"] == got
    assert "fitted on exact counts" in next(n for n in res.report.notes if "budget" in n)
    items, counter = _counter(model, x, res.config, res.plan)
    keep = res.report.config["budget"]["keep"]
    for it in items:  # tight on the exact counts, not on the wrong ones
        w = upper_width(keep[it.producer], it.channels, it.multiple)
        if w is not None:
            assert counter.exact({**keep, it.producer: w}, ("params",))["params"] > limit, it.producer


def test_a_budget_run_with_groups_resumes_to_the_same_model(tmp_path, monkeypatch):
    import thinet_fast.pipeline.coupled as coupled

    model, x = _case("conv")
    want = tf.prune(model, x, params_target=0.45, **OPTS).model
    real = coupled.run_coupled

    def crash(*a, **k):
        raise KeyboardInterrupt
    path = tmp_path / "run.ckpt"
    monkeypatch.setattr(coupled, "run_coupled", crash)
    with pytest.raises(KeyboardInterrupt):
        tf.prune(model, x, params_target=0.45, resume=str(path), **OPTS)
    monkeypatch.setattr(coupled, "run_coupled", real)
    got = tf.prune(model, x, params_target=0.45, resume=str(path), **OPTS).model
    for (k, a), (_, b) in zip(want.state_dict().items(), got.state_dict().items()):
        assert a.shape == b.shape and torch.equal(a, b), k


def test_shadow_cuts_in_the_pipelines_order():
    model, x = _case("conv")
    res = tf.prune(model, x, keep=0.5, **OPTS)
    items, counter = _counter(model, x, res.config, res.plan)
    shadow = counter.shadow.copy()
    group = next(it for it in items if it.kind == "group")
    unit = next(it for it in items if it.kind == "unit")
    shadow.cut(group, 1)
    with pytest.raises(RuntimeError, match="a unit cut after a group cut"):
        shadow.cut(unit, 1)
    with pytest.raises(ValueError, match="units first"):
        bi.CountModel(counter.shadow, list(reversed(items)))


@pytest.mark.parametrize("kind", ["conv", "transformer"])
def test_a_shape_only_copy_shows_the_same_groups(kind):
    import copy

    from thinet_fast.groups import find_groups

    model, x = _case(kind)
    # normalised groups (the residual stream: attention traces another way on the meta
    # device) are no budget items: budget_stats.budget_items leaves them out
    real = [g for g in find_groups(model, x[:1])[0] if not g.normalised]
    meta = [g for g in find_groups(copy.deepcopy(model).to("meta"), x[:1].to("meta"))[0] if not g.normalised]
    describe = lambda gs: sorted((g.name, g.channels, g.blocks, tuple(g.producers),  # noqa: E731
                                  tuple(r.name for r in g.readers)) for g in gs)
    print(describe(real))
    assert real and describe(meta) == describe(real)


def test_a_budget_the_pipeline_does_not_follow_is_an_error_not_a_model(monkeypatch):
    import sys

    prune_module = sys.modules["thinet_fast.pipeline.prune"]  # the package exports the function by that name
    model, x = _case("conv_nobias")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real_items, real_biases = prune_module.budget_items, prune_module.new_biases
    # a group the budget never saw: the coupled stage finds it and has no width for it
    monkeypatch.setattr(prune_module, "budget_items",
                        lambda *a, **k: [it for it in real_items(*a, **k) if it.producer != "c2"])
    with pytest.raises(RuntimeError, match="no width for the coupled group `c2`"):
        tf.prune(model, x, params_target=0.45, **OPTS)
    monkeypatch.setattr(prune_module, "budget_items", real_items)
    # biases the budget did not count: the returned model would miss the target
    monkeypatch.setattr(prune_module, "new_biases", lambda *a, **k: [])
    with pytest.raises(RuntimeError, match="did not count"):
        tf.prune(model, x, params_target=0.45, **OPTS)
    monkeypatch.setattr(prune_module, "new_biases", real_biases)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

"""thinet_fast.integrations.torch_pruning: ThiNet as a Torch-Pruning importance.

Every ranking is checked against thinet_fast's own statistics and selection, computed
independently (``collect_statistics`` one unit at a time, then ``greedy_remove``).
"""
import copy
import importlib
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

tp = pytest.importorskip("torch_pruning")

import thinet_fast  # noqa: E402
from thinet_fast.integrations.torch_pruning import (  # noqa: E402
    ThiNetImportance, UnsupportedGroupError, thinet_pruner)

OPTS = dict(num_images=20, samples_per_image=5, seed=3)


# ----------------------------------------------------------------- fixtures
class Bomb(nn.Module):
    """Identity until armed; then the forward fails here."""

    def __init__(self):
        super().__init__()
        self.armed = False

    def forward(self, x):
        if self.armed:
            raise RuntimeError("boom inside the forward")
        return x


def small_vgg(bomb: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),      # 0 1 2
              nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),  # 3 4 5
              nn.MaxPool2d(2),                                                    # 6: 14 -> 7
              nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.ReLU(),               # 7 8: 7 -> 4
              nn.Flatten(), nn.Linear(16 * 4 * 4, 10)]                            # 9 10: t = 16
    if bomb:
        layers.insert(6, Bomb())
    model = nn.Sequential(*layers)
    _randomise_bn(model)
    return model.eval()


def demo_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = thinet_fast.models.DemoResNet()
    _randomise_bn(model)
    return model.eval()


def _randomise_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.2
            m.running_mean.data = torch.randn(m.num_features, generator=g) * 0.1
            m.running_var.data = torch.rand(m.num_features, generator=g) + 0.5


def batches(hw: int, n_batches: int = 3, batch: int = 8):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(batch, 1, hw, hw, generator=g) for _ in range(n_batches)]


def out_fn(module):
    return tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels


def group_of(DG, module):
    C = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    return DG.get_pruning_group(module, out_fn(module), list(range(C)))


def expected_scores(G, method="thinet"):
    n = G.shape[0]
    s = torch.empty(n)
    if method == "thinet":
        order = thinet_fast.greedy_remove(G, n - 1)
        s.fill_(n - 1)
        s[order] = torch.arange(n - 1, dtype=torch.float32)
    else:
        keep = thinet_fast.greedy_keep_ls(G, n)
        s[keep] = torch.arange(n - 1, -1, -1, dtype=torch.float32)
    return s / (n - 1)


def consumer_unit(model, name, channels):
    """A thinet_fast Unit that takes statistics at consumer ``name`` (built by hand,
    for consumers find_units refuses because they sit on a residual stream)."""
    m = thinet_fast.units.get_module(model, name)
    if isinstance(m, nn.Linear):
        return thinet_fast.Unit(producer=name, followers=(), consumer=name, channels=channels,
                                taps=m.in_features // channels, consumer_kind="linear", flatten=True)
    return thinet_fast.Unit(producer=name, followers=(), consumer=name, channels=channels,
                            taps=m.kernel_size[0] * m.kernel_size[1], consumer_kind="conv",
                            kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation)


def no_hooks(model):
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# ----------------------------------------------------------------- (1) plain units
@pytest.mark.parametrize("statistics", ["sampled", "full"])
@pytest.mark.parametrize("which", ["vgg", "resnet"])
def test_plain_units_match_greedy_remove_on_collect_statistics(which, statistics):
    model, hw = (small_vgg(), 14) if which == "vgg" else (demo_resnet(), 28)
    data = batches(hw)
    example = data[0][:1]
    plan = thinet_fast.find_units(model, example)
    assert len(plan.units) >= 3, plan.table()
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    imp = ThiNetImportance(data, statistics=statistics, **OPTS)  # prefetch: every consumer in one pass
    for unit in plan.units:
        group = group_of(DG, thinet_fast.units.get_module(model, unit.producer))
        assert imp.consumers(group) == [unit.consumer], (unit.producer, imp.consumers(group))
        ref = thinet_fast.collect_statistics(model, [unit], data, statistics=statistics, **OPTS)[unit.producer]
        G, names = imp.gram(group)
        diff = (G - ref.gram).abs().max().item()
        print(f"{which}/{statistics} {unit.producer} -> {unit.consumer} (t={unit.taps}): max |G - G_ref| = {diff:.3g}")
        assert torch.equal(G, ref.gram)
        got, want = imp(group), expected_scores(ref.gram)
        print("  scores", got.tolist(), "\n  expect", want.tolist())
        assert torch.equal(got, want)
    assert imp.collections == 1, imp.collections


def test_thinet_ls_ranking_and_unnormalised_scores():
    model, data = small_vgg(), batches(14)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=data[0][:1])
    unit = thinet_fast.find_units(model, data[0][:1])["3"]
    ref = thinet_fast.collect_statistics(model, [unit], data, statistics="full", **OPTS)["3"].gram
    group = group_of(DG, model[3])
    got = ThiNetImportance(data, statistics="full", method="thinet_ls", **OPTS)(group)
    want = expected_scores(ref, "thinet_ls")
    print("thinet_ls", got.tolist(), want.tolist())
    assert torch.equal(got, want)
    raw = ThiNetImportance(data, statistics="full", normalize=False, **OPTS)(group)
    print("raw ranks", raw.tolist())
    assert sorted(raw.tolist()) == list(range(12))
    assert torch.equal(raw / 11, expected_scores(ref))


# ----------------------------------------------------------------- (2) a full step
def test_vgg_pruner_step_half():
    model, data = small_vgg(), batches(14)
    example = data[0][:1]
    w0 = model[0].weight.detach().clone()
    pruner = thinet_pruner(model, example, data, pruning_ratio=0.5, ignored_layers=[model[10]], **OPTS)
    imp0 = pruner.importance(group_of(pruner.DG, model[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the classifier is ignored: no warning expected
        pruner.step()
    shapes = [(m.in_channels, m.out_channels) for m in model if isinstance(m, nn.Conv2d)]
    print("conv (in, out):", shapes, "fc:", model[10].in_features, model[10].out_features)
    assert shapes == [(1, 4), (4, 6), (6, 8)]
    assert [m.num_features for m in model if isinstance(m, nn.BatchNorm2d)] == [4, 6]
    assert (model[10].in_features, model[10].out_features) == (8 * 16, 10)
    y = model(torch.randn(2, 1, 14, 14))
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    kept = torch.argsort(imp0)[4:].sort().values  # Torch-Pruning drops the lowest scores
    print("kept channels of conv 0:", kept.tolist(), "importance", imp0.tolist())
    assert torch.equal(model[0].weight.detach(), w0[kept])


def test_resnet_pruner_step_half_and_iterative_recompute():
    model, data = demo_resnet(), batches(28)
    before = {n: (m.in_channels, m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    pruner = thinet_pruner(model, data[0][:1], data, pruning_ratio=0.5, iterative_steps=2, **OPTS)
    with pytest.warns(UserWarning, match="`fc`"):  # nothing reads the classifier's outputs
        pruner.step()
    assert pruner.importance.collections == 1
    pruner.step()
    assert pruner.importance.collections == 2, "the second step must see the pruned model's statistics"
    after = {n: (m.in_channels, m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for name, (cin, cout) in before.items():
        want = (cin if cin == 1 else cin // 2, cout // 2)
        print(f"{name}: {before[name]} -> {after[name]} (want {want})")
        assert after[name] == want, name
    assert (model.fc.in_features, model.fc.out_features) == (128, 10)
    y = model(torch.randn(2, 1, 28, 28))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


# ----------------------------------------------------------------- (3) residual groups
@pytest.mark.parametrize("root, consumers", [
    ("layer2.0.conv3", ["layer2.1.conv1", "layer3.0.conv1", "layer3.0.downsample.0"]),
    ("conv1", ["layer1.0.conv1", "layer1.0.downsample.0"]),
])
def test_residual_group_sums_all_consumers(root, consumers):
    model, data = demo_resnet(), batches(28)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=data[0][:1])
    producer = thinet_fast.units.get_module(model, root)
    group = group_of(DG, producer)
    C = producer.out_channels
    imp = ThiNetImportance(data, statistics="sampled", dtype=torch.float64, **OPTS)
    print("consumers:", imp.consumers(group))
    assert sorted(imp.consumers(group)) == sorted(consumers)
    G_ref = torch.zeros(C, C, dtype=torch.float64)
    for name in consumers:
        unit = consumer_unit(model, name, C)
        G_ref += thinet_fast.collect_statistics(model, [unit], data, statistics="sampled", dtype=torch.float64,
                                                **OPTS)[name].gram
    G, _ = imp.gram(group)
    rel = ((G - G_ref).abs().max() / G_ref.abs().max()).item()
    print(f"{root}: rel |G - sum G_ref| = {rel:.3g}")
    assert rel < 1e-12
    got, want = imp(group), expected_scores(G_ref)
    print("scores", got.tolist(), "\nexpect", want.tolist())
    assert torch.equal(got, want)
    # and not just one consumer's view
    single = thinet_fast.collect_statistics(model, [consumer_unit(model, consumers[0], C)], data,
                                            statistics="sampled", dtype=torch.float64, **OPTS)[consumers[0]].gram
    assert not torch.allclose(G, single)


# ----------------------------------------------------------------- (4) hooks and errors
def test_hooks_removed_after_exception_in_forward():
    model, data = small_vgg(bomb=True), batches(14)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=data[0][:1])
    model.train()
    model[1].eval()  # per-module train flags must come back as they were
    flags = [m.training for m in model.modules()]
    model[6].armed = True  # after the first consumer (model[3]), before the others
    imp = ThiNetImportance(data, **OPTS)
    group = group_of(DG, model[8])  # its consumer, the Linear, lies past the bomb (model[6])
    with pytest.raises(RuntimeError, match="boom"):
        imp(group)
    print("hooks left:", [(n, dict(m._forward_pre_hooks)) for n, m in model.named_modules() if m._forward_pre_hooks])
    assert no_hooks(model)
    assert [m.training for m in model.modules()] == flags
    model[6].armed = False
    assert imp(group).shape == (16,)  # a failed pass leaves nothing half-cached
    assert no_hooks(model)


def test_unsupported_consumer_is_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                          nn.Conv2d(8, 4, 1))
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 9, 9))
    imp = ThiNetImportance([torch.randn(4, 3, 9, 9)], num_images=4)
    with pytest.raises(UnsupportedGroupError, match=r"`2`.*grouped Conv2d") as err:
        imp(group_of(DG, model[0]))
    print(err.value)
    assert no_hooks(model)
    assert imp(group_of(DG, model[2])).shape == (8,)  # the grouped conv's own outputs are fine


def test_bad_arguments():
    with pytest.raises(TypeError, match="one-shot iterator"):
        ThiNetImportance(iter([torch.randn(2, 1, 8, 8)]))
    with pytest.raises(ValueError, match="statistics"):
        ThiNetImportance([torch.randn(2, 1, 8, 8)], statistics="exact")
    with pytest.raises(ValueError, match="method"):
        ThiNetImportance([torch.randn(2, 1, 8, 8)], method="apoz")


# ----------------------------------------------------------------- (5) no side effects
def test_importance_leaves_weights_unchanged_and_caches():
    model, data = demo_resnet(), batches(28)
    state = copy.deepcopy(model.state_dict())
    params = [id(p) for p in model.parameters()]
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=data[0][:1])
    imp = ThiNetImportance(data, statistics="auto", **OPTS)
    groups = list(DG.get_all_groups(ignored_layers=[model.fc], root_module_types=[nn.Conv2d, nn.Linear]))
    first = [imp(g) for g in groups]
    again = [imp(g) for g in groups]
    assert imp.collections == 1 and set(imp.statistics_used.values()) == {"full"}
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    print("changed tensors:", changed)
    assert not changed and [id(p) for p in model.parameters()] == params
    assert no_hooks(model) and not model.training
    with torch.no_grad():  # an in-place change invalidates the cache
        model.layer1[0].conv1.weight.mul_(2)
    imp(groups[0])
    assert imp.collections == 2
    imp.reset()
    imp(groups[0])
    assert imp.collections == 3


# ----------------------------------------------------------------- imports
def test_import_thinet_fast_does_not_import_torch_pruning():
    code = ("import sys, thinet_fast, thinet_fast.integrations; "
            "sys.exit(1 if 'torch_pruning' in sys.modules else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    print(r.stdout, r.stderr)
    assert r.returncode == 0


def test_missing_torch_pruning_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # makes `import torch_pruning` fail
    monkeypatch.delitem(sys.modules, "thinet_fast.integrations.torch_pruning")
    with pytest.raises(ImportError, match="pip install torch-pruning") as err:
        importlib.import_module("thinet_fast.integrations.torch_pruning")
    print(err.value)


def test_concat_consumer_uses_its_sub_block():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 2, 1)
            self.c = nn.Conv2d(6, 5, 3)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], 1).relu())

    torch.manual_seed(0)
    model, data = Cat().eval(), batches(8)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=data[0][:1])
    imp = ThiNetImportance(data, statistics="full", **OPTS)
    G_c = thinet_fast.collect_statistics(model, [consumer_unit(model, "c", 6)], data, statistics="full",
                                         **OPTS)["c"].gram
    for producer, block in (("a", slice(0, 4)), ("b", slice(4, 6))):
        group = group_of(DG, getattr(model, producer))
        G, names = imp.gram(group)
        print(producer, names, (G - G_c[block, block]).abs().max().item())
        assert names == ["c"] and torch.equal(G, G_c[block, block])
        assert torch.equal(imp(group), expected_scores(G_c[block, block]))

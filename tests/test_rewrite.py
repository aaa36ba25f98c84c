"""Physical rewriting: shapes, exactness against zeroed channels, copies, export."""
import copy
import dataclasses
import importlib.util
import io

import pytest
import torch
import torch.nn as nn
import torchvision

from thinet_fast.counting import count_params
from thinet_fast.models import DemoResNet, DemoVGG
from thinet_fast.rewrite import check_keep, prune_unit_, prune_units
from thinet_fast.units import find_units, get_module

X28 = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def random_keep(c, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(c, generator=g)[:n].sort().values


def seeded(builder, seed=0, **kw):
    torch.manual_seed(seed)
    return builder(**kw)


def randomize_bn(model, seed=0):
    """Non-trivial BN statistics/affine so that BN is not the identity in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model


# ------------------------------------------------------------------ identity and exactness
@pytest.mark.parametrize("builder", [DemoVGG, DemoResNet])
def test_keep_all_channels_is_identity(builder):
    model = randomize_bn(seeded(builder)).eval()
    plan = find_units(model, X28)
    pruned = prune_units(model, plan, {u.producer: torch.arange(u.channels) for u in plan})
    assert all(get_module(pruned, u.producer) is not get_module(model, u.producer) for u in plan)
    torch.testing.assert_close(pruned(X28), model(X28))


class NoBN(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> pool -> flatten -> fc -> ReLU -> fc (no BN after a cut)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1)
        self.c2 = nn.Conv2d(12, 10, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(10 * 4 * 4, 20)
        self.fc2 = nn.Linear(20, 5)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        x = nn.functional.max_pool2d(x, 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def test_pruning_equals_zeroing_producer_channels():
    # Without BN after the cut, a removed channel with zero weight and bias is exactly 0
    # after ReLU, so the unpruned model with those rows zeroed must equal the pruned one.
    model = seeded(NoBN).eval()
    x = torch.randn(3, 3, 16, 16)
    plan = find_units(model, x)
    assert plan.producers == ["c1", "c2", "fc1"]
    assert plan["c2"].flatten and plan["c2"].taps == 16
    keeps = {"c1": random_keep(12, 7, 1), "c2": random_keep(10, 4, 2), "fc1": random_keep(20, 9, 3)}
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for fqn, keep in keeps.items():
            m = get_module(zeroed, fqn)
            drop = torch.ones(m.weight.shape[0], dtype=torch.bool)
            drop[keep] = False
            m.weight[drop] = 0
            m.bias[drop] = 0
    pruned = prune_units(model, plan, keeps)
    assert pruned.c1.out_channels == 7 and pruned.c2.in_channels == 7 and pruned.c2.out_channels == 4
    assert pruned.fc1.in_features == 4 * 16 and pruned.fc1.out_features == 9 and pruned.fc2.in_features == 9
    torch.testing.assert_close(pruned(x), zeroed(x), rtol=1e-5, atol=1e-6)
    # and the zeroing is not a no-op: the full model differs
    assert not torch.allclose(model(x), zeroed(x), atol=1e-4)


def test_pruning_equals_zeroing_bn_outputs():
    # With BN after the cut, zero the BN's affine for removed channels (eval mode): the
    # channel's BN output is 0, ReLU keeps it 0, so it contributes nothing downstream.
    model = randomize_bn(seeded(DemoVGG)).eval()
    plan = find_units(model, X28)
    keeps = {u.producer: random_keep(u.channels, max(1, u.channels // 2 - 1), i) for i, u in enumerate(plan)}
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for u in plan:
            drop = torch.ones(u.channels, dtype=torch.bool)
            drop[keeps[u.producer]] = False
            if u.producer_kind == "conv":
                bn = get_module(zeroed, u.followers[0])
                bn.weight[drop] = 0
                bn.bias[drop] = 0
            else:  # fc -> ReLU -> Dropout -> fc: zero the producer rows
                p = get_module(zeroed, u.producer)
                p.weight[drop] = 0
                p.bias[drop] = 0
    pruned = prune_units(model, plan, keeps)
    torch.testing.assert_close(pruned(X28), zeroed(X28), rtol=1e-5, atol=1e-5)


def test_depthwise_block_zeroing():
    model = nn.Sequential(nn.Conv2d(3, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=True), nn.BatchNorm2d(16), nn.ReLU6(),
                          nn.Conv2d(16, 8, 1))
    model = randomize_bn(model).eval()
    x = torch.randn(2, 3, 8, 8)
    plan = find_units(model, x)
    keep = random_keep(16, 6, 5)
    zeroed = copy.deepcopy(model)
    drop = torch.ones(16, dtype=torch.bool)
    drop[keep] = False
    with torch.no_grad():
        zeroed[4].weight[drop] = 0
        zeroed[4].bias[drop] = 0
    pruned = prune_units(model, plan, {"0": keep})
    assert (pruned[0].out_channels, pruned[1].num_features, pruned[3].groups, pruned[3].in_channels,
            pruned[4].num_features, pruned[6].in_channels) == (6, 6, 6, 6, 6, 6)
    torch.testing.assert_close(pruned[1].running_var, model[1].running_var[keep])
    torch.testing.assert_close(pruned[3].bias, model[3].bias[keep])
    torch.testing.assert_close(pruned(x), zeroed(x), rtol=1e-5, atol=1e-6)


def test_linear_after_flatten_taps_follow_channels():
    model = nn.Sequential(nn.Conv2d(2, 5, 1), nn.Flatten(), nn.Linear(5 * 6, 3))
    plan = find_units(model, torch.randn(1, 2, 2, 3))
    keep = torch.tensor([1, 4])
    pruned = prune_units(model, plan, [keep])
    cols = torch.tensor([6, 7, 8, 9, 10, 11, 24, 25, 26, 27, 28, 29])  # c*t + u, t = 6
    torch.testing.assert_close(pruned[2].weight, model[2].weight[:, cols])


# ------------------------------------------------------------------ counts against from-scratch models
def test_param_count_matches_narrow_model():
    model = DemoVGG()
    plan = find_units(model, X28)
    keeps = {u.producer: torch.arange(u.channels // 2) for u in plan}
    pruned = prune_units(model, plan, keeps)
    narrow = DemoVGG(widths=(4, 8, 16, 32, 32), hidden=128)
    assert count_params(pruned) == count_params(narrow)
    assert {k: v.shape for k, v in pruned.state_dict().items()} == {k: v.shape for k, v in narrow.state_dict().items()}


def test_resnet50_half_inner_width_matches_width_per_group_32():
    with torch.device("meta"):
        model = torchvision.models.resnet50(weights=None)
        narrow = torchvision.models.ResNet(torchvision.models.resnet.Bottleneck, [3, 4, 6, 3], width_per_group=32)
    plan = find_units(model, torch.zeros(1, 3, 224, 224))
    pruned = prune_units(model, plan, {u.producer: torch.arange(u.channels // 2) for u in plan}, inplace=True)
    assert pruned is model
    assert {k: v.shape for k, v in pruned.state_dict().items()} == {k: v.shape for k, v in narrow.state_dict().items()}
    assert count_params(pruned) == count_params(narrow) == 12_381_864


# ------------------------------------------------------------------ consumer weights
def test_consumer_weight_and_new_bias():
    model = DemoVGG().eval()
    plan = find_units(model, X28)
    u = plan["features.4"]  # conv (bias=False, followed by BN) -> conv
    keep = torch.tensor([0, 3, 5, 9])
    K = u.consumer_out
    w = torch.randn(K, 4 * 9)  # flattened (K, n*t) form is accepted
    b = torch.randn(K)
    pruned = copy.deepcopy(model)
    prune_unit_(pruned, u, keep, consumer_weight=w, consumer_bias=b)
    cons = get_module(pruned, u.consumer)
    # the consumer is followed by BatchNorm: the bias folds into its running mean
    assert u.consumer_norm is not None and cons.bias is None
    before = get_module(model, u.consumer_norm).running_mean
    torch.testing.assert_close(get_module(pruned, u.consumer_norm).running_mean, before - b)
    pruned = copy.deepcopy(model)
    prune_unit_(pruned, dataclasses.replace(u, consumer_norm=None), keep, consumer_weight=w, consumer_bias=b)
    cons = get_module(pruned, u.consumer)
    assert cons.weight.shape == (K, 4, 3, 3) and cons.bias is not None
    torch.testing.assert_close(cons.weight, w.reshape(K, 4, 3, 3))
    torch.testing.assert_close(cons.bias, b)
    assert cons.weight.data_ptr() != w.data_ptr()  # copied, not aliased
    assert pruned(X28).shape == (4, 10)
    fc = plan["features.14"]  # linear after flatten: (K, n*t)
    with pytest.raises(ValueError, match=r"classifier.0.*expected \(256, 18\)"):
        prune_unit_(copy.deepcopy(model), fc, torch.tensor([0, 1]), consumer_weight=torch.randn(256, 2))
    with pytest.raises(ValueError, match=r"consumer_bias .* shape \(256,\)"):
        prune_unit_(copy.deepcopy(model), fc, torch.tensor([0, 1]), consumer_bias=torch.randn(3))
    with pytest.raises(ValueError, match="NaN"):
        prune_unit_(copy.deepcopy(model), fc, torch.tensor([0, 1]), consumer_weight=torch.full((256, 18), float("nan")))


# ------------------------------------------------------------------ validation, copies, staleness
@pytest.mark.parametrize("keep, err, msg", [
    (torch.tensor([2, 1]), ValueError, "sorted"),
    (torch.tensor([1, 1]), ValueError, "repeated"),
    (torch.tensor([0, 8]), ValueError, r"\[0, 8\)"),
    (torch.tensor([-1, 2]), ValueError, r"\[0, 8\)"),
    (torch.tensor([], dtype=torch.long), ValueError, "no channel"),
    (torch.tensor([0.0, 1.0]), TypeError, "integers"),
    (torch.ones(8, dtype=torch.bool), TypeError, "nonzero"),
    (torch.tensor([[0, 1]]), ValueError, "1-D"),
])
def test_keep_validation(keep, err, msg):
    with pytest.raises(err, match=msg):
        check_keep(keep, 8, "keep")


def test_validation_happens_before_any_change():
    model = DemoVGG()
    plan = find_units(model, X28)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    with pytest.raises(ValueError):
        prune_unit_(model, plan["features.0"], torch.tensor([0, 1]), consumer_weight=torch.randn(3, 3))
    with pytest.raises(ValueError, match="sorted"):
        prune_units(model, plan, {"features.0": [0, 1], "features.4": [3, 2]}, inplace=True)
    assert dict(model.named_modules()) == modules
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_caller_model_unchanged_unless_inplace():
    model = DemoResNet()
    plan = find_units(model, X28)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keeps = {u.producer: torch.arange(u.channels // 2) for u in plan}
    pruned = prune_units(model, plan, keeps)
    assert pruned is not model
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in before.items()}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert count_params(pruned) < count_params(model)
    same = prune_units(model, plan, keeps, inplace=True)
    assert same is model and count_params(model) == count_params(pruned)


def test_stale_unit_and_unknown_keys():
    model = DemoVGG()
    plan = find_units(model, X28)
    prune_unit_(model, plan["features.0"], torch.arange(4))
    with pytest.raises(ValueError, match=r"stale: `features.0` has 4 output channels"):
        prune_unit_(model, plan["features.0"], torch.arange(2))
    with pytest.raises(ValueError, match="not units of the plan"):
        prune_units(model, plan, {"features.1": [0]})
    with pytest.raises(ValueError, match="2 keeps for 6 units"):
        prune_units(model, plan, [[0], [0]])


# ------------------------------------------------------------------ the result is an ordinary model
def small_pruned():
    model = randomize_bn(seeded(DemoResNet))
    plan = find_units(model, X28)
    return prune_units(model, plan, {u.producer: random_keep(u.channels, u.channels // 2, i) for i, u in enumerate(plan)})


def test_pruned_model_trains_and_keeps_dtype():
    model = DemoVGG().double()
    plan = find_units(model, X28.double())
    pruned = prune_units(model, plan, {u.producer: torch.arange(u.channels // 2) for u in plan})
    assert all(p.dtype == torch.float64 for p in pruned.parameters())
    assert all(not t.is_meta for t in pruned.state_dict().values())
    pruned.train()
    opt = torch.optim.SGD(pruned.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(pruned(X28.double()), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in pruned.parameters())
    opt.step()
    assert pruned.features[1].num_batches_tracked.item() == 1


def test_pruned_model_torch_save_roundtrip():
    pruned = small_pruned().eval()
    buf = io.BytesIO()
    torch.save(pruned, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    torch.testing.assert_close(again(X28), pruned(X28))


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None,
                    reason="onnx/onnxscript not installed")
def test_pruned_model_onnx_export(tmp_path):
    import onnx
    from onnx.reference import ReferenceEvaluator

    pruned = small_pruned().eval()
    path = tmp_path / "pruned.onnx"
    torch.onnx.export(pruned, (X28,), str(path), dynamo=True, verbose=False)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    ref = ReferenceEvaluator(proto)
    out = ref.run(None, {ref.input_names[0]: X28.numpy()})[0]
    expected = pruned(X28).detach().numpy()
    print("onnx max abs err", abs(out - expected).max())
    assert abs(out - expected).max() < 1e-4


def test_pruned_model_torch_compile():
    # a small pruned chain keeps dynamo/aot tracing quick on the CPU
    model = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 11 * 11, 10))
    plan = find_units(model, X28)
    pruned = prune_units(model, plan, {"0": torch.tensor([1, 2, 6]), "4": torch.tensor([0, 5])}).train()
    eager = copy.deepcopy(pruned)
    compiled = torch.compile(pruned, backend="aot_eager", fullgraph=True)
    out = compiled(X28)
    out.square().mean().backward()
    ref = eager(X28)
    ref.square().mean().backward()
    assert out.shape == (4, 10) and pruned[7].in_features == 2 * 121
    torch.testing.assert_close(out, ref)
    for (name, p), q in zip(pruned.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_bias_correction_folds_into_the_following_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
    with torch.no_grad():
        model[3].running_mean.uniform_(-0.5, 0.5)
        model[3].running_var.uniform_(0.5, 1.5)
    x = torch.randn(5, 3, 7, 7)
    (unit,) = find_units(model, x[:1]).units
    assert unit.consumer_norm == "3"
    keep = torch.tensor([0, 2, 3, 6])
    b = torch.randn(6)
    folded = prune_unit_(copy.deepcopy(model), unit, keep, consumer_bias=b)
    added = prune_unit_(copy.deepcopy(model), dataclasses.replace(unit, consumer_norm=None), keep, consumer_bias=b)
    assert folded[2].bias is None and added[2].bias is not None
    for mode in ("eval", "train"):
        getattr(folded, mode)(), getattr(added, mode)()
        err = float((folded(x) - added(x)).abs().max())
        print(mode, err)
        assert err < 1e-5
    # no BatchNorm after the consumer: nothing to fold into
    twice = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 6, 1, bias=False))
    assert find_units(twice, x[:1]).units[0].consumer_norm is None

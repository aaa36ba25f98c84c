"""Unit discovery on torchvision and hand-built models (shapes only: meta device where big)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from thinet_fast.units import (Refusal, Unit, UnitPlan, UntraceableModelError, find_units, get_module,
                               set_module)

X224 = torch.zeros(1, 3, 224, 224)


def meta(builder, **kw):
    with torch.device("meta"):
        return builder(weights=None, **kw)


def refusal(plan, fqn):
    for r in plan.refused:
        if r.producer == fqn:
            return r.reason
    raise AssertionError(f"{fqn} not refused; refused: {[r.producer for r in plan.refused]}")


# ------------------------------------------------------------------ torchvision
def test_vgg16_units():
    plan = find_units(meta(torchvision.models.vgg16), X224)
    convs = ["features.%d" % i for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)]
    assert plan.producers == convs + ["classifier.0", "classifier.3"]
    for a, b in zip(convs, convs[1:]):
        u = plan[a]
        assert (u.consumer, u.consumer_kind, u.taps, u.flatten) == (b, "conv", 9, False)
        assert u.kernel_size == (3, 3) and u.stride == (1, 1) and u.padding == (1, 1) and u.dilation == (1, 1)
    assert plan["features.2"].followers == ("features.3", "features.4")  # ReLU, MaxPool
    fc6 = plan["features.28"]
    assert (fc6.consumer, fc6.consumer_kind, fc6.channels, fc6.taps, fc6.flatten) == ("classifier.0", "linear", 512, 49, True)
    assert fc6.followers == ("features.29", "features.30", "avgpool")
    assert fc6.consumer_in_shape == (25088,) and fc6.consumer_out == 4096
    fc7 = plan["classifier.0"]
    assert (fc7.consumer, fc7.taps, fc7.flatten, fc7.producer_kind) == ("classifier.3", 1, False, "linear")
    assert [r.producer for r in plan.refused] == ["classifier.6"]
    assert "model output" in refusal(plan, "classifier.6")


def test_vgg16_bn_followers():
    plan = find_units(meta(torchvision.models.vgg16_bn), X224)
    assert len(plan.units) == 15
    assert plan["features.0"].followers == ("features.1", "features.2")
    assert plan["features.0"].consumer == "features.3"


def test_resnet50_bottleneck():
    plan = find_units(meta(torchvision.models.resnet50), X224)
    blocks = [f"layer{i}.{b}" for i, n in enumerate((3, 4, 6, 3), 1) for b in range(n)]
    assert sorted(plan.producers) == sorted([f"{b}.conv1" for b in blocks] + [f"{b}.conv2" for b in blocks])
    u1, u2 = plan["layer2.0.conv1"], plan["layer2.0.conv2"]
    assert (u1.consumer, u1.taps, u1.stride) == ("layer2.0.conv2", 9, (2, 2))  # torchvision v1.5: stride on the 3x3
    assert u1.followers == ("layer2.0.bn1", "layer2.0.relu")
    assert (u2.consumer, u2.taps, u2.channels, u2.consumer_out) == ("layer2.0.conv3", 1, 128, 512)
    for b in blocks:
        assert "residual" in refusal(plan, f"{b}.conv3")
    for i in range(1, 5):
        assert "residual" in refusal(plan, f"layer{i}.0.downsample.0")
    assert "layer1.0.conv1" in refusal(plan, "conv1") and "layer1.0.downsample.0" in refusal(plan, "conv1")
    assert "model output" in refusal(plan, "fc")
    assert len(plan.refused) == 16 + 4 + 2


def test_resnet18_basic_block():
    plan = find_units(meta(torchvision.models.resnet18), X224)
    assert plan.producers == [f"layer{i}.{b}.conv1" for i in range(1, 5) for b in range(2)]
    assert all(plan[p].consumer == p.replace("conv1", "conv2") for p in plan.producers)
    reason = refusal(plan, "layer3.1.conv2")
    assert "residual add" in reason and "layer3.1" in reason


def test_mobilenet_v2_depthwise_follower():
    plan = find_units(meta(torchvision.models.mobilenet_v2), X224)
    u = plan["features.2.conv.0.0"]
    assert u.followers == ("features.2.conv.0.1", "features.2.conv.0.2", "features.2.conv.1.0",
                           "features.2.conv.1.1", "features.2.conv.1.2")
    assert (u.consumer, u.taps) == ("features.2.conv.2", 1)
    assert "residual" in refusal(plan, "features.3.conv.2")


# ------------------------------------------------------------------ hand-built models
def test_sequential_linear_after_flatten():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                      nn.Linear(8 * 3 * 3, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 4))
    plan = find_units(m, torch.randn(2, 3, 8, 8))
    u = plan["0"]
    assert (u.consumer, u.consumer_kind, u.taps, u.flatten, u.followers) == ("4", "linear", 9, True, ("1", "2", "3"))
    v = plan["4"]
    assert (v.consumer, v.taps, v.flatten, v.followers) == ("7", 1, False, ("5", "6"))


class ViewFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 5)
        self.conv2 = nn.Conv2d(3, 6, 3, padding=1)
        self.fc2 = nn.Linear(6, 5)

    def forward(self, x):
        a = F.relu(self.conv(x))
        a = F.max_pool2d(a, 2)
        a = self.fc(a.view(a.size(0), -1))
        b = torch.relu(self.conv2(x)).mean((2, 3))  # global pooling written as a mean
        return a + self.fc2(b)


def test_functional_ops_view_flatten_and_mean_pool():
    plan = find_units(ViewFlatten(), torch.randn(2, 3, 8, 8))
    u = plan["conv"]
    assert (u.consumer, u.taps, u.flatten, u.followers) == ("fc", 16, True, ())
    assert u.ops == ("conv", "relu", "max_pool2d", "view", "fc")
    v = plan["conv2"]
    assert (v.consumer, v.taps, v.flatten) == ("fc2", 1, False)
    assert "residual add" in refusal(plan, "fc")


def test_depthwise_block():
    m = nn.Sequential(nn.Conv2d(3, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                      nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                      nn.Conv2d(16, 8, 1))
    plan = find_units(m, torch.randn(1, 3, 8, 8))
    assert plan.producers == ["0"]
    u = plan["0"]
    assert u.followers == ("1", "2", "3", "4", "5") and u.consumer == "6" and u.taps == 1
    assert "model output" in refusal(plan, "6")


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1))


def test_concat_refused():
    plan = find_units(Concat(), torch.randn(1, 3, 6, 6))
    assert plan.units == []
    assert "concat" in refusal(plan, "a") and "concat" in refusal(plan, "b")


class MultiConsumer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 4, 1)
        self.right = nn.Conv2d(8, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.mix = nn.Conv2d(4, 4, 1)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = F.relu(self.stem(x))
        y = self.grouped(F.relu(self.left(h)))          # grouped, not depthwise
        z = torch.softmax(self.mix(self.right(h)), dim=1)  # mixes channels
        return self.out(y * z)


def test_multi_consumer_grouped_and_unknown_refused():
    plan = find_units(MultiConsumer(), torch.randn(1, 3, 6, 6))
    assert plan.producers == ["right"]  # right -> mix is a plain conv -> conv unit
    assert "read by 2 ops" in refusal(plan, "stem") and "`left`" in refusal(plan, "stem")
    assert "grouped conv" in refusal(plan, "left") and "`grouped`" in refusal(plan, "left")
    assert "softmax" in refusal(plan, "mix")
    assert "model output" in refusal(plan, "out")


class SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c(self.bn(self.b(self.bn(self.a(x)))))


def test_shared_stateful_follower_refused():
    plan = find_units(SharedBN(), torch.randn(2, 3, 6, 6))
    assert plan.units == []
    assert "called 2 times" in refusal(plan, "a") and "`bn`" in refusal(plan, "a")


def test_linear_producer_with_batchnorm1d():
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.GELU(), nn.Linear(8, 3)).train()
    plan = find_units(m, torch.randn(1, 3, 2, 2))  # batch of one: the shape pass runs in eval mode
    assert m.training and m[2].training
    u = plan["1"]
    assert (u.producer_kind, u.consumer, u.followers, u.taps, u.flatten) == ("linear", "4", ("2", "3"), 1, False)


def test_conv_into_linear_without_flatten_refused():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Linear(5, 2))
    plan = find_units(m, torch.randn(1, 3, 5, 5))
    assert "last dim" in refusal(plan, "0")


# ------------------------------------------------------------------ tracing errors
class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # not fx-traceable
            return x
        return -x


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.block = nn.Sequential(nn.Identity(), DataDependent())

    def forward(self, x):
        return self.block(self.conv(x))


def test_untraceable_names_module():
    with pytest.raises(UntraceableModelError, match=r"`block\.1` \(DataDependent\)") as ei:
        find_units(Wrapper(), torch.randn(1, 3, 4, 4))
    assert "leaf_modules" in str(ei.value)
    # the fix the message suggests works: the leaf is an unknown op, conv is refused
    plan = find_units(Wrapper(), torch.randn(1, 3, 4, 4), leaf_modules=["block.1"])
    assert "block.1" in refusal(plan, "conv")


# ------------------------------------------------------------------ selection
def test_units_selection_and_errors():
    m = meta(torchvision.models.resnet18)
    plan = find_units(m, X224, units=["layer2.1.conv1", "layer1.0.conv1"])
    assert plan.producers == ["layer1.0.conv1", "layer2.1.conv1"] and plan.refused == []
    with pytest.raises(ValueError, match=r"`layer1.0.conv2` cannot be pruned: .*residual"):
        find_units(m, X224, units=["layer1.0.conv2"])
    with pytest.raises(ValueError, match=r"`nope` is not a module"):
        find_units(m, X224, units=["nope"])
    with pytest.raises(ValueError, match=r"`layer1.0.bn1` is a BatchNorm2d, not a producer"):
        find_units(m, X224, units=["layer1.0.bn1"])
    with pytest.raises(ValueError, match="not both"):
        find_units(m, X224, units=["layer1.0.conv1"], filter_fn=lambda mod, fqn: True)


def test_filter_fn():
    m = meta(torchvision.models.resnet18)
    calls = []

    def only_layer4(mod, fqn):
        calls.append(fqn)
        assert isinstance(mod, (nn.Conv2d, nn.Linear))
        return fqn.startswith("layer4")

    plan = find_units(m, X224, filter_fn=only_layer4)
    assert plan.producers == ["layer4.0.conv1", "layer4.1.conv1"]
    assert {r.producer for r in plan.refused} == {"layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv2"}
    assert "conv1" in calls and "fc" in calls


def test_plan_str_and_lookup():
    plan = find_units(meta(torchvision.models.resnet18), X224)
    text = str(plan)
    assert "8 unit(s), 13 refused" in text and "layer1.0.conv1" in text and "residual" in text
    assert "layer1.0.conv1" in plan and "layer1.0.conv2" not in plan
    with pytest.raises(KeyError, match="refused"):
        plan["layer1.0.conv2"]
    assert isinstance(plan.refused[0], Refusal) and isinstance(plan[0], Unit) and len(plan) == 8


def test_find_units_does_not_touch_model():
    m = torchvision.models.resnet18(weights=None, num_classes=10).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    find_units(m, torch.randn(2, 3, 32, 32))
    assert m.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------ dataclasses and helpers
def test_unit_validation():
    with pytest.raises(ValueError, match="consumer_kind"):
        Unit("a", (), "b", 4, 1, "pool")
    with pytest.raises(ValueError, match="taps"):
        Unit("a", (), "b", 4, 4, "conv", kernel_size=(3, 3))
    with pytest.raises(ValueError, match="kernel"):
        Unit("a", (), "b", 4, 9, "conv")
    u = Unit("a", ["x"], "b", 4, 9, "conv", kernel_size=3)
    assert u.followers == ("x",) and u.kernel_size == (3, 3) and u.padding == (0, 0) and u.in_features == 36
    with pytest.raises(Exception):
        u.channels = 3  # frozen
    assert isinstance(UnitPlan().units, list)


def test_get_set_module():
    m = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Sequential(nn.ReLU(), nn.Linear(2, 2)))
    assert isinstance(get_module(m, "1.1"), nn.Linear) and get_module(m, "") is m
    with pytest.raises(KeyError, match="`1` has no child `5`"):
        get_module(m, "1.5")
    set_module(m, "1.0", nn.GELU())
    assert isinstance(m[1][0], nn.GELU)
    with pytest.raises(ValueError, match="root"):
        set_module(m, "", nn.ReLU())
    with pytest.raises(KeyError):
        set_module(m, "1.7", nn.ReLU())


def test_shape_passes_fall_back_when_meta_cannot_run():
    """A tensor held outside parameters/buffers defeats the meta pass; the fake-tensor
    fallback must then give the same shapes and FLOPs, once, and touch nothing."""
    from thinet_fast.counting import profile

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3)
            self.scale = torch.randn(1, 4, 1, 1)  # a plain attribute: stays on the CPU

        def forward(self, x):
            return self.conv2(torch.relu(self.bn(self.conv1(x)))) * self.scale

    model = Shifted().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 9, 9)
    plan = find_units(model, x)
    assert [(u.producer, u.consumer, u.consumer_in_shape) for u in plan.units] == [("conv1", "conv2", (8, 9, 9))]
    prof = profile(model, x[:1])
    print([(lc.name, lc.out_shape, lc.flops) for lc in prof.layers])
    assert [lc.name for lc in prof.layers] == ["conv1", "conv2"]
    assert prof.flops == 2 * 8 * 81 * 3 * 9 + 2 * 4 * 49 * 8 * 9
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())

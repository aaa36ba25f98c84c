"""Activation replay (DESIGN.md §7): cut points, segments, and a sequential prune that
equals the re-run-from-the-images schedule."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import thinet_fast as tf
from thinet_fast.models import DemoResNet, DemoVGG
from thinet_fast.segments import Segments, State


def _data(n=20, batch=6, seed=0, shape=(1, 28, 28)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    return [(x[i:i + batch],) for i in range(0, n, batch)]


def _model(cls, seed=0, **kw):
    torch.manual_seed(seed)
    m = cls(**kw).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.1, 0.3)
    return m


class Chain(nn.Module):
    """Conv chain with a strided and a dilated consumer, then flatten -> Linear -> Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(12, 10, 3, padding=2, dilation=2)
        self.fc1 = nn.Linear(10 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = nn.functional.max_pool2d(torch.relu(self.c3(x)), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def _max_rel(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    worst = 0.0
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        if sa[k].is_floating_point():
            worst = max(worst, float((sa[k] - sb[k]).abs().max() / sb[k].abs().max().clamp_min(1e-12)))
    return worst


def test_cut_points_of_a_chain_and_of_a_resnet():
    seg = Segments(Chain())
    names = [seg.name(c) for c in seg.cuts]
    print(names)
    # in a chain every value is a cut point
    assert names[0] == "input" and "c1" in names and "flatten" in names and "relu_3" in names
    m = _model(DemoResNet)
    seg = Segments(m)
    inner = seg.input_of("layer2.1.conv2")  # inside a block: the identity is still live
    assert not seg.is_cut(inner)
    cut = seg.latest_cut(seg.call("layer2.1.conv1"))
    print("latest cut before layer2.1.conv1:", seg.name(cut))
    # the block input (layer2.0's output, after its final ReLU) is the last cut before it
    assert seg.is_cut(cut) and seg.nodes[cut].target == "layer2.0.relu" or "relu" in seg.name(cut)
    later = [n for n in seg.nodes[cut + 1: seg.call("layer2.1.conv1") + 1] if n.op == "call_module"]
    assert [str(n.target) for n in later] == ["layer2.1.conv1"]


@pytest.mark.parametrize("cls", [Chain, DemoVGG, DemoResNet])
@torch.no_grad()
def test_segments_reproduce_the_forward(cls):
    m = _model(cls)
    x = _data(shape=(3, 16, 16) if cls is Chain else (1, 28, 28))[0][0]
    seg = Segments(m)
    want = m(x)
    states = [i for i, d in enumerate(seg.dynamic) if d and seg.nodes[i].op != "output"]
    assert len(seg.cuts) < len(states) or cls is not DemoResNet
    for c in states:
        v = seg.run(m, seg.input, x, capture=c, stop=c)
        assert isinstance(v, State) == (not seg.is_cut(c)) and (not isinstance(v, State) or v.batch == x.shape[0])
        v = State([t.clone() for t in v], v.batch) if isinstance(v, State) else v.clone()
        got = seg.run(m, c, v)
        err = float((got - want).abs().max())
        print(seg.name(c), len(seg.live(c)), err)
        assert err == 0.0
    inner = [c for c in states if not seg.is_cut(c)]
    if inner:  # a bare tensor where the state is several values
        with pytest.raises(ValueError, match="values"):
            seg.run(m, inner[0], x)


CASES = [
    (Chain, dict(keep=0.5), (3, 16, 16)),
    (DemoVGG, dict(keep=0.5), (1, 28, 28)),
    (DemoResNet, dict(keep=0.5), (1, 28, 28)),
    (DemoVGG, dict(keep=0.5, reconstruction="full", statistics="full"), (1, 28, 28)),
]


@pytest.mark.parametrize("cls,opts,shape", CASES)
def test_replay_equals_rerun_from_images(cls, opts, shape):
    model, data = _model(cls), _data(shape=shape)
    kw = dict(opts, num_images=18, samples_per_image=4, progress=False, seed=2, schedule="sequential")
    rerun = tf.prune(model, data, replay_memory=0, **kw)
    replay = tf.prune(model, data, **kw)
    how = [u["replay"] for u in replay.report.units]
    print("\n".join(how))
    assert all("replay off" in u["replay"] for u in rerun.report.units)
    assert sum("replayed from" in h for h in how) >= len(how) - 1
    for a, b in zip(replay.report.units, rerun.report.units):
        assert a["kept"] == b["kept"]
    err = _max_rel(replay.model, rerun.model)
    print("max relative weight difference", err)
    assert err < 1e-4
    x = data[0][0]
    assert torch.allclose(replay.model(x), rerun.model(x), rtol=1e-4, atol=1e-5)


def test_over_budget_falls_back_to_the_images_and_still_agrees():
    model, data = _model(DemoVGG), _data()
    kw = dict(keep=0.5, num_images=18, samples_per_image=4, progress=False, seed=1)
    rerun = tf.prune(model, data, replay_memory=0, **kw)
    small = tf.prune(model, data, replay_memory=6 * 8 * 14 * 14 * 4 * 3 + 1, **kw)  # room for small maps only
    how = [u["replay"] for u in small.report.units]
    print("\n".join(how))
    assert any("over the replay memory budget" in h for h in how)
    assert any("replayed from" in h for h in how)
    assert _max_rel(small.model, rerun.model) < 1e-4


def test_replay_resumes_and_per_unit_finetune_invalidates(tmp_path):
    model, data = _model(DemoResNet), _data()
    kw = dict(keep=0.5, num_images=18, samples_per_image=4, progress=False, seed=4)
    want = tf.prune(model, data, **kw).model
    ckpt = str(tmp_path / "run.ckpt")
    calls = []

    def stop_after_two(m, unit, index):
        calls.append(index)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tf.prune(model, data, resume=ckpt, finetune=stop_after_two, **kw)
    resumed = tf.prune(model, data, resume=ckpt, finetune=stop_after_two, **kw)  # the same callback
    assert _max_rel(resumed.model, want) < 1e-4


def test_finetune_callback_sees_fresh_statistics():
    model, data = _model(DemoVGG), _data()
    kw = dict(keep=0.5, num_images=18, samples_per_image=4, progress=False, seed=0)

    def nudge(m, unit, index):  # changes a layer before every later cut point
        with torch.no_grad():
            m.features[0].weight.mul_(1.1)

    a = tf.prune(model, data, finetune=nudge, **kw)
    b = tf.prune(model, data, finetune=nudge, replay_memory=0, **kw)
    how = [u["replay"] for u in a.report.units]
    print(how)
    # only the images stay valid when any layer may change after each unit
    assert how[0].startswith("from the images; cached `input`")
    assert all(h.startswith("replayed from `input`") for h in how[1:])
    assert _max_rel(a.model, b.model) < 1e-4


def test_report_has_the_time_breakdown():
    model, data = _model(DemoVGG), _data()
    res = tf.prune(model, data, keep=0.5, num_images=18, progress=False)
    t = res.report.timings
    print(t)
    for k in ("forward", "statistics", "selection", "reconstruction", "rewrite", "total"):
        assert k in t and t[k] >= 0
    assert t["forward"] > 0 and t["statistics"] > 0
    assert sum(v for k, v in t.items() if k != "total") <= t["total"] * 1.001
    assert "time:" in res.report.table()


def test_bottleneck_replay_runs_each_conv_once_per_batch():
    """Inside a bottleneck the state is the block input plus the branch value, so no
    conv runs twice on the calibration batches (re-running from the block input would
    run conv1 three times and conv2 twice per block)."""
    model, data = _model(DemoResNet), _data()
    calls: dict[tuple, int] = {}

    def count(mod, args, out):
        x = args[0]
        if isinstance(mod, nn.Conv2d) and x.device.type == "cpu" and x.shape[0] == 6:
            key = (mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, id(mod))
            calls[key] = calls.get(key, 0) + 1

    h = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        res = tf.prune(model, data, keep=0.5, num_images=18, samples_per_image=4, progress=False, seed=3)
    finally:
        h.remove()
    how = [u["replay"] for u in res.report.units]
    print("\n".join(how))
    print(sorted(calls.values()))
    assert any(" with `" in h for h in how)  # some states hold two values
    assert calls and max(calls.values()) == 3  # three batches, each conv once per batch


class _InPlace(nn.Module):
    """Cached states read by in-place functions (torch.sigmoid_, F.relu(x, True), a
    a method through a view): replay must copy them, and equal the re-run schedule."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv4 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv5 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        x0 = self.conv0(x)
        h = torch.relu(self.conv1(x0))
        torch.sigmoid_(x0)
        h2 = nn.functional.relu(self.conv2(h), True)
        x0.narrow(1, 0, 2).mul_(0.5)  # through a view
        y = self.conv3(h2) + x0
        return self.conv5(torch.relu(self.conv4(y)))


def test_replay_copies_states_that_in_place_ops_change():
    torch.manual_seed(0)
    model = _InPlace().eval()
    x = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    kw = dict(keep=0.5, num_images=16, samples_per_image=4, progress=False, schedule="sequential")
    a = tf.prune(model, [x[:8], x[8:]], replay_memory=0, **kw)
    b = tf.prune(model, [x[:8], x[8:]], **kw)
    print([u["replay"] for u in b.report.units])
    assert sum("replayed from" in u["replay"] for u in b.report.units) >= 1
    assert _max_rel(a.model, b.model) < 1e-5


class StaticBias(nn.Module):
    """Swin v2's shape: a small MLP on a buffer (no image changes its input) next to the
    image path, whose width it shares."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(5, 2, generator=torch.Generator().manual_seed(3)))
        self.pre = nn.Linear(6, 8)
        self.b1, self.b2 = nn.Linear(2, 8), nn.Linear(8, 8)
        self.f1, self.f2 = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.pre(x))                                   # (N, 8): as wide as b1's output
        bias = self.b2(torch.relu(self.b1(self.table))).mean(0)       # static: no image changes it
        return self.f2(torch.relu(self.f1(h + bias)))


def test_replay_leaves_a_static_consumer_input_alone():
    model = StaticBias().eval()
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    opts = dict(keep=0.5, num_images=32, statistics="full", samples_per_image=None, holdout=0, progress=False)
    a = tf.prune(model, x, replay_memory=0, **opts)
    b = tf.prune(model, x, **opts)
    assert "b1" in [u.producer for u in b.report.units]
    for (k, u), (_, v) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert u.shape == v.shape and torch.allclose(u, v, atol=1e-6), k

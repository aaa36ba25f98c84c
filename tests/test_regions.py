"""Models torch.fx cannot trace: Torch-Pruning's graph per fx-traceable region, exits
that keep the channels leaving a region, detector-style RoI rows, and shape forwards
that leave tensor attributes as they were."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torch_pruning")

import thinet_fast as tf  # noqa: E402
from thinet_fast.groups import find_groups  # noqa: E402
from thinet_fast.ops.draws import row_keys  # noqa: E402
from thinet_fast.regions import find_regions  # noqa: E402
from thinet_fast.tracing import UntraceableModelError  # noqa: E402


class Body(nn.Module):
    """c0 -> c1 is internal; the residual stream (c1, c2) and c3's output leave the body."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        a = torch.relu(self.c1(torch.relu(self.c0(x))))
        b = torch.relu(self.c2(a)) + a
        return b, self.c3(b)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Body()
        self.head = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x):
        feat, out = self.body(x)
        rows = [f for f in feat if f.abs().sum() > 0]  # a data-dependent loop: fx cannot trace it
        y = self.head(torch.stack(rows))
        return y.mean((2, 3)) + out.mean((2, 3)).sum(1, keepdim=True)


def _data(n=16):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_regions_are_the_largest_traceable_submodules():
    model, x = Untraceable().eval(), _data()
    scopes = find_regions(model, x[:2])
    assert [s.name for s in scopes] == ["body", "head"]
    assert scopes[0].args[0].shape == (2, 3, 8, 8) and len(scopes[0].outputs) == 2
    whole = find_regions(Body().eval(), x[:2])
    assert [s.name for s in whole] == [""]  # a traceable model is one region


def test_channels_leaving_a_region_are_kept():
    model, x = Untraceable().eval(), _data()
    groups, refused = find_groups(model, x[:2])
    print(groups, refused)
    assert {g.name for g in groups} == {"body.c0", "head.0"}
    why = dict(refused)
    assert "output of `body`" in why["body.c1"] and "output of `body`" in why["body.c3"]


def test_untraceable_model_prunes_inside_its_regions():
    model, x = Untraceable().eval(), _data()
    with pytest.raises(UntraceableModelError, match="coupled='prune'"):
        tf.prune(model, x, keep=0.5, num_images=16, progress=False)
    res = tf.prune(model, x, keep=0.5, num_images=16, coupled="prune", progress=False)
    m = res.model
    assert (m.body.c0.out_channels, m.body.c1.in_channels, m.head[0].out_channels, m.head[2].in_channels) == (4, 4, 4, 4)
    assert (m.body.c1.out_channels, m.body.c3.out_channels, m.head[0].in_channels) == (8, 6, 8)
    with torch.no_grad():
        y, y0 = m(x), model(x)
    err = float((y - y0).norm() / y0.norm())
    print("relative deviation", err)
    assert y.shape == y0.shape and torch.isfinite(y).all() and err < 1.0
    assert any("largest fx-traceable" in n for n in res.report.notes)


class RoIHead(nn.Module):
    """A head whose batch is not the image batch (every image gives 3 rows)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = RoIHead()

    def forward(self, x):
        f = self.conv(x)
        rois = torch.cat([f[:, :, :3, :3].flatten(1)[:, :12] + i for i in range(3)])  # 3 rows per image
        if rois.abs().sum() < 0:  # data-dependent branch
            return rois
        return self.head(rois)


def test_rows_that_are_not_images_are_sampled():
    model, x = Detector().eval(), _data()
    res = tf.prune(model, x, keep=0.5, num_images=16, coupled="prune", progress=False)
    assert res.model.head.fc1.out_features == 5 and res.model.head.fc2.in_features == 5
    assert torch.isfinite(res.model(x)).all()
    k = torch.arange(4)
    assert torch.equal(row_keys(k, 12), row_keys(k, 12))
    assert row_keys(k, 12).unique().numel() == 12 and not torch.equal(row_keys(k, 12), row_keys(k + 4, 12))


class Anchors(nn.Module):
    """Moves a list of tensors to the input's device in forward (torchvision's
    AnchorGenerator), and has a data-dependent op, so the meta and fake passes fail."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.cells = [torch.ones(2)]

    def forward(self, x):
        self.cells = [c.to(x.device) for c in self.cells]
        y = self.conv(x)
        return y[torch.nonzero(y > 0, as_tuple=True)].sum() + self.cells[0].sum()


def test_shape_forwards_restore_tensor_attributes():
    from thinet_fast.counting import count_flops

    model, x = Anchors(), _data(2)
    assert count_flops(model, x) > 0
    assert model.cells[0].device.type == "cpu" and type(model.cells[0]) is torch.Tensor
    assert torch.isfinite(model(x))


class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8 * 64, 16), nn.Linear(16, 3)

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc2(torch.relu(self.fc1(y.flatten(1))))


def test_a_group_past_the_index_budget_is_refused_and_the_search_goes_on(monkeypatch):
    import thinet_fast.tp_graph as tp_graph

    model, x = Flat().eval(), _data(2)
    found, _ = find_groups(model, x)
    assert {g.name for g in found} == {"c1", "c2", "fc1"}
    monkeypatch.setattr(tp_graph, "MAX_MAPPED_INDICES", 8 * 64 - 1)  # c2's 8 channels map to 512 features
    found, refused = find_groups(model, x)
    print(refused)
    assert {g.name for g in found} == {"c1", "fc1"}
    assert "mapped more than 511 indices" in dict(refused)["c2"]


class Functional(nn.Module):
    """``attn.weight`` is used through F.linear: the graph sees a bare parameter."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 8)
        self.attn = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = h + self.fc2(h)
        return nn.functional.linear(h, self.attn.weight, self.attn.bias)


def test_a_layer_weight_used_functionally_refuses_its_group():
    model, x = Functional().eval(), torch.randn(4, 6)
    groups, refused = find_groups(model, x)
    print(refused)
    assert any(root in ("fc1", "fc2") and "`attn` (Linear) outside its module's forward" in why
               for root, why in refused)
    assert not {"fc1", "fc2"} & {g.name for g in groups}


def test_a_cut_that_breaks_the_forward_is_an_error(monkeypatch):
    import thinet_fast.pipeline.coupled as coupled

    model, x = Untraceable().eval(), _data()
    real, calls = coupled.output_widths, []

    def widths(m, ex):
        calls.append(1)
        w = real(m, ex)
        return w if len(calls) == 1 else [(-1,)]  # pretend the cut changed an output

    import thinet_fast.regions as regions
    monkeypatch.setattr(coupled, "output_widths", widths)  # the widths before the cut
    monkeypatch.setattr(regions, "output_widths", widths)  # check_widths: after it
    with pytest.raises(RuntimeError, match="changed the model's forward"):
        tf.prune(model, x, keep=0.5, num_images=16, coupled="prune", progress=False)
    assert model.body.c0.out_channels == 8  # the caller's model is whole


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.m = Flat()

    def forward(self, x):
        if x.sum() < -1e30:  # fx cannot trace the root
            return x
        return self.m(x)


def test_a_region_prunes_as_the_plain_units_would():
    """The same chain (convs, flatten, Linear with 64 taps per channel) through the fx
    units and through a Torch-Pruning region gives the same model."""
    x = _data(24)
    torch.manual_seed(0)
    plain = Flat().eval()
    wrapped = Wrapped().eval()
    wrapped.m.load_state_dict(plain.state_dict())
    opts = dict(keep=0.5, num_images=24, statistics="full", samples_per_image=None, holdout=0, progress=False,
                stats_dtype=torch.float64)
    a = tf.prune(plain, x, **opts).model
    b = tf.prune(wrapped, x, coupled="prune", **opts).model.m
    assert b.fc1.in_features == 4 * 64 and b.c2.out_channels == 4
    for (k, u), (_, v) in zip(a.state_dict().items(), b.state_dict().items()):
        print(k, float((u - v).abs().max()))
        assert u.shape == v.shape and torch.allclose(u, v, atol=1e-5, rtol=1e-4), k


class DepthwiseHead(nn.Module):
    """The head's depthwise conv reads a map the stem makes outside the head's region."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 6, 1),
                                  nn.ReLU(), nn.Conv2d(6, 4, 1))

    def forward(self, x):
        f = self.stem(x)
        if f.sum() < -1e30:  # fx cannot trace the root
            return f
        return self.head(torch.relu(f)).mean((2, 3))


def test_channels_entering_a_region_are_kept():
    model, x = DepthwiseHead().eval(), _data()
    groups, refused = find_groups(model, x[:2])
    print(groups, refused)
    assert "come into `head` from outside" in dict(refused)["head.0"]
    res = tf.prune(model, x, keep=0.5, num_images=16, coupled="prune", progress=False)
    assert (res.model.head[0].out_channels, res.model.head[2].out_channels) == (8, 3)
    assert torch.isfinite(res.model(x)).all()

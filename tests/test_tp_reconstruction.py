"""thinet_fast.integrations.reconstruction: ThiNet's least-squares refit after a
Torch-Pruning step (record / reconstruct / reconstructing)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

tp = pytest.importorskip("torch_pruning")

from thinet_fast.integrations import reconstruction as R  # noqa: E402
from thinet_fast.integrations.torch_pruning import (  # noqa: E402
    record, reconstruct, reconstructing, thinet_pruner)


def rel_dev(y, y0):
    return float((y - y0).norm() / y0.norm())


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------- resnet18 round trip
def test_resnet18_round_trip_beats_the_plain_cut_on_held_out_images():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # running statistics from random images: normalised activations
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(32, 3, 64, 64, generator=g))
    model.eval()
    calib = [torch.randn(16, 3, 64, 64, generator=g) for _ in range(4)]
    held = torch.randn(32, 3, 64, 64, generator=g)
    unpruned = copy.deepcopy(model)
    pruner = thinet_pruner(model, calib[0][:1], calib, pruning_ratio=0.5, ignored_layers=[model.fc],
                           num_images=64, samples_per_image=5)
    with reconstructing(model, calib, num_images=64) as rec:
        pruner.step()
        cut = copy.deepcopy(model)  # the plain Torch-Pruning result, for comparison
        params = [id(p) for p in model.parameters()]
    print(rec.report.table())
    with torch.no_grad():
        y0, y_cut, y_rec = unpruned(held), cut(held), model(held)
    d_cut, d_rec = rel_dev(y_cut, y0), rel_dev(y_rec, y0)
    print(f"held-out relative output deviation from the unpruned model: cut {d_cut:.4f}, reconstructed {d_rec:.4f}")
    assert d_rec < d_cut
    assert y_rec.shape == (32, 10) and torch.isfinite(y_rec).all()
    assert [id(p) for p in model.parameters()] == params  # written in place: an optimizer keeps its tensors
    # every layer whose inputs were cut is in the report, and the Linear too
    cut_inputs = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                  and R._width(m)[0] != R._width(R.get_module(unpruned, n))[0]}
    assert {f.name for f in rec.report.layers} == cut_inputs and "fc" in cut_inputs
    assert len(rec.report.fitted) >= len(cut_inputs) // 2, rec.report.table()
    for f in rec.report.layers:  # the choice is never worse than the cut on the held-out fold
        assert f.error_fit <= f.error_cut + 1e-12, f


# ----------------------------------------------------------------- against brute force
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):  # no ReLU before fc: dead features would make its fit non-unique
        return self.fc(self.b(self.a(x).relu()).flatten(1))

    def inputs(self, x):  # what b and fc read
        xb = self.a(x).relu()
        return xb, self.b(xb).flatten(1)


def test_refit_equals_least_squares_on_explicit_patches():
    torch.manual_seed(0)
    model = Tiny().eval()
    data = [torch.randn(100, 2, 4, 4) for _ in range(3)]
    x = torch.cat(data)
    unpruned = copy.deepcopy(model)
    snap = record(model)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=data[0][:1])
    DG.get_pruning_group(model.a, tp.prune_conv_out_channels, idxs=[1, 4]).prune()   # b loses inputs 1, 4
    DG.get_pruning_group(model.b, tp.prune_conv_out_channels, idxs=[2]).prune()      # fc loses 16 features
    cut = copy.deepcopy(model)
    report = reconstruct(model, snap, data, num_images=300, reconstruction="full", ridges=(1e-12,),
                         samples_per_image=None, holdout_every=0)
    print(report.table())
    assert [(f.name, f.action, f.samples) for f in report.layers] == [("b", "full", 300 * 16), ("fc", "full", 300)]
    with torch.no_grad():
        xb_ref, xf_ref = unpruned.inputs(x)
        xb_cur, _ = cut.inputs(x)
        _, xf_cur = model.inputs(x)  # fc is fitted on b as refitted before it
    keep_out = torch.tensor([0, 1, 3])
    # b: every 3x3 patch of the pruned input against the unpruned output of the kept filters
    Z = F.unfold(xb_cur.double(), 3, padding=1).transpose(1, 2).reshape(-1, 4 * 9)
    Y = F.unfold(xb_ref.double(), 3, padding=1).transpose(1, 2).reshape(-1, 6 * 9) \
        @ unpruned.b.weight.double()[keep_out].reshape(3, -1).T
    Wb = torch.linalg.lstsq(Z, Y).solution.T.reshape(3, 4, 3, 3)
    # fc: one sample per image
    Wf = torch.linalg.lstsq(xf_cur.double(), xf_ref.double() @ unpruned.fc.weight.double().T).solution.T
    for name, got, want, before in (("b", model.b.weight, Wb, cut.b.weight), ("fc", model.fc.weight, Wf,
                                                                              cut.fc.weight)):
        err = float((got.double() - want).abs().max() / want.abs().max())
        moved = float((before.double() - want).abs().max() / want.abs().max())
        print(f"{name}: refit vs lstsq {err:.2e}; cut vs lstsq {moved:.2e}")
        assert err < 1e-4 and moved > 1e-2
    assert torch.equal(model.b.bias, cut.b.bias) and torch.equal(model.fc.bias, cut.fc.bias)


def test_scale_mode_equals_least_squares_of_channel_scales():
    torch.manual_seed(1)
    model = Tiny().eval()
    data = [torch.randn(120, 2, 4, 4)]
    unpruned = copy.deepcopy(model)
    snap = record(model)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=data[0][:1])
    DG.get_pruning_group(model.a, tp.prune_conv_out_channels, idxs=[0, 2, 5]).prune()
    cut = copy.deepcopy(model)
    report = reconstruct(model, snap, data, reconstruction="scale", samples_per_image=None, holdout_every=0)
    assert [(f.name, f.action) for f in report.layers] == [("b", "scale")]
    kept = torch.tensor([1, 3, 4])
    with torch.no_grad():
        z_ref = F.unfold(unpruned.inputs(data[0])[0].double(), 3, padding=1).transpose(1, 2).reshape(-1, 6, 9)
        z_cur = F.unfold(cut.inputs(data[0])[0].double(), 3, padding=1).transpose(1, 2).reshape(-1, 3, 9)
    W = unpruned.b.weight.double().reshape(4, 6, 9)
    X = torch.einsum("kcu,scu->skc", W[:, kept], z_cur).reshape(-1, 3)  # per kept channel, every (sample, filter)
    y = torch.einsum("kcu,scu->sk", W, z_ref).reshape(-1, 1)
    w = torch.linalg.lstsq(X, y).solution.squeeze(1)
    want = W[:, kept] * w[None, :, None]
    got = model.b.weight.double().reshape(4, 3, 9)
    err = float((got - want).abs().max() / want.abs().max())
    print("scales", w.tolist(), "refit vs lstsq", err)
    assert err < 1e-5 and float((w - 1).abs().max()) > 1e-2


def test_kept_indices_exact_or_refused():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(7, 5, 3, 3, generator=g)
    rows, cols = torch.tensor([0, 2, 3, 6]), torch.tensor([1, 4])
    got = R.kept_indices(W, W[rows][:, cols])
    assert torch.equal(got[0], rows) and torch.equal(got[1], cols)
    bad = W[rows][:, cols].clone()
    bad[1, 0, 1, 1] += 1.0  # changed after the cut: still located, but not a sub-block
    with pytest.raises(ValueError, match="not a sub-block"):
        R.kept_indices(W, bad)
    W0 = W.clone()
    W0[:, 4] = 0.0  # a dead input channel: no value tells where column 1 came from
    with pytest.raises(ValueError, match="cannot tell"):
        R.kept_indices(W0, W0[rows][:, cols])


# ----------------------------------------------------------------- failure and skips
def test_failure_restores_the_model(monkeypatch):
    torch.manual_seed(0)
    model = Tiny().eval()
    data = [torch.randn(50, 2, 4, 4) for _ in range(2)]
    snap = record(model)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=data[0][:1])
    DG.get_pruning_group(model.a, tp.prune_conv_out_channels, idxs=[0, 5]).prune()
    DG.get_pruning_group(model.b, tp.prune_conv_out_channels, idxs=[1]).prune()
    before = state(model)
    calls = []
    real = R.cross.refit_towards

    def flaky(*a, **k):  # b is fitted, then Ctrl-C during fc's fit
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(R.cross, "refit_towards", flaky)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(model, snap, data, reconstruction="full", ridges=(1e-8,), holdout_every=0)
    assert len(calls) == 2
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k],
                                                                                                     after[k])]


def test_depthwise_conv_left_as_cut_and_reported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.ReLU(), nn.Conv2d(8, 5, 1)).eval()
    data = [torch.randn(40, 3, 6, 6)]
    with reconstructing(model, data, num_images=40) as rec:
        DG = tp.DependencyGraph().build_dependency(model, example_inputs=data[0][:1])
        DG.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=[0, 3, 6]).prune()
        dw = model[2].weight.detach().clone()
    print(rec.report.table())
    assert model[2].groups == 5 and model[4].in_channels == 5
    assert list(rec.report.skipped) == ["2"] and "grouped" in rec.report.skipped["2"]
    assert torch.equal(model[2].weight, dw)
    assert [f.name for f in rec.report.layers if f.action != "skipped"] == ["4"]


def test_options_checked_before_the_step_and_no_refit_after_an_error():
    model = Tiny().eval()
    with pytest.raises(ValueError, match="reconstruction"):
        with reconstructing(model, [torch.randn(4, 2, 4, 4)], reconstruction="exact"):
            pytest.fail("the block must not run")
    with pytest.raises(RuntimeError, match="inside"):
        with reconstructing(model, [torch.randn(4, 2, 4, 4)]) as rec:
            raise RuntimeError("inside the block")
    assert rec.report is None
    with pytest.raises(TypeError, match="one-shot"):
        reconstruct(model, record(model), iter([torch.randn(4, 2, 4, 4)]))
    with pytest.raises(TypeError, match="num_image"):
        with reconstructing(model, [torch.randn(4, 2, 4, 4)], num_image=8):  # misspelt: refused on entry
            pytest.fail("the block must not run")

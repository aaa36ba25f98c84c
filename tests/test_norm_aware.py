"""BatchNorm-aware pruning: selection and fit through the consumer's BatchNorm
(``through_norm``), and re-estimation of only the BatchNorm layers a cut reaches."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import thinet_fast as tf
from thinet_fast.models import DemoResNet
from thinet_fast.pipeline.calibrate import downstream_norms


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 10, 3, padding=1), nn.Conv2d(10, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.c2(torch.relu(self.c1(x))))


def _model(seed=0):
    torch.manual_seed(seed)
    m = ConvBN().eval()
    with torch.no_grad():  # very unequal gains: what the next layer sees differs from the raw output
        m.bn.weight.copy_(torch.logspace(-1.5, 1.5, 6)[torch.randperm(6)])
        m.bn.running_var.uniform_(0.2, 3.0)
        m.bn.running_mean.normal_()
    return m


def _data(n=16):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(3))


OPTS = dict(num_images=16, statistics="full", samples_per_image=None, holdout=0, progress=False,
            stats_dtype=torch.float64, bias_compensation=False)


def _folded(m):
    """The same function with the BatchNorm's gain moved into c2 (a BatchNorm of gain 1)."""
    f = copy.deepcopy(m)
    bn = f.bn
    gain = bn.weight.detach().abs() / (bn.running_var + bn.eps).sqrt()
    with torch.no_grad():
        f.c2.weight.mul_(gain[:, None, None, None])
        bn.running_var.copy_(torch.ones_like(bn.running_var) - bn.eps)
        bn.running_mean.mul_(gain)
        bn.weight.copy_(bn.weight.sign())
    return f, gain


@pytest.mark.parametrize("recon", ["scale", "full"])
def test_through_norm_is_the_plain_fit_with_the_gain_folded_in(recon):
    m, x = _model(), _data()
    f, gain = _folded(m)
    assert torch.allclose(f(x), m(x), atol=1e-4)
    a = tf.prune(m, x, keep=0.5, through_norm=True, reconstruction=recon, **OPTS)
    b = tf.prune(f, x, keep=0.5, through_norm=False, reconstruction=recon, **OPTS)
    ra, rb = a.report.units[0], b.report.units[0]
    wa, wb = a.model.c2.weight * gain[:, None, None, None], b.model.c2.weight
    err = float((wa - wb).abs().max() / wb.abs().max())
    print(f"{recon}: errors {ra.error_reconstructed:.6f} / {rb.error_reconstructed:.6f}, weight diff {err:.2e}")
    assert torch.equal(a.model.c1.weight, b.model.c1.weight)  # the same channels kept
    assert abs(ra.error_reconstructed - rb.error_reconstructed) < 1e-6
    assert err < 1e-5


def test_through_norm_lowers_the_normalised_error_of_the_scale_fit():
    m, x = _model(1), _data()
    opts = dict(OPTS, method="weight_sum", reconstruction="scale")  # the same channels either way
    errs = {}
    for flag in (False, True):
        p = tf.prune(m, x, keep=0.5, through_norm=flag, **opts).model
        with torch.no_grad():
            errs[flag] = float((p(x) - m(x)).norm() / (m(x) - m.bn.bias[:, None, None]).norm())
    print(f"normalised output error: raw fit {errs[False]:.4f}, through the BatchNorm {errs[True]:.4f}")
    assert errs[True] < errs[False]


def _norm_inputs(model, x):
    seen, hs = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.BatchNorm2d):
            hs.append(mod.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0].clone())))
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return seen


@pytest.mark.parametrize("source", ["layer1.0.conv2", "layer2.0.conv1", "layer2.1.conv3", "layer2.0.downsample.0"])
def test_downstream_norms_are_the_ones_a_change_reaches(source):
    """Brute force: perturb the source's weight and see which BatchNorm inputs move."""
    torch.manual_seed(0)
    m, x = DemoResNet().eval(), torch.rand(2, 1, 28, 28)
    before = _norm_inputs(m, x)
    p = copy.deepcopy(m)
    with torch.no_grad():
        dict(p.named_modules())[source].weight.add_(torch.randn_like(dict(p.named_modules())[source].weight))
    after = _norm_inputs(p, x)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    names = {v: k for k, v in m.named_modules()}
    got = {names[b] for b in downstream_norms(m, [dict(m.named_modules())[source]], x[:1])}
    print(source, sorted(got))
    assert got == moved and 0 < len(got) < len(before)


def test_bn_recalibration_leaves_the_layers_before_the_cut_alone():
    torch.manual_seed(0)
    m, x = DemoResNet().eval(), torch.rand(32, 1, 28, 28)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2)
    last = [n for n, mod in m.named_modules() if n.endswith("conv2")][-1]  # the last block's
    res = tf.prune(m, x, keep=0.5, units=[last], num_images=32, bn_recalibration=True, progress=False)
    note = [n for n in res.report.notes if "BatchNorm" in n][0]
    print(note)
    kept = reset = 0
    for (name, a), b in zip(m.named_modules(), res.model.modules()):
        if isinstance(a, nn.BatchNorm2d) and a.running_mean.shape == b.running_mean.shape:
            same = torch.equal(a.running_mean, b.running_mean)
            kept, reset = kept + same, reset + (not same)
    assert reset >= 1 and kept >= 10
    assert f"re-estimated {reset} BatchNorm layers downstream" in note

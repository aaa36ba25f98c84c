"""target="unpruned": each consumer fitted towards the unpruned model's output on the
same images (the cross-moments of ops/cross.py, collected in the unit's pass)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import thinet_fast as tf
from thinet_fast.ops import cross
from thinet_fast.ops.patches import ConsumerGeometry, gather_patches_ref


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 6, 3)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))).mean((2, 3))


def _data(n=24):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


OPTS = dict(num_images=24, statistics="full", samples_per_image=None, holdout=0, progress=False,
            stats_dtype=torch.float64, reconstruction="full", bias_compensation=False)


def _input_of(model, name, x):
    seen = {}
    h = dict(model.named_modules())[name].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    return seen["x"].double()


def test_the_first_unit_fits_as_the_current_target():
    torch.manual_seed(0)
    model, x = Chain().eval(), _data()
    a = tf.prune(model, x, keep=0.5, units=["c1"], target="current", **OPTS).model
    b = tf.prune(model, x, keep=0.5, units=["c1"], target="unpruned", **OPTS).model
    for (k, u), (_, v) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(u, v), k


def test_a_later_consumer_is_fitted_towards_the_unpruned_output():
    torch.manual_seed(1)
    model, x = Chain().eval(), _data()
    keep = {"c1": 4, "c2": 8}  # c2 keeps every channel: c3's refit only corrects c1's cut
    cur = tf.prune(model, x, keep=keep, target="current", **OPTS).model
    got = tf.prune(model, x, keep=keep, target="unpruned", **OPTS)
    assert torch.allclose(cur.c3.weight, model.c3.weight, atol=1e-5)  # nothing to correct towards itself
    geo = ConsumerGeometry.conv(3)
    z_cur, z_ref = _input_of(got.model, "c3", x), _input_of(model, "c3", x)
    oh = z_cur.shape[2] - 2
    img = torch.arange(24).repeat_interleave(oh * oh)
    oy, ox = torch.arange(oh).repeat_interleave(oh).repeat(24), torch.arange(oh).repeat(oh * 24)
    want = cross.refit_towards_ref(model.c3.weight.detach(), gather_patches_ref(z_cur, geo, img, oy, ox),
                                   gather_patches_ref(z_ref, geo, img, oy, ox), torch.arange(8), ridge=1e-8)
    err = float((got.model.c3.weight.double() - want.reshape(6, 8, 3, 3)).abs().max())
    print("c3 weight vs brute-force refit towards the unpruned output:", err)
    assert err < 1e-4
    assert any("target unpruned" in n for n in got.report.units[1].notes)
    with torch.no_grad():
        y0 = model(x)
        dev = lambda m: float((m(x) - y0).norm() / y0.norm())  # noqa: E731
        print("deviation current", dev(cur), "unpruned", dev(got.model))
        assert dev(got.model) < dev(cur)


def test_target_is_validated_and_in_the_fingerprint():
    with pytest.raises(ValueError, match="target"):
        tf.PruneConfig(target="teacher")
    assert tf.PruneConfig(target="unpruned").fingerprint()["target"] == "unpruned"

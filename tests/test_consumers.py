"""find_units never lists a unit that prune cannot handle: padding modes, string
padding and Linear-on-tokens consumers (issue 8)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import thinet_fast as tf
from thinet_fast.ops.patches import ConsumerGeometry, UnsupportedConsumer


class Pair(nn.Module):
    def __init__(self, **consumer):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 6, **{"kernel_size": 3, **consumer})
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.b(torch.relu(self.a(x)))
        return self.head(x.mean((2, 3)))


X = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_non_zero_padding_modes_are_refused_by_find_units(mode):
    plan = tf.find_units(Pair(padding=1, padding_mode=mode), X[:1])
    reasons = {r.producer: r.reason for r in plan.refused}
    print(reasons)
    assert "a" in reasons and mode in reasons["a"] and "zero-padded" in reasons["a"]
    assert "a" not in [u.producer for u in plan.units]


def test_padding_mode_without_padding_is_fine():
    plan = tf.find_units(Pair(padding=0, padding_mode="reflect"), X[:1])
    assert "a" in [u.producer for u in plan.units]


@pytest.mark.parametrize("string,explicit", [("same", 1), ("valid", 0)])
def test_string_padding_gives_the_explicit_padding_result(string, explicit):
    torch.manual_seed(0)
    m_str = Pair(padding=string).eval()
    m_int = Pair(padding=explicit).eval()
    m_int.load_state_dict(m_str.state_dict())
    kw = dict(keep=0.5, num_images=4, samples_per_image=6, progress=False, reconstruction="full")
    a = tf.prune(m_str, [X], **kw).model
    b = tf.prune(m_int, [X], **kw).model
    assert a.b.padding == string  # the module keeps its own padding spec
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0)


def test_asymmetric_same_padding_is_refused():
    plan = tf.find_units(Pair(kernel_size=2, padding="same"), X[:1])
    reasons = {r.producer: r.reason for r in plan.refused}
    assert "asymmetrically" in reasons["a"]
    with pytest.raises(UnsupportedConsumer):
        ConsumerGeometry.from_module(nn.Conv2d(2, 2, 4, padding="same"))
    assert ConsumerGeometry.from_module(nn.Conv2d(2, 2, 3, padding="same", dilation=2)).padding == (2, 2)


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.mlp = nn.Linear(8, 4)

    def forward(self, x):  # (N, L, 5)
        return self.mlp(torch.relu(self.embed(x))).mean(1)


def test_linear_on_tokens_is_a_unit():
    plan = tf.find_units(Tokens(), torch.randn(2, 7, 5))
    print(plan)
    (u,) = plan.units
    assert u.producer == "embed" and u.tokens
    res = tf.prune(Tokens(), [torch.randn(4, 7, 5)], keep=0.5, progress=False)
    assert res.model.embed.out_features == res.model.mlp.in_features < Tokens().embed.out_features

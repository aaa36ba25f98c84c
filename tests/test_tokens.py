"""Linear consumers on tokens and channels-last maps (ViT / ConvNeXt MLPs): every
position is a location, exactly as for a 1x1 conv on the same numbers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import thinet_fast as tf


class TokenMLP(nn.Module):
    """(N, L, C) tokens -> fc1 -> GELU -> fc2, like a transformer block's MLP."""

    def __init__(self, c=6, hidden=12, k=5):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(c, hidden), nn.GELU(), nn.Linear(hidden, k)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ConvMLP(nn.Module):
    """The same MLP as 1x1 convs on the (N, C, L, 1) map."""

    def __init__(self, token: TokenMLP):
        super().__init__()
        h, c = token.fc1.weight.shape
        k = token.fc2.weight.shape[0]
        self.fc1, self.act, self.fc2 = nn.Conv2d(c, h, 1), nn.GELU(), nn.Conv2d(h, k, 1)
        with torch.no_grad():
            for conv, lin in ((self.fc1, token.fc1), (self.fc2, token.fc2)):
                conv.weight.copy_(lin.weight[:, :, None, None])
                conv.bias.copy_(lin.bias)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ChannelsLast(nn.Module):
    """conv -> permute to (N, H, W, C) -> Linear, as in ConvNeXt's blocks."""

    def __init__(self):
        super().__init__()
        self.conv, self.act, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).permute(0, 2, 3, 1))


def _rel(a, b):
    err = float((a - b).norm() / b.norm())
    print(f"relative difference {err:.3e}")
    return err


def test_find_units_lists_token_consumers():
    plan = tf.find_units(TokenMLP(), torch.randn(2, 7, 6))
    (u,) = plan.units
    print(plan)
    assert (u.producer, u.consumer, u.tokens, u.taps, u.flatten) == ("fc1", "fc2", True, 1, False)
    assert tf.find_units(ChannelsLast(), torch.randn(1, 3, 5, 5)).units[0].tokens


@pytest.mark.parametrize("statistics", ["full", "direct"])
@pytest.mark.parametrize("reconstruction", ["scale", "full"])
def test_tokens_prune_like_a_1x1_conv(statistics, reconstruction):
    """Every location and no held-out fold: nothing depends on the image keys, which
    differ between the two layouts of the same numbers."""
    torch.manual_seed(0)
    token = TokenMLP().eval()
    conv = ConvMLP(token).eval()
    x = torch.randn(40, 9, 6)  # 40 images of 9 tokens
    opts = dict(keep=0.5, num_images=40, samples_per_image=None, statistics=statistics, holdout=0,
                reconstruction=reconstruction, progress=False, stats_dtype=torch.float64)
    a = tf.prune(token, x, **opts)
    b = tf.prune(conv, x.transpose(1, 2).unsqueeze(-1), **opts)
    ra, rb = a.report.units[0], b.report.units[0]
    assert ra.kept == rb.kept == 6 and ra.reconstruction == rb.reconstruction
    w_tok, w_conv = a.model.fc2.weight, b.model.fc2.weight[:, :, 0, 0]
    assert _rel(w_tok, w_conv) < 1e-5
    assert torch.equal(a.model.fc1.weight, b.model.fc1.weight[:, :, 0, 0])
    y = a.model(x)
    assert _rel(y, b.model(x.transpose(1, 2).unsqueeze(-1))[..., 0].transpose(1, 2)) < 1e-5
    assert _rel(y, token(x)) < 1.0  # the reconstruction is a fit, not noise


def test_channels_last_linear_is_pruned_and_reconstructed():
    torch.manual_seed(1)
    model = ChannelsLast().eval()
    x = torch.randn(16, 3, 6, 6)
    res = tf.prune(model, x, keep=0.5, num_images=16, statistics="full", reconstruction="full",
                   samples_per_image=None, progress=False)
    assert res.model.conv.out_channels == 4 and res.model.fc.in_features == 4
    plain = tf.prune(model, x, keep=0.5, num_images=16, statistics="full", reconstruction="none",
                     samples_per_image=None, progress=False)
    # the refit beats keeping the same weights
    assert _rel(res.model(x), model(x)) < _rel(plain.model(x), model(x))


def test_sampled_token_statistics_draw_per_image():
    """Sampled mode draws samples_per_image positions per image of tokens."""
    torch.manual_seed(2)
    model = TokenMLP().eval()
    x = torch.randn(30, 9, 6)
    res = tf.prune(model, x, keep=0.5, num_images=30, samples_per_image=3, statistics="sampled",
                   progress=False)
    (r,) = res.report.units
    assert res.model.fc1.out_features == 6 and res.model.fc2.in_features == 6
    assert r.statistics == "sampled" and r.error_reconstructed < 1.0
    assert _rel(res.model(x), model(x)) < 1.0

"""Normalised groups: a transformer's residual stream (LayerNorms over its channels,
attention reading and writing them) cut with ``coupled="prune"``, its readers refitted
after the cut towards their output before it."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

pytest.importorskip("torch_pruning")

import thinet_fast as tf  # noqa: E402
from thinet_fast.attention import HeadPrunedAttention  # noqa: E402
from thinet_fast.groups import find_groups  # noqa: E402
from thinet_fast.ops.cross import refit_across_ref  # noqa: E402
from thinet_fast.pipeline.towards import refit_readers  # noqa: E402


def _vit(seed=0, layers=2):
    torch.manual_seed(seed)
    m = VisionTransformer(image_size=16, patch_size=8, num_layers=layers, num_heads=4, hidden_dim=32, mlp_dim=64,
                          num_classes=10).eval()
    m.heads.head.reset_parameters()  # torchvision zeroes it: every output would be the bias
    return m


def _images(n, seed):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _stream(model):
    groups, _ = find_groups(model, _images(2, 0))
    return next(g for g in groups if g.norms)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_the_stream_is_one_group_with_its_norms_attention_and_readers():
    model = _vit()
    g = _stream(model)
    print(g.name, g.norms, g.attention, [r.name for r in g.readers], g.followers)
    assert g.channels == 32 and g.normalised
    assert set(g.norms) == {"encoder.layers.encoder_layer_0.ln_1", "encoder.layers.encoder_layer_0.ln_2",
                            "encoder.layers.encoder_layer_1.ln_1", "encoder.layers.encoder_layer_1.ln_2",
                            "encoder.ln"}
    attn = {"encoder.layers.encoder_layer_0.self_attention", "encoder.layers.encoder_layer_1.self_attention"}
    assert set(g.attention) == attn
    assert {r.name for r in g.readers} == attn | {"encoder.layers.encoder_layer_0.mlp.0",
                                                  "encoder.layers.encoder_layer_1.mlp.0", "heads.head"}
    assert {"conv_proj", "encoder.layers.encoder_layer_0.mlp.3", "encoder.layers.encoder_layer_1.mlp.3"} <= \
        set(g.producers)
    assert any(f.endswith("class_token") for f in g.followers) and any(f.endswith("pos_embedding")
                                                                      for f in g.followers)


def _stream_only(model):
    g = _stream(model)
    producers = set(g.producers) | set(g.attention)
    return lambda module, name: name in producers


def test_prune_cuts_the_stream_and_the_refit_beats_the_cut_on_held_out_images():
    model = _vit(1)
    before = copy.deepcopy(model.state_dict())
    x, held = _images(96, 1), _images(32, 2)
    with torch.no_grad():
        y0 = model(held)
    opts = dict(keep=0.5, num_images=96, coupled="prune", progress=False, filter_fn=_stream_only(model))
    fit = tf.prune(model, x, reconstruction="full", **opts)
    cut = tf.prune(model, x, reconstruction="none", **opts)
    m = fit.model
    assert m.hidden_dim == 16 and m.conv_proj.out_channels == 16 and m.class_token.shape[-1] == 16
    assert m.encoder.pos_embedding.shape[-1] == 16 and m.encoder.ln.normalized_shape == (16,)
    attn = [mod for mod in m.modules() if isinstance(mod, HeadPrunedAttention)]
    assert len(attn) == 2 and all(a.embed_dim == 16 and a.head_dim == 8 for a in attn)  # (heads: the filter too)
    assert m.encoder.layers[0].mlp[0].in_features == 16 and m.heads.head.in_features == 16
    with torch.no_grad():
        d_fit, d_cut = _rel(m(held), y0), _rel(cut.model(held), y0)
    rec = next(r for r in fit.report.units if r.producer == _stream(model).name)
    print("deviation: refit", d_fit, "cut only", d_cut, "record", rec.error_selected, rec.error_reconstructed)
    assert d_fit < 0.8 * d_cut
    assert rec.error_reconstructed < rec.error_selected
    assert any("normalised group" in n for n in rec.notes)
    for k, v in model.state_dict().items():  # the caller's model is unchanged
        assert torch.equal(v, before[k]), k


def _inputs_of(model, name, x):
    seen = []
    h = dict(model.named_modules())[name].register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    z = seen[0].reshape(-1, seen[0].shape[-1]).double()
    return torch.cat([z, torch.ones(z.shape[0], 1, dtype=torch.float64)], 1)


@pytest.mark.parametrize("reader", ["encoder.layers.encoder_layer_0.self_attention", "heads.head"])
def test_refit_readers_is_least_squares_on_the_inputs_before_and_after_the_cut(reader):
    model = _vit(2)
    before = copy.deepcopy(model)
    g = _stream(model)
    g.prune(list(range(1, 32, 2)))
    x = _images(64, 3)
    Zc, Zr = _inputs_of(model, reader, x), _inputs_of(before, reader, x)  # brute force: the inputs themselves
    mod = dict(model.named_modules())[reader]
    w_name, b_name = ("in_proj_weight", "in_proj_bias") if isinstance(mod, HeadPrunedAttention) else ("weight", "bias")
    ref_mod = dict(before.named_modules())[reader]
    W = torch.cat([getattr(ref_mod, w_name).detach(), getattr(ref_mod, b_name).detach()[:, None]], 1)
    prior = torch.cat([getattr(mod, w_name).detach(), getattr(mod, b_name).detach()[:, None]], 1)
    want, e0, e1 = refit_across_ref(W, Zc, Zr, prior, ridge=1e-8)
    got = refit_readers(before, model, [reader], lambda: x.split(16), ridge=1e-8, holdout=0)[reader]
    theta = torch.cat([getattr(mod, w_name).detach(), getattr(mod, b_name).detach()[:, None]], 1).double()
    out_err = float((Zc @ (theta - want).T).abs().max() / (Zc @ want.T).abs().max())
    print(reader, "output err", out_err, "errors", got, (e0, e1))
    assert out_err < 1e-4
    assert abs(got[0] - e0) < 1e-6 and abs(got[1] - e1) < 1e-6 and got[1] < got[0]


def test_the_held_out_fold_keeps_a_scarce_reader_from_interpolating():
    """The head reads one token per image: with 12 images it has fewer samples than
    unknowns. Its ridge is chosen on held-out images, so its error there is never worse
    than the cut's own weights (ridge inf)."""
    model = _vit(3)
    before = copy.deepcopy(model)
    _stream(model).prune(list(range(0, 32, 2)))
    x = _images(12, 4)
    got = refit_readers(before, model, ["heads.head"], lambda: x.split(4), ridge=1e-8, holdout=3)["heads.head"]
    print("held-out errors: cut", got[0], "refit", got[1])
    assert got[1] <= got[0]


def test_a_budget_keeps_the_stream_and_says_so():
    model = _vit(4)
    x = _images(48, 5)
    full = sum(p.numel() for p in model.parameters())
    res = tf.prune(model, x, params_target=0.6, num_images=48, coupled="prune", progress=False)
    got = sum(p.numel() for p in res.model.parameters())
    print(full, got, {r.producer: r.kept for r in res.report.units})
    assert got <= 0.6 * full and res.model.hidden_dim == 32
    assert any("keeps a normalised group" in n for n in res.report.notes), res.report.notes
    assert torch.isfinite(res.model(x[:2])).all()


def test_a_stream_cut_model_round_trips_through_save_and_load(tmp_path):
    model = _vit(5)
    x = _images(32, 6)
    res = tf.prune(model, x, keep=0.5, num_images=32, coupled="prune", progress=False)
    assert res.model.hidden_dim == 16
    tf.save(res.model, tmp_path / "m.pt")
    back = tf.load(tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.allclose(back(x[:4]), res.model(x[:4]), atol=1e-6)
    assert isinstance(back.encoder.layers[0].self_attention, HeadPrunedAttention)
    into = tf.load(tmp_path / "m.pt", base=_vit(9))  # a fresh model of the same architecture
    assert into.hidden_dim == 16 and into.class_token.shape[-1] == 16
    with torch.no_grad():
        assert torch.allclose(into(x[:4]), res.model(x[:4]), atol=1e-6)


def test_a_groupnorm_still_keeps_its_channels():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.n, self.b = nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 4, 3)

        def forward(self, x):
            return self.b(self.n(self.a(x)) + self.a(x))
    groups, refused = find_groups(Net().eval(), torch.randn(2, 3, 12, 12))
    print(refused)
    assert not groups and any("GroupNorm" in why for _, why in refused)

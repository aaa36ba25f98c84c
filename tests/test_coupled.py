"""coupled="prune": groups from Torch-Pruning's DependencyGraph, ThiNet selection on the
sum of every reader's Gram, every reader reconstructed from its own statistics."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torch_pruning")

import thinet_fast as tf  # noqa: E402
from thinet_fast.groups import find_groups  # noqa: E402
from thinet_fast.ops import greedy, reconstruct  # noqa: E402
from thinet_fast.pipeline.coupled import group_statistics  # noqa: E402


class Residual(nn.Module):
    """stem and a block's conv2 both write the residual channels; conv3 and fc read them."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 5, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        r = torch.relu(s + self.conv2(torch.relu(self.conv1(s))))
        return self.conv3(r).mean((2, 3)) + self.fc(r.mean((2, 3))).sum(1, keepdim=True)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(10, 5, 3, padding=1)

    def forward(self, x):
        return self.head(torch.relu(torch.cat([self.a(x), self.b(x)], 1)))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.c3 = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return self.c3(torch.relu(self.g(torch.relu(self.c1(x)))))


def _data(n=24, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


OPTS = dict(keep=0.5, num_images=24, statistics="full", samples_per_image=None, holdout=0, progress=False,
            stats_dtype=torch.float64, coupled="prune")


def test_refuse_is_the_default_and_prune_cuts_the_residual_group():
    model, x = Residual().eval(), _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = tf.prune(model, x, **{**OPTS, "coupled": "refuse"})
    assert plain.model.stem.out_channels == 8  # the residual channels stay
    res = tf.prune(model, x, **OPTS)
    m = res.model
    print(res.report)
    assert m.stem.out_channels == m.conv2.out_channels == m.conv3.in_channels == m.fc.in_features == 4
    assert m.conv1.out_channels == 3  # the plain unit, pruned first
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model is whole
    rec = [r for r in res.report.units if r.producer in ("stem", "conv2")]
    assert len(rec) == 1 and "stem" in rec[0].notes[0] and "conv2" in rec[0].notes[0]
    assert torch.isfinite(m(x)).all()


def test_group_selection_is_greedy_on_the_summed_gram():
    model, x = Residual().eval(), _data()
    groups, refused = find_groups(model, x[:1])
    print(refused)
    (g,) = [g for g in groups if set(g.producers) == {"stem", "conv2"}]
    assert {r.name for r in g.readers} == {"conv1", "conv3", "fc"}
    stats = tf.pipeline.coupled.collect_accumulators(
        model, g.readers, [x], tf.pipeline.collect.StatsSpec(statistics="full", num_images=24, samples_per_image=None,
                                                              acc_dtype=torch.float64))
    G = group_statistics(g, stats).gram
    # brute force: the per-reader Grams over the same channels, summed by hand
    G_hand = sum(stats[r.key].gram.double() for r in g.readers if r.kind == "conv")
    fc = [r for r in g.readers if r.kind == "linear"][0]
    G_hand = G_hand + stats[fc.key].gram.double()
    print("max |G - G_hand|", float((G - G_hand).abs().max()))
    assert torch.allclose(G, G_hand, rtol=1e-12, atol=1e-12)
    res = tf.prune(model, x, **{**OPTS, "units": ["stem"]})
    keep = greedy.removal_to_keep(greedy.greedy_remove_ref(G, 7), 8, 4)
    w_expected = model.conv3.weight[:, keep]
    # scale reconstruction of conv3 from its own Gram, on the kept channels
    s = reconstruct.ls_scale(stats[[r for r in g.readers if r.name == "conv3"][0].key].gram, keep)
    got = res.model.conv3.weight.double()
    want = (w_expected.double() * s[None, :, None, None])
    print("max |conv3 - scaled|", float((got - want).abs().max()))
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-8)


def test_concat_reader_keeps_the_union_and_is_refitted():
    model, x = Concat().eval(), _data()
    res = tf.prune(model, x, **{**OPTS, "reconstruction": "full"})
    m = res.model
    assert (m.a.out_channels, m.b.out_channels, m.head.in_channels) == (3, 2, 5)
    none = tf.prune(model, x, **{**OPTS, "reconstruction": "none"})
    err = lambda mm: float((mm(x) - model(x)).norm() / model(x).norm())  # noqa: E731
    print("refit", err(m), "none", err(none.model))
    assert err(m) < err(none.model)


def test_grouped_conv_groups_stay_aligned():
    model, x = Grouped().eval(), _data()
    res = tf.prune(model, x, **OPTS)
    g = res.model.g
    print(res.report)
    assert (g.in_channels, g.out_channels, g.groups) == (4, 4, 4) and res.model.c1.out_channels == 4
    assert torch.isfinite(res.model(x)).all()
    out = res.model(x)
    assert out.shape == (24, 5, 8, 8)


def test_pruned_model_round_trips(tmp_path):
    model, x = Residual().eval(), _data()
    res = tf.prune(model, x, **OPTS)
    tf.save(res.model, tmp_path / "m.pt")
    back = tf.load(tmp_path / "m.pt")
    assert torch.allclose(back(x), res.model(x))


def test_options_are_validated():
    with pytest.raises(ValueError, match="coupled"):
        tf.PruneConfig(coupled="yes")
    with pytest.raises(ValueError, match="preset"):
        tf.PruneConfig(coupled="prune", preset="vgg16-thinet-conv")
    with pytest.raises(TypeError, match="ignored_layers"):
        tf.PruneConfig(ignored_layers="fc")


def test_ignored_layers_are_not_pruned():
    model, x = Residual().eval(), _data()
    res = tf.prune(model, x, **{**OPTS, "ignored_layers": ["stem"]})
    m = res.model
    assert m.stem.out_channels == m.conv2.out_channels == 8 and m.conv1.out_channels == 3


def test_coupled_stage_is_checkpointed_and_resumes_exactly(tmp_path, monkeypatch):
    import thinet_fast.pipeline.coupled as coupled

    model, x = Residual().eval(), _data()
    want = tf.prune(model, x, **OPTS).model
    real = coupled.run_coupled

    def crash(*a, **k):
        raise KeyboardInterrupt

    path = tmp_path / "run.ckpt"
    monkeypatch.setattr(coupled, "run_coupled", crash)  # interrupted in the coupled stage
    with pytest.raises(KeyboardInterrupt):
        tf.prune(model, x, resume=str(path), **OPTS)
    meta = tf.load_meta(path)
    assert "coupled" not in meta and [r["producer"] for r in meta["records"]] == ["conv1"]
    monkeypatch.setattr(coupled, "run_coupled", real)
    got = tf.prune(model, x, resume=str(path), **OPTS)
    meta = tf.load_meta(path)
    assert "coupled" in meta and len(meta["records"]) == 2
    for (k, a), (_, b) in zip(want.state_dict().items(), got.model.state_dict().items()):
        assert a.shape == b.shape and torch.equal(a, b), k
    monkeypatch.setattr(coupled, "run_coupled", crash)  # a finished checkpoint never reruns it
    again = tf.prune(model, x, resume=str(path), **OPTS)
    assert any("coupled groups: 1 pruned" in n for n in again.report.notes)
    for (k, a), (_, b) in zip(want.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k

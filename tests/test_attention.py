"""Attention heads: the head-pruned modules against the torch/torchvision modules they
replace, the head statistics against brute force, and whole prune() runs."""
import pytest
import torch
from torch import nn
from torchvision.models import swin_transformer as sw

pytest.importorskip("torch_pruning")

import thinet_fast as tf  # noqa: E402
from torchvision.models import maxvit  # noqa: E402

from thinet_fast.attention import (HeadPrunedAttention, HeadPrunedRelativeAttention,  # noqa: E402
                                   HeadPrunedWindowAttention, HeadPrunedWindowAttentionV2, cut_heads, find_heads,
                                   pre_projection)
from thinet_fast.pipeline.collect import StatsSpec, iter_batches  # noqa: E402
from thinet_fast.pipeline.heads import head_gram, head_statistics  # noqa: E402


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mha(batch_first=True, E=24, H=4, seed=0):
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(E, H, batch_first=batch_first).eval()
    with torch.no_grad():
        m.in_proj_bias.normal_()
        m.out_proj.bias.normal_()
    return m


def _zero_heads(m, drop, d):
    """The reference for a cut: the original module with the dropped heads' projection
    columns zeroed (their output then reaches nothing)."""
    with torch.no_grad():
        w = next(getattr(m, n) for n in ("out_proj", "proj", "merge") if hasattr(m, n)).weight
        for h in drop:
            w[:, h * d:(h + 1) * d] = 0
    return m


def _cut(m, keep):
    holder = nn.Module()
    holder.a = m
    site = find_heads(holder)[0][0]
    d = site.head_dim
    cols = (torch.tensor(keep)[:, None] * d + torch.arange(d)).reshape(-1)
    proj = site.projection
    return cut_heads(holder, site, torch.tensor(keep), proj.weight[:, cols].detach(),
                     None if proj.bias is None else proj.bias.detach())


@pytest.mark.parametrize("batch_first", [True, False])
def test_head_pruned_attention_is_multihead_attention_with_the_other_heads_zeroed(batch_first):
    import copy
    m = _mha(batch_first)
    N, L, S, E, H = 3, 5, 7, 24, 4
    q = torch.randn(N, L, E, generator=_gen(1))
    kv = torch.randn(N, S, E, generator=_gen(2))
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    pad = torch.rand(N, S, generator=_gen(3)) < 0.3
    pad[:, 0] = False
    float_mask = torch.randn(L, S, generator=_gen(4))
    per_head = torch.rand(N * H, L, S, generator=_gen(5)) < 0.2
    per_head[..., 0] = False
    calls = [dict(), dict(key_padding_mask=pad), dict(attn_mask=float_mask), dict(attn_mask=per_head),
             dict(attn_mask=float_mask, key_padding_mask=pad, need_weights=False)]
    for keep in ([0, 1, 2, 3], [1, 3]):
        ref = _zero_heads(copy.deepcopy(m), sorted(set(range(H)) - set(keep)), E // H)
        new = _cut(copy.deepcopy(m), keep)
        assert isinstance(new, HeadPrunedAttention) and new.num_heads == len(keep)
        for kw in calls:
            want, want_w = ref(q, kv, kv, **kw)
            got, got_w = new(q, kv, kv, **kw)
            err = (got - want).abs().max().item()
            print(keep, sorted(kw), "max |pruned - reference|", err)
            assert err < 1e-5
            if len(keep) == H and kw.get("need_weights", True):
                assert torch.allclose(got_w, want_w, atol=1e-6)
    # unbatched and causal calls, all heads kept
    new = _cut(_mha(batch_first), [0, 1, 2, 3])
    ref = _mha(batch_first)
    x = torch.randn(L, E, generator=_gen(6))
    assert torch.allclose(new(x, x, x)[0], ref(x, x, x)[0], atol=1e-5)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    assert torch.allclose(new(q, q, q, attn_mask=causal, is_causal=True)[0],
                          ref(q, q, q, attn_mask=causal, is_causal=True)[0], atol=1e-5)


def _swin(v2, shift, window=(4, 4), C=32, H=4):
    torch.manual_seed(0)
    cls = sw.ShiftedWindowAttentionV2 if v2 else sw.ShiftedWindowAttention
    m = cls(C, list(window), list(shift), H).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=_gen(p.numel())))
    return m


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("shift", [(0, 0), (2, 2)], ids=["plain", "shifted"])
def test_head_pruned_window_attention_is_torchvisions_with_the_other_heads_zeroed(v2, shift):
    import copy
    m = _swin(v2, shift)
    x = torch.randn(2, 10, 9, 32, generator=_gen(7))  # padded to whole windows
    for keep in ([0, 1, 2, 3], [0, 2]):
        ref = _zero_heads(copy.deepcopy(m), sorted(set(range(4)) - set(keep)), 8)
        new = _cut(copy.deepcopy(m), keep)
        assert isinstance(new, HeadPrunedWindowAttentionV2 if v2 else HeadPrunedWindowAttention)
        err = (new(x) - ref(x)).abs().max().item()
        print("v2" if v2 else "v1", shift, keep, "max |pruned - torchvision|", err)
        assert err < 1e-5


def _maxvit():
    torch.manual_seed(0)
    m = maxvit.RelativePositionalMultiHeadAttention(32, 8, 16).eval()
    with torch.no_grad():
        m.relative_position_bias_table.normal_()
    return m


def test_head_pruned_relative_attention_is_maxvits_with_the_other_heads_zeroed():
    import copy
    m = _maxvit()
    x = torch.randn(2, 3, 16, 32, generator=_gen(14))  # (B, G, P, D)
    for keep in ([0, 1, 2, 3], [1, 2]):
        ref = _zero_heads(copy.deepcopy(m), sorted(set(range(4)) - set(keep)), 8)
        new = _cut(copy.deepcopy(m), keep)
        assert isinstance(new, HeadPrunedRelativeAttention) and new.n_heads == len(keep)
        err = (new(x) - ref(x)).abs().max().item()
        print(keep, "max |pruned - torchvision|", err)
        assert err < 1e-5


@pytest.mark.parametrize("kind", ["mha", "mha_seq_first", "swin", "maxvit"])
def test_the_heads_before_the_projection_give_the_output_through_it(kind):
    m = {"swin": lambda: _swin(False, (2, 2)), "maxvit": _maxvit}.get(kind, lambda: _mha(kind == "mha"))()
    x = {"swin": torch.randn(2, 8, 8, 32, generator=_gen(8)), "maxvit": torch.randn(2, 3, 16, 32, generator=_gen(8))
         }.get(kind, torch.randn(3, 5, 24, generator=_gen(8)))
    holder = nn.Module()
    holder.a = m
    site = find_heads(holder)[0][0]
    call = (lambda: m(x)) if kind in ("swin", "maxvit") else (lambda: m(x, x, x, need_weights=False)[0])
    with pre_projection(site):
        z = call()
    y = call()
    proj = site.projection
    err = (nn.functional.linear(z, proj.weight, proj.bias) - y).abs().max().item()
    print(kind, "max |proj(heads) - output|", err)
    assert err < 1e-5
    assert not torch.allclose(z, y)  # the projection is back


class _Tiny(nn.Module):
    def __init__(self, E=32, H=4, layers=2, batch_first=True):
        super().__init__()
        self.embed = nn.Linear(6, E)
        layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=48, batch_first=batch_first, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(E, 5)
        self.batch_first = batch_first

    def forward(self, x):
        h = self.embed(x)
        h = self.enc(h if self.batch_first else h.transpose(0, 1))
        return self.head(h if self.batch_first else h.transpose(0, 1)).mean(1)


def test_head_statistics_are_the_brute_force_head_contributions():
    torch.manual_seed(0)
    model = _Tiny().eval()
    x = torch.randn(5, 7, 6, generator=_gen(9))
    sites = find_heads(model)[0]
    spec = StatsSpec(statistics="full", samples_per_image=None, num_images=5, acc_dtype=torch.float64)
    stats = head_statistics(model, sites, iter_batches([x[:2], x[2:]], 5, torch.device("cpu")), spec)
    site = sites[0]
    captured = {}
    h = site.module.register_forward_hook(lambda m, a, k, o: captured.update(args=a, kwargs=k), with_kwargs=True)
    model(x)
    h.remove()
    with pre_projection(site):
        z = site.module.forward(*captured["args"], **captured["kwargs"])[0].reshape(-1, 32).double()
    W = site.projection.weight.detach().double()
    d = site.head_dim
    contrib = torch.stack([z[:, i * d:(i + 1) * d] @ W[:, i * d:(i + 1) * d].T for i in range(site.heads)])
    want = torch.einsum("htk,gtk->hg", contrib, contrib)
    got = head_gram(stats[site.name], site.heads).gram
    err = ((got - want).abs().max() / want.abs().max()).item()
    print("relative error of the head Gram", err)
    assert err < 1e-6  # float32 activations, float64 sums


@pytest.mark.parametrize("batch_first", [True, False])
def test_prune_cuts_heads_refits_the_projection_and_round_trips(tmp_path, batch_first):
    torch.manual_seed(0)
    model = _Tiny(batch_first=batch_first).eval()
    x = torch.randn(64, 7, 6, generator=_gen(10))
    held = torch.randn(16, 7, 6, generator=_gen(11))
    kw = dict(keep=0.5, num_images=64, coupled="prune", progress=False, statistics="full", reconstruction="full")
    res = tf.prune(model, [x[:32], x[32:]], **kw)
    heads_only = dict(kw, filter_fn=lambda m, fqn: isinstance(m, nn.MultiheadAttention))
    refit = tf.prune(model, [x[:32], x[32:]], **heads_only)
    plain = tf.prune(model, [x[:32], x[32:]], **dict(heads_only, reconstruction="none"))
    layers = [m for m in res.model.modules() if isinstance(m, HeadPrunedAttention)]
    assert len(layers) == 2 and all(m.num_heads == 2 for m in layers)
    heads = [r for r in res.report.units if "attention heads" in " ".join(r.notes)]
    assert [(r.channels, r.kept) for r in heads] == [(4, 2), (4, 2)]
    y0 = model(held)

    def dev(m):
        return ((m(held) - y0).norm() / y0.norm()).item()
    print("deviation, heads only: refit", dev(refit.model), "plain cut", dev(plain.model), "; all:", dev(res.model))
    assert dev(refit.model) < 0.5 * dev(plain.model)
    assert all(r.error_reconstructed < r.error_selected for r in heads)
    tf.save(res.model, tmp_path / "m.safetensors")
    back = tf.load(tmp_path / "m.safetensors")
    assert torch.allclose(back(held), res.model(held), atol=1e-6)
    assert isinstance(model.enc.layers[0].self_attn, nn.MultiheadAttention)  # the caller's model is untouched


def test_ignored_and_unselected_attention_keeps_its_heads():
    torch.manual_seed(0)
    model = _Tiny().eval()
    x = torch.randn(32, 7, 6, generator=_gen(12))
    res = tf.prune(model, x, keep=0.5, num_images=32, coupled="prune", progress=False,
                   ignored_layers=["enc.layers.0.self_attn"])
    assert isinstance(res.model.enc.layers[0].self_attn, nn.MultiheadAttention)
    assert isinstance(res.model.enc.layers[1].self_attn, HeadPrunedAttention)
    res = tf.prune(model, x, keep=0.5, num_images=32, coupled="prune", progress=False,
                   filter_fn=lambda m, fqn: not isinstance(m, nn.MultiheadAttention))
    assert not any(isinstance(m, HeadPrunedAttention) for m in res.model.modules())


def _small_swin(v2=False):
    torch.manual_seed(0)
    extra = dict(block=sw.SwinTransformerBlockV2, downsample_layer=sw.PatchMergingV2) if v2 else {}
    return sw.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 1], num_heads=[2, 4], window_size=[4, 4],
                              num_classes=5, **extra).eval()


def _small_maxvit():
    torch.manual_seed(0)
    return maxvit.MaxVit(input_size=(32, 32), stem_channels=16, partition_size=2, block_channels=[32, 64],
                         block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=5).eval()


def _deployable(build, x, res, tmp_path):
    """The head-pruned model round-trips through save/load, loads into a fresh base of
    its architecture, and exports to ONNX that onnxruntime runs to the same outputs."""
    y = res.model(x)
    assert torch.isfinite(y).all()
    tf.save(res.model, tmp_path / "m.safetensors")
    assert torch.allclose(tf.load(tmp_path / "m.safetensors")(x), y, atol=1e-6)
    tf.save(res.model, tmp_path / "bare.safetensors", skeleton=False)
    base = build()
    with torch.no_grad():
        for p in base.parameters():  # what the base holds must not matter
            p.add_(1.0)
    loaded = tf.load(tmp_path / "bare.safetensors", base=base)
    err = (loaded(x) - y).abs().max().item()
    print("max |load(base=) - pruned|", err)
    assert err == 0.0 and [type(m) for m in loaded.modules()] == [type(m) for m in res.model.modules()]
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    check = tf.export_onnx(res.model, x[:2], tmp_path / "m.onnx")
    print(check)
    assert check.max_abs_error < 1e-4 and (tmp_path / "m.onnx").stat().st_size > 0


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_a_small_swin_prunes_its_heads_and_round_trips(tmp_path, v2, monkeypatch):
    import thinet_fast.tp_graph as tp_graph
    # the window partitions' groups are refused when their index search passes the bound;
    # a lower bound refuses them sooner (the heads, tested here, are not searched)
    monkeypatch.setattr(tp_graph, "MAX_MAPPED_INDICES", 50_000)
    x = torch.rand(8, 3, 32, 32, generator=_gen(13))
    res = tf.prune(_small_swin(v2), x, keep=0.5, num_images=8, coupled="prune", progress=False)
    cls = HeadPrunedWindowAttentionV2 if v2 else HeadPrunedWindowAttention
    pruned = [m for m in res.model.modules() if isinstance(m, cls)]
    assert [m.num_heads for m in pruned] == [1, 1, 2]
    if v2:
        y = res.model(x)
        tf.save(res.model, tmp_path / "s.safetensors")
        assert torch.isfinite(y).all() and torch.allclose(tf.load(tmp_path / "s.safetensors")(x), y, atol=1e-6)
    else:
        _deployable(_small_swin, x, res, tmp_path)


def test_a_small_maxvit_prunes_its_heads_and_round_trips(tmp_path):
    x = torch.rand(8, 3, 32, 32, generator=_gen(15))
    res = tf.prune(_small_maxvit(), x, keep=0.5, num_images=8, coupled="prune", progress=False)
    assert [m.n_heads for m in res.model.modules() if isinstance(m, HeadPrunedRelativeAttention)] == [2, 2, 4, 4]
    _deployable(_small_maxvit, x, res, tmp_path)


def test_a_finished_checkpoint_restores_the_head_pruned_model(tmp_path, monkeypatch):
    import thinet_fast.pipeline.coupled as coupled
    torch.manual_seed(0)
    model = _Tiny().eval()
    x = torch.randn(32, 7, 6, generator=_gen(16))
    opts = dict(keep=0.5, num_images=32, coupled="prune", progress=False)
    path = tmp_path / "run.ckpt"
    first = tf.prune(model, x, resume=str(path), **opts)

    def crash(*a, **k):
        raise AssertionError("the finished stage ran again")
    monkeypatch.setattr(coupled, "run_heads", crash)
    again = tf.prune(model, x, resume=str(path), **opts)
    assert sum(isinstance(m, HeadPrunedAttention) for m in again.model.modules()) == 2
    for (k, a), (_, b) in zip(first.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_attention_counts_as_one_layer_whatever_its_path_and_dry_run_plans_its_heads():
    torch.manual_seed(0)
    E, L, H = 32, 7, 4
    model = _Tiny(E=E, H=H).eval()
    x = torch.randn(1, L, 6, generator=_gen(17))
    prof = tf.counting.profile(model, x)
    attn = [r for r in prof.layers if r.kind == "MultiheadAttention"]
    # brute force: q, k, v and output projections (4·L·E² MACs) and the two attention products (2·L²·E)
    want = 2 * (4 * L * E * E + 2 * L * L * E)
    print("attention FLOPs counted", [r.flops for r in attn], "brute force", want)
    assert len(attn) == 2 and all(r.flops == want for r in attn)
    assert not any(r.name.endswith("out_proj") for r in prof.layers)
    only = dict(keep=0.5, coupled="prune", filter_fn=lambda m, fqn: isinstance(m, nn.MultiheadAttention))
    plan = tf.dry_run(model, x, **only)  # the dry run plans heads, not channel groups: heads only here
    res = tf.prune(model, torch.randn(16, L, 6, generator=_gen(18)), num_images=16, progress=False, **only)
    heads = [u for u in plan.units if u.producer.endswith("self_attn")]
    assert [(u.channels, u.kept) for u in heads] == [(H, H // 2)] * 2
    # the pruned twin counts the same way: half the heads, half of every attention term
    pruned = [r for r in tf.counting.profile(res.model, x).layers if r.kind == "HeadPrunedAttention"]
    assert all(r.flops == want // 2 for r in pruned)
    assert plan.params[1] == tf.count_params(res.model)


def test_a_head_cut_that_breaks_the_forward_is_an_error(monkeypatch):
    import thinet_fast.pipeline.heads as heads
    import thinet_fast.regions as regions
    torch.manual_seed(0)
    model = _Tiny().eval()
    real, calls = regions.output_widths, []

    def widths(m, ex):
        calls.append(1)
        return real(m, ex) if len(calls) == 1 else [(-1,)]  # pretend the cut changed an output
    monkeypatch.setattr(heads, "output_widths", widths)
    monkeypatch.setattr(regions, "output_widths", widths)
    with pytest.raises(RuntimeError, match="attention heads of enc.layers.0.self_attn"):
        tf.prune(model, torch.randn(16, 7, 6, generator=_gen(19)), keep=0.5, num_images=16, coupled="prune",
                 progress=False, filter_fn=lambda m, fqn: isinstance(m, nn.MultiheadAttention))
    assert isinstance(model.enc.layers[0].self_attn, nn.MultiheadAttention)  # the caller's model is whole


def _small_mha():
    torch.manual_seed(0)
    return _Tiny().eval()


def test_head_pruned_multihead_attention_saves_loads_into_a_base_and_exports(tmp_path):
    x = torch.randn(16, 7, 6, generator=_gen(21))
    res = tf.prune(_small_mha(), x, keep=0.5, num_images=16, coupled="prune", progress=False)
    assert sum(isinstance(m, HeadPrunedAttention) for m in res.model.modules()) == 2
    other = _small_mha()
    other.enc.layers[0].self_attn = nn.Linear(32, 32)
    tf.save(res.model, tmp_path / "m.safetensors", skeleton=False)
    with pytest.raises(ValueError, match="saved `enc.layers.0.self_attn` is a .*HeadPrunedAttention with 2 heads"):
        tf.load(tmp_path / "m.safetensors", base=other)
    _deployable(_small_mha, x, res, tmp_path)

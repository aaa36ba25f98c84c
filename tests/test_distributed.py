"""torch.distributed statistics: two gloo processes, each on half the images, must
give the statistics of one process on all of them (full statistics at every location
are deterministic, so the sums must agree)."""
import os

import pytest
import torch
import torch.distributed as dist

import thinet_fast as tf
from thinet_fast.models import DemoResNet
from conftest import spawn_gloo


def _setup():
    torch.manual_seed(0)
    model = DemoResNet().eval()
    x = torch.randn(12, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    units = tf.find_units(model, x[:1]).units[:3]
    return model, x, units


def _collect(model, units, x):
    return tf.collect_statistics(model, units, [x[i:i + 3] for i in range(0, len(x), 3)], statistics="full",
                                 samples_per_image=None, num_images=len(x), dtype=torch.float64)


def _worker(rank, world, out):
    model, x, units = _setup()
    shard = x[rank::world]
    stats = _collect(model, units, shard)
    if rank == 0:
        torch.save({p: (s.gram, s.cov, s.patch_sum, s.zeros, s.count, s.patch_count, s.elements)
                    for p, s in stats.items()}, out)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "stats.pt"
    spawn_gloo(_worker, 2, tmp_path, str(out))
    got = torch.load(out)
    model, x, units = _setup()
    want = _collect(model, units, x)
    for u in units:
        g = got[u.producer]
        w = want[u.producer]
        err = (g[0] - w.gram).abs().max().item() / w.gram.abs().max().item()
        print(u.producer, "relative gram error", err)
        assert err < 1e-10
        assert torch.allclose(g[1], w.cov, rtol=1e-10, atol=1e-10)
        assert torch.allclose(g[2], w.patch_sum, rtol=1e-10, atol=1e-10)
        assert torch.equal(g[3], w.zeros)
        assert (g[4], g[5], g[6]) == (w.count, w.patch_count, w.elements)


def _prune_setup(dtype):
    torch.manual_seed(0)
    model = DemoResNet().eval()
    x = torch.randn(24, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    kw = dict(keep=0.5, num_images=24, progress=False, reconstruction="full", schedule="sequential",
              stats_dtype=dtype)
    return model, x, kw  # samples_per_image: the default (10), drawn per image key


def _prune_worker(rank, world, out, dtype):
    model, x, kw = _prune_setup(dtype)
    shard = x[rank::world]  # as DistributedSampler(shuffle=False) shards it
    res = tf.prune(model, [shard[i:i + 5] for i in range(0, len(shard), 5)],
                   **dict(kw, num_images=len(shard)))
    if rank == 0:
        torch.save({"state": res.model.state_dict(), "kept": [u["kept"] for u in res.report.units]}, out)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-3)], ids=["float64", "float32"])
def test_two_process_prune_equals_one_process(tmp_path, dtype, tol):
    """Sampled locations and the held-out fold are drawn per image key, so sharding over
    2 processes (and other batch sizes) gives the 1-process model: the same channels,
    and weights equal up to the summation order of the statistics (float32 sums in
    another order differ by ~1e-7, which the full refits amplify)."""
    out = tmp_path / "pruned.pt"
    spawn_gloo(_prune_worker, 2, tmp_path, str(out), dtype)
    got = torch.load(out)
    model, x, kw = _prune_setup(dtype)
    want = tf.prune(model, [x[i:i + 8] for i in range(0, len(x), 8)], **kw)
    assert got["kept"] == [u["kept"] for u in want.report.units]
    worst = 0.0
    for k, v in want.model.state_dict().items():
        if v.is_floating_point():
            worst = max(worst, float((got["state"][k] - v).abs().max() / v.abs().max().clamp_min(1e-12)))
    print("max relative weight difference, 2 processes vs 1:", worst, kw)
    assert worst < tol


def _coupled_setup(kind):
    if kind == "heads":
        from test_attention import _Tiny
        torch.manual_seed(0)
        model, x = _Tiny().eval(), torch.randn(24, 7, 6, generator=torch.Generator().manual_seed(4))
    else:
        from test_coupled_budget import Net
        torch.manual_seed(0)
        model, x = Net().eval(), torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    kw = dict(params_target=0.5, coupled="prune", num_images=24, progress=False, reconstruction="full",
              stats_dtype=torch.float64)
    return model, x, kw


def _coupled_worker(rank, world, out, kind):
    model, x, kw = _coupled_setup(kind)
    shard = x[rank::world]
    res = tf.prune(model, [shard[i:i + 5] for i in range(0, len(shard), 5)], **dict(kw, num_images=len(shard)))
    if rank == 0:
        torch.save({"state": res.model.state_dict(), "keep": res.report.config["budget"]["keep"]}, out)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
@pytest.mark.parametrize("kind", ["groups", "heads"])
def test_two_process_budget_over_groups_and_heads_equals_one_process(tmp_path, kind):
    """A budget with coupled="prune": the allocation (from statistics reduced over the
    ranks), the groups' and heads' selections and every refit match one process."""
    pytest.importorskip("torch_pruning")
    out = tmp_path / "pruned.pt"
    spawn_gloo(_coupled_worker, 2, tmp_path, str(out), kind)
    got = torch.load(out)
    model, x, kw = _coupled_setup(kind)
    want = tf.prune(model, [x[i:i + 8] for i in range(0, len(x), 8)], **kw)
    assert got["keep"] == want.report.config["budget"]["keep"]
    worst = 0.0
    for k, v in want.model.state_dict().items():
        assert got["state"][k].shape == v.shape, k
        if v.is_floating_point():
            worst = max(worst, float((got["state"][k] - v).abs().max() / v.abs().max().clamp_min(1e-12)))
    print(kind, "max relative weight difference, 2 processes vs 1:", worst, got["keep"])
    assert worst < 1e-5


def _stream_worker(rank, world, out):
    from test_stream import _images, _vit
    model, x = _vit(6), _images(48, 7)
    shard = x[rank::world]
    res = tf.prune(model, [shard[i:i + 6] for i in range(0, len(shard), 6)], keep=0.5, coupled="prune",
                   num_images=len(shard), progress=False, reconstruction="full", stats_dtype=torch.float64)
    if rank == 0:
        torch.save(res.model.state_dict(), out)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_process_stream_cut_equals_one_process(tmp_path):
    """A transformer's residual stream: the selection and the refit after the cut (moments
    of both models reduced over the ranks, the ridge chosen on the same held-out images)
    match one process."""
    pytest.importorskip("torch_pruning")
    from test_stream import _images, _vit
    out = tmp_path / "pruned.pt"
    spawn_gloo(_stream_worker, 2, tmp_path, str(out))
    got = torch.load(out)
    x = _images(48, 7)
    want = tf.prune(_vit(6), [x[i:i + 8] for i in range(0, len(x), 8)], keep=0.5, coupled="prune", num_images=48,
                    progress=False, reconstruction="full", stats_dtype=torch.float64).model
    assert want.hidden_dim == 16
    worst = 0.0
    for k, v in want.state_dict().items():
        assert got[k].shape == v.shape, k
        if v.is_floating_point():
            worst = max(worst, float((got[k] - v).abs().max() / v.abs().max().clamp_min(1e-12)))
    print("max relative weight difference, 2 processes vs 1:", worst)
    assert worst < 1e-5

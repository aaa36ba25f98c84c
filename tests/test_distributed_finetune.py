"""Distributed fine-tuning: two gloo processes with 4 inputs each must train the model
one process trains with batches of 8 (DDP averages the ranks' mean-loss gradients,
which is the mean over the global batch), only rank 0 writes files, and a stopped and
resumed 2-process run (with dropout, drawn per rank) ends where a straight one does.

The equality model has no BatchNorm and no dropout: with them a 2-process run is not
the 1-process run (per-rank batch statistics unless ``sync_bn=True`` on CUDA; per-rank
dropout masks), which the module docstring of thinet_fast.finetuning says."""
import json
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from thinet_fast import checkpoints_ft as ck
from thinet_fast import distributed as D
from thinet_fast import finetune
from conftest import Preempted, StopAfter, spawn_gloo

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")

GLOBAL_BATCH = 8


def _data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(5, (n,), generator=g))


def _net(seed, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(dropout), nn.Linear(144, 5))


def _loader(ds):
    """The global loader: shuffled, 8 per step; each run shards it with shard_loader."""
    return DataLoader(ds, batch_size=GLOBAL_BATCH, shuffle=True, generator=torch.Generator().manual_seed(3))


def _opts(world, rank):
    val = DataLoader(D.shard_dataset(_data(20, seed=1), rank, world), batch_size=4)
    return dict(epochs=2, lr=0.05, momentum=0.9, weight_decay=1e-3, teacher=_net(7).eval(), distill_weight=0.5,
                temperature=2.0, val_data=val, val_every=3, seed=11, progress=False)




def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank, world, tmp):
    if rank != 0:  # only rank 0 may write a checkpoint
        def refuse(*a, **k):
            raise AssertionError(f"rank {rank} wrote a checkpoint")
        ck.write_checkpoint = ck.write_best = refuse
    got = {}
    # 1. equality with one process: no BN, no dropout, distillation, validation, checkpoints, log
    model = _net(0)
    train = D.shard_loader(_loader(_data()))
    assert train.batch_size == GLOBAL_BATCH // world
    res = finetune(model, train, checkpoint_dir=os.path.join(tmp, f"ck-rank{rank}"),
                   log=os.path.join(tmp, f"log-rank{rank}.jsonl"), **_opts(world, rank))
    got["plain"], got["plain_res"] = _params(model), res
    # 2. dropout (drawn per rank): straight, then stopped after a checkpoint and resumed
    model = _net(0, dropout=0.3)
    finetune(model, D.shard_loader(_loader(_data())), **_opts(world, rank))
    got["dropout"] = _params(model)
    ckdir = os.path.join(tmp, "ck-resume")
    per_step = GLOBAL_BATCH // world
    try:  # every rank stops while loading step 8 (last.pt is from step 6, mid epoch 2)
        finetune(_net(0, dropout=0.3), D.shard_loader(_loader(StopAfter(_data(), 7 * per_step))),
                 checkpoint_dir=ckdir, **_opts(world, rank))
        raise AssertionError("the run was not stopped")
    except Preempted:
        pass
    model = _net(5, dropout=0.3)  # other weights: the checkpoint's replace them
    res = finetune(model, D.shard_loader(_loader(_data())), checkpoint_dir=ckdir, resume=True,
                   **_opts(world, rank))
    got["resumed"], got["resumed_from"] = _params(model), res["resumed_from"]
    # 3. an error on rank 0 reaches every rank; sync_bn on CPU is refused before any collective
    try:
        D.from_rank0(lambda: (_ for _ in ()).throw(ValueError("only rank 0 saw this")))
    except ValueError as exc:
        got["error"] = str(exc)
    try:
        finetune(_net(0), D.shard_loader(_loader(_data())), steps=1, sync_bn=True, progress=False)
    except ValueError as exc:
        got["sync_bn"] = str(exc)
    torch.save(got, os.path.join(tmp, f"rank{rank}.pt"))


def _single(tmp):
    model = _net(0)
    res = finetune(model, D.shard_loader(_loader(_data()), world_size=1, rank=0),
                   checkpoint_dir=os.path.join(tmp, "ck-single"), **_opts(1, 0))
    return _params(model), res


def _worst(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_processes_train_the_one_process_model_and_only_rank0_writes(tmp_path):
    spawn_gloo(_worker, 2, tmp_path, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    want, want_res = _single(str(tmp_path))
    worst = _worst(r0["plain"], want)
    print("max |2 processes - 1 process| over the parameters:", worst)
    assert worst < 1e-6
    assert _worst(r0["plain"], r1["plain"]) == 0  # DDP keeps the replicas identical
    res = r0["plain_res"]
    assert res["world_size"] == 2 and res["steps"] == want_res["steps"] == 8
    assert abs(res["last_loss"] - want_res["last_loss"]) < 1e-5  # the global batch's loss, not rank 0's
    for key in ("val", "best_val"):  # validation counts summed over the ranks' shards
        assert res[key]["step"] == want_res[key]["step"]
        assert abs(res[key]["top1"] - want_res[key]["top1"]) < 1e-9
    assert r1["plain_res"]["val"] == res["val"]
    # files: rank 0's checkpoint dir and log only (rank 1's arguments were not written to)
    assert sorted(os.listdir(tmp_path / "ck-rank0")) == ["best.pt", "last.pt"]
    assert not (tmp_path / "ck-rank1").exists() and not (tmp_path / "log-rank1.jsonl").exists()
    lines = [json.loads(x) for x in (tmp_path / "log-rank0.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["event"] == "train"] == list(range(1, 9))
    # resume under DDP: every rank's random streams came back (dropout), so it ends where a straight run does
    assert r0["resumed_from"] == 6
    assert _worst(r0["resumed"], r0["dropout"]) < 1e-6
    assert _worst(r0["dropout"], want) > 1e-4  # dropout was really on
    assert r0["error"] == r1["error"] == "only rank 0 saw this"
    assert "CUDA" in r0["sync_bn"] and "CUDA" in r1["sync_bn"]


def test_shard_loader_splits_each_global_batch_between_the_ranks():
    ds = TensorDataset(torch.arange(40.0), torch.zeros(40, dtype=torch.long))
    one = D.shard_loader(_loader(ds), world_size=1, rank=0)
    parts = [D.shard_loader(_loader(ds), world_size=2, rank=r) for r in (0, 1)]
    orders = []
    for epoch in (0, 1):
        for loader in (one, *parts):
            loader.sampler.set_epoch(epoch)
        steps = [[b[0].tolist() for b in loader] for loader in (one, *parts)]
        orders.append(steps[0])
        assert len(steps[1]) == len(steps[2]) == len(steps[0]) == 5
        for k, whole in enumerate(steps[0]):
            assert sorted(steps[1][k] + steps[2][k]) == sorted(whole)
            assert not set(steps[1][k]) & set(steps[2][k])
    assert orders[0] != orders[1]  # set_epoch reshuffles, the same way on every rank
    with pytest.raises(ValueError, match="multiple"):
        D.shard_loader(_loader(ds), world_size=3, rank=0)


def test_shard_dataset_is_an_exact_partition_of_the_first_limit_items():
    ds = TensorDataset(torch.arange(11.0))
    parts = [[float(ds[i][0]) for i in D.shard_dataset(ds, r, 3, limit=10).indices] for r in range(3)]
    assert sorted(sum(parts, [])) == [float(i) for i in range(10)]
    assert D.shard_dataset(ds, 0, 1) is ds


def test_sync_batchnorms_swap_classes_and_give_plain_ones_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 4),
                          nn.BatchNorm1d(4)).eval()
    x = torch.randn(2, 1, 4, 4)
    before, state = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    with D.SyncBatchNorms(model) as sbn:
        assert [type(m) for m in model if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [nn.SyncBatchNorm] * 2
        assert torch.equal(model(x), before)  # eval: running statistics, same parameters
        with sbn.plain():
            assert type(model[1]) is nn.BatchNorm2d and type(model[4]) is nn.BatchNorm1d
        assert type(model[1]) is nn.SyncBatchNorm
    assert type(model[1]) is nn.BatchNorm2d and not hasattr(model[1], "process_group")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with D.SyncBatchNorms(model, enabled=False):
        assert type(model[1]) is nn.BatchNorm2d

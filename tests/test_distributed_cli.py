"""`thinet-fast prune` and `finetune` under torchrun: each rank's share of the data (the
calibration subset split rank::world, training batches through a DistributedSampler
with --batch-size as the global batch), and two real torchrun runs on a tiny model: the
2-process prune gives the 1-process model, and only rank 0 prints and writes."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

import thinet_fast as tf
from thinet_fast.cli import main
from thinet_fast.cli.loading import CLIError, load_data

from conftest import needs_fmnist, write_image_folder

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")


@pytest.fixture
def folder(tmp_path):
    """3 classes x 4 small RGB images, ImageNet layout."""
    return write_image_folder(tmp_path / "imgs", ("ant", "bee", "cat"), 4, 12)


def _images(loader):
    return [bytes(x.numpy().tobytes()) for batch in loader for x in batch[0]]


def test_calibration_shards_partition_the_first_num_images(folder):
    kw = dict(train=True, batch_size=4, per_class=3, image_size=8, workers=0, seed=1)
    whole = _images(load_data(str(folder), **kw))
    assert len(whole) == 9 and len(set(whole)) == 9
    for limit, world in ((7, 2), (None, 2), (9, 4)):
        shards = [_images(load_data(str(folder), shard=(r, world), limit=limit, **kw)) for r in range(world)]
        want = whole[:limit]
        assert sorted(sum(shards, [])) == sorted(want)  # every image once, none twice
        assert shards[0] == want[0::world] and shards[1] == want[1::world]  # rank 0 starts the stream
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_training_and_evaluation_shards(folder):
    kw = dict(batch_size=4, image_size=8, workers=0, seed=0)
    train = [load_data(str(folder), train=True, shard=(r, 2), **kw) for r in (0, 1)]
    assert all(isinstance(t.sampler, DistributedSampler) and t.batch_size == 2 for t in train)
    assert [t.sampler.rank for t in train] == [0, 1] and len(train[0]) == len(train[1]) == 3
    one = load_data(str(folder), train=False, **kw)
    evals = [load_data(str(folder), train=False, shard=(r, 2), **kw) for r in (0, 1)]
    assert evals[0].batch_size == 2  # the ranks' first k batches are one process's first k
    first = _images(one)[:4]
    assert sorted(_images(evals[0])[:2] + _images(evals[1])[:2]) == sorted(first)
    with pytest.raises(CLIError, match="--batch-size 4.*multiple of 3"):
        load_data(str(folder), train=True, shard=(0, 3), **kw)


def _torchrun(args, cwd, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "thinet_fast.cli", "--", *args]  # "--": torchrun would take --log for its own --log-dir
    run = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


@needs_fmnist
def test_torchrun_prune_gives_the_one_process_model_and_finetune_writes_once(tmp_path, capsys):
    torch.manual_seed(0)
    tf.save(tf.models.MODEL_BUILDERS["demo-vgg"]().eval(), tmp_path / "base.pt")
    common = ["prune", "--model", "base.pt", "--data", "fashion-mnist", "--per-class", "3", "--num-images", "25",
              "--keep", "0.5", "--workers", "0", "--batch-size", "8", "--device", "cpu"]
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(common + ["--output", "one.pt", "--json", "one.json"]) == 0
    finally:
        os.chdir(here)
    capsys.readouterr()
    out = _torchrun(common + ["--output", "two.pt", "--json", "two.json"], tmp_path)
    assert out.count("thinet-fast prune: device cpu") == 1 and out.count("saved the pruned model") == 1
    one, two = tf.load(tmp_path / "one.pt").state_dict(), tf.load(tmp_path / "two.pt").state_dict()
    worst = max(float((one[k] - two[k]).abs().max() / one[k].abs().max().clamp_min(1e-12))
                for k in one if one[k].is_floating_point())
    print("max relative weight difference, torchrun 2 processes vs 1:", worst)
    assert worst < 1e-3  # float32 statistics summed in another order (tests/test_distributed.py)
    j1, j2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert [u["kept"] for u in j1["units"]] == [u["kept"] for u in j2["units"]]
    assert j1["run"]["images"] == j2["run"]["images"] == 25  # 13 + 12 images, each read by one rank

    out = _torchrun(["finetune", "--model", "two.pt", "--teacher", "base.pt", "--train-data", "fashion-mnist",
                     "--eval-data", "fashion-mnist", "--eval-batches", "3", "--steps", "4", "--val-every", "2",
                     "--batch-size", "8", "--workers", "0", "--device", "cpu", "--checkpoint-dir", "ck",
                     "--log", "ft.jsonl", "--output", "ft.pt", "--json", "ft.json"], tmp_path)
    assert out.count("saved the fine-tuned model") == 1
    body = json.loads((tmp_path / "ft.json").read_text())["finetune"]
    assert body["world_size"] == 2 and body["steps"] == 4
    assert body["val"]["top1"] * 24 == pytest.approx(round(body["val"]["top1"] * 24))  # 3 batches of 8 in all
    assert sorted(os.listdir(tmp_path / "ck")) == ["best.pt", "last.pt"]
    events = [json.loads(x)["event"] for x in (tmp_path / "ft.jsonl").read_text().splitlines()]
    assert events.count("start") == 1 and events.count("train") == 4  # one writer
    assert tf.load_meta(tmp_path / "ck" / "last.pt")["finetune"]["options"]["world_size"] == 2

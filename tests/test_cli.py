"""The thinet-fast CLI and the demo, on real Fashion-MNIST (Debian's dataset-fashion-mnist)."""
import json

import pytest
import torch

import thinet_fast as tf
from conftest import needs_fmnist
from thinet_fast.cli import main


def test_backends_command(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "cpu", "cuda", "cupy", "triton"):
        assert name in out


@needs_fmnist
def test_prune_report_finetune_round_trip(tmp_path, capsys):
    out, rep = tmp_path / "pruned.pt", tmp_path / "report.json"
    assert main(["prune", "--model", "demo-vgg", "--data", "fashion-mnist", "--per-class", "3",
                 "--num-images", "30", "--keep", "0.5", "--method", "thinet", "--workers", "0",
                 "--batch-size", "16", "--output", str(out), "--json", str(rep),
                 "--eval-data", "fashion-mnist", "--eval-batches", "2", "--speed"]) == 0
    report = json.loads(rep.read_text())
    for which in ("pruned", "original"):
        r = report[which]
        assert 0.0 <= r["top1"] <= r["top5"] <= 1.0
        assert r["forward_ms"] > 0 and r["backward_ms"] > 0
    model = tf.load(out)
    assert report["pruned"]["params"] == tf.count_params(model)
    assert report["pruned"]["params"] < report["original"]["params"]
    assert len(report["units"]) > 0
    capsys.readouterr()
    assert main(["report", "--model", str(out), "--data", "fashion-mnist", "--eval-batches", "2",
                 "--batch-size", "50", "--workers", "0"]) == 0
    assert "pruned" in capsys.readouterr().out
    ft = tmp_path / "ft.pt"
    assert main(["finetune", "--model", str(out), "--data", "fashion-mnist", "--epochs", "0.002",
                 "--batch-size", "32", "--workers", "0", "--teacher", "demo-vgg", "--output", str(ft)]) == 0
    a, b = tf.load(ft), model
    assert tf.count_params(a) == tf.count_params(b)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())), "fine-tuning changed nothing"


def test_unwritable_output_fails_before_any_work(tmp_path, capsys):
    for flag in ("--output", "--json"):  # the data path is bad too: the output check comes first
        assert main(["prune", "--model", "demo-vgg", "--data", "/no/such/data", flag,
                     str(tmp_path / "nodir" / "x")]) == 2
        err = capsys.readouterr().err
        assert flag in err and "does not exist" in err, err


def test_bad_model_name_is_a_clear_error():
    with pytest.raises(SystemExit, match="neither a file"):
        main(["report", "--model", "no-such-net"])


@needs_fmnist
def test_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("THINET_FAST_CACHE", str(tmp_path))
    s = tf.demo.DemoSettings(models=("vgg",), methods=("thinet", "random"), train_epochs=1.0, train_limit=1500,
                             calib_per_class=5, finetune_steps=3, eval_limit=500, speed=False, batch_size=100)
    rows = tf.demo.run_demo(s, log=lambda *a: None)
    assert [r["method"] for r in rows] == ["original", "thinet", "random"]
    assert rows[0]["top1"] > 0.4, "the demo model did not learn"
    assert all(r["params"] < rows[0]["params"] for r in rows[1:])
    cached = list((tmp_path / "demo").glob("*.pt"))
    assert len(cached) == 1

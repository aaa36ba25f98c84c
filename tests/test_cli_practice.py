"""The CLI as a practitioner uses it (issue 12), through subprocess-free `main()` calls
and one real subprocess: devices, failing before work, data checks, inspect and
--dry-run, round_to, report as a run log, --config, --version, Ctrl-C."""
import json
import subprocess
import sys

import pytest
import torch

import thinet_fast as tf
from conftest import write_image_folder
from thinet_fast.cli import build_parser, main


@pytest.fixture
def folder(tmp_path):
    """3 classes x 4 small RGB images, ImageNet layout."""
    return write_image_folder(tmp_path / "imgs", ("ant", "bee", "cat"), 4, 40)


def _prune_args(folder, *extra):
    return ["prune", "--model", "resnet18", "--num-classes", "3", "--image-size", "32", "--data", str(folder),
            "--per-class", "2", "--workers", "0", "--batch-size", "6", "--device", "cpu", *extra]


def test_device_auto_is_said_first_and_cuda_without_a_gpu_fails_before_loading(capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert main(["report", "--model", "no-such-net", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "no CUDA device" in err and "no-such-net" not in err
    assert main(["report", "--model", "demo-vgg"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "thinet-fast report: device cpu (no CUDA device)"


def test_option_conflicts_and_outputs_fail_before_the_model_is_loaded(tmp_path, capsys):
    base = ["prune", "--model", "no-such-net", "--data", str(tmp_path)]
    assert main(base + ["--keep", "0.3", "--preset", "vgg16-thinet-conv"]) == 2
    err = capsys.readouterr().err
    assert "--keep" in err and "--preset" in err and "no-such-net" not in err, err
    assert main(base + ["--resume", str(tmp_path / "nodir" / "ck.pt")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(base + ["--round-to", "eight"]) == 2
    assert "--round-to" in capsys.readouterr().err
    assert main(["prune", "--model", "demo-vgg", "--data", str(tmp_path / "missing")]) == 2
    assert "--data" in capsys.readouterr().err


def test_a_preset_on_the_wrong_base_says_what_it_needs_before_reading_images(folder, capsys):
    assert main(_prune_args(folder, "--preset", "resnet50-thinet-50", "--model", "resnet50")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "v1.5" in err and "resnet50_original" in err, err


def test_corrupt_images_are_named_or_skipped_and_counted(folder, tmp_path, capsys):
    bad = folder / "bee" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    out = _prune_args(folder, "--per-class", "5", "--keep", "0.5", "--units", "layer1.0.conv1")
    assert main(out) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "--skip-bad-images" in err and len(err.strip().splitlines()) == 1, err
    js = tmp_path / "run.json"
    assert main(out + ["--skip-bad-images", "--json", str(js)]) == 0
    run = json.loads(js.read_text())["run"]
    assert run["skipped_images"] == [str(bad)]
    assert run["device"].startswith("cpu") and run["torch"] == torch.__version__ and run["thinet_fast"] == tf.__version__
    assert run["seconds"]["prune"] > 0 and run["images"] == 13  # the bad file's place holds another bee


def test_the_parent_of_train_and_val_is_refused_against_the_model_outputs(folder, tmp_path, capsys):
    parent = tmp_path / "dataset"
    parent.mkdir()
    folder.rename(parent / "train")
    (parent / "val").mkdir()
    (parent / "train" / "ant").rename(parent / "val" / "ant")
    assert main(_prune_args(parent)) == 2
    err = capsys.readouterr().err
    assert "top folder" in err and str(parent / "train") in err, err


def test_inspect_and_dry_run_plan_without_statistics(folder, tmp_path, capsys):
    js = tmp_path / "inspect.json"
    assert main(["inspect", "--model", "resnet18", "--image-size", "32", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    info = json.loads(js.read_text())
    assert info["units"] and info["refused"] and "refused" in out
    assert {u["producer"] for u in info["units"]} >= {"layer1.0.conv1", "layer4.1.conv1"}
    dry = tmp_path / "dry.json"
    assert main(_prune_args(folder, "--keep", "0.5", "--dry-run", "--json", str(dry))) == 0
    plan = json.loads(dry.read_text())["dry_run"]
    res = tf.prune(tf.cli.load_model("resnet18", num_classes=3), [torch.randn(4, 3, 32, 32)], keep=0.5,
                   num_images=4, progress=False)
    assert [u["kept"] for u in plan["units"]] == [u.kept for u in res.report.units]
    assert plan["params"] == [res.report.original.params, res.report.params]
    assert "total: params" in capsys.readouterr().out


def test_round_to_keeps_widths_at_multiples(folder, tmp_path):
    js = tmp_path / "r.json"
    assert main(_prune_args(folder, "--keep", "0.3", "--round-to", "8", "--json", str(js))) == 0
    units = json.loads(js.read_text())["units"]
    print([(u["channels"], u["kept"]) for u in units])
    assert units and all(u["kept"] % 8 == 0 for u in units)
    assert all(u["pass_seconds"] > 0 for u in units)  # the run log's statistics time per unit
    assert any(round(u["channels"] * 0.3) % 8 for u in units)  # the rounding did something


def test_report_compares_against_the_original_with_latency_spread(tmp_path, capsys):
    pruned = tmp_path / "p.pt"
    model = tf.models.DemoVGG()
    tf.save(tf.prune(model, [torch.randn(8, 1, 28, 28)], keep=0.5, num_images=8, progress=False).model, pruned)
    orig = tmp_path / "o.pt"
    tf.save(model, orig)
    js = tmp_path / "rep.json"
    assert main(["report", "--model", str(pruned), "--original", str(orig), "--speed", "--speed-batch-sizes", "1,4",
                 "--input-shape", "1,28,28", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "vs original: params" in out and "median ms" in out
    body = json.loads(js.read_text())
    for which in ("model", "original"):
        for mode in ("inference", "train"):
            s = body["speed"][which][mode]["4"]
            assert 0 < s["p10_ms"] <= s["median_ms"] <= s["p90_ms"]
    assert body["original"]["params"] > body["pruned"]["params"]


def test_config_file_sets_options_and_is_written_beside_the_output(folder, tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "resnet18"\nnum-classes = 3\nimage_size = 32\ndata = "{folder}"\nper_class = 2\n'
                   'workers = 0\nkeep = 0.25\ndevice = "cpu"\nunits = "layer1.0.conv1"\n')
    out = tmp_path / "m.pt"
    assert main(["prune", "--config", str(cfg), "--output", str(out)]) == 0
    written = (tmp_path / "m.pt.config.toml").read_text()
    assert "keep = 0.25" in written and 'units = "layer1.0.conv1"' in written
    assert tf.load(out).layer1[0].conv1.out_channels == 16
    # the written file reproduces the run; the command line still wins over it
    out2 = tmp_path / "m2.pt"
    assert main(["prune", "--config", str(tmp_path / "m.pt.config.toml"), "--keep", "0.5", "--output", str(out2)]) == 0
    assert tf.load(out2).layer1[0].conv1.out_channels == 32
    cfg.write_text('model = "resnet18"\nkep = 0.3\n')
    assert main(["prune", "--config", str(cfg), "--data", str(folder)]) == 2
    assert "kep" in capsys.readouterr().err


def test_every_option_has_help_and_version_prints(capsys):
    ap = build_parser()
    subs = next(a for a in ap._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subs.choices.items():
        for a in sub._actions:
            if a.dest != "help":
                assert a.help, f"{name} {a.option_strings} has no help text"
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"thinet-fast {tf.__version__}"


def test_ctrl_c_gives_a_resume_hint_not_a_traceback(folder, tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(tf, "prune", interrupted)
    ck = tmp_path / "ck.pt"
    assert main(_prune_args(folder, "--resume", str(ck))) == 130
    err = capsys.readouterr().err
    assert "rerun the same command" in err and str(ck) in err and "Traceback" not in err


def test_the_console_script_runs_as_a_subprocess():
    r = subprocess.run([sys.executable, "-m", "thinet_fast.cli", "--version"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"thinet-fast {tf.__version__}", r.stderr


def test_finetune_with_steps_validation_checkpoints_resume_and_logs(folder, tmp_path, capsys):
    model = tmp_path / "m.pt"
    tf.save(tf.cli.load_model("resnet18", num_classes=3), model)
    ck, log, js = tmp_path / "ck", tmp_path / "ft.jsonl", tmp_path / "ft.json"
    args = ["finetune", "--model", str(model), "--image-size", "32", "--train-data", str(folder),
            "--eval-data", str(folder), "--workers", "0", "--batch-size", "4", "--device", "cpu",
            "--steps", "4", "--val-every", "2", "--checkpoint-dir", str(ck), "--log", str(log),
            "--json", str(js), "--output", str(tmp_path / "ft.pt"), "--label-smoothing", "0.1"]
    assert main(args) == 0
    out = json.loads(js.read_text())["finetune"]
    assert out["steps"] == 4 and out["val"]["step"] == 4 and 0 <= out["val"]["top1"] <= 1
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "val"] == [2, 4]
    assert (ck / "last.pt").exists() and (ck / "best.pt").exists()
    assert (tmp_path / "ft.pt.config.toml").exists()
    # a finished run resumes to nothing new: the same weights come back
    before = tf.load(tmp_path / "ft.pt").state_dict()
    assert main(args + ["--resume"]) == 0
    after = tf.load(tmp_path / "ft.pt").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert main(args[:-2] + ["--amp", "fp16"]) == 2 or torch.cuda.is_available()
    assert "--amp fp16" in capsys.readouterr().err or torch.cuda.is_available()


def test_the_api_device_is_auto_by_default_and_a_missing_gpu_is_an_error_before_work():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    model = tf.models.DemoVGG()
    x = torch.randn(4, 1, 28, 28)
    res = tf.prune(model, [x], keep=0.5, num_images=4, progress=False)
    assert next(res.model.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="device='cuda'.*no CUDA device"):
        tf.prune(model, [x], keep=0.5, num_images=4, device="cuda", progress=False)


def test_progress_has_one_weighted_bar_and_a_line_per_finished_unit(capsys):
    from thinet_fast.pipeline.overall import unit_costs
    model = tf.models.DemoVGG().eval()
    x = torch.randn(6, 1, 28, 28)
    units = tf.find_units(model, x[:1]).units
    costs = unit_costs(model, units, x[:1])
    mods = dict(model.named_modules())
    for u, c in zip(units, costs):  # brute force: 2 x MACs of the consumer at its output size
        m = mods[u.consumer]
        if isinstance(m, torch.nn.Conv2d):
            hw = {"features.4": 14 * 14, "features.7": 14 * 14, "features.11": 7 * 7, "features.14": 7 * 7}[u.consumer]
            flops = 2 * m.in_channels * m.out_channels * 9 * hw
        else:
            flops = 2 * m.in_features * m.out_features
        want = flops * (1 + u.channels * u.taps / u.consumer_out)
        print(u.consumer, c, want)
        assert c == pytest.approx(want, rel=0.02)
    tf.prune(model, [x], keep=0.5, num_images=6, progress=True)
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.startswith("[")]
    assert any(line.startswith(f"[1/{len(units)}] features.0 -> features.4: kept 4/8, error ") for line in lines), lines
    assert sum(" -> " in line for line in lines) == len(units)


def test_report_plot_writes_the_prune_plots_from_the_saved_model(folder, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "p.pt"
    assert main(_prune_args(folder, "--keep", "0.5", "--output", str(out), "--plot", str(tmp_path / "a"))) == 0
    assert main(["report", "--model", str(out), "--image-size", "32", "--plot", str(tmp_path / "b")]) == 0
    for d in ("a", "b"):
        names = sorted(p.name for p in (tmp_path / d).glob("*.png"))
        assert names == ["allocation.png", "greedy-curves.png", "kept-channels.png"], names
        for p in (tmp_path / d).glob("*.png"):
            blob = p.read_bytes()
            assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 10_000, (p, len(blob))
    from PIL import Image
    with Image.open(tmp_path / "b" / "greedy-curves.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200
    # a model without a prune report says what --plot needs, before any measuring
    plain = tmp_path / "plain.pt"
    tf.save(tf.models.DemoVGG(), plain)
    assert main(["report", "--model", str(plain), "--plot", str(tmp_path / "c")]) == 2
    assert "--prune-json" in capsys.readouterr().err


def test_params_and_flops_budgets_through_the_cli(folder, tmp_path, capsys):
    js = tmp_path / "b.json"
    assert main(_prune_args(folder, "--params-target", "0.5", "--flops-target", "0.6", "--json", str(js))) == 0
    body = json.loads(js.read_text())
    p0, p1 = body["original"]["params"], body["pruned"]["params"]
    f0, f1 = body["original"]["flops"], body["pruned"]["flops"]
    print(p1 / p0, f1 / f0)
    assert p1 <= 0.5 * p0 and f1 <= 0.6 * f0
    assert main(_prune_args(folder, "--params-target", "lots")) == 2
    assert "--params-target" in capsys.readouterr().err
    assert main(_prune_args(folder, "--params-target", "0.5", "--keep", "0.5")) == 2
    err = capsys.readouterr().err
    assert "--keep" in err and "--params-target" in err, err


def test_bench_command_prints_a_checked_table_and_json(tmp_path, capsys):
    js = tmp_path / "bench.json"
    assert main(["bench", "--sizes", "16x1x200,16x4x200", "--backends", "torch", "--repeats", "2",
                 "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "checked against its _ref" in out and "median ms" in out
    rows = json.loads(js.read_text())["rows"]
    assert {r["op"] for r in rows} >= {"greedy", "forward_ls", "gram"} and all(r["status"] == "ok" for r in rows)
    assert all(r["median_ms"] > 0 for r in rows)
    assert main(["bench", "--sizes", "16by4"]) == 2
    assert "--sizes" in capsys.readouterr().err


def test_a_per_unit_finetune_with_the_oneshot_schedule_is_refused_before_work(tmp_path, capsys):
    assert main(["prune", "--model", "no-such-net", "--data", str(tmp_path), "--train-data", str(tmp_path),
                 "--finetune-steps", "3", "--schedule", "oneshot"]) == 2
    err = capsys.readouterr().err
    assert "--schedule sequential" in err and "no-such-net" not in err

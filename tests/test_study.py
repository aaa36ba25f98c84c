"""The method study: a tiny run end to end through the CLI (tables, plots, resume), and
its arithmetic against brute force."""
import json
import math
import statistics as pystats

import pytest
import torch

import thinet_fast as tf
from conftest import needs_fmnist
from thinet_fast import study
from thinet_fast.cli import main
from thinet_fast.models import DemoVGG
from thinet_fast.study.summary import aggregate, losses, markdown, mean_sd

PNG = b"\x89PNG\r\n\x1a\n"


@needs_fmnist
def test_study_end_to_end_writes_tables_plots_and_resumes(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("THINET_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- study:start -->\nold\n<!-- study:end -->\ntail\n")
    assert main(["study", "--quick", "--out", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.endswith("<!-- study:end -->\ntail\n") and "| `thinet_exact` |" in text
    assert "](results/vgg-sequential-top1.png)" in text and "](results/study.md)" in text
    result = json.loads((out / "study.json").read_text())
    runs = result["runs"]
    assert {r["row"] for r in runs} == {"random", "thinet", "thinet_exact"}
    for r in runs:
        for stage in ("top1", "top1_ft", "top1_kd"):
            assert 0.0 <= r[stage] <= 1.0, (r["row"], stage, r[stage])
        assert r["params"] < result["originals"]["vgg"]["params"]
        assert all(abs(u["kept"] - u["channels"] / 2) <= 1 for u in r["units"]), r["units"]
    thinet = next(r for r in runs if r["row"] == "thinet")
    assert all(len(u["error_curve"]) == u["channels"] - 1 for u in thinet["units"])
    md = (out / "study.md").read_text()
    for row in ("random", "thinet", "thinet_exact"):
        assert f"| {row} |" in md
    assert "## Targets" in md and "## Where a ThiNet variant loses" in md
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} == {"vgg-sequential-top1.png", "vgg-unit-errors.png", "vgg-greedy-curves.png"}
    for p in pngs:
        blob = p.read_bytes()
        assert blob[:8] == PNG and len(blob) > 10_000, (p.name, len(blob))
        assert f"]({p.name})" in md
    capsys.readouterr()
    # a second call finds every run done; other settings start afresh
    assert main(["study", "--quick", "--out", str(out), "--no-plots"]) == 0
    assert "0 to go" in capsys.readouterr().out
    assert json.loads((out / "study.json").read_text())["runs"] == runs
    assert main(["study", "--quick", "--out", str(out), "--no-plots", "--finetune-steps", "2",
                 "--rows", "random"]) == 0
    text = capsys.readouterr().out
    assert "other settings" in text and "1 to go" in text


def test_study_settings_reject_bad_input_naming_the_argument(tmp_path):
    with pytest.raises(ValueError, match="models"):
        study.StudySettings(models=("alexnet",))
    with pytest.raises(ValueError, match="rows"):
        study.StudySettings(rows=("magic",))
    with pytest.raises(ValueError, match="keeps"):
        study.StudySettings(keeps=(1.5,))
    assert main(["study", "--quick", "--rows", "nope", "--out", str(tmp_path)]) == 2


def test_ablation_grid_covers_every_meaningful_point_and_each_is_a_valid_config():
    grid = study.ablation_variants()
    names = [n for n, _ in grid]
    assert len(set(names)) == len(names)
    brute = 0
    for stats in ("sampled", "full"):
        for recon in ("none", "scale", "full"):
            for bias in (False, True):
                for bn in (False, True):
                    for target in ("current", "unpruned"):
                        brute += recon != "none" or (not bias and target == "current")
    assert len(grid) == brute
    for _, opts in grid:
        tf.PruneConfig(keep=0.5, **opts)  # raises on an invalid combination


def test_mean_sd_matches_the_statistics_module():
    g = torch.Generator().manual_seed(1)
    v = torch.rand(5, generator=g).tolist()
    m, sd, n = mean_sd(v + [None])
    print("mean/sd error", abs(m - pystats.mean(v)), abs(sd - pystats.stdev(v)))
    assert n == 5 and math.isclose(m, pystats.mean(v)) and math.isclose(sd, pystats.stdev(v))
    assert mean_sd([0.3]) == (0.3, 0.0, 1) and mean_sd([None])[2] == 0


def _run(model, row, seed, top1, keep=0.5, schedule="sequential"):
    return {"model": model, "row": row, "keep": keep, "schedule": schedule, "seed": seed, "top1": top1,
            "top1_ft": None, "top1_kd": None, "decide_seconds": 0.1, "params": 10, "units": []}


def test_summary_says_where_a_thinet_row_loses_to_a_baseline():
    runs = [_run("vgg", "weight_sum", s, 0.6 + 0.01 * s) for s in range(3)]
    runs += [_run("vgg", "thinet", s, 0.5 + 0.01 * s) for s in range(3)]
    runs += [_run("vgg", "thinet_exact", s, 0.9) for s in range(3)]
    result = {"context": study.StudySettings().context(), "originals": {"vgg": {"top1": 0.91, "params": 20}},
              "runs": runs}
    agg = aggregate(result)
    assert agg[("vgg", "thinet", "sequential", 0.5)]["top1"][0] == pytest.approx(0.51)
    lost = losses(agg)
    assert len(lost) == 1 and "`thinet` 51.00% < `weight_sum` 61.00%" in lost[0]
    md = markdown(result)
    assert "51.00 ± 1.00" in md and "best `thinet_exact` 90.00%" in md and "met" in md


def test_demo_vgg_without_batchnorm_prunes_and_its_units_have_no_norm():
    torch.manual_seed(0)
    model = DemoVGG(batch_norm=False).eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.randn(64, 1, 28, 28)
    res = tf.prune(model, [x], keep=0.5, num_images=64, statistics="full", reconstruction="full",
                   through_norm=True, progress=False)
    out = res.model(x)
    assert out.shape == (64, 10) and torch.isfinite(out).all()
    assert res.report.params < sum(p.numel() for p in model.parameters())


def test_torch_pruning_rows_cut_the_same_units_to_the_same_widths():
    pytest.importorskip("torch_pruning")
    from thinet_fast.study.tp_rows import run_tp_row
    torch.manual_seed(0)
    model = DemoVGG().eval()
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(16, 1, 28, 28)
    calib = [(x, torch.randint(0, 10, (16,)))]
    ours = tf.prune(model, [x], keep=0.5, num_images=16, progress=False).model
    for row in ("tp_magnitude", "tp_taylor"):
        theirs = run_tp_row(row, model, 0.5, calib, x[:1])
        widths = lambda m: [c.out_channels for c in m.modules() if isinstance(c, torch.nn.Conv2d)]  # noqa: E731
        print(row, widths(theirs), widths(ours))
        assert widths(theirs) == widths(ours)
        assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())
        assert torch.isfinite(theirs(x)).all()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the caller's model is untouched

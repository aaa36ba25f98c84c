"""The study's figures: means and spreads over seeds, the markdown tables, the targets
check and the plain statements of where a ThiNet variant loses to a baseline."""
from __future__ import annotations

import math
from collections import defaultdict

from .run import BASELINES, ROWS, STAGES

STAGE_NAMES = {"top1": "pruned", "top1_ft": "fine-tuned", "top1_kd": "fine-tuned + KD"}
MODEL_NAMES = {"vgg": "demo VGG (BatchNorm)", "vgg_nobn": "demo VGG without BatchNorm",
               "resnet": "demo bottleneck ResNet"}


def mean_sd(values) -> tuple[float, float, int]:
    v = [x for x in values if x is not None]
    if not v:
        return math.nan, math.nan, 0
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, sd, len(v)


def aggregate(result: dict) -> dict:
    """(model, row, schedule, keep) -> {stage: (mean, sd, n), "decide_seconds": ..., "params": ...}."""
    groups = defaultdict(list)
    for r in result["runs"]:
        groups[(r["model"], r["row"], r["schedule"], r["keep"])].append(r)
    out = {}
    for key, runs in groups.items():
        agg = {stage: mean_sd(r.get(stage) for r in runs) for stage in STAGES}
        agg["decide_seconds"] = mean_sd(r["decide_seconds"] for r in runs)
        agg["params"] = runs[0]["params"]
        out[key] = agg
    return out


def _pct(ms) -> str:
    m, sd, n = ms
    if n == 0:
        return "–"
    return f"{100 * m:.2f}" + (f" ± {100 * sd:.2f}" if n > 1 else "")


def keeps_of(agg: dict, model: str, schedule: str) -> list[float]:
    return sorted({k[3] for k in agg if k[0] == model and k[2] == schedule and not k[1].startswith("grid:")},
                  reverse=True)


def rows_of(agg: dict, model: str, schedule: str) -> list[str]:
    present = {k[1] for k in agg if k[0] == model and k[2] == schedule}
    return [r for r in ROWS if r in present]


def method_table(agg: dict, model: str, schedule: str) -> str:
    keeps = keeps_of(agg, model, schedule)
    head = ["method"] + [f"keep {k:g} {STAGE_NAMES[s]}" for k in keeps for s in STAGES] + ["selection s (keep 0.5)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows_of(agg, model, schedule):
        cells = [row]
        for k in keeps:
            a = agg.get((model, row, schedule, k))
            cells += [_pct(a[s]) if a else "–" for s in STAGES]
        a = agg.get((model, row, schedule, 0.5))
        cells.append(f"{a['decide_seconds'][0]:.2f}" if a else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(agg: dict, model: str) -> str:
    grid = [(k, a) for k, a in agg.items() if k[0] == model and k[1].startswith("grid:")]
    if not grid:
        return ""
    grid.sort(key=lambda ka: -ka[1]["top1"][0])
    lines = ["| rank | statistics+reconstruction(+bias)(+bn)(+unpruned) | top-1 pruned (%) | selection s |",
             "|---|---|---|---|"]
    for i, (k, a) in enumerate(grid, 1):
        lines.append(f"| {i} | {k[1][5:]} | {_pct(a['top1'])} | {a['decide_seconds'][0]:.2f} |")
    return "\n".join(lines)


def best_mode(agg: dict, model: str, stage: str = "top1", keep: float = 0.5) -> tuple[str, tuple] | None:
    """The sequential mode (a row or a grid point) with the highest mean at ``keep``."""
    cands = [(k[1], a[stage]) for k, a in agg.items()
             if k[0] == model and k[2] == "sequential" and k[3] == keep and a[stage][2]]
    return max(cands, key=lambda c: c[1][0]) if cands else None


def losses(agg: dict) -> list[str]:
    """Every (model, schedule, keep, stage) where a ThiNet row's mean falls below the best
    baseline's, said plainly."""
    out = []
    for (model, row, schedule, keep), a in sorted(agg.items()):
        if row not in ROWS or row in BASELINES:
            continue
        for stage in STAGES:
            base = [(b, agg[(model, b, schedule, keep)][stage]) for b in BASELINES
                    if (model, b, schedule, keep) in agg and agg[(model, b, schedule, keep)][stage][2]]
            if not base or not a[stage][2]:
                continue
            b, bms = max(base, key=lambda x: x[1][0])
            if a[stage][0] < bms[0]:
                out.append(f"{MODEL_NAMES.get(model, model)}, {schedule}, keep {keep:g}, {STAGE_NAMES[stage]}: "
                           f"`{row}` {100 * a[stage][0]:.2f}% < `{b}` {100 * bms[0]:.2f}%")
    return out


def targets(result: dict, agg: dict) -> list[str]:
    """Issue 11's targets at keep 0.5, sequential: the best mode before fine-tuning, and
    the best with distillation, against the original."""
    goal = {"vgg": ("within 1 point", lambda acc, orig: acc >= orig - 0.01),
            "resnet": ("at least 85%", lambda acc, orig: acc >= 0.85)}
    out = []
    for model, orig in result["originals"].items():
        for stage, want in (("top1", goal.get(model)), ("top1_kd", ("within 1 point", lambda a, o: a >= o - 0.01))):
            best = best_mode(agg, model, stage)
            if best is None or want is None:
                continue
            row, (m, sd, n) = best
            ok = want[1](m, orig["top1"])
            out.append(f"{MODEL_NAMES.get(model, model)}, {STAGE_NAMES[stage]}: best `{row}` {100 * m:.2f}% "
                       f"(original {100 * orig['top1']:.2f}%; target {want[0]}): {'met' if ok else 'NOT met'}")
    return out


def markdown(result: dict, plots: dict | None = None) -> str:
    """The whole study as markdown; ``plots`` maps a model to its PNG paths (relative)."""
    agg = aggregate(result)
    ctx = result["context"]
    parts = ["# The method study (Fashion-MNIST)", "",
             f"Calibration: {ctx['calib_per_class']} images per class ({10 * ctx['calib_per_class']}), "
             f"{ctx['samples_per_image']} sampled locations per image where statistics are sampled; fine-tune: "
             f"{ctx['finetune_steps']} steps at lr {ctx['finetune_lr']} (batch {ctx['batch_size']}), with and "
             "without distillation from the unpruned model; accuracy on the Fashion-MNIST test set "
             f"({'all 10k images' if ctx['eval_limit'] is None else str(ctx['eval_limit']) + ' images'}); "
             "mean ± sample standard deviation over seeds (calibration draw, sampled locations, random "
             "selection and fine-tune order).", "",
             "| model | original top-1 (%) | parameters |", "|---|---|---|"]
    for model, o in result["originals"].items():
        parts.append(f"| {MODEL_NAMES.get(model, model)} | {100 * o['top1']:.2f} | {o['params']:,} |")
    parts += ["", "## Targets (sequential, keep 0.5)", ""] + [f"- {t}" for t in targets(result, agg)]
    for model in result["originals"]:
        parts += ["", f"## {MODEL_NAMES.get(model, model)}"]
        for schedule in ("sequential", "oneshot"):
            if rows_of(agg, model, schedule) and keeps_of(agg, model, schedule):
                parts += ["", f"### {schedule}: top-1 (%)", "", method_table(agg, model, schedule)]
        table = ablation_table(agg, model)
        if table:
            keep = next(k[3] for k in agg if k[0] == model and k[1].startswith("grid:"))
            parts += ["", f"### Ablation of the exact variants (ThiNet greedy, sequential, keep {keep:g}, "
                      "no fine-tune)", "", table]
        for p in (plots or {}).get(model, []):
            parts += ["", f"![{p}]({p})"]
    lost = losses(agg)
    parts += ["", "## Where a ThiNet variant loses to a baseline", ""]
    parts += [f"- {x}" for x in lost] or ["- nowhere in this run"]
    return "\n".join(parts) + "\n"


def readme_section(result: dict, plots: dict | None = None, prefix: str = "bench/results/") -> str:
    """The compact version for the README: per model, top-1 before fine-tuning at every
    keep and after the KD fine-tune at keep 0.5 (sequential), the targets, and the
    plots; the full tables are in study.md."""
    agg = aggregate(result)
    ctx = result["context"]
    parts = [f"Fashion-MNIST test set, sequential schedule, mean ± sd over seeds; {10 * ctx['calib_per_class']} "
             f"calibration images; fine-tune: {ctx['finetune_steps']} steps with distillation. "
             f"Full tables, one-shot and the ablation grid: [{prefix}study.md]({prefix}study.md).", ""]
    for model, orig in result["originals"].items():
        keeps = keeps_of(agg, model, "sequential")
        if not keeps:
            continue
        head = ["method"] + [f"keep {k:g}" for k in keeps] + ["keep 0.5 + KD fine-tune"]
        parts += [f"**{MODEL_NAMES.get(model, model)}** (original {100 * orig['top1']:.2f}%), top-1 (%) "
                  "before fine-tuning:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in rows_of(agg, model, "sequential"):
            cells = [f"`{row}`"] + [_pct(agg[(model, row, "sequential", k)]["top1"])
                                     if (model, row, "sequential", k) in agg else "–" for k in keeps]
            a = agg.get((model, row, "sequential", 0.5))
            cells.append(_pct(a["top1_kd"]) if a else "–")
            parts.append("| " + " | ".join(cells) + " |")
        parts.append("")
    parts += ["Targets (issue 11):", ""] + [f"- {t}" for t in targets(result, agg)] + [""]
    for model, files in (plots or {}).items():
        shown = [f for f in files if f.endswith("sequential-top1.png")]
        parts += [f"![{f}]({prefix}{f})" for f in shown]
    return "\n".join(parts).rstrip() + "\n"


def replace_between(text: str, body: str, start: str = "<!-- study:start -->", end: str = "<!-- study:end -->") -> str:
    """``text`` with everything between the markers replaced by ``body``."""
    if start not in text or end not in text:
        raise ValueError(f"the markers {start} and {end} are not both in the file")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}{end}{tail}"

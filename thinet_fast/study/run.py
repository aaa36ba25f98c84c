"""The method study: every selection method and the exact variants, pruned, fine-tuned
and distilled on Fashion-MNIST, over keep fractions, schedules and seeds.

One run is one (model, row, keep, schedule, seed). Runs are appended to
``<out>/study.json`` as they finish, so an interrupted study resumes where it stopped
(runs made under other settings are dropped, never mixed in).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import data as tfdata
from ..demo import DEMO_MODELS, DemoSettings, trained
from ..pipeline import PruneConfig, dry_run, prune
from ..training import evaluate, finetune

# name -> prune options. Rows compare selection at equal kept channels per unit; the
# baselines run as the literature ran them (no reconstruction), LASSO as He et al.
# (least squares on every location), the ThiNet rows as the papers.
ROWS = {
    "random": {"method": "random", "reconstruction": "none"},
    "weight_sum": {"method": "weight_sum", "reconstruction": "none"},
    "apoz": {"method": "apoz", "reconstruction": "none"},
    "lasso": {"method": "lasso", "statistics": "full", "reconstruction": "full"},
    "thinet_noscale": {"method": "thinet", "reconstruction": "none"},
    "thinet": {"method": "thinet", "reconstruction": "scale"},  # the ICCV paper
    "thinet_ls": {"method": "thinet_ls", "reconstruction": "scale"},  # the journal's forward LS
    "thinet_exact": {"method": "thinet", "statistics": "full", "reconstruction": "full",
                     "bias_compensation": True, "bn_recalibration": True, "target": "unpruned",
                     "through_norm": True},
    # the same, with per-unit keep allocated from the greedy error curves at the FLOPs
    # that uniform keep gives (flops_target = that fraction)
    "thinet_exact_alloc": {"method": "thinet", "statistics": "full", "reconstruction": "full",
                           "bias_compensation": True, "bn_recalibration": True, "target": "unpruned",
                           "through_norm": True, "allocate": True},
}
# Torch-Pruning's importances on the same units (thinet_fast.study.tp_rows), when installed
ROWS.update({"tp_magnitude": {"torch_pruning": "magnitude"}, "tp_taylor": {"torch_pruning": "taylor"}})
BASELINES = ("random", "weight_sum", "apoz", "lasso", "tp_magnitude", "tp_taylor")
# the ablation grid of the exact variants (ThiNet greedy selection, sequential)
ABLATION_AXES = {
    "statistics": ("sampled", "full"),
    "reconstruction": ("none", "scale", "full"),
    "bias_compensation": (False, True),
    "bn_recalibration": (False, True),
    "target": ("current", "unpruned"),
}
STAGES = ("top1", "top1_ft", "top1_kd")  # right after pruning, fine-tuned, fine-tuned with distillation


@dataclass
class StudySettings:
    """What the study runs. The defaults are the published study (about 40 minutes on
    two idle CPU cores): every keep, schedule and the grid on the first seed, the
    targets' keep on every seed; :meth:`quick` is a smoke run of seconds."""
    models: tuple[str, ...] = ("vgg", "vgg_nobn", "resnet")
    rows: tuple[str, ...] = tuple(ROWS)
    keeps: tuple[float, ...] = (0.7, 0.5, 0.3)
    schedules: tuple[str, ...] = ("sequential", "oneshot")
    seeds: tuple[int, ...] = (0, 1, 2)
    finetune_schedules: tuple[str, ...] = ("sequential",)  # one-shot rows: accuracy right after pruning
    oneshot_seeds: tuple[int, ...] = (0,)  # the one-shot comparison is cheap to read from one seed
    spread_keeps: tuple[float, ...] = (0.5,)  # seeds after the first run at these keeps (the targets') only
    ablation: bool = True            # the grid, at ablation_keep, sequential, no fine-tune
    ablation_keep: float = 0.5
    ablation_seeds: tuple[int, ...] = (0,)
    finetune_steps: int = 100
    finetune_lr: float = 0.01
    calib_per_class: int = 200       # 2000 calibration images (the exact path gains 1.8 points on the VGG over 500)
    samples_per_image: int = 10      # the paper's sampled statistics
    train_epochs: float = 2.0        # of the cached models (trained once, seed 0)
    train_limit: int | None = None
    eval_limit: int | None = None    # test images (None: all 10k)
    batch_size: int = 128
    cache: bool = True
    out: str = "bench/results"

    def __post_init__(self):
        unknown = sorted(set(self.models) - set(DEMO_MODELS))
        if unknown:
            raise ValueError(f"models: unknown {unknown}; known {sorted(DEMO_MODELS)}")
        unknown = sorted(set(self.rows) - set(ROWS))
        if unknown:
            raise ValueError(f"rows: unknown {unknown}; known {list(ROWS)}")
        for k in (*self.keeps, self.ablation_keep):
            if not 0 < k <= 1:
                raise ValueError(f"keeps: {k} must lie in (0, 1]")
        for s in self.schedules:
            if s not in ("sequential", "oneshot"):
                raise ValueError(f"schedules: {s!r} is not 'sequential' or 'oneshot'")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")

    @classmethod
    def quick(cls, **changes) -> "StudySettings":
        base = dict(models=("vgg",), rows=("random", "thinet", "thinet_exact"), keeps=(0.5,),
                    schedules=("sequential",), seeds=(0,), ablation=False, finetune_steps=5,
                    calib_per_class=5, train_epochs=1.0, train_limit=5000, eval_limit=500)
        return cls(**{**base, **changes})

    def context(self) -> dict:
        """The settings a run's figures depend on, beyond its own key."""
        skip = {"models", "rows", "keeps", "schedules", "seeds", "finetune_schedules", "oneshot_seeds", "spread_keeps", "ablation",
                "ablation_keep", "ablation_seeds", "cache", "out"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def ablation_variants() -> list[tuple[str, dict]]:
    """(name, options) for every point of the grid that changes something: bias
    compensation and the target matter only with a reconstruction."""
    out = []
    for values in itertools.product(*ABLATION_AXES.values()):
        opts = dict(zip(ABLATION_AXES, values), method="thinet")
        if opts["reconstruction"] == "none" and (opts["bias_compensation"] or opts["target"] == "unpruned"):
            continue
        name = "+".join([opts["statistics"], opts["reconstruction"]] +
                        (["bias"] if opts["bias_compensation"] else []) +
                        (["bn"] if opts["bn_recalibration"] else []) +
                        (["unpruned"] if opts["target"] == "unpruned" else []))
        out.append((f"grid:{name}", opts))
    return out


def planned(s: StudySettings) -> list[dict]:
    """Every run of the study, seed by seed (a cut-short study still covers every model),
    as (model, row, keep, schedule, seed, options, finetune)."""
    runs = []
    for seed in s.seeds:
        for model in s.models:
            for schedule in s.schedules:
                if schedule == "oneshot" and seed not in s.oneshot_seeds:
                    continue
                for keep in s.keeps:
                    if seed != s.seeds[0] and keep not in s.spread_keeps:
                        continue
                    for row in s.rows:
                        if "torch_pruning" in ROWS[row] and (schedule != "sequential" or not _have_tp()):
                            continue  # Torch-Pruning cuts every unit at once: one schedule
                        runs.append(dict(model=model, row=row, keep=keep, schedule=schedule, seed=seed,
                                         options=ROWS[row], finetune=schedule in s.finetune_schedules))
            if s.ablation and seed in s.ablation_seeds:
                for name, opts in ablation_variants():
                    runs.append(dict(model=model, row=name, keep=s.ablation_keep, schedule="sequential",
                                     seed=seed, options=opts, finetune=False))
    return runs


def _have_tp() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False
    return True


def run_key(r: dict) -> str:
    return f"{r['model']}|{r['row']}|{r['keep']}|{r['schedule']}|{r['seed']}"


class _Data:
    """The study's data, loaded once: train/test sets and a calibration set per seed."""

    def __init__(self, s: StudySettings):
        self.s = s
        self.train = tfdata.fashion_mnist(train=True, limit=s.train_limit)
        self.test = tfdata.loader(tfdata.fashion_mnist(train=False, limit=s.eval_limit), 500)
        self._calib = {}

    def train_loader(self, seed: int):
        return tfdata.loader(self.train, self.s.batch_size, shuffle=True, seed=seed)

    def calib(self, seed: int):
        if seed not in self._calib:
            self._calib[seed] = tfdata.loader(tfdata.per_class_subset(self.train, self.s.calib_per_class, seed=seed),
                                              100)
        return self._calib[seed]


def _load(path: Path, s: StudySettings, log) -> dict:
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log(f"study: ignoring unreadable {path} ({exc})")
        return {}
    if old.get("context") != json.loads(json.dumps(s.context())):
        log(f"study: {path} was made with other settings; starting afresh")
        return {}
    return {run_key(r): r for r in old.get("runs", [])}


def _compact(r: dict) -> dict:
    """The plots read greedy curves at keep 0.5, sequential only; elsewhere they would
    make study.json megabytes of numbers nobody reads."""
    keep_curves = r["keep"] == 0.5 and r["schedule"] == "sequential"
    units = [{**u, "error_curve": [float(f"{e:.4g}") for e in u["error_curve"]] if keep_curves else []}
             for u in r["units"]]
    return {**r, "units": units}


def _write(path: Path, s: StudySettings, originals: dict, runs: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    body = {"context": s.context(), "originals": originals, "runs": [_compact(r) for r in runs.values()]}
    tmp.write_text(json.dumps(body, separators=(",", ":")))
    os.replace(tmp, path)


def run_study(s: StudySettings | None = None, *, resume: bool = True, log=print) -> dict:
    """Run (or finish) the study; returns {"context", "originals", "runs"} as written to
    ``<out>/study.json``."""
    s = s or StudySettings()
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "study.json"
    done = _load(path, s, log) if resume else {}
    d = _Data(s)
    demo = DemoSettings(train_epochs=s.train_epochs, train_limit=s.train_limit, cache=s.cache,
                        batch_size=s.batch_size)
    originals, bases = {}, {}
    for name in s.models:
        bases[name] = trained(name, demo, d.train_loader(0), log)
        acc = evaluate(bases[name], d.test)
        originals[name] = {"top1": acc[1], "top5": acc[5],
                           "params": sum(p.numel() for p in bases[name].parameters())}
        log(f"[{name}] original top-1 {100 * acc[1]:.2f}%")
    plan = planned(s)
    todo = [r for r in plan if run_key(r) not in done]
    log(f"study: {len(plan)} runs, {len(plan) - len(todo)} done already, {len(todo)} to go")
    t_start = time.time()
    for i, r in enumerate(todo):
        done[run_key(r)] = one_run(r, bases[r["model"]], d, s)
        _write(path, s, originals, done)
        eta = (time.time() - t_start) / (i + 1) * (len(todo) - i - 1)
        res = done[run_key(r)]
        log(f"[{i + 1}/{len(todo)}] {run_key(r)}: top-1 {100 * res['top1']:.2f}%"
            + (f" / ft {100 * res['top1_ft']:.2f}% / kd {100 * res['top1_kd']:.2f}%" if res["top1_ft"] is not None else "")
            + f"  ({res['prune_seconds']:.1f}s; ETA {eta / 60:.0f} min)")
    _write(path, s, originals, done)
    keys = {run_key(r) for r in plan}
    return {"context": s.context(), "originals": originals, "runs": [done[k] for k in done if k in keys]}


def one_run(r: dict, base: torch.nn.Module, d: _Data, s: StudySettings) -> dict:
    """Prune ``base`` as the run says; accuracy right after, and after the fine-tunes."""
    if "torch_pruning" in r["options"]:
        return _tp_run(r, base, d, s)
    opts = {"statistics": "sampled", **r["options"]}
    budget = {"keep": r["keep"]}
    if opts.pop("allocate", False):  # equal FLOPs to uniform keep, allocated per unit
        example = d.test.dataset.tensors[0][:1]
        plan = dry_run(base, example, keep=r["keep"], device="cpu")
        budget = {"flops_target": plan.flops[1] / plan.flops[0], "min_keep": 0.1}
    cfg = PruneConfig(schedule=r["schedule"], seed=r["seed"], num_images=10 * s.calib_per_class,
                      samples_per_image=s.samples_per_image, progress=False, **budget, **opts)
    t0 = time.perf_counter()
    res = prune(base, d.calib(r["seed"]), cfg)
    seconds = time.perf_counter() - t0
    out = {k: r[k] for k in ("model", "row", "keep", "schedule", "seed", "options")}
    out.update(top1=evaluate(res.model, d.test)[1], params=res.report.params, flops=res.report.flops,
               prune_seconds=seconds, decide_seconds=sum(u.seconds for u in res.report.units),
               units=[{"producer": u.producer, "channels": u.channels, "kept": u.kept,
                       "error_selected": u.error_selected, "error_reconstructed": u.error_reconstructed,
                       "error_curve": list(u.error_curve)} for u in res.report.units],
               top1_ft=None, top1_kd=None)
    _finetunes(out, res.model, r, base, d, s)
    return out


def _tp_run(r: dict, base, d: _Data, s: StudySettings) -> dict:
    from ..counting import count_flops, count_params
    from .tp_rows import run_tp_row
    example = d.test.dataset.tensors[0][:1]
    t0 = time.perf_counter()
    model = run_tp_row(r["row"], base, r["keep"], d.calib(r["seed"]), example)
    seconds = time.perf_counter() - t0
    out = {k: r[k] for k in ("model", "row", "keep", "schedule", "seed", "options")}
    out.update(top1=evaluate(model, d.test)[1], params=count_params(model), flops=count_flops(model, example),
               prune_seconds=seconds, decide_seconds=seconds, units=[], top1_ft=None, top1_kd=None)
    _finetunes(out, model, r, base, d, s)
    return out


def _finetunes(out: dict, pruned, r: dict, base, d: _Data, s: StudySettings) -> None:
    if r["finetune"] and s.finetune_steps:
        for key, teacher in (("top1_ft", None), ("top1_kd", base)):
            torch.manual_seed(r["seed"])
            student = copy.deepcopy(pruned)
            finetune(student, d.train_loader(r["seed"]), steps=s.finetune_steps, lr=s.finetune_lr,
                     teacher=teacher, progress=False)
            out[key] = evaluate(student, d.test)[1]

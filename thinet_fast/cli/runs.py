"""The subcommands that run their own workloads: bench, demo, study, backends."""
from __future__ import annotations

from pathlib import Path

import torch

import thinet_fast as tf
from thinet_fast.files import check_writable

from .loading import CLIError


# ---------------------------------------------------------------- bench
def cmd_bench(args):
    from thinet_fast import benchmark as B
    if args.json:
        check_writable(args.json, "--json")
    try:
        sizes = B.parse_sizes(args.sizes) if args.sizes else B.DEFAULT_SIZES
    except ValueError as exc:
        raise CLIError(f"--sizes: {exc}") from None
    backends = _tuple(args.backends)
    available = {n for n, info in tf.backends().items() if info.available}
    unknown = sorted(set(backends or ()) - set(tf.backends()))
    if unknown:
        raise CLIError(f"--backends: unknown {unknown}; known {sorted(tf.backends())}")
    print(f"thinet-fast bench: backends {', '.join(sorted(backends or available))}; each kernel is checked "
          "against its _ref before it is timed", flush=True)
    rows = B.run_bench(sizes, backends=backends, ops=_tuple(args.ops) or B.DEFAULT_OPS, repeats=args.repeats,
                       dtype={"float32": torch.float32, "float64": torch.float64}[args.dtype], seed=args.seed,
                       log=None)
    print(B.format_table(rows))
    if args.json:
        B.write_json(rows, args.json)
        print(f"wrote {args.json}")
    if any(r.status == "wrong" for r in rows):
        raise CLIError("a kernel disagreed with its reference (status 'wrong' above); it was not timed")


# ---------------------------------------------------------------- demo, study, backends
def cmd_backends(args):
    for name, info in tf.backends().items():
        print(f"{name:>7}: {'yes' if info.available else 'no '}  {info.reason}")


def cmd_demo(args):
    s = tf.demo.DemoSettings(keep=args.keep, seed=args.seed, schedule=args.schedule, statistics=args.statistics,
                             reconstruction=args.reconstruction, cache=not args.no_cache)
    if args.methods:
        s.methods = tuple(args.methods.split(","))
    if args.models:
        s.models = tuple(args.models.split(","))
    if args.quick:
        s.train_epochs, s.train_limit, s.calib_per_class, s.finetune_steps, s.eval_limit = 1.0, 10000, 20, 30, 2000
    if args.json:
        check_writable(args.json, "--json")
    rows = tf.demo.run_demo(s)
    if args.json:
        tf.demo.dump(rows, args.json)


def _tuple(text: str | None, kind=str):
    return None if text is None else tuple(kind(x) for x in text.split(",") if x)


def cmd_study(args):
    from thinet_fast import study
    chosen = {k: v for k, v in dict(models=_tuple(args.models), rows=_tuple(args.rows), keeps=_tuple(args.keeps, float),
                                    schedules=_tuple(args.schedules), seeds=_tuple(args.seeds, int),
                                    finetune_steps=args.finetune_steps, out=args.out).items() if v is not None}
    if args.no_ablation:
        chosen["ablation"] = False
    if args.no_cache:
        chosen["cache"] = False
    s = study.StudySettings.quick(**chosen) if args.quick else study.StudySettings(**chosen)
    try:
        Path(s.out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"--out {s.out!r}: cannot create the folder ({exc})") from None
    check_writable(str(Path(s.out) / "study.json"), "--out")
    if args.readme:
        check_writable(args.readme, "--readme")
        if "<!-- study:start -->" not in Path(args.readme).read_text():
            raise CLIError(f"--readme {args.readme}: put <!-- study:start --> and <!-- study:end --> where the "
                           "table goes")
    study.write_study(s, resume=not args.fresh, plots=not args.no_plots, readme=args.readme)

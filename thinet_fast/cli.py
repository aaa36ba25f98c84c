"""``thinet-fast``: prune, report, fine-tune, demo. Calls only the public API."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import thinet_fast as tf
from thinet_fast.files import check_writable


# ---------------------------------------------------------------- loading
def load_model(spec: str, weights: str | None = None, num_classes: int | None = None) -> torch.nn.Module:
    """A saved thinet_fast model (path), a thinet_fast model name (resnet50_original,
    demo-vgg, demo-resnet) or a torchvision model name, plus optional state-dict weights."""
    path = Path(spec)
    if path.exists():
        model = tf.load(path)
    else:
        kw = {} if num_classes is None else {"num_classes": num_classes}
        if spec in tf.models.MODEL_BUILDERS:
            model = tf.models.MODEL_BUILDERS[spec](**kw)
        else:
            import torchvision
            try:
                model = torchvision.models.get_model(spec, weights=None, **kw)
            except ValueError:
                raise SystemExit(f"error: --model {spec!r} is neither a file, a thinet_fast model "
                                 f"({', '.join(tf.models.MODEL_BUILDERS)}) nor a torchvision model name")
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SystemExit(f"error: --weights {weights} does not fit {spec}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    return model


def load_data(spec: str, train: bool, batch_size: int, per_class: int | None = None, image_size: int = 224,
              workers: int = 4, seed: int = 0):
    if spec == "fashion-mnist":
        ds = tf.data.fashion_mnist(train=train)
    else:
        ds = tf.data.image_folder(spec, train=False, image_size=image_size) if per_class else \
            tf.data.image_folder(spec, train=train, image_size=image_size)
    if per_class:
        ds = tf.data.per_class_subset(ds, per_class, seed=seed)
    return tf.data.loader(ds, batch_size, shuffle=train and not per_class, workers=workers, seed=seed)


# ---------------------------------------------------------------- commands
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
    study.write_study(s, resume=not args.fresh, plots=not args.no_plots)


def cmd_prune(args):
    _check_outputs(args)
    model = load_model(args.model, args.weights, args.num_classes)
    calib = load_data(args.data, train=True, batch_size=args.batch_size, per_class=args.per_class,
                      image_size=args.image_size, workers=args.workers, seed=args.seed)
    options = dict(method=args.method, statistics=args.statistics, reconstruction=args.reconstruction,
                   bias_compensation=not args.no_bias_compensation, bn_recalibration=args.bn_recalibration,
                   schedule=args.schedule, num_images=args.num_images, samples_per_image=args.samples_per_image,
                   seed=args.seed, device=args.device, backend=args.backend, resume=args.resume,
                   target=args.target, through_norm=args.through_norm)
    if args.preset:
        if args.units:
            raise ValueError("--units does not combine with --preset (the preset names its units)")
        options.update(preset=args.preset)
    elif args.flops_target:
        options.update(flops_target=args.flops_target, min_keep=args.min_keep)
    else:
        options["keep"] = args.keep
    if args.units and not args.preset:
        options["units"] = args.units.split(",")
    if bool(args.finetune_steps) != bool(args.train_data):
        raise ValueError("the per-unit fine-tune needs both --train-data and --finetune-steps")
    teacher = None
    if args.finetune_steps and args.train_data:
        import copy
        teacher = copy.deepcopy(model).to(args.device or "cpu")
        train = load_data(args.train_data, train=True, batch_size=args.batch_size, image_size=args.image_size,
                          workers=args.workers, seed=args.seed)
        options["finetune"] = tf.finetune_callback(train, teacher=teacher, steps=args.finetune_steps,
                                                   lr=args.lr, device=args.device)
    result = tf.prune(model, calib, **options)
    if args.eval_data or args.speed:
        val = load_data(args.eval_data, train=False, batch_size=args.batch_size, image_size=args.image_size,
                        workers=args.workers) if args.eval_data else None
        example = next(iter(calib))[0][:1]
        result.report.measure(result.model, model.to(next(result.model.parameters()).device), eval_data=val, speed=args.speed,
                              example=example, max_batches=args.eval_batches, progress=True)
    print(result.report.table())
    if args.output:
        tf.save(result.model, args.output)
        print(f"saved the pruned model to {args.output}")
    if args.json:
        Path(args.json).write_text(result.report.to_json(indent=2))


def cmd_report(args):
    _check_outputs(args)
    model = load_model(args.model, args.weights, args.num_classes).to(args.device or "cpu")
    shape = (1, 1, 28, 28) if args.data == "fashion-mnist" else (1, 3, args.image_size, args.image_size)
    example = torch.randn(shape, device=args.device or "cpu")
    stats = tf.report.model_stats(model, example)
    if args.data:
        val = load_data(args.data, train=False, batch_size=args.batch_size, image_size=args.image_size,
                        workers=args.workers)
        acc = tf.evaluate(model, val, progress=True, max_batches=args.eval_batches)
        stats.top1, stats.top5 = acc[1], acc[5]
    if args.speed:
        stats.forward_ms, stats.backward_ms = tf.report.measure_speed(model, example)
    rep = tf.report.Report(stats)
    print(rep.table())
    if args.json:
        Path(args.json).write_text(rep.to_json(indent=2))


def _check_outputs(args) -> None:
    """Fail now, not after an hour of pruning, when an output path cannot be written."""
    for flag in ("output", "json"):
        path = getattr(args, flag, None)
        if path:
            check_writable(path, f"--{flag}")


def cmd_finetune(args):
    _check_outputs(args)
    model = load_model(args.model, args.weights, args.num_classes)
    teacher = load_model(args.teacher, args.teacher_weights, args.num_classes) if args.teacher else None
    train = load_data(args.data, train=True, batch_size=args.batch_size, image_size=args.image_size,
                      workers=args.workers, seed=args.seed)
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(dev)
    out = tf.finetune(model, train, epochs=args.epochs, lr=args.lr, optimizer=args.optimizer,
                      schedule=args.lr_schedule, teacher=teacher, temperature=args.temperature,
                      distill_weight=args.distill_weight if teacher is not None else 0.0, device=dev)
    print(json.dumps(out))
    tf.save(model, args.output)
    print(f"saved the fine-tuned model to {args.output}")


# ---------------------------------------------------------------- parser
def _common(p):
    p.add_argument("--model", required=True, help="saved model path, torchvision name, or thinet_fast model name")
    p.add_argument("--weights", help="state-dict file to load into --model (e.g. pretrained ImageNet weights)")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report as JSON here")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="thinet-fast", description="Fast and exact ThiNet filter pruning.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train/prune/fine-tune small nets on Fashion-MNIST and print the table")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (about a minute)")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--methods", help=f"comma list from {','.join(tf.demo.DEMO_METHODS)}")
    p.add_argument("--models", help="comma list from vgg,resnet")
    p.add_argument("--schedule", default="sequential", choices=tf.SCHEDULES)
    p.add_argument("--statistics", default="sampled", choices=tf.STATISTICS)
    p.add_argument("--reconstruction", default="scale", choices=tf.RECONSTRUCTIONS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="retrain instead of reusing the cached demo models")
    p.add_argument("--json")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("study", help="the method study on Fashion-MNIST: tables and plots under bench/results")
    p.add_argument("--quick", action="store_true", help="a one-minute smoke run (one model, seed, keep)")
    p.add_argument("--models", help="comma list from vgg,vgg_nobn,resnet (default: all)")
    p.add_argument("--rows", help="comma list of methods (default: all; see thinet_fast.study.ROWS)")
    p.add_argument("--keeps", help="comma list of keep fractions (default 0.7,0.5,0.3)")
    p.add_argument("--schedules", help="comma list from sequential,oneshot (default: both)")
    p.add_argument("--seeds", help="comma list of seeds (default 0,1,2)")
    p.add_argument("--finetune-steps", type=int, help="steps of each fine-tune (default 100)")
    p.add_argument("--no-ablation", action="store_true", help="skip the grid of exact variants")
    p.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    p.add_argument("--fresh", action="store_true", help="ignore the runs already in <out>/study.json")
    p.add_argument("--no-cache", action="store_true", help="retrain the models instead of reusing the cache")
    p.add_argument("--out", help="output folder (default bench/results)")
    p.set_defaults(fn=cmd_study)

    p = sub.add_parser("prune", help="prune a model")
    _common(p)
    p.add_argument("--data", required=True, help="ImageFolder root (e.g. ImageNet train) or 'fashion-mnist'")
    p.add_argument("--per-class", type=int, default=10, help="calibration images per class (paper: 10)")
    p.add_argument("--num-images", type=int, default=10000)
    p.add_argument("--samples-per-image", type=int, default=10)
    p.add_argument("--preset", choices=sorted(tf.presets.PRESETS))
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--flops-target", type=float, help="keep this fraction of the FLOPs; per-unit keep from the "
                                                       "greedy error curves (instead of --keep)")
    p.add_argument("--min-keep", type=float, default=0.1, help="with --flops-target: the least fraction a unit keeps")
    p.add_argument("--units", help="comma list of producer fqns to prune")
    p.add_argument("--method", default="thinet", choices=tf.method_names())
    p.add_argument("--statistics", default="auto", choices=tf.STATISTICS)
    p.add_argument("--reconstruction", default="scale", choices=tf.RECONSTRUCTIONS)
    p.add_argument("--no-bias-compensation", action="store_true")
    p.add_argument("--bn-recalibration", action="store_true",
                   help="re-estimate the BatchNorm layers downstream of the pruned consumers")
    p.add_argument("--target", choices=tf.pipeline.config.TARGETS, default="current",
                   help="what the sequential reconstruction fits: the partly pruned model's output (current, "
                        "the paper's) or the unpruned model's (default: %(default)s)")
    p.add_argument("--through-norm", action="store_true",
                   help="select and fit on the output of the consumer's BatchNorm (what the next layer sees)")
    p.add_argument("--schedule", default="sequential", choices=tf.SCHEDULES)
    p.add_argument("--backend", default="auto", choices=tf.BACKENDS)
    p.add_argument("--resume", help="checkpoint file written after every unit and resumed from")
    p.add_argument("--train-data", help="ImageFolder for the per-unit fine-tune")
    p.add_argument("--finetune-steps", type=int, default=0, help="per-unit fine-tune steps (with --train-data)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-data", help="ImageFolder for top-1/top-5 of both models")
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--speed", action="store_true", help="time forward/backward at batch 32 for both models")
    p.add_argument("--output", help="where to save the pruned model (thinet_fast.save format)")
    p.set_defaults(fn=cmd_prune)

    for name in ("report", "eval"):
        p = sub.add_parser(name, help="params, FLOPs, size, speed and accuracy of a model")
        _common(p)
        p.add_argument("--data", help="ImageFolder or 'fashion-mnist' for top-1/top-5")
        p.add_argument("--eval-batches", type=int)
        p.add_argument("--speed", action="store_true", help="time forward/backward at batch 32")
        p.set_defaults(fn=cmd_report)

    p = sub.add_parser("finetune", help="fine-tune a (pruned) model, optionally distilling from a teacher")
    _common(p)
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    p.add_argument("--lr-schedule", default="cosine", choices=("cosine", "step", "constant"))
    p.add_argument("--teacher", help="the unpruned model for distillation")
    p.add_argument("--teacher-weights")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--distill-weight", type=float, default=0.5)
    p.add_argument("--output", required=True)
    p.set_defaults(fn=cmd_finetune)

    p = sub.add_parser("backends", help="which kernel backends are available here, and why not")
    p.set_defaults(fn=cmd_backends)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, tf.BackendUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

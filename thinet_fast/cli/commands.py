"""The subcommands. Each one resolves the device, checks every output path and validates
its options before it loads a model or reads an image; calls only the public API.

``prune`` and ``finetune`` also run under torchrun (``torchrun --nproc_per_node N -m
thinet_fast.cli prune ...``): each rank reads its shard (``load_data(shard=)``;
``--batch-size`` is the global batch) and only rank 0 prints and writes files."""
from __future__ import annotations

import copy
import functools
import json
import math
import platform
import time
from pathlib import Path

import torch

import thinet_fast as tf
from thinet_fast import distributed as D
from thinet_fast.files import check_writable

from .loading import (CLIError, check_data_path, describe_device, load_data, load_model, num_outputs,
                      resolve_device, skipped_images, write_config)

# argparse bookkeeping that is not an option of the run
_NOT_OPTIONS = {"fn", "command", "config", "eval_data_alias", "train_data_alias"}


def _start(args, name: str) -> torch.device:
    dev = resolve_device(args.device)
    size, rank = D.world()
    if size > 1:
        dev = D.local_device(dev)
    if rank == 0:
        print(f"thinet-fast {name}: device {describe_device(dev)}" + (f", {size} processes" if size > 1 else ""),
              flush=True)
    return dev


def _torchrun(fn):
    """Under torchrun (WORLD_SIZE > 1) the command runs in the process group of its ranks."""
    @functools.wraps(fn)
    def run(args):
        with D.process_group_from_env(resolve_device(args.device)):
            return fn(args)
    return run


def _check_outputs(args, *extra: str) -> None:
    """Fail now, not after an hour of pruning, when an output path cannot be written (or
    a data folder does not exist)."""
    for flag in ("output", "json", "resume", *extra):
        path = getattr(args, flag, None)
        if isinstance(path, str) and path:
            check_writable(path, f"--{flag.replace('_', '-')}")
    if getattr(args, "output", None):
        check_writable(config_path(args.output), "--output (its .config.toml beside it)")
    for flag in ("data", "eval_data", "train_data", "eval_data_alias", "train_data_alias"):
        check_data_path(getattr(args, flag, None), "--" + flag.replace("_alias", "").replace("_", "-"))



def config_path(output: str) -> Path:
    return Path(str(output) + ".config.toml")


def _save_options(args) -> None:
    if getattr(args, "output", None):
        write_config(config_path(args.output), {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS})


def _run_info(dev: torch.device, phases: dict, images: int | None = None) -> dict:
    return {"device": describe_device(dev), "torch": torch.__version__, "thinet_fast": tf.__version__,
            "python": platform.python_version(), "images": images,
            "seconds": {k: round(v, 3) for k, v in phases.items()}}


def _write_json(path: str | None, body: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(body, indent=2, default=str))
        print(f"wrote {path}")


def _example_shape(args, model: torch.nn.Module | None = None) -> tuple[int, ...]:
    """One input's shape: --input-shape, else Fashion-MNIST's when a data option names it
    or the model is a demo one, else the first conv's channels at --image-size."""
    if getattr(args, "input_shape", None):
        try:
            return tuple(int(v) for v in args.input_shape.split(","))
        except ValueError:
            raise CLIError(f"--input-shape {args.input_shape!r}: give C,H,W such as 3,224,224") from None
    datas = [getattr(args, k, None) for k in ("data", "eval_data", "eval_data_alias", "train_data")]
    if args.model.startswith("demo-") or "fashion-mnist" in datas:
        return (1, 28, 28)
    conv = next((m for m in (model.modules() if model is not None else ()) if isinstance(m, torch.nn.Conv2d)), None)
    return (conv.in_channels if conv is not None else 3, args.image_size, args.image_size)


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise CLIError(f"--speed-batch-sizes {text!r}: give positive integers such as 1,32")
    return sizes


# ---------------------------------------------------------------- prune
def _prune_config(args, dev: torch.device) -> tf.PruneConfig:
    if args.units and args.preset:
        raise CLIError("--units does not combine with --preset (the preset names its units)")
    if bool(args.finetune_steps) != bool(args.train_data):
        raise CLIError("the per-unit fine-tune needs both --train-data and --finetune-steps")
    if args.finetune_steps and args.schedule == "oneshot":
        raise CLIError("a per-unit fine-tune (--finetune-steps) needs --schedule sequential")
    round_to = args.round_to
    if round_to not in (None, "auto"):
        try:
            round_to = int(round_to)
        except ValueError:
            raise CLIError(f"--round-to {args.round_to!r}: give auto or a positive integer") from None
    options = dict(method=args.method, statistics=args.statistics, reconstruction=args.reconstruction,
                   bias_compensation=not args.no_bias_compensation, bn_recalibration=args.bn_recalibration,
                   schedule=args.schedule, samples_per_image=args.samples_per_image, seed=args.seed,
                   device=str(dev), backend=args.backend, resume=args.resume, target=args.target,
                   through_norm=args.through_norm, coupled=args.coupled, keep=args.keep, preset=args.preset,
                   flops_target=args.flops_target, params_target=args.params_target, round_to=round_to)
    if args.flops_target is not None or args.params_target is not None:
        options["min_keep"] = args.min_keep
    if args.num_images is not None:
        options["num_images"] = args.num_images
    if args.units:
        options["units"] = args.units.split(",")
    try:
        return tf.PruneConfig(**options)
    except (TypeError, ValueError) as exc:  # say it with the CLI's names
        msg = str(exc)
        for name in ("keep", "preset", "flops_target", "params_target", "min_keep", "num_images", "round_to",
                     "coupled"):
            msg = msg.replace(f"{name}=", f"--{name.replace('_', '-')} ")
        raise CLIError(msg) from None


def _check_plot_dir(path: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CLIError("--plot needs matplotlib: pip install 'thinet_fast[plots]'") from None
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"--plot {path!r}: cannot create the folder ({exc})") from None
    check_writable(str(Path(path) / "kept-channels.png"), "--plot")


@_torchrun
def cmd_prune(args):
    dev = _start(args, "prune")
    shard, main = D.shard_spec(), D.is_main()
    _check_outputs(args)
    if args.plot:
        _check_plot_dir(args.plot)
    cfg = _prune_config(args, dev)
    cfg.progress = cfg.progress and main
    phases, t0 = {}, time.perf_counter()
    model = load_model(args.model, args.weights, args.num_classes)
    D.broadcast_module(model, dev)  # every rank prunes rank 0's model (a random init differs)
    if cfg.preset is not None:  # the wrong base is said now, not after the calibration pass
        tf.presets.check_base(cfg.preset, model)
    if args.dry_run:
        example = torch.zeros(1, *_example_shape(args, model))
        plan = tf.dry_run(model, example, cfg)
        if main:
            print(plan.table())
            _write_json(args.json, {"dry_run": plan.to_dict()})
        return
    shape = _example_shape(args, model)
    outputs = num_outputs(model, shape)
    calib = load_data(args.data, train=True, batch_size=args.batch_size, per_class=args.per_class,
                      image_size=args.image_size, workers=args.workers, seed=args.seed,
                      skip_bad=args.skip_bad_images, num_outputs=outputs, shard=shard, limit=cfg.num_images)
    images = len(calib.dataset)
    if shard is not None:  # each rank has its share of the first num_images: read all of it
        images = int(D.all_sum([images], dev)[0])
        cfg.num_images = math.ceil(min(cfg.num_images, images) / shard[1])
    if cfg.num_images > images:
        cfg.num_images = images  # the bars and the report count what is there
    if args.finetune_steps:
        teacher = copy.deepcopy(model).to(dev)
        train = load_data(args.train_data, train=True, batch_size=args.batch_size, image_size=args.image_size,
                          workers=args.workers, seed=args.seed, what="--train-data", skip_bad=args.skip_bad_images,
                          num_outputs=outputs, shard=shard)
        cfg.finetune = tf.finetune_callback(train, teacher=teacher, steps=args.finetune_steps, lr=args.lr,
                                            device=dev, progress=main)
    phases["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = tf.prune(model, calib, cfg)
    phases["prune"] = time.perf_counter() - t0
    if not main:  # every rank holds the same pruned model: rank 0 evaluates, prints and writes
        return
    if args.eval_data or args.speed:
        t0 = time.perf_counter()
        val = load_data(args.eval_data, train=False, batch_size=args.batch_size, image_size=args.image_size,
                        workers=args.workers, what="--eval-data", skip_bad=args.skip_bad_images,
                        num_outputs=outputs) if args.eval_data else None
        example = next(iter(calib))[0][:1]
        result.report.measure(result.model, model.to(dev), eval_data=val, speed=False, example=example,
                              max_batches=args.eval_batches, progress=True)
        if args.speed:
            print(f"timing inference and training steps at batch sizes {args.speed_batch_sizes} ...", flush=True)
            result.report.speed = {"pruned": tf.report.measure_latency(result.model, example,
                                                                       _batch_sizes(args.speed_batch_sizes)),
                                   "original": tf.report.measure_latency(model, example,
                                                                         _batch_sizes(args.speed_batch_sizes))}
            for which in ("pruned", "original"):
                train32 = result.report.speed[which]["train"]
                stats = getattr(result.report, which)
                stats.forward_ms = result.report.speed[which]["inference"][max(train32)]["median_ms"]
                stats.backward_ms = train32[max(train32)]["median_ms"]
        phases["evaluate"] = time.perf_counter() - t0
    print(result.report.table())
    if args.plot:
        for path in tf.report_plots.write_report_plots(result.report.units, args.plot, title=args.model):
            print(f"wrote {path}")
    if args.output:  # the report travels with the model: `report --plot` reads it back
        tf.save(result.model, args.output, meta={"report": json.loads(result.report.to_json())})
        _save_options(args)
        print(f"saved the pruned model to {args.output} (options in {config_path(args.output)})")
    body = result.report.to_dict()
    body["run"] = _run_info(dev, {**phases, **result.report.timings},
                            images if shard is not None else min(cfg.num_images, images))
    body["run"]["skipped_images"] = skipped_images(calib)
    if body["run"]["skipped_images"]:
        print(f"skipped {len(body['run']['skipped_images'])} unreadable calibration image(s) (listed in --json)")
    _write_json(args.json, body)


# ---------------------------------------------------------------- inspect
def cmd_inspect(args):
    dev = _start(args, "inspect")
    _check_outputs(args)
    model = load_model(args.model, args.weights, args.num_classes).to(dev).eval()
    example = torch.zeros(1, *_example_shape(args, model), device=dev)
    plan = tf.find_units(model, example)
    print(plan.table())
    st = tf.report.model_stats(model, example)
    print(f"model: {st.params:,} parameters, {st.flops:,} FLOPs per input of shape {tuple(example.shape[1:])}")
    _write_json(args.json, {"units": [{"producer": u.producer, "consumer": u.consumer, "channels": u.channels,
                                       "followers": list(u.followers)} for u in plan.units],
                            "refused": [{"producer": r.producer, "reason": r.reason} for r in plan.refused],
                            "params": st.params, "flops": st.flops})


# ---------------------------------------------------------------- report
def cmd_report(args):
    dev = _start(args, "report")
    _check_outputs(args)
    if args.plot:
        _check_plot_dir(args.plot)
        _prune_units(args)  # fail now if there is nothing to plot
    eval_data = args.eval_data or args.eval_data_alias
    sizes = _batch_sizes(args.speed_batch_sizes)
    t0 = time.perf_counter()
    model = load_model(args.model, args.weights, args.num_classes).to(dev)
    original = load_model(args.original, args.original_weights, args.num_classes).to(dev) if args.original else None
    example = torch.randn(1, *_example_shape(args, model), device=dev)
    stats = tf.report.model_stats(model, example)
    ref = tf.report.model_stats(original, example) if original is not None else None
    phases = {"load": time.perf_counter() - t0}
    speed = {}
    t0 = time.perf_counter()
    for st, m, which in ((stats, model, "model"), (ref, original, "original")):
        if m is None:
            continue
        if eval_data:
            val = load_data(eval_data, train=False, batch_size=args.batch_size, image_size=args.image_size,
                            workers=args.workers, what="--eval-data", skip_bad=args.skip_bad_images,
                            num_outputs=num_outputs(m, tuple(example.shape[1:])))
            acc = tf.evaluate(m, val, progress=True, max_batches=args.eval_batches)
            st.top1, st.top5 = acc[1], acc[5]
        if args.speed:
            print(f"timing the {which} at batch sizes {args.speed_batch_sizes} ...", flush=True)
            speed[which] = tf.report.measure_latency(m, example, sizes)
            st.forward_ms = speed[which]["inference"][max(sizes)]["median_ms"]
            st.backward_ms = speed[which]["train"][max(sizes)]["median_ms"]
    phases["measure"] = time.perf_counter() - t0
    rep = tf.report.Report(stats, original=ref)
    print(rep.table())
    if ref is not None:
        print(tf.report.comparison(stats, ref))
    for which, table in speed.items():
        print(f"speed ({which}):\n" + tf.report.latency_table(table))
    if args.plot:
        for path in tf.report_plots.write_report_plots(_prune_units(args), args.plot, title=args.model):
            print(f"wrote {path}")
    body = rep.to_dict()
    body.update(speed=speed, run=_run_info(dev, phases))
    _write_json(args.json, body)


def _prune_units(args) -> list:
    """The unit records of the prune that made ``--model``: from --prune-json, or from
    the file itself (``prune --output`` stores its report in the file's meta)."""
    if args.prune_json:
        return json.loads(Path(args.prune_json).read_text()).get("units", [])
    if Path(args.model).is_file():
        report = tf.load_meta(args.model).get("report")
        if report:
            return report.get("units", [])
    raise CLIError("--plot needs the prune's report: a model saved by `thinet-fast prune --output`, or "
                   "--prune-json FILE (the JSON `prune --json` wrote)")


# ---------------------------------------------------------------- finetune
@_torchrun
def cmd_finetune(args):
    dev = _start(args, "finetune")
    shard, main = D.shard_spec(), D.is_main()
    _check_outputs(args, "log")
    train_data = args.train_data or args.train_data_alias
    if not train_data:
        raise CLIError("finetune needs --train-data (an ImageFolder root or 'fashion-mnist')")
    if args.resume and not args.checkpoint_dir:
        raise CLIError("--resume continues from --checkpoint-dir/last.pt; give --checkpoint-dir")
    if args.val_every and not args.eval_data:
        raise CLIError("--val-every needs --eval-data")
    if args.amp == "fp16" and dev.type != "cuda":
        raise CLIError(f"--amp fp16 needs a CUDA device (this run is on {dev.type}); --amp bf16 runs on the CPU too")
    if args.checkpoint_dir:
        Path(args.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = load_model(args.model, args.weights, args.num_classes).to(dev)
    teacher = load_model(args.teacher, args.teacher_weights, args.num_classes) if args.teacher else None
    outputs = num_outputs(model, _example_shape(args, model))
    train = load_data(train_data, train=True, batch_size=args.batch_size, image_size=args.image_size,
                      workers=args.workers, seed=args.seed, what="--train-data", skip_bad=args.skip_bad_images,
                      num_outputs=outputs, shard=shard)
    val = load_data(args.eval_data, train=False, batch_size=args.batch_size, image_size=args.image_size,
                    workers=args.workers, what="--eval-data", skip_bad=args.skip_bad_images,
                    num_outputs=outputs, shard=shard) if args.eval_data else None  # counts summed over ranks
    load_s = time.perf_counter() - t0
    out = tf.finetune(model, train, epochs=args.epochs, steps=args.steps, lr=args.lr, optimizer=args.optimizer,
                      schedule=args.lr_schedule, momentum=args.momentum, weight_decay=args.weight_decay,
                      label_smoothing=args.label_smoothing, teacher=teacher, temperature=args.temperature,
                      distill_weight=args.distill_weight if teacher is not None else 0.0, device=dev,
                      val_data=val, val_every=args.val_every, val_batches=args.eval_batches,
                      checkpoint_dir=args.checkpoint_dir, resume=bool(args.resume), amp=args.amp, seed=args.seed,
                      log=args.log, progress=main)
    if not main:
        return
    print(json.dumps(out, default=str))
    tf.save(model, args.output)
    _save_options(args)
    print(f"saved the fine-tuned model to {args.output}")
    _write_json(args.json, {"finetune": out, "run": _run_info(dev, {"load": load_s, "finetune": out.get("seconds", 0.0)})})


from .runs import cmd_backends, cmd_bench, cmd_demo, cmd_study  # noqa: E402,F401 (the parser's table)

"""The ``thinet-fast`` argument parser: one name per option in every subcommand, help
and default shown for each."""
from __future__ import annotations

import argparse
import inspect

import thinet_fast as tf

from . import commands as C

HELP = argparse.ArgumentDefaultsHelpFormatter


def _fraction_or_count(text: str):
    """A budget: a fraction (0.5) or an absolute count (5000000)."""
    try:
        return int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction such as 0.5 nor a count such as 5000000")


def _api(name: str):
    """finetune()'s own default, so the CLI and the API never disagree."""
    return inspect.signature(tf.finetune).parameters[name].default


def _common(p, *, model_required: bool = True):
    p.add_argument("--model", required=model_required,
                   help="saved model path, thinet_fast model name (resnet50_original, demo-vgg, demo-resnet), "
                        "torchvision name, or timm name (with timm installed)")
    p.add_argument("--weights", help="state-dict file to load into --model (e.g. pretrained ImageNet weights)")
    p.add_argument("--num-classes", type=int, help="classes of a model built by name (default: its own)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (the global batch under torchrun)")
    p.add_argument("--image-size", type=int, default=224, help="ImageFolder crop size")
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="random seed (calibration draw, sampled locations)")
    p.add_argument("--json", help="write the run log / report as JSON here")
    p.add_argument("--config", help="TOML (or YAML) file of option values (`keep = 0.5`); command-line "
                                    "options override it")
    p.add_argument("--input-shape", help="C,H,W of one input for shapes and speed (default: the first conv's "
                                         "channels at --image-size; 1,28,28 for the demo models and fashion-mnist)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable or corrupt images (each is named and counted) instead of stopping")


def _eval(p):
    p.add_argument("--eval-data", help="ImageFolder root (validation) or 'fashion-mnist' for top-1/top-5")
    p.add_argument("--eval-batches", type=int, help="evaluate on this many batches only (default: all)")
    p.add_argument("--speed", action="store_true", help="time inference and training steps (median, spread)")
    p.add_argument("--speed-batch-sizes", default="1,32", help="batch sizes --speed times, comma list")


def _prune_options(p):
    p.add_argument("--data", required=True, help="calibration ImageFolder root (e.g. ImageNet train) or 'fashion-mnist'")
    p.add_argument("--per-class", type=int, default=10, help="calibration images per class (paper: 10)")
    p.add_argument("--num-images", type=int, help="calibration images used (default: all of --per-class)")
    p.add_argument("--samples-per-image", type=int, default=10, help="sampled locations per image (statistics=sampled)")
    p.add_argument("--preset", choices=sorted(tf.presets.PRESETS), help="a paper configuration (instead of --keep)")
    p.add_argument("--keep", type=float, help="fraction of channels every unit keeps (default 0.5 unless --preset "
                                              "or --flops-target)")
    p.add_argument("--flops-target", type=_fraction_or_count,
                   help="keep this fraction (or count per image) of the FLOPs; widths from the greedy error "
                        "curves, of coupled groups and attention heads too with --coupled prune (instead of --keep)")
    p.add_argument("--params-target", type=_fraction_or_count,
                   help="keep this fraction (or count) of the parameters; with --flops-target both are met")
    p.add_argument("--min-keep", type=float, default=0.1,
                   help="with a budget (--flops-target/--params-target): the least fraction a unit, group or "
                        "attention module keeps")
    p.add_argument("--round-to", default="auto", help="kept channels a multiple of N (auto: 8 on CUDA, none on CPU; "
                                                      "1: none)")
    p.add_argument("--units", help="comma list of producer module names to prune (default: every unit)")
    p.add_argument("--method", default="thinet", choices=tf.method_names(), help="channel selection")
    p.add_argument("--statistics", default="auto", choices=tf.STATISTICS, help="consumer-input statistics")
    p.add_argument("--reconstruction", default="scale", choices=tf.RECONSTRUCTIONS, help="consumer refit")
    p.add_argument("--no-bias-compensation", action="store_true", help="do not shift the consumer bias to keep E[y]")
    p.add_argument("--bn-recalibration", action="store_true",
                   help="re-estimate the BatchNorm layers downstream of the pruned consumers")
    p.add_argument("--target", choices=tf.pipeline.config.TARGETS, default="current",
                   help="what the sequential reconstruction fits: the partly pruned model's output (the paper's) "
                        "or the unpruned model's")
    p.add_argument("--through-norm", action="store_true",
                   help="select and fit on the output of the consumer's BatchNorm (what the next layer sees)")
    p.add_argument("--coupled", default="refuse", choices=tf.pipeline.config.COUPLED,
                   help="prune coupled channel groups (residual adds, concats) too")
    p.add_argument("--schedule", default="sequential", choices=tf.SCHEDULES, help="one unit at a time, or all at once")
    p.add_argument("--backend", default="auto", choices=tf.BACKENDS, help="kernel backend")
    p.add_argument("--resume", help="checkpoint written after every unit; rerunning the same command resumes from it")
    p.add_argument("--train-data", help="ImageFolder for the per-unit fine-tune (with --finetune-steps)")
    p.add_argument("--finetune-steps", type=int, default=0, help="fine-tune steps after each unit (paper: a short one)")
    p.add_argument("--lr", type=float, default=1e-3, help="per-unit fine-tune learning rate (paper: 1e-3)")
    p.add_argument("--output", help="where to save the pruned model (thinet_fast.save format)")
    p.add_argument("--plot", help="write PNG plots here: kept channels, greedy error curves, allocation")
    p.add_argument("--dry-run", action="store_true", help="print the planned widths, parameters and FLOPs per unit "
                                                           "and stop (no statistics)")
    _eval(p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="thinet-fast", description="Fast and exact ThiNet filter pruning.",
                                 formatter_class=HELP)
    ap.add_argument("--version", action="version", version=f"thinet-fast {tf.__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model", formatter_class=HELP)
    _common(p)
    _prune_options(p)
    p.set_defaults(fn=C.cmd_prune)

    p = sub.add_parser("inspect", help="what can be pruned: units, and refused channels with the reasons",
                       formatter_class=HELP)
    _common(p)
    p.set_defaults(fn=C.cmd_inspect)

    for name in ("report", "eval"):
        p = sub.add_parser(name, help="params, FLOPs, size, speed and accuracy of a model, against --original",
                           formatter_class=HELP)
        _common(p)
        _eval(p)
        p.add_argument("--data", dest="eval_data_alias", help=argparse.SUPPRESS)  # the old name of --eval-data
        p.add_argument("--original", help="the unpruned model (path or name) to compare against")
        p.add_argument("--original-weights", help="state-dict for --original")
        p.add_argument("--plot", help="write the prune's PNG plots here (kept channels, greedy curves, allocation)")
        p.add_argument("--prune-json", help="with --plot: the JSON `prune --json` wrote (default: the report "
                                            "stored in a --model file saved by `prune --output`)")
        p.set_defaults(fn=C.cmd_report)

    p = sub.add_parser("finetune", help="fine-tune a (pruned) model, optionally distilling from a teacher",
                       formatter_class=HELP)
    _common(p)
    p.add_argument("--train-data", help="training ImageFolder root or 'fashion-mnist'")
    p.add_argument("--data", dest="train_data_alias", help=argparse.SUPPRESS)  # the old name of --train-data
    p.add_argument("--epochs", type=float, default=_api("epochs"), help="passes over --train-data (unless --steps)")
    p.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
    p.add_argument("--lr", type=float, default=_api("lr"), help="peak learning rate (the API's default)")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"), help="optimizer")
    p.add_argument("--momentum", type=float, default=_api("momentum"), help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=_api("weight_decay"), help="weight decay")
    p.add_argument("--label-smoothing", type=float, default=_api("label_smoothing"), help="label smoothing of the cross-entropy")
    p.add_argument("--lr-schedule", default="cosine", choices=("cosine", "step", "constant"), help="schedule")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="mixed precision (fp16: CUDA only)")
    p.add_argument("--teacher", help="the unpruned model for distillation (path or name)")
    p.add_argument("--teacher-weights", help="state-dict for --teacher")
    p.add_argument("--temperature", type=float, default=_api("temperature"), help="distillation temperature")
    p.add_argument("--distill-weight", type=float, default=_api("distill_weight"), help="weight of the distillation loss (0: plain CE)")
    p.add_argument("--eval-data", help="validation ImageFolder root or 'fashion-mnist'")
    p.add_argument("--val-every", type=int, help="validate every N steps (and at the end)")
    p.add_argument("--eval-batches", type=int, help="validate on this many batches only")
    p.add_argument("--checkpoint-dir", help="write last.pt (and best.pt with --eval-data) here")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir/last.pt")
    p.add_argument("--log", help="JSON-lines log of the steps and validations")
    p.add_argument("--output", required=True, help="where to save the fine-tuned model")
    p.set_defaults(fn=C.cmd_finetune)

    p = sub.add_parser("demo", help="train/prune/fine-tune small nets on Fashion-MNIST and print the table",
                       formatter_class=HELP)
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (about a minute)")
    p.add_argument("--keep", type=float, default=0.5, help="fraction of channels every unit keeps")
    p.add_argument("--methods", help=f"comma list from {','.join(tf.demo.DEMO_METHODS)} (default: all)")
    p.add_argument("--models", help="comma list from vgg,resnet (default: both)")
    p.add_argument("--schedule", default="sequential", choices=tf.SCHEDULES, help="schedule")
    p.add_argument("--statistics", default="sampled", choices=tf.STATISTICS, help="statistics")
    p.add_argument("--reconstruction", default="scale", choices=tf.RECONSTRUCTIONS, help="reconstruction")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--no-cache", action="store_true", help="retrain instead of reusing the cached demo models")
    p.add_argument("--json", help="write the rows as JSON here")
    p.set_defaults(fn=C.cmd_demo)

    p = sub.add_parser("study", help="the method study on Fashion-MNIST: tables and plots under bench/results",
                       formatter_class=HELP)
    p.add_argument("--quick", action="store_true", help="a smoke run of seconds (one model, seed, keep)")
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
    p.add_argument("--readme", help="also write the compact table between this file's <!-- study:start --> and "
                                    "<!-- study:end --> markers (e.g. README.md)")
    p.set_defaults(fn=C.cmd_study)

    p = sub.add_parser("bench", help="time greedy removal, forward least squares and the statistics kernels on "
                                     "every backend, each checked against its reference first", formatter_class=HELP)
    p.add_argument("--sizes", help="comma list of CxBATCHxM problem sizes (default: a CPU-minute grid)")
    p.add_argument("--backends", help="comma list of backends (default: every available one)")
    p.add_argument("--ops", help="comma list from greedy,forward_ls,gram,moments,gram_from_cov "
                                 "(default: greedy,forward_ls,gram)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per kernel (median and spread)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="problem dtype")
    p.add_argument("--seed", type=int, default=0, help="random problems' seed")
    p.add_argument("--json", help="write the rows (and the machine) as JSON here")
    p.set_defaults(fn=C.cmd_bench)

    p = sub.add_parser("backends", help="which kernel backends are available here, and why not")
    p.set_defaults(fn=C.cmd_backends)
    return ap

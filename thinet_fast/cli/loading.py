"""What the subcommands load: the device, a config file, models and data. Everything
here fails with one line naming the option, before any long work."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

import thinet_fast as tf
from thinet_fast.distributed import shard_dataset, shard_loader


class CLIError(ValueError):
    """A bad option: printed as one line, exit status 2."""


# ---------------------------------------------------------------- device
def resolve_device(spec: str | None) -> torch.device:
    """``auto`` (the default): CUDA when there is a GPU, else the CPU. ``cuda`` without
    one is an error now, not after the model and data are loaded."""
    spec = spec or "auto"
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise CLIError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {spec}: no CUDA device is visible here; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def describe_device(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return "cpu" + ("" if torch.cuda.is_available() else " (no CUDA device)")


# ---------------------------------------------------------------- config files
def read_config(path: str) -> dict:
    """Option values from a TOML (or, with PyYAML installed, YAML) file: ``keep = 0.5``,
    ``method = "thinet"``; keys are option names with ``-`` or ``_``."""
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--config {path!r}: no such file")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise CLIError(f"--config {path!r}: YAML needs PyYAML (pip install pyyaml), or write TOML") from None
        data = yaml.safe_load(text) or {}
    else:
        import tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise CLIError(f"--config {path!r}: not valid TOML ({exc})") from None
    if not isinstance(data, dict) or any(isinstance(v, dict) for v in data.values()):
        raise CLIError(f"--config {path!r}: expected flat `option = value` lines")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)) and not (isinstance(v, float) and not math.isfinite(v)):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def write_config(path: Path, options: dict) -> None:
    """The options a run used, as TOML that ``--config`` reads back."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in sorted(options.items()) if v is not None]
    path.write_text("# thinet-fast options of this run; rerun with --config " + path.name + "\n" +
                    "\n".join(lines) + "\n")


# ---------------------------------------------------------------- models and data
def load_model(spec: str, weights: str | None = None, num_classes: int | None = None) -> torch.nn.Module:
    """A saved thinet_fast model (path), a thinet_fast model name (resnet50_original,
    demo-vgg, demo-resnet), a torchvision model name or, with timm installed, a timm
    model name; plus optional state-dict weights."""
    path = Path(spec)
    if path.exists():
        model = tf.load(path)
    else:
        kw = {} if num_classes is None else {"num_classes": num_classes}
        if spec in tf.models.MODEL_BUILDERS:
            model = tf.models.MODEL_BUILDERS[spec](**kw)
        else:
            model = _named_model(spec, kw)
    if weights:
        if not Path(weights).is_file():
            raise CLIError(f"--weights {weights!r}: no such file")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SystemExit(f"error: --weights {weights} does not fit {spec}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    return model


def _named_model(spec: str, kw: dict) -> torch.nn.Module:
    import torchvision
    try:
        return torchvision.models.get_model(spec, weights=None, **kw)
    except ValueError:
        pass
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(spec):
        return timm.create_model(spec, pretrained=False, **kw)
    raise SystemExit(f"error: --model {spec!r} is neither a file, a thinet_fast model "
                     f"({', '.join(tf.models.MODEL_BUILDERS)}), a torchvision model name"
                     + (" nor a timm model name" if timm is not None else " nor (timm is not installed) a timm name"))


def check_data_path(spec: str | None, what: str) -> None:
    if spec and spec != "fashion-mnist" and not Path(spec).is_dir():
        raise CLIError(f"{what} {spec!r} is not a folder of class subfolders (ImageNet layout) nor 'fashion-mnist'")


def load_data(spec: str, train: bool, batch_size: int, per_class: int | None = None, image_size: int = 224,
              workers: int = 4, seed: int = 0, what: str = "--data", skip_bad: bool = False,
              num_outputs: int | None = None, shard: tuple[int, int] | None = None, limit: int | None = None):
    """A DataLoader over ``spec``: 'fashion-mnist' or an ImageFolder root. With
    ``per_class``: the paper's calibration subset, deterministic preprocessing, each
    image decoded once per run and kept (uint8, within a memory budget) for every pass.
    With ``num_outputs``: the class count is checked against the model's outputs (for
    calibration, fewer classes are fine: its labels are unused).

    ``shard=(rank, world)`` (torchrun): this process's share. The calibration subset
    (cut to its first ``limit`` images) and evaluation sets (``batch_size // world`` per
    batch when it divides) are split ``rank::world``, an exact partition, before any
    image is decoded; a training set gets a
    DistributedSampler with ``batch_size // world`` per process (``batch_size`` is the
    global batch), so the ranks' steps together are one process's steps."""
    check_data_path(spec, what)
    if spec == "fashion-mnist":
        ds = tf.data.fashion_mnist(train=train)
    else:
        ds = tf.data.image_folder(spec, train=train and not per_class, image_size=image_size, skip_bad=skip_bad)
    if num_outputs is not None:
        tf.data.check_classes(ds, num_outputs, what, exact=not per_class)
    if per_class:
        ds = tf.data.per_class_subset(ds, per_class, seed=seed)
        if shard is not None:
            ds = shard_dataset(ds, *shard, limit=limit)
        ds = tf.data.decoded(ds)
    elif shard is not None and not train:
        ds = shard_dataset(ds, *shard)
        if batch_size % shard[1] == 0:  # the ranks' first k batches are one process's first k
            batch_size //= shard[1]
    loader = tf.data.loader(ds, batch_size, shuffle=train and not per_class, workers=workers, seed=seed)
    if shard is not None and train and not per_class:
        if batch_size % shard[1]:
            raise CLIError(f"--batch-size {batch_size}: under torchrun it is the global batch, split over the "
                           f"{shard[1]} processes; give a multiple of {shard[1]}")
        loader = shard_loader(loader, rank=shard[0], world_size=shard[1], seed=seed)
    return loader


def skipped_images(loader) -> list[str]:
    """Unreadable files skipped so far (with --skip-bad-images), for the run log."""
    ds = loader.dataset
    while not hasattr(ds, "skipped") and hasattr(ds, "dataset"):
        ds = ds.dataset
    return list(getattr(ds, "skipped", []) or [])


def num_outputs(model: torch.nn.Module, shape) -> int | None:
    """The model's output width on one zero input, or None if it is not (N, classes)."""
    try:
        dev = next(model.parameters()).device
        with torch.no_grad():
            was = model.training
            model.eval()
            out = model(torch.zeros(1, *shape, device=dev))
            model.train(was)
    except Exception:
        return None
    return int(out.shape[-1]) if isinstance(out, torch.Tensor) and out.dim() == 2 else None

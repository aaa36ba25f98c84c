"""The validated configuration of a pruning run (torchao-style: one dataclass)."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ..ops.dispatch import BACKEND_NAMES
from ..ops.stats import STATISTICS
from .methods import method_names

METHODS = method_names()  # the built-in methods; register_method() adds more
RECONSTRUCTIONS = ("scale", "full", "none")
SCHEDULES = ("sequential", "oneshot")
COUPLED = ("refuse", "prune")
TARGETS = ("current", "unpruned")
BACKENDS = ("auto",) + BACKEND_NAMES


@dataclass
class PruneConfig:
    """Every option of :func:`thinet_fast.prune`.

    Attributes:
        keep: fraction of channels to keep (0 < keep <= 1), for every unit, or a dict
            producer fqn -> fraction (float) or channel count (int). Units absent from
            a dict are not pruned. Default 0.5 unless a budget (``flops_target`` /
            ``params_target``) or ``preset``.
        flops_target: instead of ``keep``: the FLOPs to keep, a fraction in (0, 1) of the
            model's or an absolute count (an int >= 1 below the model's; per image at the
            calibration input size); the widths are allocated from the greedy error
            curves of one statistics pass (DESIGN §6, ``pipeline.budget``): of every
            plain unit and, with ``coupled="prune"``, every coupled group (positions per
            block) and attention module (heads).
        params_target: instead of ``keep``: the parameters to keep, a fraction in (0, 1)
            of the model's (``count_params``) or an absolute count (an int >= 1 below
            it). With ``flops_target`` too, the allocation meets both: each step
            removed is the cheapest in error per unit of the target furthest from
            being met. Counts are exact, and no unit, group or head count can grow a
            step without exceeding a target.
        min_keep: with ``flops_target`` / ``params_target``: the fraction every unit,
            group and attention module keeps at least.
        method: "thinet" (greedy removal, ICCV), "thinet_ls" (forward least squares,
            journal), or the baselines "random", "weight_sum", "apoz", "lasso".
        statistics: "sampled" (paper), "full" (exact over every output), "direct"
            (large t), or "auto" (full while (C·t)² is small, direct otherwise).
        reconstruction: "scale" (paper), "full" (least-squares refit of the consumer)
            or "none".
        bias_compensation: shift the consumer's bias so E[y] is kept.
        target: what the reconstruction fits, sequential schedule: "current" (the
            consumer's output on the partly pruned model, the paper's) or "unpruned"
            (the unpruned model's output on the same images: upstream errors are
            corrected; one extra forward of the unpruned model per unit, no replay).
        through_norm: for a consumer whose output goes to a BatchNorm alone, select and
            fit on the normalised output (each output channel weighed by γ/σ), which is
            what the next layer sees; the paper (and the default) fits the raw output.
            Plain units only: coupled groups' readers fit their raw output.
        bn_recalibration: after pruning, re-estimate the running statistics of every
            BatchNorm downstream of a changed consumer (the others are exact already).
        schedule: "sequential" (paper; resumable) or "oneshot".
        num_images: calibration images to use (paper: 10 per class).
        samples_per_image: locations per image (paper: 10); None = every location.
        seed: seeds sampling and the random baseline.
        device: where the pruned copy is made and the statistics are computed:
            "auto" (default: CUDA when available, else the CPU), a device, or None
            (the model's own device). The returned model lives there.
        backend: preferred kernel backend. Each op uses it where it has that
            implementation ("cpu"/"cuda"/"cupy" are selection-only, "triton" has no
            forward least squares) and "auto" elsewhere; the report says what ran.
        units / filter_fn: which producers to prune (fqn list, or a predicate
            ``filter_fn(module, fqn)``).
        finetune: callback ``finetune(model, unit, index)`` after each unit
            (sequential schedule).
        resume: checkpoint path: written after every unit, and resumed from if it exists.
        replay_memory: sequential schedule: bytes of host memory the activation-replay
            cache may hold (DESIGN §7); None = half of the available host memory (and,
            on a GPU, half of its free memory before spilling to the host); 0 = no
            replay, every unit re-runs the model from the images. The report says
            where each unit's pass started.
        inplace: prune the given model instead of a copy.
        preset: a paper preset name (see ``thinet_fast.presets``); it fixes keep/units.
        stats_dtype: accumulation dtype (float32 or float64).
        ridge: the smallest ridge factor of the least-squares solves (relative to the
            mean diagonal). With a held-out fold the solve's ridge is chosen from it and
            larger ones (up to 1) on the held-out images; without, it is used as is.
        holdout: about one calibration image in n (default 5, chosen by image key) is kept apart to choose
            the reconstruction's ridge, to report its error on images the fit did not
            see, and to fall back from a full refit to scale when scale does better
            there (DESIGN §5). 0 = none: the fixed ``ridge`` and in-sample errors.
        progress: show progress bars.
        coupled: "refuse" (default, and the paper presets: coupled channels stay) or
            "prune": coupled groups (residual adds, concats, grouped convs, SE gates)
            found with Torch-Pruning's DependencyGraph are pruned too, selected on the sum
            of every reader's Gram and every reader reconstructed (one statistics pass
            after the plain units; see :mod:`thinet_fast.pipeline.coupled`); then the
            heads of every supported attention module (``nn.MultiheadAttention``,
            Swin, MaxViT), selected on the output projection's head-summed Gram, the
            projection refitted (:mod:`thinet_fast.pipeline.heads`).
        leaf_modules: module fqns torch.fx should not trace into (code fx cannot trace).
        ignored_layers: module fqns never pruned (with their submodules), as producers
            or inside a coupled group.
        round_to: hardware-friendly widths (as Torch-Pruning's ``round_to``): each kept
            count becomes the nearest multiple of N in [N, C] (ties: the wider), or C
            itself. None: no rounding; an int N >= 1; "auto" (default): 8 when the run's
            device is CUDA, no rounding on the CPU. A unit narrower than N keeps its
            count; an explicit int in a ``keep`` dict is kept as given; the presets keep
            the paper's widths unless ``round_to`` is an int. With a budget
            (``flops_target`` / ``params_target``) the allocation is rounded, then
            narrowed a step at a time while over a target (least error rise first) and
            widened into slack that is left; see :mod:`thinet_fast.pipeline.keeps` and
            ``pipeline.budget.allocate``.
    """

    keep: float | Mapping[str, float | int] | None = None
    method: str = "thinet"
    statistics: str = "auto"
    reconstruction: str = "scale"
    bias_compensation: bool = True
    bn_recalibration: bool = False
    schedule: str = "sequential"
    num_images: int = 1000
    samples_per_image: int | None = 10
    seed: int = 0
    device: str | torch.device | None = "auto"
    backend: str = "auto"
    units: list[str] | None = None
    filter_fn: Callable[[torch.nn.Module, str], bool] | None = None
    finetune: Callable[..., Any] | None = None
    resume: str | None = None
    replay_memory: int | None = None
    inplace: bool = False
    preset: str | None = None
    flops_target: float | int | None = None
    params_target: float | int | None = None
    min_keep: float = 0.1
    stats_dtype: torch.dtype = torch.float32
    ridge: float = 1e-8
    holdout: int = 5
    progress: bool = True
    coupled: str = "refuse"
    leaf_modules: tuple = ()
    ignored_layers: tuple = ()
    target: str = "current"
    through_norm: bool = False
    round_to: int | str | None = "auto"

    def __post_init__(self):
        def _one_of(name, value, allowed):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}")

        if self.method not in method_names():
            raise ValueError(f"method={self.method!r} is not one of {method_names()}; "
                             "thinet_fast.register_method() adds a method")
        _one_of("statistics", self.statistics, STATISTICS)
        _one_of("reconstruction", self.reconstruction, RECONSTRUCTIONS)
        _one_of("schedule", self.schedule, SCHEDULES)
        _one_of("backend", self.backend, BACKENDS)
        _one_of("coupled", self.coupled, COUPLED)
        _one_of("target", self.target, TARGETS)
        for name in ("leaf_modules", "ignored_layers"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or \
                    not all(isinstance(v, str) for v in value):
                raise TypeError(f"{name} must be a list of module names (strings); got {value!r}")
            setattr(self, name, tuple(value))
        if self.coupled == "prune" and self.preset is not None:
            raise ValueError("the paper presets prune plain chains only, as the paper did; drop coupled='prune' "
                             "or preset=")
        self.flops_target = _budget_target("flops_target", self.flops_target, "FLOPs")
        self.params_target = _budget_target("params_target", self.params_target, "parameters")
        chosen = [n for n in ("keep", "preset") if getattr(self, n) is not None]
        targets = [n for n in ("flops_target", "params_target") if getattr(self, n) is not None]
        if len(chosen) + bool(targets) > 1:  # the two targets go together; keep/preset with nothing else
            raise ValueError(f"give one of keep=, preset= or a budget (flops_target= and/or params_target=); "
                             f"got {', '.join(chosen + targets)}")
        if not 0.0 < self.min_keep <= 1.0:
            raise ValueError(f"min_keep={self.min_keep} must lie in (0, 1]")
        if isinstance(self.keep, Mapping):
            for fqn, v in self.keep.items():
                _check_keep(v, f"keep[{fqn!r}]")
        elif self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)):
                raise TypeError(f"keep must be a float in (0, 1] or a dict of producer fqn -> fraction/count; got {type(self.keep).__name__}")
            if not 0.0 < float(self.keep) <= 1.0:
                raise ValueError(f"keep={self.keep} must lie in (0, 1]")
            self.keep = float(self.keep)  # a global keep is always a fraction (keep=1 means all)
        _int("num_images", self.num_images, 1)
        if self.samples_per_image is not None:
            _int("samples_per_image", self.samples_per_image, 1, "or None (every location)")
        _int("seed", self.seed, None)
        if self.units is not None:
            if isinstance(self.units, str) or not isinstance(self.units, (list, tuple)):
                raise TypeError(f"units must be a list of producer module names (strings); got "
                                f"{type(self.units).__name__}{' (wrap one name in a list)' if isinstance(self.units, str) else ''}")
            bad = [u for u in self.units if not isinstance(u, str)]
            if bad:
                raise TypeError(f"units must hold module names (strings, e.g. 'features.0'); got {bad[:3]!r}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError(f"filter_fn must be a callable filter_fn(module, fqn) -> bool; got {type(self.filter_fn).__name__}")
        if self.units is not None and self.filter_fn is not None:
            raise ValueError("pass units= or filter_fn=, not both")
        if self.finetune is not None and not callable(self.finetune):
            raise TypeError("finetune must be a callable finetune(model, unit, index)")
        if self.finetune is not None and self.schedule == "oneshot":
            raise ValueError("a per-unit finetune callback needs schedule='sequential'")
        if self.resume is not None and self.schedule == "oneshot":
            raise ValueError("resume= checkpoints after every unit of the sequential schedule; "
                             "use schedule='sequential' or drop resume=")
        if self.replay_memory is not None and (isinstance(self.replay_memory, bool) or
                                               not isinstance(self.replay_memory, int) or self.replay_memory < 0):
            raise ValueError(f"replay_memory must be None (auto), 0 (off) or a byte count >= 0; got {self.replay_memory!r}")
        if self.stats_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"stats_dtype must be torch.float32 or torch.float64; got {self.stats_dtype}")
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)) or not math.isfinite(self.ridge) \
                or self.ridge < 0:
            raise ValueError(f"ridge must be a finite number >= 0; got {self.ridge!r}")
        for name in ("bias_compensation", "bn_recalibration", "through_norm", "inplace", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False; got {getattr(self, name)!r}")
        self.round_to = _round_to(self.round_to)
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, int) or self.holdout < 0 or \
                self.holdout == 1:
            raise ValueError(f"holdout must be 0 (none) or an int >= 2 (about 1 image in n held out); got {self.holdout!r}")

    def replace(self, **changes) -> "PruneConfig":
        return dataclasses.replace(self, **changes)

    def fingerprint(self) -> dict:
        """The options that decide the result (a resumed run must match them)."""
        keys = ("keep", "method", "statistics", "reconstruction", "bias_compensation", "schedule",
                "num_images", "samples_per_image", "seed", "units", "preset", "ridge", "flops_target", "params_target",
                "min_keep", "holdout",
                "coupled", "ignored_layers", "target", "through_norm", "round_to")
        out = {k: getattr(self, k) for k in keys}
        out["keep"] = dict(self.keep) if isinstance(self.keep, Mapping) else self.keep
        out["stats_dtype"] = str(self.stats_dtype)
        return out


def _int(name, v, low, extra=""):
    """An int option (not a bool, not a float) of at least ``low``."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int{' ' + extra if extra else ''}; got {type(v).__name__} {v!r}")
    if low is not None and v < low:
        raise ValueError(f"{name} must be >= {low}{' ' + extra if extra else ''}; got {v}")


def _budget_target(name, v, what):
    """``flops_target`` / ``params_target``: None, a fraction in (0, 1) (a float) or an
    absolute count (an int >= 1; numpy ints accepted). Whether a count is below the
    model's is checked once the model is known (``pipeline.budget.budget_constraints``)."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a fraction in (0, 1) of the model's {what} (a float) or a count of "
                        f"{what} (an int >= 1); got {type(v).__name__} {v!r}")
    if isinstance(v, numbers.Integral):
        if int(v) < 1:
            raise ValueError(f"{name}={v}: a count of {what} must be >= 1; or give a fraction in (0, 1), "
                             f"e.g. {name}=0.5")
        return int(v)
    v = float(v)
    if not (math.isfinite(v) and 0.0 < v < 1.0):
        hint = f"; for an absolute count pass an int, e.g. {name}={int(v)}" if math.isfinite(v) and v > 1 else ""
        raise ValueError(f"{name}={v} must lie in (0, 1): the fraction of the model's {what} to keep{hint}")
    return v


def _round_to(v):
    """``round_to`` as given (None, "auto") or as an int >= 1 (numpy ints accepted)."""
    if v is None or (isinstance(v, str) and v == "auto"):
        return v
    if isinstance(v, numbers.Integral) and not isinstance(v, bool) and int(v) >= 1:
        return int(v)
    raise ValueError(f"round_to={v!r} is not valid: pass None (no rounding), 'auto' (8 on CUDA, none on the CPU) "
                     "or a positive int channel multiple such as round_to=8")


def _check_keep(v, name):
    if isinstance(v, bool):
        raise TypeError(f"{name} must be a fraction or a channel count; got a bool")
    if isinstance(v, int):
        if v < 1:
            raise ValueError(f"{name}={v}: a channel count must be >= 1")
    elif isinstance(v, float):
        if not 0.0 < v <= 1.0:
            raise ValueError(f"{name}={v}: a fraction must lie in (0, 1]")
    else:
        raise TypeError(f"{name} must be a float fraction or an int count; got {type(v).__name__}")


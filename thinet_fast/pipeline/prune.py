"""``thinet_fast.prune``: the high-level entry point."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, fields
from typing import Mapping

import torch
from torch import nn

from ..counting import count_flops, count_params
from ..files import check_writable
from ..report import Report, build_report
from ..units import UnitPlan, UntraceableModelError, find_units
from .coupled import CoupledStage
from .budget import allocate, budget_constraints
from .budget_stats import budget_items, item_curves, new_biases
from .calibrate import downstream_norms, recalibrate_batchnorm, running_norms
from .collect import StatsSpec, images_in, iter_batches, model_device, progress_bar
from . import keeps
from .config import PruneConfig
from .schedules import run_oneshot, run_sequential, transplant
from .timing import Timings


@dataclass
class PruneResult:
    """What :func:`prune` returns. Unpacking gives the pair most callers want,
    ``model, report = thinet_fast.prune(...)``; ``plan`` (the units found) and
    ``config`` (the validated options) are read by name."""

    model: nn.Module
    report: Report
    plan: UnitPlan
    config: PruneConfig

    def __iter__(self):
        return iter((self.model, self.report))


def run_device(spec, model: nn.Module) -> torch.device:
    """``device=``: "auto" is CUDA when available, else the CPU; None the model's own."""
    if spec is None:
        return model_device(model)
    if isinstance(spec, str) and spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={spec!r}: no CUDA device is visible here; use device='cpu' or 'auto'")
    return dev


def _config(config: PruneConfig | None, options: dict) -> PruneConfig:
    if config is not None and options:
        raise TypeError(f"pass a PruneConfig or keyword options, not both (got {sorted(options)})")
    if config is not None:
        if not isinstance(config, PruneConfig):
            raise TypeError(f"config must be a thinet_fast.PruneConfig; got {type(config).__name__}")
        return config
    known = {f.name for f in fields(PruneConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; valid options are {sorted(known)}")
    return PruneConfig(**options)


def _example_input(data, device, model: nn.Module) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        try:
            one_pass = iter(data) is data
        except TypeError:
            raise TypeError(f"data must be a DataLoader, a list of batches or a tensor; got a "
                            f"{type(data).__name__}, which is not iterable") from None
        if one_pass:
            raise TypeError("data is a one-pass iterator; pass a DataLoader, a list of batches or a tensor "
                            "(statistics are collected in several passes)")
    x = next(iter(iter_batches(data, 1, device)))
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear))), None)
    if isinstance(first, nn.Conv2d) and x.dim() == 3:
        raise ValueError(f"the model starts with a Conv2d, so a batch must be (N, C, H, W); got a {x.dim()}-D batch "
                         f"{tuple(x.shape)}. Add the batch dimension (x.unsqueeze(0)) or the channel one "
                         "(x.unsqueeze(1)); a 3-D tensor would be taken as one image")
    return x


def _plan(work: nn.Module, example, cfg: PruneConfig, units_arg) -> tuple[UnitPlan, str]:
    """The plain units (torch.fx). A model fx cannot trace leaves every channel to the
    coupled groups with ``coupled="prune"``, and is an error that says so otherwise."""
    ignored = set(cfg.ignored_layers)
    filter_fn = cfg.filter_fn
    if ignored:
        inside = lambda fqn: any(fqn == i or fqn.startswith(i + ".") for i in ignored)  # noqa: E731
        base = filter_fn
        filter_fn = lambda m, fqn: not inside(fqn) and (base is None or base(m, fqn))  # noqa: E731
        if units_arg is not None:
            units_arg = [u for u in units_arg if not inside(u)]
            filter_fn = None
    if cfg.coupled == "prune" and units_arg is not None:
        # a named producer may be coupled: the plain ones go to find_units, the rest to the groups
        modules = dict(work.named_modules())
        missing = [u for u in units_arg if u not in modules]
        if missing:
            raise ValueError(f"units= names {missing}, which are not modules of {type(work).__name__}")
        named = set(units_arg)
        filter_fn, units_arg = (lambda m, fqn: fqn in named), None
    try:
        return find_units(work, example, units=units_arg, filter_fn=filter_fn,
                          leaf_modules=cfg.leaf_modules), ""
    except UntraceableModelError as exc:
        if cfg.coupled != "prune":
            raise UntraceableModelError(f"{exc}\nOr pass coupled='prune': Torch-Pruning's autograd graph then "
                                        "finds every group, plain chains included.") from exc
        return UnitPlan([], []), ("torch.fx could not trace the model: every group came from Torch-Pruning, on the "
                                  f"largest fx-traceable submodules ({exc})")[:400]


def _warn_scarce(records: list[dict], notes: list[str]) -> None:
    """One warning for every unit whose fit had fewer samples than unknowns."""
    scarce = [f"{r.consumer!r}: {n}" for r in records for n in r.notes if "calibration samples for" in n]
    if scarce:
        message = (f"{len(scarce)} unit(s) had fewer calibration samples than unknowns; their fits are "
                   "regularised, and the errors reported on held-out images. Give more images (num_images=) "
                   "or samples_per_image= for better fits:\n  " + "\n  ".join(scarce))
        warnings.warn(message, stacklevel=3)
        notes.append(f"{len(scarce)} unit(s) had fewer calibration samples than unknowns (see their notes)")


def prune(model: nn.Module, data, config: PruneConfig | None = None, **options) -> PruneResult:
    """Prune ``model`` with ThiNet (or a baseline) using calibration ``data``.

    Args:
        model: any fx-traceable model built from Conv2d/Linear chains.
        data: a DataLoader, a list of batches, or one tensor; a batch is a tensor or a
            tuple/list whose first item is the input.
        config: a :class:`PruneConfig`; or pass its fields as keywords.

    Returns:
        :class:`PruneResult` with ``.model`` (the physically smaller model; a copy
        unless ``inplace=True``) and ``.report``.

    Example::

        result = thinet_fast.prune(model, loader, keep=0.5, method="thinet", num_images=1000)
        print(result.report)
    """
    cfg = _config(config, options)
    if cfg.resume:
        check_writable(cfg.resume, "resume=")
    spec = StatsSpec.from_config(cfg).replace(images=images_in(data))
    preset = None
    if cfg.preset is not None:
        from ..presets import check_base, get_preset
        preset = get_preset(cfg.preset)
        if isinstance(model, nn.Module):
            check_base(preset, model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(f"the model has meta tensors (no data), e.g. {meta[0]!r}; load its weights first "
                         "(statistics need real activations)")
    device = run_device(cfg.device, model)
    timer = Timings(device)
    example = _example_input(data, device, model)
    # always work on a copy: a failure half way leaves the caller's model whole
    work = copy.deepcopy(model).to(device)

    units_arg = cfg.units
    if preset is not None:
        units_arg = preset.producers if units_arg is None else units_arg
    elif isinstance(cfg.keep, Mapping) and units_arg is None and cfg.filter_fn is None:
        units_arg = list(cfg.keep)
    plan, untraced = _plan(work, example, cfg, units_arg)
    if isinstance(cfg.keep, Mapping):  # units absent from the dict are not pruned
        unknown = sorted(set(cfg.keep) - {u.producer for u in plan.units})
        if unknown:
            raise ValueError(f"keep names producer(s) {unknown} that units=/filter_fn= did not select")
        plan = UnitPlan([u for u in plan.units if u.producer in cfg.keep], plan.refused, graph=plan.graph)
    if not plan.units and cfg.coupled == "refuse":
        raise ValueError("no prunable units were selected; see the refused channels:\n" + str(plan)
                         + "\n(coupled='prune' prunes coupled channel groups too)")
    notes = [untraced] if untraced else []
    stats = budget = None
    if cfg.flops_target is not None or cfg.params_target is not None:
        targets = dict(flops_target=cfg.flops_target, params_target=cfg.params_target)
        budget_constraints(work, example[:1], **targets)  # a count above the model's fails before any pass
        with timer.phase("groups"):
            items = budget_items(work, plan, cfg, example[:1], device)
        # the unpruned model's statistics: the one-shot schedule reuses the units'
        with progress_bar(spec.pass_images, "statistics (budget)", cfg.progress) as bar:
            curves, stats = item_curves(work, items, data, spec, cfg, device, bar=bar, timer=timer)
        with timer.phase("selection"):
            budget = allocate(work, items, curves, example[:1], **targets, min_keep=cfg.min_keep,
                              ignored_layers=cfg.ignored_layers, skip=[u.producer for u in plan.units],
                              biases=new_biases(work, items, cfg))
        n_keep = {u.producer: budget.keep.get(u.producer, u.channels) for u in plan.units}
        coupled_counts = {it.producer: budget.keep[it.producer] for it in items if it.kind != "unit"}
        del items, curves  # their groups' graphs hold the unpruned modules
        notes.append(budget.note)
    else:
        n_keep = keeps.for_config(plan, cfg, preset, device)
    multiple = keeps.round_multiple(cfg.round_to, device, preset=preset is not None)
    if multiple > 1:
        notes.append(f"round_to={cfg.round_to!r}: kept counts rounded to multiples of {multiple} (or the full "
                     f"width); explicit counts and units narrower than {multiple} as given")

    stage = None
    if cfg.coupled == "prune":
        stage = CoupledStage(example[:1], data, cfg, device, spec, timer, skip={u.producer for u in plan.units},
                             counts=None if budget is None else coupled_counts)
    if cfg.schedule == "sequential" and (plan.units or cfg.resume):
        records = run_sequential(work, plan.units, n_keep, data, cfg, device, spec, timer, graph=plan.graph,
                                 example=example[:1], coupled=stage)
    else:
        records = run_oneshot(work, plan.units, n_keep, data, cfg, device, spec, timer,
                              stats=stats) if plan.units else []
        records += stage.run(work) if stage is not None else []
    if stage is not None:
        grouped = [r for r in records if r.producer not in {u.producer for u in plan.units}]
        notes.append(f"coupled groups: {len(grouped)} pruned, {len(stage.refused)} left "
                     f"(Torch-Pruning's DependencyGraph)")
        notes += [f"group `{root}` not pruned: {why}" for root, why in stage.refused]
        if not records:
            raise ValueError("nothing was pruned: no plain unit and no coupled group could be pruned:\n"
                             + "\n".join(notes))
    _warn_scarce(records, notes)
    if budget is not None:
        _check_budget(work, example[:1], budget)
    if preset is not None and preset.transform is not None:
        work = preset.transform(work)
        notes.append(f"preset {preset.name}: {preset.note}")
    if cfg.bn_recalibration:
        with timer.phase("bn_recalibration"):
            layers, why = _changed_norms(work, records, cfg, example[:1])
            n_bn = recalibrate_batchnorm(work, data, num_images=cfg.num_images, device=device, layers=layers)
        notes.append(f"re-estimated {n_bn} BatchNorm layers{why} on {cfg.num_images} calibration images")
    with timer.phase("report"):
        report = build_report(work, example[:1], reference=model, units=records,
                              config={**cfg.fingerprint(), "round_to_multiple": multiple,
                                      **({"budget": budget.info()} if budget is not None else {})},
                              backend=_backends_used(records), notes=notes)
    report.timings = timer.as_dict()
    if cfg.inplace:
        transplant(model, work)  # only now that everything succeeded
        work = model
    return PruneResult(work, report, plan, cfg)


def _check_budget(work: nn.Module, example, budget) -> None:
    """The pruned model's counts are the allocation's: anything else is a bug to report,
    not a model to return (the caller's model is unchanged)."""
    got = {"flops": count_flops(work, example), "params": count_params(work)}
    if got != budget.achieved:
        raise RuntimeError(f"the pruned model has {got}, but the budget allocated for {budget.achieved}: a layer "
                           "changed that the budget did not count; please report the model")


def _changed_norms(model: nn.Module, records, cfg: PruneConfig, example):
    """(the BatchNorm layers a cut reaches, or None for all; a note on which)."""
    if cfg.finetune is not None:
        return None, " (all: per-unit fine-tuning may have changed any layer)"
    names = {n.strip() for r in records for n in r.consumer.split(",")}
    modules = dict(model.named_modules())
    if not names <= modules.keys():
        return None, " (all: the preset's rewrite renamed pruned consumers)"
    total = len(running_norms(model))
    try:
        layers = downstream_norms(model, [modules[n] for n in names], example)
    except Exception as e:  # noqa: BLE001 - the safe fallback is to re-estimate them all
        return None, f" (all: following the data from the pruned consumers failed: {type(e).__name__}: {e})"
    return layers, f" downstream of the pruned consumers (of {total})"


def _backends_used(records: list[dict]) -> dict:
    return {key: ",".join(sorted({getattr(r, key) for r in records}))
            for key in ("statistics_backend", "selection_backend")}

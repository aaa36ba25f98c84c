"""The paper's pruned architectures as data.

A :class:`Preset` names a base architecture, how many channels each producer keeps
(a fraction of its width, or an absolute count), and an optional architecture transform
applied after pruning (ThiNet-GAP/Tiny replace fc6-fc8 by global average pooling and one
Linear). The pruning pipeline calls ``find_units(model, x, units=preset.producers)``,
``preset.keep_for(plan)`` for the channel counts, prunes with ThiNet-selected channels,
then ``preset.transform(model)``.

:func:`apply_preset_shapes` produces the pruned *architecture* without any statistics
(it keeps the first n channels), so parameter and FLOP counts can be checked cheaply,
e.g. on the meta device.

Rounding rule: a fraction keeps ``floor(C * fraction)`` channels (at least 1), e.g. 70% of
64 = 44.8 -> 44. This is the rule that reproduces the paper. Counted on one 224x224
image (ResNet v1; FLOPs = 2 x MACs of conv+linear; params with and without the
conv/linear biases, the paper counting without):

==========  ==========  ======================  =============  ======================
preset      params      params without biases   FLOPs          paper prints
==========  ==========  ======================  =============  ======================
VGG-16      138,357,544 138,344,128             30,940,528,640 138.34M, 30.94G
ThiNet-Conv 131,452,552 131,440,480             9,582,411,776  131.44M, 9.58G
ThiNet-GAP    8,322,696   8,318,816             9,336,168,448  8.32M, 9.34G
ThiNet-Tiny   1,325,368   1,323,184             2,009,157,632  1.32M, 2.01G
ResNet-50    25,557,032  25,556,032             7,715,946,496  25.56M, 7.72G
ThiNet-70    16,945,246  16,944,246             4,880,052,680  16.94M, 4.88G
ThiNet-50    12,381,864  12,380,864             3,412,852,736  12.38M, 3.41G
ThiNet-30     8,665,318   8,664,318             2,194,985,078  8.66M, 2.20G
==========  ==========  ======================  =============  ======================

Every printed figure matches except ThiNet-30's FLOPs, which sit 15K FLOPs (0.0007%)
below the 2.195G rounding boundary: any tiny extra term in the authors' count (pooling,
bias adds) prints as 2.20. Rounding to nearest instead (``rounding="round"``, 45 of 64)
gives 16,959,305 / 12,381,864 / 8,704,945 parameters (16.96M / 12.38M / 8.70M with
biases) and 4.92 / 3.41 / 2.20 GFLOPs: ThiNet-70's 4.92G is not the paper's 4.88G. The
VGG presets are the same under both rules (halves of even widths, or absolute counts).

Heads: the GAP/Tiny head is a *new* ``Linear(512 or 256 -> num_classes)``, freshly
initialised; it must be fine-tuned (the paper trains it).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Literal, Mapping, Optional, Union

import torch
import torch.nn as nn

from .models import THINET_TINY_WIDTHS, gap_head_, resnet50_original
from .rewrite import prune_unit_
from .units import UnitPlan, find_units

__all__ = ["Preset", "PRESETS", "get_preset", "apply_preset_shapes", "preset_architecture", "BASES", "check_base"]

#: base architectures a preset can name; all built with random init (weights=None).
def _torchvision(name: str) -> Callable[..., nn.Module]:
    def build(**kw) -> nn.Module:
        import torchvision  # lazy: importing torchvision takes seconds

        return getattr(torchvision.models, name)(weights=None, **kw)

    build.__name__ = name
    return build


BASES: Mapping[str, Callable[..., nn.Module]] = MappingProxyType({
    "vgg16": _torchvision("vgg16"),
    "resnet50": _torchvision("resnet50"),
    "resnet50_original": resnet50_original,
})

KeepValue = Union[float, int]


@dataclass(frozen=True)
class Preset:
    """A paper configuration.

    Attributes:
        name: e.g. ``"vgg16-thinet-conv"``.
        base: key of :data:`BASES` (``"vgg16"``, ``"resnet50"``, ``"resnet50_original"``).
        keep: ``{producer fqn: fraction in (0, 1] or int channel count}``.
        transform: ``model -> model`` applied after pruning (in place), or None.
        rounding: how a fraction becomes a count: ``"floor"`` (default) or ``"round"``.
        note: one line for reports.
        paper: the paper's figures, ``{"params_m": ..., "gflops": ...}`` (for reference).
    """

    name: str
    base: str
    keep: Mapping[str, KeepValue]
    transform: Optional[Callable[[nn.Module], nn.Module]] = None
    rounding: Literal["floor", "round"] = "floor"
    note: str = ""
    paper: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise ValueError(f"Preset {self.name}: unknown base {self.base!r}; one of {sorted(BASES)}")
        if self.rounding not in ("floor", "round"):
            raise ValueError(f"Preset {self.name}: rounding must be 'floor' or 'round', got {self.rounding!r}")
        if not self.keep:
            raise ValueError(f"Preset {self.name}: keep is empty")
        for fqn, v in self.keep.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"Preset {self.name}: keep[{fqn!r}] must be a float fraction or an int count")
            if isinstance(v, float) and not 0.0 < v <= 1.0:
                raise ValueError(f"Preset {self.name}: keep[{fqn!r}]={v} is not a fraction in (0, 1]")
            if isinstance(v, int) and v < 1:
                raise ValueError(f"Preset {self.name}: keep[{fqn!r}]={v} must keep at least one channel")
        object.__setattr__(self, "keep", MappingProxyType(dict(self.keep)))
        object.__setattr__(self, "paper", MappingProxyType(dict(self.paper)))

    @property
    def producers(self) -> list[str]:
        """The producer fqns this preset prunes (pass as ``find_units(..., units=...)``)."""
        return list(self.keep)

    def build_base(self, num_classes: int = 1000, **kwargs) -> nn.Module:
        """The unpruned base model, randomly initialised (nothing downloaded)."""
        return BASES[self.base](num_classes=num_classes, **kwargs)

    def n_keep(self, channels: int, value: KeepValue) -> int:
        """Channels kept of ``channels`` for a fraction or a count (see module doc for the rule)."""
        if isinstance(value, int):
            if value > channels:
                raise ValueError(f"Preset {self.name}: asked to keep {value} of {channels} channels")
            return value
        x = channels * value
        n = math.floor(x + 1e-9) if self.rounding == "floor" else int(round(x))  # 1e-9: 0.7*10 = 6.999...
        return max(1, min(channels, n))

    def keep_for(self, plan: UnitPlan) -> dict[str, int]:
        """``{producer fqn: channels to keep}`` for every producer of the preset.

        Raises ``ValueError`` naming the producer when the preset names a producer that
        is not a unit of ``plan`` (never skips silently).
        """
        by = {u.producer: u for u in plan.units}
        missing = []
        for fqn in self.keep:
            if fqn not in by:
                why = next((r.reason for r in plan.refused if r.producer == fqn), "not a unit of this plan")
                missing.append(f"`{fqn}`: {why}")
        if missing:
            raise ValueError(f"preset {self.name}: producer(s) not prunable in this model:\n  " + "\n  ".join(missing))
        return {u.producer: self.n_keep(u.channels, self.keep[u.producer]) for u in plan.units if u.producer in self.keep}


# --------------------------------------------------------------------------- the presets
# torchvision VGG-16 conv indices in `features`: conv1_1 .. conv5_3
_VGG16_CONVS = ("features.0", "features.2", "features.5", "features.7", "features.10", "features.12",
                "features.14", "features.17", "features.19", "features.21", "features.24", "features.26",
                "features.28")


def _resnet50_inner(frac: float) -> dict[str, float]:
    out = {}
    for li, blocks in enumerate((3, 4, 6, 3), start=1):
        for b in range(blocks):
            out[f"layer{li}.{b}.conv1"] = frac
            out[f"layer{li}.{b}.conv2"] = frac
    return out


def _gap_transform(model: nn.Module) -> nn.Module:
    """VGG head -> GAP + one new Linear(last conv width -> classes). The head must be trained."""
    return gap_head_(model)


_GAP_NOTE = ("fc6-fc8 replaced by global average pooling + a new Linear head; the head is freshly "
             "initialised and must be fine-tuned")

PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in (
    Preset("vgg16-thinet-conv", "vgg16", {f: 0.5 for f in _VGG16_CONVS[:10]},
           note="conv1_1-conv4_3 keep 50%; conv5 and the FC layers untouched",
           paper={"params_m": 131.44, "gflops": 9.58}),
    Preset("vgg16-thinet-gap", "vgg16", {f: 0.5 for f in _VGG16_CONVS[:10]}, transform=_gap_transform,
           note="ThiNet-Conv + " + _GAP_NOTE, paper={"params_m": 8.32, "gflops": 9.34}),
    Preset("vgg16-thinet-tiny", "vgg16", dict(zip(_VGG16_CONVS, THINET_TINY_WIDTHS)), transform=_gap_transform,
           note="conv widths " + ",".join(map(str, THINET_TINY_WIDTHS)) + "; " + _GAP_NOTE,
           paper={"params_m": 1.32, "gflops": 2.01}),
    Preset("resnet50-thinet-70", "resnet50_original", _resnet50_inner(0.7),
           note="conv1/conv2 of every bottleneck keep 70%; conv3 and downsample untouched (residual-coupled)",
           paper={"params_m": 16.94, "gflops": 4.88}),
    Preset("resnet50-thinet-50", "resnet50_original", _resnet50_inner(0.5),
           note="conv1/conv2 of every bottleneck keep 50%; conv3 and downsample untouched (residual-coupled)",
           paper={"params_m": 12.38, "gflops": 3.41}),
    Preset("resnet50-thinet-30", "resnet50_original", _resnet50_inner(0.3),
           note="conv1/conv2 of every bottleneck keep 30%; conv3 and downsample untouched (residual-coupled)",
           paper={"params_m": 8.66, "gflops": 2.20}),
)})


def get_preset(name: Union[str, Preset]) -> Preset:
    """Look a preset up by name (a :class:`Preset` is returned as is)."""
    if isinstance(name, Preset):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; one of: {', '.join(PRESETS)}") from None


_BASE_NOTES = {
    "resnet50_original": "ResNet-50 v1 as the paper's Caffe model (stride 2 in the first 1x1 conv of a stage); "
                         "torchvision's resnet50 is v1.5 (stride in the 3x3 conv) and lands on other FLOPs. "
                         "Build thinet_fast.models.resnet50_original() and load your weights into it "
                         "(the keys and shapes are torchvision's)",
    "resnet50": "torchvision's resnet50",
    "vgg16": "torchvision's vgg16 without BatchNorm (features.0 .. features.28, classifier 25088-4096-4096-N)",
}


def _layout(m: nn.Module):
    if isinstance(m, nn.Conv2d):
        g = f", groups {m.groups}" if m.groups > 1 else ""
        return f"Conv2d({m.in_channels}->{m.out_channels}, kernel {m.kernel_size[0]}, stride {m.stride[0]}{g})"
    if isinstance(m, nn.Linear):
        return f"Linear({m.in_features}->{m.out_features})"
    return None


def check_base(preset: Union[str, Preset], model: nn.Module) -> None:
    """Refuse a model that is not the preset's base architecture, before any work, with
    what the preset needs and the first differences (the last layer's width, the class
    count, may differ)."""
    preset = get_preset(preset)
    with torch.device("meta"):
        base = preset.build_base()
    mine = dict(model.named_modules())
    layers = [(n, m) for n, m in base.named_modules() if _layout(m) is not None]
    diffs = []
    for i, (name, ref) in enumerate(layers):
        got = mine.get(name)
        want = _layout(ref)
        have = None if got is None else _layout(got)
        if i == len(layers) - 1 and have is not None and want.startswith("Linear") and have.startswith("Linear"):
            want, have = want.split("->")[0], have.split("->")[0]  # any number of classes
        if have != want:
            diffs.append(f"`{name}` should be {want}, is " + ("missing" if got is None else have or type(got).__name__))
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise ValueError(f"preset {preset.name} needs {_BASE_NOTES.get(preset.base, preset.base)}; this "
                         f"{type(model).__name__} differs: " + "; ".join(diffs[:3]) + more)


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def apply_preset_shapes(model: nn.Module, preset: Union[str, Preset], example_inputs=None, *,
                        inplace: bool = False) -> nn.Module:
    """The preset's pruned architecture by shape only: every producer keeps its *first*
    n channels (no statistics), then the transform runs.

    Works on the meta device (instant, no memory). ``example_inputs`` defaults to one
    3x224x224 image. Returns a copy unless ``inplace=True``.
    """
    preset = get_preset(preset)
    if example_inputs is None:
        example_inputs = torch.zeros(1, 3, 224, 224, device=_device_of(model))
    plan = find_units(model, example_inputs, units=preset.producers)
    n_keep = preset.keep_for(plan)
    target = model if inplace else copy.deepcopy(model)
    for u in plan.units:
        prune_unit_(target, u, torch.arange(n_keep[u.producer]))
    if preset.transform is not None:
        target = preset.transform(target)
    return target


def preset_architecture(preset: Union[str, Preset], num_classes: int = 1000,
                        device: Union[str, torch.device] = "meta") -> nn.Module:
    """Build the base and apply :func:`apply_preset_shapes` (on the meta device by default)."""
    preset = get_preset(preset)
    with torch.device(device):
        base = preset.build_base(num_classes=num_classes)
    return apply_preset_shapes(base, preset, torch.zeros(1, 3, 224, 224, device=device), inplace=True)

"""Parameter, FLOP and size counts, counted the way the ThiNet paper counts them.

- **Params**: every parameter element, shared tensors once. The paper leaves out the
  biases of conv/linear layers (``count_params(m, biases=False)``): with that, every
  parameter figure it prints is reproduced (VGG-16 138.34M; torchvision's 138.36M
  includes the 13,416 biases).
- **FLOPs**: ``Conv2d`` and ``Linear`` only, 2 FLOPs per multiply-add (so FLOPs = 2 x
  MACs), biases, BatchNorm, activations and pooling not counted. This is the convention
  that gives VGG-16 = 30.94 GFLOPs and ResNet-50 (torchvision, v1.5) = 8.18 GFLOPs at
  224x224. FLOPs are for the whole ``example_input`` you pass: use batch 1 for
  per-image figures. An attention module (``nn.MultiheadAttention``, Swin's and
  MaxViT's, and their head-pruned twins) counts as one layer: its projections and
  attention products, however it computes them (functional projections included).
- **Size**: ``model_size_mb`` counts parameter (and, by default, buffer) bytes divided by
  2**20 (MiB). The paper's "527 MB" for VGG-16 is 138.36M float32 parameters x 4 bytes /
  2**20 = 527.8.

The forward that the FLOP count needs runs on fake tensors (meta tensors when the model
lives on the meta device): no real compute, no change to the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .attention import ATTENTION_TYPES
from .tables import format_table
from .tracing import shape_forward

__all__ = ["count_params", "count_flops", "model_size_mb", "profile", "LayerCount", "Profile"]

ExampleInputs = Union[torch.Tensor, Sequence[torch.Tensor]]


def count_params(model: nn.Module, *, trainable_only: bool = False, biases: bool = True) -> int:
    """Number of parameter elements (shared parameters counted once).

    ``biases=False`` leaves out the biases of Conv/Linear layers: that is how the ThiNet
    paper counts (VGG-16 138.34M instead of 138.36M, ThiNet-Conv 131.44M, ResNet-50
    ThiNet-70 16.94M); BatchNorm's affine parameters are still counted.
    """
    skip = set()
    if not biases:
        skip = {id(m.bias) for m in model.modules()
                if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and m.bias is not None}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or id(p) in skip or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def model_size_mb(model: nn.Module, *, buffers: bool = True) -> float:
    """Bytes of parameters (plus buffers, by default) / 2**20, each tensor counted once."""
    seen: set[int] = set()
    total = 0
    tensors = list(model.parameters()) + (list(model.buffers()) if buffers else [])
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total / 2**20


@dataclass(frozen=True)
class LayerCount:
    """One Conv2d/Linear call: its fqn, shapes, own parameters and FLOPs (2 x MACs)."""

    name: str
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    params: int
    flops: int


@dataclass
class Profile:
    """Per-layer counts plus totals; ``str()`` gives a table."""

    layers: list[LayerCount] = field(default_factory=list)
    params: int = 0
    size_mb: float = 0.0

    @property
    def flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    def table(self) -> str:
        head = ("layer", "kind", "in", "out", "params", "MFLOPs")
        rows = [(lc.name, lc.kind, "x".join(map(str, lc.in_shape)), "x".join(map(str, lc.out_shape)),
                 f"{lc.params:,}", f"{lc.flops / 1e6:.2f}") for lc in self.layers]
        out = [format_table([head, *rows])]
        out.append(f"total: {self.params / 1e6:.3f}M params, {self.flops / 1e9:.3f} GFLOPs "
                   f"(2 x MACs, conv+linear), {self.size_mb:.1f} MB (2**20 bytes)")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _as_tuple(x: ExampleInputs) -> tuple:
    if isinstance(x, torch.Tensor):
        return (x,)
    return tuple(x)


def profile(model: nn.Module, example_input: ExampleInputs) -> Profile:
    """Run one shape-only forward and return the counts: FLOPs from torch's
    ``FlopCounterMode`` (2 x MACs), attributed to each Conv/Linear and attention module
    (the paper's convention: other ops are not counted); shapes and parameters from
    hooks on those modules."""
    records: list[tuple] = []
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def hook(m, args, out):
        inp = args[0] if args else None
        out = out[0] if isinstance(out, tuple) else out
        records.append((names.get(m, type(m).__name__), type(m).__name__,
                        tuple(inp.shape) if isinstance(inp, torch.Tensor) else (), tuple(out.shape),
                        sum(p.numel() for p in m.parameters(recurse=isinstance(m, ATTENTION_TYPES)))))

    # an attention module's own Linears are part of its count, not layers of their own
    inside = {id(c) for m in model.modules() if isinstance(m, ATTENTION_TYPES) for c in m.modules() if c is not m}
    for m in model.modules():
        if isinstance(m, ATTENTION_TYPES) or (isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
                                               and id(m) not in inside):
            handles.append(m.register_forward_hook(hook))
    inputs = _as_tuple(example_input)
    counter = {}
    try:
        # shapes only: the parameters and BatchNorm running stats stay untouched
        def run(*xs):
            records.clear()  # a failed meta attempt may have recorded some layers
            counter["mode"] = FlopCounterMode(display=False, depth=None)
            with counter["mode"]:
                return model(*xs)
        shape_forward(model, run, inputs)
    finally:
        for h in handles:  # never leave hooks behind, even on error
            h.remove()
    counts = counter["mode"].get_flop_counts()
    root = type(model).__name__
    calls: dict[str, int] = {}
    for name, *_ in records:
        calls[name] = calls.get(name, 0) + 1
    layers = []
    for name, kind, in_shape, out_shape, params in records:
        key = f"{root}.{name}" if name else root
        flops = int(sum(counts.get(key, {}).values())) // calls[name]  # a module called twice: its share
        layers.append(LayerCount(name, kind, in_shape, out_shape, params, flops))
    return Profile(layers, count_params(model), model_size_mb(model))


def count_flops(model: nn.Module, example_input: ExampleInputs) -> int:
    """FLOPs (2 x multiply-adds of Conv/Linear layers) of one forward on ``example_input``."""
    return profile(model, example_input).flops

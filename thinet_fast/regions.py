"""The parts of a model that Torch-Pruning's dependency graph is built on.

A *region* is a submodule traced as a whole: the model itself when torch.fx can trace
it, else its largest fx-traceable subtrees (a detection model's backbone body, its box
head, the convs of its RPN head). Code fx cannot follow (data-dependent control flow,
loops over feature lists, box sampling) stays outside every region, so Torch-Pruning
never walks it: that is where its autograd tracing explodes or mis-maps channels.

Each region is traced inside :class:`Region`, which puts an *exit* on every tensor the
region returns. A group that reaches an exit feeds code outside the region (or the
model's output), so its channels are kept: they are refused with that reason. An
*entry* on every input tensor does the same for channels that come into the region
through a channel-wise path (a depthwise conv on a feature map made outside). This
module knows modules; it runs one forward to capture each region's inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from .modes import hooked_forward, preserved_modes
from .tracing import UntraceableModelError, trace

__all__ = ["Region", "Entry", "Exit", "TokenExit", "find_regions", "output_widths"]


class Exit(nn.PReLU):
    """Marks the channels (dim 1) of a region's output: they leave the region."""


class TokenExit(nn.Linear):
    """Marks the last dim of a 3-D region output (tokens): it leaves the region."""


class Entry(nn.PReLU):
    """Marks the channels (dim 1) of a region's input: a channel-wise path (a depthwise
    conv) would otherwise cut what a producer outside the region writes."""


def _mapped(x: Any, fn) -> Any:
    """``x`` with every tensor replaced by ``fn(t)``, in :func:`_tensors` order."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return type(x)((k, _mapped(v, fn)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        items = [_mapped(v, fn) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    return x


def _tensors(out: Any) -> Iterator[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict):
        for v in out.values():
            yield from _tensors(v)
    elif isinstance(out, (list, tuple)):
        for v in out:
            yield from _tensors(v)


def _marked(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dim() >= 2 and t.shape[1] > 0


class Region(nn.Module):
    """``body`` with an exit on each floating-point output of the traced call."""

    def __init__(self, body: nn.Module, outputs: list[torch.Tensor], inputs: list[torch.Tensor] = ()):
        super().__init__()
        self.body = body
        # on the tensors' device: a shape-only (meta) model gets meta markers
        self.entries = nn.ModuleList(Entry(t.shape[1], device=t.device) for t in inputs if _marked(t))
        self.exits = nn.ModuleList()
        for t in outputs:
            if _marked(t):
                self.exits.append(Exit(t.shape[1], device=t.device))
                if t.dim() == 3:
                    self.exits.append(TokenExit(t.shape[-1], 1, bias=False, device=t.device))

    def forward(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        entries = iter(self.entries)
        enter = lambda t: next(entries)(t) if _marked(t) else t  # noqa: E731
        args, kwargs = _mapped(args, enter), _mapped(kwargs, enter)
        exits, marked = iter(self.exits), []
        for t in _tensors(self.body(*args, **kwargs)):
            if _marked(t):
                marked.append(next(exits)(t))
                if t.dim() == 3:
                    marked.append(next(exits)(t))
        return marked


@dataclass
class Scope:
    """A region: its fqn in the model, the module, and the arguments of its first call."""

    name: str
    module: nn.Module
    args: tuple
    kwargs: dict
    outputs: list[torch.Tensor]

    def wrapped(self) -> Region:
        return Region(self.module, self.outputs, list(_tensors((self.args, self.kwargs))))


def _traceable(module: nn.Module) -> bool:
    try:
        trace(module, ())
    except UntraceableModelError:
        return False
    except Exception:  # fx raises many kinds on code it cannot follow
        return False
    return True


def _prunable(module: nn.Module) -> bool:
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules()) >= 2


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model when fx traces it, else the largest traceable subtrees (depth first)."""
    found = []

    def visit(prefix: str, m: nn.Module):
        if not _prunable(m):
            return
        if not isinstance(m, (nn.ModuleList, nn.ModuleDict)) and _traceable(m):
            found.append((prefix.rstrip("."), m))
            return
        for n, child in m.named_children():
            visit(f"{prefix}{n}.", child)

    visit("", model)
    return found


def _detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (list, tuple)):
        return type(x)(_detach(v) for v in x) if not hasattr(x, "_fields") else type(x)(*(_detach(v) for v in x))
    if isinstance(x, dict):
        return type(x)((k, _detach(v)) for k, v in x.items())
    return x


@torch.no_grad()
def find_regions(model: nn.Module, example_inputs) -> list[Scope]:
    """The regions of ``model``, each with the inputs and outputs of its first call in
    one forward of ``example_inputs``. Regions that the forward never calls are left out."""
    candidates = _candidates(model)
    calls: dict[int, tuple] = {}
    handles = []
    for _, m in candidates:
        def hook(mod, args, kwargs, out, _calls=calls):
            _calls.setdefault(id(mod), (_detach(args), _detach(kwargs), [t.detach() for t in _tensors(out)]))
        handles.append(m.register_forward_hook(hook, with_kwargs=True))
    hooked_forward(model, example_inputs, handles)
    return [Scope(name, m, *calls[id(m)]) for name, m in candidates if id(m) in calls]


@torch.no_grad()
def output_widths(model: nn.Module, example_inputs) -> list[tuple[int, ...]]:
    """The shape past the batch dim of each floating-point output of one forward: what
    pruning must not change."""
    with preserved_modes(model, train=False):
        out = model(*example_inputs) if isinstance(example_inputs, tuple) else model(example_inputs)
    return [tuple(t.shape[1:]) for t in _tensors(out) if _marked(t)]


def check_widths(model: nn.Module, example_inputs, widths, what: str, hint: str) -> None:
    """Never hand back a model that a cut broke: it must still run, with outputs as wide
    as ``widths`` (from :func:`output_widths` before the cut). ``what`` was cut; ``hint``
    ends the error: the likely cause and the fix."""
    try:
        now = output_widths(model, example_inputs)
    except Exception as exc:  # noqa: BLE001 - reported below
        now = f"{type(exc).__name__}: {exc}"[:300]
    if now != widths:
        raise RuntimeError(f"cutting {what} changed the model's forward ({now}; output widths were {widths}){hint}")

"""Deployable outputs: ONNX that has been run before it is trusted.

A pruned model is an ordinary ``nn.Module`` (smaller ``Conv2d``/``Linear``/``BatchNorm``
layers, nothing custom), so ``torch.onnx.export`` and ``torch.export.export`` take it as
they are. :func:`export_onnx` adds the step that is easy to skip: it runs the exported
graph in onnxruntime on the example (and, with a dynamic batch, on a second batch size)
and compares it with PyTorch *before* writing the file, the way llm.c checks its kernels
against a reference before using them. A graph that does not match is never written.

    check = thinet_fast.export_onnx(result.model, torch.randn(1, 3, 224, 224), "pruned.onnx")
    print(check)    # OnnxExport(path='pruned.onnx', max_abs_error=6.6e-07, batch_sizes=(1, 2), ...)

Needs ``onnx``, ``onnxscript`` (torch's exporter) and ``onnxruntime`` (the ``deploy``
extra); nothing here is imported until it is called.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import torch
from torch import nn

from .files import atomic_write, check_writable

__all__ = ["export_onnx", "OnnxExport", "OnnxMismatch"]

_PROTO_LIMIT = 2 ** 31 - 1  # protobuf's limit on one serialized ONNX file


class OnnxMismatch(RuntimeError):
    """onnxruntime's outputs differ from PyTorch's beyond the tolerance."""


@dataclasses.dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote and how closely onnxruntime matched PyTorch."""
    path: str
    max_abs_error: float  # over every output element and every checked batch size
    batch_sizes: tuple[int, ...]  # the batch sizes run in onnxruntime
    opset: int
    size_bytes: int


def _tensors(out) -> list[torch.Tensor]:
    """The model's output tensors in the order the exporter flattens them."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    raise TypeError(f"export_onnx: the model returned a {type(out).__name__}; only tensors, and tuples, "
                    "lists and dicts of them, can be compared")


def _grow(args: tuple, by: int) -> tuple:
    """``args`` with ``by`` more rows (copies of the first) on every tensor's batch dim."""
    return tuple(torch.cat([a, a[:1].expand(by, *a.shape[1:])]) if isinstance(a, torch.Tensor) and a.dim() else a
                 for a in args)


def _compare(session, args: tuple, expected: list[torch.Tensor], batch: int, atol: float, rtol: float) -> float:
    names = [i.name for i in session.get_inputs()]
    arrays = [a.detach().cpu().numpy() for a in args if isinstance(a, torch.Tensor)]
    if len(names) != len(arrays):
        raise ValueError(f"export_onnx: the ONNX graph takes {len(names)} inputs ({names}), the example has "
                         f"{len(arrays)} tensors")
    got = session.run(None, dict(zip(names, arrays)))
    if len(got) != len(expected):
        raise OnnxMismatch(f"onnxruntime gave {len(got)} outputs, PyTorch {len(expected)}")
    worst = 0.0
    for i, (g, e) in enumerate(zip(got, expected)):
        e = e.detach().cpu()
        g = torch.from_numpy(g).to(e.dtype)
        if g.shape != e.shape:
            raise OnnxMismatch(f"output {i}: onnxruntime's shape {tuple(g.shape)}, PyTorch's {tuple(e.shape)}")
        if not e.is_floating_point():
            bad = int((g != e).sum())
            if bad:
                raise OnnxMismatch(f"output {i}: {bad} of {e.numel()} integer values differ")
            continue
        err = (g.double() - e.double()).abs()
        this = float(err.max()) if err.numel() else 0.0
        worst = max(worst, this)
        if bool((err > atol + rtol * e.double().abs()).any()) or bool(torch.isnan(g).ne(torch.isnan(e)).any()):
            raise OnnxMismatch(f"output {i} at batch size {batch}: onnxruntime differs from PyTorch by up to "
                               f"{this:.3g} (tolerance atol={atol} + rtol={rtol}·|output|); the file was not written")
    return worst


def export_onnx(model: nn.Module, example, path, *, dynamic_batch: bool = True, opset: Optional[int] = None,
                atol: float = 1e-4, rtol: float = 1e-4, providers: Optional[Sequence[str]] = None,
                check: bool = True) -> OnnxExport:
    """Export ``model`` to ONNX at ``path`` with torch's dynamo exporter, run it in
    onnxruntime and write it only if its outputs match PyTorch's.

    Args:
        model: the (pruned) model; exported and compared in eval mode (the caller's
            train/eval flags are restored afterwards).
        example: an input tensor or a tuple of positional inputs (float tensors,
            batch first).
        path: the ``.onnx`` file: checked for writability first, written atomically
            and as one file (weights inside; models over 2 GB are refused: use
            ``torch.onnx.export(..., external_data=True)`` for those).
        dynamic_batch: make dimension 0 of every input dynamic (named ``batch``); the
            check then also runs a second batch size.
        opset: ONNX opset (torch's default when None).
        atol, rtol: the check passes when ``|onnx - torch| <= atol + rtol * |torch|``
            for every output element.
        providers: onnxruntime execution providers for the check (CPU by default).
        check: run the comparison (False: export and write unchecked).

    Returns:
        :class:`OnnxExport` with the path, the largest absolute error seen and the
        batch sizes checked. Raises :class:`OnnxMismatch` (nothing written) when the
        outputs differ.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx: expected an nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    check_writable(path, "export_onnx: path")
    args = example if isinstance(example, tuple) else (example,)
    if not any(isinstance(a, torch.Tensor) for a in args):
        raise TypeError("export_onnx: example must be a tensor or a tuple holding tensors")
    n_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    if n_bytes > 0.9 * _PROTO_LIMIT:
        raise ValueError(f"export_onnx: the model has {n_bytes / 2 ** 30:.1f} GiB of weights, more than one ONNX "
                         "file holds; use torch.onnx.export(..., external_data=True)")
    ort = _onnxruntime() if check else None  # before the export: fail in a second, not after a minute
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            dynamic = None
            if dynamic_batch:
                batch = torch.export.Dim("batch")
                dynamic = tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() else None for a in args)
            program = torch.onnx.export(model, args, None, dynamo=True, opset_version=opset,
                                        dynamic_shapes=dynamic, verbose=False)
            proto = program.model_proto
            data = proto.SerializeToString()
            opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)
            worst, sizes = float("nan"), ()
            if check:
                session = ort.InferenceSession(data, providers=list(providers or ["CPUExecutionProvider"]))
                worst, sizes = _check(model, args, session, dynamic_batch, atol, rtol)
    finally:
        for m, flag in flags:
            m.training = flag
    atomic_write(path, lambda f: f.write(data))  # exactly the bytes that were run
    return OnnxExport(path=path, max_abs_error=worst, batch_sizes=sizes, opset=int(opset_used), size_bytes=len(data))


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError("export_onnx checks the graph in onnxruntime: pip install onnxruntime "
                          "(or thinet-fast[deploy]); check=False skips the check") from exc
    return onnxruntime


def _check(model: nn.Module, args: tuple, session, dynamic_batch: bool, atol: float,
           rtol: float) -> tuple[float, tuple[int, ...]]:
    """Run the graph on ``args`` (and one more row, with a dynamic batch) and compare."""
    runs = [args] + ([_grow(args, 1)] if dynamic_batch else [])
    worst, sizes = 0.0, []
    for run_args in runs:
        first = next(a for a in run_args if isinstance(a, torch.Tensor))
        sizes.append(int(first.shape[0]) if first.dim() else 1)
        worst = max(worst, _compare(session, run_args, _tensors(model(*run_args)), sizes[-1], atol, rtol))
    return worst, tuple(sizes)


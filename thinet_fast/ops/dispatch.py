"""Backend discovery and choice.

Every fast path is optional: probing never raises, and ``backends()`` says why a
path is missing. An explicitly requested backend that is missing raises
``BackendUnavailable`` with the way to get it.
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass

import torch

BACKEND_NAMES = ("torch", "cpu", "cuda", "cupy", "triton")

_HOW_TO_GET = {
    "cpu": "build the extension: `pip install .` from a source checkout (needs a C++17 compiler and CMake).",
    "cuda": "build the extension where nvcc is on PATH (set THINET_FAST_CUDA_ARCHS for your GPU) and run on a CUDA device.",
    "cupy": "`pip install thinet-fast[cupy]` (cupy-cuda12x or -13x) and run on a CUDA device.",
    "triton": "install triton (it ships with CUDA builds of torch) and run on a CUDA device, "
              "or set TRITON_INTERPRET=1 before importing thinet_fast to run the kernels on the CPU (slow, for tests).",
}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here."""


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str

    def __bool__(self) -> bool:  # lets `if backends()["cpu"]:` read naturally
        return self.available


def _probe_cext():
    try:
        return importlib.import_module("thinet_fast._C"), ""
    except Exception as exc:  # ImportError, or a broken build
        return None, f"thinet_fast._C not importable ({type(exc).__name__}: {exc})"


@functools.lru_cache(maxsize=None)
def _probe(name: str) -> BackendInfo:
    if name == "torch":
        return BackendInfo(name, True, f"torch {torch.__version__}")
    if name == "cpu":
        mod, why = _probe_cext()
        if mod is None:
            return BackendInfo(name, False, why)
        return BackendInfo(name, True, f"_C host path, OpenMP threads={mod.omp_max_threads()}")
    if name == "cuda":
        mod, why = _probe_cext()
        if mod is None:
            return BackendInfo(name, False, why)
        if not mod.built_with_cuda():
            return BackendInfo(name, False, "_C was built without nvcc (CPU part only)")
        if not torch.cuda.is_available():
            return BackendInfo(name, False, f"_C has CUDA (archs {mod.cuda_archs()}) but no CUDA device is visible")
        return BackendInfo(name, True, f"_C CUDA kernels, archs {mod.cuda_archs()}")
    if name == "cupy":
        try:
            import cupy  # noqa: F401
        except Exception as exc:
            return BackendInfo(name, False, f"cupy not importable ({type(exc).__name__})")
        try:
            ok = bool(cupy.cuda.is_available())
        except Exception as exc:  # driver missing
            return BackendInfo(name, False, f"cupy has no CUDA device ({exc})")
        if not ok:
            return BackendInfo(name, False, "cupy imports but no CUDA device is visible")
        return BackendInfo(name, True, f"cupy {cupy.__version__}, NVRTC")
    if name == "triton":
        try:
            import triton
        except Exception as exc:
            return BackendInfo(name, False, f"triton not importable ({type(exc).__name__})")
        if torch.cuda.is_available():
            return BackendInfo(name, True, f"triton {triton.__version__} on CUDA")
        if triton_interpreted():
            return BackendInfo(name, True, f"triton {triton.__version__}, TRITON_INTERPRET=1 (CPU, slow)")
        return BackendInfo(name, False, "triton imports but there is no GPU and TRITON_INTERPRET is not 1")
    raise ValueError(f"unknown backend {name!r}; choose from {BACKEND_NAMES} or 'auto'")


def clear_caches() -> None:
    """Forget every probe and decision (after changing TRITON_INTERPRET, say)."""
    _probe.cache_clear()
    _resolve.cache_clear()


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backends() -> dict[str, BackendInfo]:
    """What each backend can do here, and why not when it cannot."""
    return {name: _probe(name) for name in BACKEND_NAMES}


def cext():
    """The compiled extension; raises BackendUnavailable if it is missing."""
    mod, why = _probe_cext()
    if mod is None:
        raise BackendUnavailable(f"backend 'cpu' is unavailable: {why}. To get it: {_HOW_TO_GET['cpu']}")
    return mod


# every op with more than one implementation: its backends in "auto" order, and the
# accumulation dtypes each backend takes (absent: any)
OPS: dict[str, tuple[tuple[str, ...], dict[str, tuple[torch.dtype, ...]]]] = {
    "greedy_remove": (("cuda", "cupy", "triton", "cpu", "torch"), {}),
    "greedy_keep_ls": (("cuda", "cupy", "cpu", "torch"), {}),
    "statistics": (("triton", "torch"), {"triton": (torch.float32,)}),   # sampled/full accumulation
    "direct_gram": (("torch",), {}),                                     # direct-mode accumulation
    "sampled_gram": (("triton", "torch"), {"triton": (torch.float32,)}),
    "patch_moments": (("triton", "torch"), {"triton": (torch.float32,)}),
    "gram_from_cov": (("triton", "torch"), {"triton": (torch.float32,)}),
}


@dataclass(frozen=True)
class Resolution:
    """The backend that runs ``op``, and why it is not the preference (empty if it is)."""

    op: str
    backend: str
    reason: str = ""


@functools.lru_cache(maxsize=None)
def _resolve(op: str, preference: str, device: torch.device, dtype) -> Resolution:
    supported, dtypes = OPS[op]
    reason = ""
    if preference != "auto" and preference not in supported:
        reason = f"{op} has no {preference!r} implementation (it has {supported}); chose automatically"
        preference = "auto"
    if preference != "auto" and dtype is not None and dtype not in dtypes.get(preference, (dtype,)):
        reason = f"{op} on {preference!r} accumulates in {dtypes[preference]}, not {dtype}; ran on torch"
        return Resolution(op, "torch", reason)
    if preference == "auto":
        usable = tuple(b for b in supported if dtype is None or dtype in dtypes.get(b, (dtype,)))
        return Resolution(op, choose("auto", device, usable, op), reason)
    return Resolution(op, choose(preference, device, supported, op), reason)


def resolve(op: str, preference: str, device, dtype: torch.dtype | None = None, *,
            strict: bool = False) -> Resolution:
    """The one place a backend is chosen for ``op`` (a key of :data:`OPS`).

    ``preference`` is "auto" or a backend name, usually the run's ``backend=``. A
    preference the op lacks, or a dtype its kernel does not take, falls back here, with
    the reason in the result; an explicit preference that is missing on this machine
    raises :class:`BackendUnavailable`. ``strict``: an explicit preference that would
    fall back raises instead (for an op called directly with ``backend=``). One decision
    per (op, preference, device, dtype) per process (:func:`clear_caches` forgets them)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops with backends: {sorted(OPS)}")
    if preference != "auto" and preference not in BACKEND_NAMES:
        raise ValueError(f"backend={preference!r} is not one of {BACKEND_NAMES + ('auto',)}")
    out = _resolve(op, preference, torch.device(device), dtype)
    if strict and out.reason and preference != "auto":
        raise ValueError(f"backend={preference!r}: {out.reason.rpartition(';')[0]}; use backend='auto' or 'torch'")
    return out


def choose(backend: str, device: torch.device | str, supported: tuple[str, ...], op: str) -> str:
    """Resolve ``backend`` for ``op`` on tensors living on ``device``.

    ``supported`` lists the backends implementing ``op`` in order of preference for
    "auto". Tensors on the CPU never pick a GPU path automatically, and vice versa.
    """
    device = torch.device(device)
    if backend == "auto":
        on_gpu = device.type == "cuda"
        for name in supported:
            if name == "torch":
                return name
            if on_gpu and name in ("cpu",):
                continue
            if not on_gpu and name in ("cuda", "cupy", "triton"):
                continue
            if _probe(name).available:
                return name
        return "torch"
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend={backend!r} is not one of {BACKEND_NAMES + ('auto',)}")
    if backend not in supported:
        raise ValueError(f"op {op!r} has no {backend!r} implementation; it supports {supported}")
    info = _probe(backend)
    if not info.available:
        raise BackendUnavailable(
            f"backend {backend!r} requested for {op!r} is unavailable: {info.reason}. To get it: {_HOW_TO_GET[backend]}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' runs on host tensors but {op!r} got tensors on {device}; move them with .cpu()")
    if backend == "triton" and device.type != "cuda" and not triton_interpreted():
        raise ValueError(f"backend 'triton' needs CUDA tensors but {op!r} got tensors on {device} "
                         "(or set TRITON_INTERPRET=1 before importing thinet_fast to run it on the CPU)")
    if backend in ("cuda", "cupy") and device.type != "cuda":
        raise ValueError(f"backend {backend!r} needs CUDA tensors but {op!r} got tensors on {device}")
    return backend

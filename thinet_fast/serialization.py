"""Save and load pruned models without rebuilding their shapes by hand, and without
running code from the file.

What a file holds (the *payload*; format tag ``"thinet_fast.model"``)::

    {
      "format": "thinet_fast.model", "version": 3, "torch": "<torch version>",
      "architecture": {...},            # the module tree as plain data (thinet_fast.architecture)
      "tensors": {...},                 # every parameter and buffer, for the architecture
      "state_dict": {...}, "state_metadata": {...},  # for load(base=...)
      "extra_buffers": {...},           # non-persistent buffers (not in state_dict)
      "spec": {fqn: {"type": ..., args}},  # shapes of Conv/Linear/BN/PReLU/adaptive pools
      "training": {fqn: bool},
      "modules": {fqn: "module.Class"},   # the saved module tree
      "skeleton": None | b"...",        # only with save(skeleton=True): the pickled tree
      "meta": {...},                    # caller's metadata: plain values and tensors
    }

Two containers:

- version 3, the default (``save(format="safetensors")``): one safetensors file. The
  tensors are safetensors tensors, the model's parameters and buffers under their own
  names (``safetensors.torch.load_file(path)`` gives them as a state dict); the rest of
  the payload is JSON in the same file's header metadata (:mod:`thinet_fast.safefile`).
  One file, not weights plus a sibling JSON: a save is one atomic replace, a model is
  one path to pass around, and the two halves cannot get out of step. Each distinct
  tensor is stored once (tied parameters are tied again on load); views of shared
  memory are stored as copies, non-contiguous tensors contiguously.
- version 2 (``save(format="torch")``, and files written before version 3): a
  ``torch.save`` of the payload, read with ``torch.load(weights_only=True)``.

:func:`load` tells them apart by their first bytes. Three ways back:

- ``load(path)``: rebuild the module tree from ``architecture`` (classes looked up by
  name, imported only from trusted packages; no constructor or other code from the
  file runs) and give it the saved tensors.
- ``load(path, base=builder())``: start from a model of the same architecture (e.g.
  ``torchvision.models.vgg16()``), rebuild every module whose shape or type differs from
  ``spec`` (Conv2d, Linear, BatchNorm1d/2d, PReLU, adaptive pools, so a ThiNet-GAP head
  is recreated too), drop children the saved model does not have, refuse any other
  difference in the module tree (``modules``: fqn -> class), then load the state dict.
- ``load(path, unsafe_unpickle=True)``: unpickle ``skeleton`` (runs pickled Python: only
  for files you trust; version-1 files and models that have no plain description).

Files are written atomically (``<path>.tmp``, then ``os.replace``). A damaged file (a
bad safetensors header, metadata that does not decode) is refused with a ``ValueError``
naming the path.
"""
from __future__ import annotations

import copy
import io
import os
import warnings
from collections import OrderedDict
from typing import Any, BinaryIO, Optional, Union

import torch
import torch.nn as nn

from . import architecture, attention, safefile
from .files import atomic_write, atomic_write_path, check_writable
from .modules import sync_widths
from .units import get_module

__all__ = ["save", "load", "load_meta", "read_payload", "FORMAT", "FORMAT_VERSION", "FORMATS"]

FORMAT = "thinet_fast.model"
FORMAT_VERSION = 3  # the safetensors container; 2 is the torch.save one
READABLE_VERSIONS = (1, 2, 3)
FORMATS = ("safetensors", "torch")

PathLike = Union[str, os.PathLike, BinaryIO]


# --------------------------------------------------------------------------- spec
def _spec_of(m: nn.Module) -> Optional[dict[str, Any]]:
    """Constructor arguments of the modules whose shape pruning can change."""
    t = type(m)
    if t is nn.Conv2d:
        return {"type": "Conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": tuple(m.kernel_size), "stride": tuple(m.stride),
                "padding": m.padding if isinstance(m.padding, str) else tuple(m.padding),
                "dilation": tuple(m.dilation), "groups": m.groups, "bias": m.bias is not None,
                "padding_mode": m.padding_mode, "dtype": str(m.weight.dtype)}
    if t is nn.Linear:
        return {"type": "Linear", "in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None, "dtype": str(m.weight.dtype)}
    if t in (nn.BatchNorm1d, nn.BatchNorm2d):
        ref = m.weight if m.weight is not None else m.running_mean
        return {"type": t.__name__, "num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
                "affine": m.affine, "track_running_stats": m.track_running_stats,
                "dtype": str(ref.dtype) if ref is not None else "torch.float32"}
    if t is nn.PReLU:
        return {"type": "PReLU", "num_parameters": m.num_parameters, "dtype": str(m.weight.dtype)}
    if t in (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d):
        os_ = m.output_size
        return {"type": t.__name__, "output_size": tuple(os_) if isinstance(os_, (tuple, list)) else os_}
    if t is nn.LayerNorm:
        return {"type": "LayerNorm", "normalized_shape": list(m.normalized_shape), "eps": m.eps,
                "elementwise_affine": m.elementwise_affine, "bias": m.bias is not None,
                "dtype": str(m.weight.dtype) if m.weight is not None else "torch.float32"}
    if isinstance(m, attention.HEAD_PRUNED_TYPES):
        spec = {"type": "HeadPruned", "class": _class_name(m), "heads": attention.heads_of(m)}
        if isinstance(m, attention.HeadPrunedAttention):  # a stream cut changes its model width too
            spec["embed_dim"] = m.embed_dim
        return spec
    return None


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in saved spec")
    return dt


def _build(spec: dict[str, Any]) -> nn.Module:
    s = dict(spec)
    kind = s.pop("type")
    kw = {"device": "meta"}
    if "dtype" in s:
        kw["dtype"] = _dtype(s.pop("dtype"))
    if kind == "Conv2d":
        return nn.Conv2d(**s, **kw)
    if kind == "Linear":
        return nn.Linear(**s, **kw)
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        return getattr(nn, kind)(**s, **kw)
    if kind == "PReLU":
        return nn.PReLU(**s, **kw)
    if kind in ("AdaptiveAvgPool2d", "AdaptiveMaxPool2d"):
        return getattr(nn, kind)(s["output_size"])
    if kind == "LayerNorm":
        return nn.LayerNorm(tuple(s.pop("normalized_shape")), **s, **kw)
    raise ValueError(f"cannot rebuild a {kind} from a saved spec")


def _matches(m: nn.Module, spec: dict[str, Any]) -> bool:
    have = _spec_of(m)
    return have is not None and have == spec


# --------------------------------------------------------------------------- skeleton
def _skeleton_bytes(model: nn.Module) -> bytes:
    # Deep copy with every parameter/buffer pre-mapped to a meta tensor: the module tree
    # (classes, attributes, ties between parameters) without copying any data.
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in memo:
            continue
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    skeleton = copy.deepcopy(model, memo)
    buf = io.BytesIO()
    torch.save(skeleton, buf)
    return buf.getvalue()


def _extra_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for fqn, m in model.named_modules():
        for name in m._non_persistent_buffers_set:
            b = m._buffers.get(name)
            if b is not None:
                out[f"{fqn}.{name}" if fqn else name] = b.detach()
    return out


def save(model: nn.Module, path: PathLike, *, meta: Optional[dict] = None, skeleton: bool = False,
         format: str = "safetensors") -> None:
    """Write ``model`` (pruned or not) so that :func:`load` gives it back as is.

    Args:
        model: the model.
        path: file path (written atomically; checked for writability first) or binary
            file object.
        meta: optional metadata (plain Python values: str/int/float/bool/None, bytes,
            lists, tuples, dicts, and tensors), readable without the model via
            :func:`load_meta`; anything else is refused here, not at load time.
        skeleton: also pickle the module tree. Useful only for models with no plain
            description (hooks, lambdas or other objects as attributes: save warns);
            such a file loads with ``base=``, or ``unsafe_unpickle=True`` with this.
        format: ``"safetensors"`` (version 3: one safetensors file, the architecture and
            ``meta`` in its header; any extension works, ``.safetensors`` tells other
            tools what it is) or ``"torch"`` (version 2: ``torch.save`` of the payload,
            as thinet_fast wrote before). :func:`load` reads both.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save: expected an nn.Module, got {type(model).__name__}")
    if format not in FORMATS:
        raise ValueError(f"save: format must be one of {FORMATS}, got {format!r}")
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        raise ValueError("save: the model has meta tensors (no data); materialise it first")
    named = isinstance(path, (str, os.PathLike))
    if named:
        check_writable(path, "save: path")
    try:
        desc = architecture.describe(model)
    except architecture.DescriptionError as exc:
        desc = None
        warnings.warn(f"save: the model has no plain description ({exc}); the file loads only with "
                      "load(path, base=<a model of the same architecture>)"
                      + (" or unsafe_unpickle=True" if skeleton else "; or pass skeleton=True to also pickle "
                         "the module tree (loaded with unsafe_unpickle=True)"), stacklevel=2)
    sd = model.state_dict()
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION if format == "safetensors" else 2,
        "torch": str(torch.__version__),
        "architecture": desc,
        "tensors": architecture.tensors_of(model),
        "state_dict": {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in sd.items()},
        "state_metadata": {k: dict(v) for k, v in getattr(sd, "_metadata", {}).items()},
        "extra_buffers": _extra_buffers(model),
        "spec": {fqn: s for fqn, m in model.named_modules() if (s := _spec_of(m)) is not None},
        "training": {fqn: m.training for fqn, m in model.named_modules()},
        "modules": {fqn: _class_name(m) for fqn, m in model.named_modules()},
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "meta": dict(meta or {}),
        "skeleton": None,
    }
    if skeleton:
        try:
            payload["skeleton"] = _skeleton_bytes(model)
        except Exception as exc:
            raise RuntimeError(
                f"save: cannot pickle the module tree of {type(model).__name__} ({type(exc).__name__}: {exc}). "
                "Remove hooks/lambdas from the model, or pass skeleton=False and load with base=<same architecture>."
            ) from exc
    if format == "safetensors":
        try:  # encoded before any file is touched: an unsupported meta value fails here
            tensors, header = safefile.encode(payload)
        except TypeError as exc:
            raise TypeError(f"save: {exc}") from None
        st = safefile.library()
        if named:  # save_file streams from the tensors: no second copy of the model in memory
            atomic_write_path(path, lambda tmp: st.torch.save_file(tensors, tmp, metadata=header))
        else:
            path.write(st.torch.save(tensors, metadata=header))
    elif named:
        atomic_write(path, lambda f: torch.save(payload, f))
    else:
        torch.save(payload, path)


def read_payload(path: PathLike, map_location=None, keys=None) -> dict:
    """The payload of a model file (see the module docstring) as plain data and
    tensors, from either container, without unpickling anything; ``keys`` limits it to
    those entries (a safetensors file then reads only the tensors they name). Raises
    ``ValueError`` naming ``path`` for anything that is not a readable model file."""
    where = repr(path)
    if _named(path):
        try:
            with open(path, "rb") as f:
                head = f.read(9)
        except OSError as exc:
            raise ValueError(f"load: cannot read {path!r} ({type(exc).__name__}: {exc})") from exc
        source = path
    else:
        source = path.read()
        head = source[:9]
    if safefile.is_safetensors(head):
        reader = safefile.Reader(source, where, map_location)
        try:
            if reader.metadata.get("format") != FORMAT:
                raise ValueError(f"load: {where} is a safetensors file but not a thinet_fast model file (no "
                                 f"'{FORMAT}' format tag); for plain weights use safetensors.torch.load_file")
            _check_version(where, reader.version)
            return reader.payload(keys)
        finally:
            reader.close()
    payload = _read_torch(source if _named(path) else io.BytesIO(source), where, map_location)
    return payload if keys is None else {k: payload[k] for k in (*keys, "format", "version") if k in payload}


def _named(path) -> bool:
    return isinstance(path, (str, os.PathLike))


def _check_version(where: str, version) -> None:
    if version not in READABLE_VERSIONS:
        raise ValueError(f"load: {where} has format version {version}, this thinet_fast "
                         f"reads versions {READABLE_VERSIONS}")


def _read_torch(path, where: str, map_location) -> dict:
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        why = (str(exc).strip().splitlines() or [""])[0][:160]  # torch's long advice is not ours
        raise ValueError(f"load: {where} is not a thinet_fast model file (neither safetensors nor readable by "
                         f"torch.load(weights_only=True): {type(exc).__name__}: {why})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"load: {where} is not a thinet_fast model file (no '{FORMAT}' format tag); "
                         "for a plain state_dict use model.load_state_dict(torch.load(...))")
    _check_version(where, payload.get("version"))
    return payload


def load_meta(path: PathLike) -> dict:
    """The ``meta`` dict stored by :func:`save` (safe: no unpickling of code; from a
    safetensors file only the header and the tensors ``meta`` holds are read)."""
    return dict(read_payload(path, "cpu", keys=("meta",)).get("meta") or {})


def _class_name(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _rebuild_base(base: nn.Module, spec: dict[str, dict], saved: dict[str, str]) -> nn.Module:
    """Make ``base``'s module tree equal to the saved one: rebuild modules whose spec
    differs, drop children the saved model does not have, refuse other differences."""
    for fqn in sorted(saved, key=lambda f: f.count(".") if f else -1):  # parents first
        if fqn == "":
            continue  # the root may be any class with the same submodules
        parent_fqn, _, name = fqn.rpartition(".")
        try:
            parent = get_module(base, parent_fqn)
        except KeyError as exc:
            raise ValueError(f"load(base=...): the base has no `{parent_fqn}` to hold saved module `{fqn}`; "
                             "build the base with the same architecture") from exc
        cur = parent._modules.get(name)
        if fqn in spec and spec[fqn]["type"] == "HeadPruned":
            if cur is None or not _matches(cur, spec[fqn]):
                _cut_base_heads(parent, name, cur, spec[fqn], fqn)
        elif fqn in spec:
            if cur is None or not _matches(cur, spec[fqn]):
                parent.add_module(name, _build(spec[fqn]))  # replaces or adds
        elif cur is None:
            raise ValueError(f"load(base=...): the base has no module `{fqn}` ({saved[fqn]})")
        elif _class_name(cur) != saved[fqn]:
            raise ValueError(f"load(base=...): base module `{fqn}` is a {_class_name(cur)}, "
                             f"the saved one a {saved[fqn]}; build the base with the same architecture")
    # children the saved model does not have (e.g. fc7/fc8 after a GAP head)
    for fqn, _ in sorted(base.named_modules(), key=lambda kv: -kv[0].count(".")):
        if fqn and fqn not in saved:
            parent_fqn, _, name = fqn.rpartition(".")
            if parent_fqn in saved or parent_fqn == "":
                del get_module(base, parent_fqn)._modules[name]
    return base


def _cut_base_heads(parent: nn.Module, name: str, cur, spec: dict, fqn: str) -> None:
    """The base's attention module ``parent.name`` cut to the saved number of heads
    (which heads, and every weight, come from the saved tensors)."""
    site = next((s for s in attention.find_heads(parent)[0] if s.name == name), None)
    if site is None:
        raise ValueError(f"load(base=...): the saved `{fqn}` is a {spec['class']} with {spec['heads']} heads, but "
                         f"the base has {'no module there' if cur is None else 'a ' + _class_name(cur)}; "
                         "build the base with the same architecture")
    width = spec.get("embed_dim")
    if width is not None and site.module.embed_dim != width:  # the residual stream was cut: its width first
        parent._modules[name] = attention.cut_width(site.module, torch.arange(width))
        site = next(s for s in attention.find_heads(parent)[0] if s.name == name)
    new = attention.cut_first_heads(parent, site, spec["heads"])
    if _class_name(new) != spec["class"]:
        raise ValueError(f"load(base=...): base module `{fqn}` cuts to a {_class_name(new)}, the saved one is a "
                         f"{spec['class']}; build the base with the same architecture")


def _resize_free_tensors(model: nn.Module, state: dict, spec: dict) -> None:
    """Parameters outside the rebuilt layers that a cut narrowed in one dim (a ViT's class
    token and position embedding, a layer scale) take the saved shape; any other
    difference is left for load_state_dict to refuse."""
    for key, saved in state.items():
        fqn, _, pname = key.rpartition(".")
        if fqn in spec:
            continue
        try:
            mod = get_module(model, fqn)
        except KeyError:
            continue
        cur = mod._parameters.get(pname)
        if cur is None or cur.shape == saved.shape or cur.dim() != saved.dim() or \
                sum(a != b for a, b in zip(cur.shape, saved.shape)) != 1:
            continue
        mod._parameters[pname] = nn.Parameter(torch.empty(saved.shape, dtype=cur.dtype, device="meta"),
                                              requires_grad=cur.requires_grad)


def _tied_groups(model: nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _get_param(model: nn.Module, name: str) -> nn.Parameter:
    mod_fqn, _, pname = name.rpartition(".")
    return getattr(get_module(model, mod_fqn), pname)


def load(path: PathLike, map_location=None, *, base: Optional[nn.Module] = None,
         trusted_modules=(), unsafe_unpickle: bool = False) -> nn.Module:
    """Load a model written by :func:`save`; by default no code from the file runs.

    Args:
        path: file path or binary file object.
        map_location: as in ``torch.load`` (e.g. ``"cpu"``).
        base: optional model of the same architecture (e.g. ``vgg16()``); it is reshaped
            from the saved spec and filled.
        trusted_modules: top-level packages the model's classes may be imported from,
            beside torch, torchvision, thinet_fast and whatever is imported already.
        unsafe_unpickle: unpickle the saved module tree when the file has no plain
            description (version-1 files, ``save(skeleton=True)``). This runs pickled
            Python: only for files you trust.
    """
    payload = read_payload(path, map_location)
    state = payload["state_dict"]
    if base is not None:
        if not isinstance(base, nn.Module):
            raise TypeError(f"load: base must be an nn.Module, got {type(base).__name__}")
        model = _rebuild_base(base, payload["spec"], payload["modules"])
        _resize_free_tensors(model, state, payload["spec"])
    elif payload.get("architecture") is not None:
        try:
            model = architecture.rebuild(payload["architecture"], payload["tensors"],
                                         trusted_modules=trusted_modules)
        except architecture.DescriptionError as exc:
            raise ValueError(f"load: {path!r}: {exc}") from exc
        return model
    else:
        blob = payload.get("skeleton")
        if blob is None:
            raise ValueError(f"load: {path!r} has no architecture; pass base=<a model of the same architecture>")
        if not unsafe_unpickle:
            raise ValueError(f"load: {path!r} holds its module tree only as a pickle, and unpickling runs code "
                             "from the file. Pass base=<a model of the same architecture>, or "
                             "unsafe_unpickle=True if you trust the file")
        model = torch.load(io.BytesIO(blob), weights_only=False)  # the caller opted in
    ties = _tied_groups(model)
    state = OrderedDict(state)
    state._metadata = OrderedDict((k, dict(v)) for k, v in payload.get("state_metadata", {}).items())
    if not state._metadata:
        del state._metadata
    model.load_state_dict(state, strict=True, assign=True)
    if base is not None:
        sync_widths(model)  # the widths a cut repeats in attributes (ViT's hidden_dim)
    for names in ties:  # assign=True makes one Parameter per key: tie them again
        first = _get_param(model, names[0])
        for other in names[1:]:
            mod_fqn, _, pname = other.rpartition(".")
            setattr(get_module(model, mod_fqn), pname, first)
    for key, buf in payload.get("extra_buffers", {}).items():
        mod_fqn, _, name = key.rpartition(".")
        get_module(model, mod_fqn)._buffers[name] = buf
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"load: no data for {left[:5]}{' ...' if len(left) > 5 else ''}; the file does not match "
                         "the model")
    for fqn, m in model.named_modules():
        flag = payload.get("training", {}).get(fqn)
        if flag is not None:
            m.training = flag
    return model

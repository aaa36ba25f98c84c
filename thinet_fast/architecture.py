"""A module tree as plain data, and back, without unpickling code.

:func:`describe` records, for every module of a model, its class (by import name), its
instance attributes (plain values: numbers, strings, tuples, lists, dicts, tensors,
dtypes; classes, functions and ``functools.partial`` by import name; plain helper
objects such as torchvision's ``BoxCoder`` as their class and attributes), its parameter and
buffer names, and the children in order. Everything in it loads with
``torch.load(weights_only=True)`` and encodes as JSON (:mod:`thinet_fast.safefile`).

:func:`rebuild` makes the module tree again: each class is looked up by name (imported
only from trusted packages), instantiated with ``cls.__new__`` and ``nn.Module.__init__``
(no constructor of the model runs) and given its saved attributes and the saved tensors.
Nothing named in the file is ever called. This module knows modules, not the math.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import sys
from typing import Iterable, Mapping

import torch
from torch import nn

__all__ = ["describe", "rebuild", "DescriptionError", "TRUSTED_PACKAGES"]

FORMAT = "thinet_fast.architecture/1"
TRUSTED_PACKAGES = ("torch", "torchvision", "thinet_fast")
_INTERNAL = frozenset(nn.Module().__dict__) | {"_compiled_call_impl"}
_HOOKS = [k for k in _INTERNAL if "hooks" in k]
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size, torch.Tensor)


class DescriptionError(ValueError):
    """The module tree holds something a plain description cannot carry."""


def _name_of(obj) -> str:
    mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not mod or not qual or "<" in qual:
        raise DescriptionError(f"{obj!r} has no import name")
    found = _lookup(mod, qual)
    if found is not obj:
        raise DescriptionError(f"{mod}.{qual} does not name {obj!r}")
    return f"{mod}:{qual}"


def _lookup(mod: str, qual: str):
    obj = sys.modules.get(mod)
    for part in qual.split("."):
        obj = getattr(obj, part, None)
    return obj


def _value(v, where: str):
    """A plain copy of attribute value ``v`` (tagged dicts for references)."""
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, (list, tuple)):
        items = [_value(x, where) for x in v]
        return items if isinstance(v, list) else {"__tuple__": items}
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise DescriptionError(f"{where}: a dict with non-string keys")
        return {"__dict__": {k: _value(x, where) for k, x in v.items()}}
    if isinstance(v, functools.partial):
        return {"__partial__": _value(v.func, where), "args": _value(v.args, where),
                "keywords": _value(dict(v.keywords), where)}
    if isinstance(v, type) or callable(v) and hasattr(v, "__qualname__"):
        try:
            return {"__ref__": _name_of(v)}
        except DescriptionError as exc:
            raise DescriptionError(f"{where}: {exc}") from None
    cls = type(v)
    if cls.__new__ is object.__new__ and hasattr(v, "__dict__") and not isinstance(v, nn.Module) \
            and getattr(cls, "__slots__", None) is None:
        # a plain helper object (torchvision's BoxCoder, Matcher): its class by name and
        # its attributes as plain data, the way a module is described
        try:
            name = _name_of(cls)
        except DescriptionError:
            raise DescriptionError(f"{where} is a {cls.__name__}, which has no plain description") from None
        return {"__object__": name, "state": {k: _value(x, f"{where}.{k}") for k, x in vars(v).items()}}
    raise DescriptionError(f"{where} is a {cls.__name__}, which has no plain description")


def describe(model: nn.Module) -> dict:
    """The module tree of ``model`` as plain data (see the module docstring). Raises
    :class:`DescriptionError` naming the module and attribute that cannot be described
    (hooks, lambdas, objects that are neither modules nor plain values)."""
    canon = {id(m): fqn for fqn, m in model.named_modules()}  # a shared module under its first name
    modules = []
    for fqn, m in model.named_modules():
        where = f"module `{fqn or '<root>'}` ({type(m).__name__})"
        for k in _HOOKS:
            if getattr(m, k, None):
                raise DescriptionError(f"{where} has {k} (e.g. weight_norm or a user hook): a description "
                                       "cannot carry hooks; remove them before saving")
        attrs = {k: _value(v, f"{where}.{k}") for k, v in vars(m).items() if k not in _INTERNAL}
        modules.append({
            "fqn": fqn, "class": _name_of(type(m)), "training": m.training, "attrs": attrs,
            "params": {k: (None if p is None else bool(p.requires_grad)) for k, p in m._parameters.items()},
            "buffers": {k: b is not None for k, b in m._buffers.items()},
            "non_persistent": sorted(m._non_persistent_buffers_set),
            "children": {k: (None if c is None else canon[id(c)]) for k, c in m._modules.items()},
        })
    first: dict[int, str] = {}
    tied = {}
    for name, t in _named_tensors(model):
        if id(t) in first:
            tied[name] = first[id(t)]
        else:
            first[id(t)] = name
    return {"format": FORMAT, "modules": modules, "tied": tied}


def _named_tensors(model: nn.Module):
    for fqn, m in model.named_modules():
        for k, t in [*m._parameters.items(), *m._buffers.items()]:
            if t is not None:
                yield (f"{fqn}.{k}" if fqn else k), t


def tensors_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) by full name, a tied tensor under
    its first name only (as :func:`rebuild` wants them)."""
    out, seen = {}, set()
    for name, t in _named_tensors(model):
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t.detach()
    return out


class _Resolver:
    def __init__(self, roots: set[str]):
        self.roots = roots

    def __call__(self, name: str, what: str):
        mod, _, qual = name.partition(":")
        root = mod.split(".")[0]
        if mod not in sys.modules:
            if root not in self.roots:
                raise DescriptionError(
                    f"the file names {what} `{mod}.{qual}` from `{mod}`, which is not imported and not trusted; "
                    f"import `{mod}` first, or pass trusted_modules=[{root!r}]")
            importlib.import_module(mod)
        obj = _lookup(mod, qual)
        if obj is None:
            raise DescriptionError(f"`{mod}` has no `{qual}` ({what}); is the same version of `{root}` installed?")
        return obj


def _restore(v, resolve: _Resolver, trusted_refs: set[str], where: str = "an attribute"):
    if isinstance(v, list):
        return [_restore(x, resolve, trusted_refs, where) for x in v]
    if isinstance(v, dict):
        if "__tuple__" in v:
            return tuple(_restore(x, resolve, trusted_refs, where) for x in v["__tuple__"])
        if "__dict__" in v:
            return {k: _restore(x, resolve, trusted_refs, where) for k, x in v["__dict__"].items()}
        if "__partial__" in v:
            func = _restore(v["__partial__"], resolve, trusted_refs, where)
            # a partial binds arguments the model never chose: only module classes
            # (e.g. torchvision's norm_layer=partial(BatchNorm2d, eps=...)) and functionals
            if not (_module_class(func) or getattr(func, "__module__", "") == "torch.nn.functional"):
                raise DescriptionError(f"{where}: a partial of {func!r} is refused (only of nn.Module classes "
                                       "and torch.nn.functional)")
            return functools.partial(func, *_restore(v["args"], resolve, trusted_refs, where),
                                     **_restore(v["keywords"], resolve, trusted_refs, where))
        if "__ref__" in v:
            return _reference(v["__ref__"], resolve, trusted_refs, where)
        if "__object__" in v:
            return _plain_object(v, resolve, trusted_refs, where)
        raise DescriptionError(f"unknown tagged value {sorted(v)}")
    if not isinstance(v, _PLAIN):
        raise DescriptionError(f"unexpected {type(v).__name__} in a description")
    return v


def _module_class(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, nn.Module)


def _reference(name: str, resolve: _Resolver, trusted_refs: set[str], where: str):
    """A class or function named ``module:qualname``: defined there itself (no walking
    through other modules' attributes), in a trusted package, and not a file or
    process function."""
    mod, _, qual = name.partition(":")
    if mod.split(".")[0] not in trusted_refs:
        raise DescriptionError(f"{where}: the file refers to `{name}` outside the model's own packages; refused")
    obj = resolve(name, "the attribute")
    if getattr(obj, "__module__", None) != mod or getattr(obj, "__qualname__", None) != qual:
        raise DescriptionError(f"{where}: `{name}` is not defined in `{mod}` itself; refused")
    if isinstance(obj, type) and not _module_class(obj):
        raise DescriptionError(f"{where}: `{name}` is a class but not an nn.Module; refused")
    if qual.split(".")[-1] in _REFUSED_NAMES:
        raise DescriptionError(f"{where}: `{name}` reads or writes files; refused")
    return obj


def _plain_object(v: Mapping, resolve: _Resolver, trusted_refs: set[str], where: str):
    """A helper object rebuilt like a module: ``cls.__new__`` and its saved attributes;
    no constructor or ``__setstate__`` runs."""
    name = v["__object__"]
    mod, _, qual = name.partition(":")
    if mod.split(".")[0] not in trusted_refs:
        raise DescriptionError(f"{where}: the file names the class `{name}` outside the model's own packages; refused")
    cls = resolve(name, "the object class")
    if not isinstance(cls, type) or _module_class(cls) or cls.__new__ is not object.__new__ \
            or cls.__module__ != mod or cls.__qualname__ != qual:
        raise DescriptionError(f"{where}: `{name}` is not a plain class defined in `{mod}`; refused")
    obj = cls.__new__(cls)
    for k in v["state"]:
        _check_attr(cls, k, where)
    obj.__dict__.update({k: _restore(x, resolve, trusted_refs, f"{where}.{k}") for k, x in v["state"].items()})
    return obj


_REFUSED_NAMES = frozenset({"load", "save", "open", "from_file", "read_file", "write_file", "system", "exec",
                            "eval", "compile", "import_module", "__import__"})


def _check_attr(cls: type, name: str, where: str) -> None:
    """An attribute from the file may only shadow plain class data: never a method, a
    property or torch's internals (the model's own code must run, not the file's)."""
    if name in _INTERNAL or name.startswith("__"):
        raise DescriptionError(f"{where}: attribute `{name}` is internal; refused")
    static = inspect.getattr_static(cls, name, None)
    if static is not None and (callable(static) or hasattr(static, "__get__")):
        raise DescriptionError(f"{where}: attribute `{name}` would replace {cls.__name__}.{name}; refused")


def rebuild(desc: Mapping, tensors: Mapping[str, torch.Tensor], *,
            trusted_modules: Iterable[str] = ()) -> nn.Module:
    """The model that :func:`describe` described, holding ``tensors`` (name -> tensor;
    as :func:`tensors_of` gives them). Classes are imported only from packages already
    imported or listed in :data:`TRUSTED_PACKAGES` / ``trusted_modules``; no constructor,
    no ``__setstate__`` and nothing else named in the description runs."""
    if not isinstance(desc, Mapping) or desc.get("format") != FORMAT:
        raise DescriptionError("not a thinet_fast architecture description")
    resolve = _Resolver(set(TRUSTED_PACKAGES) | set(trusted_modules))
    classes = {}
    for rec in desc["modules"]:
        cls = resolve(rec["class"], "module class")
        if not _module_class(cls) or cls.__new__ is not object.__new__:
            raise DescriptionError(f"`{rec['class']}` is not a plain nn.Module subclass; refused")
        classes[rec["fqn"]] = cls
    refs_ok = set(TRUSTED_PACKAGES) | set(trusted_modules) | {r["class"].partition(":")[0].split(".")[0]
                                                                for r in desc["modules"]}
    tied = desc.get("tied", {})
    built: dict[str, nn.Module] = {}
    params: dict[str, torch.Tensor] = {}
    for rec in desc["modules"]:
        fqn = rec["fqn"]
        m = classes[fqn].__new__(classes[fqn])
        nn.Module.__init__(m)
        where = f"module `{fqn or '<root>'}`"
        for k in rec["attrs"]:
            _check_attr(classes[fqn], k, where)
        m.__dict__.update({k: _restore(v, resolve, refs_ok, f"{where}.{k}") for k, v in rec["attrs"].items()})
        m.training = bool(rec["training"])
        for table, entries, kind in ((m._parameters, rec["params"], "parameter"), (m._buffers, rec["buffers"], "buffer")):
            for k, flag in entries.items():
                key = f"{fqn}.{k}" if fqn else k
                if flag is None or (kind == "buffer" and flag is False):
                    table[k] = None
                elif key in tied:
                    table[k] = params[tied[key]]
                elif key not in tensors:
                    raise DescriptionError(f"no tensor for {kind} `{key}`")
                else:
                    t = tensors[key]
                    table[k] = nn.Parameter(t, requires_grad=flag) if kind == "parameter" else t
                    params[key] = table[k]
        m._non_persistent_buffers_set = set(rec["non_persistent"])
        built[fqn] = m
    for rec in desc["modules"]:
        m = built[rec["fqn"]]
        for child, cfqn in rec["children"].items():
            m._modules[child] = None if cfqn is None else built[cfqn]
    return built[""]

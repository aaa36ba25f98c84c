"""The safetensors container of :mod:`thinet_fast.serialization` (format version 3).

A model file is one ordinary safetensors file: every tensor is a safetensors tensor
(the model's parameters and buffers under their own names, so any safetensors tool reads
them as a state dict), and everything else (the architecture description, the state
dict's version metadata, the caller's ``meta``) is one JSON document in the header's
``__metadata__``, beside ``"format": "thinet_fast.model"`` and ``"version": "3"``.
Keeping it in one file keeps a save one atomic ``os.replace`` and a model one path.

Reading runs no code: safetensors parses and checks the header (offsets, sizes, dtypes)
and the JSON is decoded by :func:`decode`, which builds only plain values. JSON has no
tuples, non-string keys, bytes or non-finite floats, so those travel tagged:

    {"$tuple": [...]}  {"$dict": [[key, value], ...]}  {"$bytes": "<base64>"}
    {"$float": "nan" | "inf" | "-inf"}  {"$complex": [re, im]}  {"$dtype": "float32"}
    {"$device": "cuda:0"}  {"$size": [2, 3]}  {"$tensor": "<name in the file>"}

A dict uses the plain JSON form when its keys are strings that do not start with ``$``.
Tensors are stored once per distinct view (a parameter, its state-dict entry and its
tie share one entry); two different views of one storage are stored as copies (safetensors
refuses shared memory), and non-contiguous tensors contiguously. Tensors of a dtype
outside the common set (complex, float8, unsigned wider than 8 bits) are stored as their
bytes (uint8) with the dtype and shape in ``"as"``; tensors not on the CPU record their
device in ``"devices"`` (``load(map_location=...)`` takes None, a device or a dict, as
``torch.load`` does).
"""
from __future__ import annotations

import base64
import json
import math
import os
from typing import Callable, Iterable, Optional

import torch

__all__ = ["HEADER_LIMIT", "library", "is_safetensors", "encode", "decode", "Reader"]

PREFIX = "__thinet_fast__."  # names of tensors that are not the model's own
HEADER_LIMIT = 100_000_000  # safetensors' own bound on the header size
# dtypes every safetensors release stores natively; the rest (complex, float8, uint16..64,
# which only newer releases know) go as bytes, readable by any version
_NATIVE = {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool}
_TAGS = ("$tuple", "$dict", "$bytes", "$float", "$complex", "$dtype", "$device", "$size", "$tensor")


def library():
    """The safetensors package (imported on first use: importing thinet_fast never needs it)."""
    try:
        import safetensors
        import safetensors.torch
    except ImportError as exc:  # a core dependency, but say what to do if it is missing
        raise ImportError("thinet_fast model files are safetensors files: pip install safetensors") from exc
    return safetensors


def is_safetensors(head: bytes) -> bool:
    """True if the first 9 bytes of a file look like a safetensors header (a
    little-endian u64 length, then ``{``); torch.save files start with ``PK`` or a
    pickle opcode."""
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= HEADER_LIMIT and head[8:9] == b"{"


# --------------------------------------------------------------------------- encode
class _Encoder:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}  # name -> what safetensors writes
        self.views: dict[tuple, str] = {}  # a tensor view already stored -> its name
        self.storages: set[tuple] = set()  # storages already written (shared memory is refused)
        self.extra: dict[str, dict] = {}  # name -> {"dtype", "shape"} for byte-stored tensors
        self.devices: dict[str, str] = {}

    def tensor(self, t: torch.Tensor, name: str) -> str:
        if t.layout != torch.strided or t.is_quantized or t.is_meta:
            raise TypeError(f"{name}: a {t.layout} {'quantized ' if t.is_quantized else ''}tensor; "
                            "only dense tensors with data can be saved")
        t = t.detach()
        key = None
        if t.numel():
            key = (str(t.device), t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(),
                   tuple(t.shape), tuple(t.stride()))
            if key in self.views:
                return self.views[key]
        while name in self.tensors:  # e.g. dict keys 0 and "0" on one path
            name += "'"
        device = str(t.device)
        t = t.resolve_conj().resolve_neg().contiguous().cpu()  # lazy conj/neg views hold other bytes
        if t.numel():
            sk = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if sk in self.storages:  # another view of stored memory: write a copy
                t = t.clone()
                sk = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            self.storages.add(sk)
        if t.dtype not in _NATIVE:
            self.extra[name] = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)}
            t = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        if device != "cpu":
            self.devices[name] = device
        self.tensors[name] = t
        if key is not None:
            self.views[key] = name
        return name

    def __call__(self, v, path: str, name: Optional[str] = None):
        """A JSON-ready copy of ``v``; ``path`` names it in errors and tensor names."""
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            return float(v) if math.isfinite(v) else {"$float": repr(float(v))}
        if isinstance(v, torch.Tensor):
            return {"$tensor": self.tensor(v, name or PREFIX + path)}
        if isinstance(v, torch.Size):
            return {"$size": [int(x) for x in v]}
        if isinstance(v, (list, tuple)):
            items = [self(x, f"{path}.{i}") for i, x in enumerate(v)]
            return items if isinstance(v, list) else {"$tuple": items}
        if isinstance(v, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in v):
                return {k: self(x, f"{path}.{k}") for k, x in v.items()}
            return {"$dict": [[self(k, f"{path}.<key>"), self(x, f"{path}.{k}")] for k, x in v.items()]}
        if isinstance(v, bytes):
            return {"$bytes": base64.b64encode(v).decode("ascii")}
        if isinstance(v, complex):
            return {"$complex": [self(v.real, path), self(v.imag, path)]}
        if isinstance(v, torch.dtype):
            return {"$dtype": str(v).replace("torch.", "")}
        if isinstance(v, torch.device):
            return {"$device": str(v)}
        raise TypeError(f"{path} is a {type(v).__name__}; a model file carries tensors and plain values "
                        "(None, bool, int, float, str, bytes, lists, tuples, dicts, dtypes, devices) only")


def encode(payload: dict, model_tensors: str = "tensors") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) for ``payload``; the tensors of
    ``payload[model_tensors]`` keep their names (the model's own)."""
    enc = _Encoder()
    body = {}
    if isinstance(payload.get(model_tensors), dict):  # first, so the model's names win
        body[model_tensors] = {k: enc(t, f"{model_tensors}.{k}", name=k) for k, t in payload[model_tensors].items()}
    for k, v in payload.items():
        if k not in ("format", "version", model_tensors):
            body[k] = enc(v, k)
    doc = {"payload": body, "as": enc.extra, "devices": enc.devices}
    meta = {"format": str(payload["format"]), "version": str(payload["version"]),
            "torch": str(torch.__version__), "thinet_fast": json.dumps(doc, allow_nan=False, separators=(",", ":"))}
    return enc.tensors, meta


# --------------------------------------------------------------------------- decode
def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def decode(v, tensor: Callable[[str], torch.Tensor]):
    """The value :class:`_Encoder` encoded; builds plain values only (``tensor(name)``
    gives a stored tensor)."""
    if isinstance(v, list):
        return [decode(x, tensor) for x in v]
    if not isinstance(v, dict):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise ValueError(f"unexpected {type(v).__name__} in the file's metadata")
    tags = [k for k in v if k.startswith("$")]
    if not tags:
        return {k: decode(x, tensor) for k, x in v.items()}
    if len(v) != 1 or tags[0] not in _TAGS:
        raise ValueError(f"unknown tagged value {sorted(v)[:3]} in the file's metadata")
    tag, x = tags[0], v[tags[0]]
    if tag == "$tuple":
        return tuple(decode(_list(x, tag), tensor))
    if tag == "$dict":
        pairs = _list(x, tag)
        if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise ValueError("malformed $dict in the file's metadata")
        return {_hashable(decode(k, tensor)): decode(val, tensor) for k, val in pairs}
    if tag == "$bytes":
        return base64.b64decode(_str(x, tag), validate=True)
    if tag == "$float":
        if x not in ("nan", "inf", "-inf"):
            raise ValueError(f"malformed $float {x!r} in the file's metadata")
        return float(x)
    if tag == "$complex":
        re, im = (decode(c, tensor) for c in _list(x, tag, 2))
        return complex(float(re), float(im))
    if tag == "$dtype":
        return _dtype(_str(x, tag))
    if tag == "$device":
        return torch.device(_str(x, tag))
    if tag == "$size":
        return torch.Size([int(i) for i in _list(x, tag)])
    return tensor(_str(x, tag))


def _list(x, tag, n=None):
    if not isinstance(x, list) or (n is not None and len(x) != n):
        raise ValueError(f"malformed {tag} in the file's metadata")
    return x


def _str(x, tag):
    if not isinstance(x, str):
        raise ValueError(f"malformed {tag} in the file's metadata")
    return x


def _hashable(k):
    try:
        hash(k)
    except TypeError:
        raise ValueError("a dict key in the file's metadata is not hashable") from None
    return k


class Reader:
    """One safetensors model file, read lazily: ``metadata`` (the header's), and
    :meth:`payload` decodes the keys asked for, loading only the tensors they name.
    Opening checks the header (safetensors does) and raises ``ValueError`` naming
    ``where`` for a file that is not safetensors or is damaged."""

    def __init__(self, source, where: str, map_location=None):
        st = library()
        self.where, self.map_location = where, map_location
        self._cache: dict[str, torch.Tensor] = {}
        try:
            if isinstance(source, (bytes, bytearray)):  # a file object's content: validated, then parsed
                self._all = st.torch.load(bytes(source))
                n = int.from_bytes(source[:8], "little")
                self.metadata = json.loads(bytes(source[8:8 + n])).get("__metadata__") or {}
                self._file = None
            else:
                self._file = st.safe_open(os.fspath(source), framework="pt", device="cpu")
                self.metadata = self._file.metadata() or {}
                self._all = None
        except Exception as exc:  # SafetensorError, a JSON or a UTF-8 error
            raise ValueError(f"load: {where} is not a valid safetensors file ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from exc
        self._doc = None

    def _document(self) -> dict:
        if self._doc is None:
            try:
                doc = json.loads(self.metadata.get("thinet_fast", ""))
                if not (isinstance(doc, dict) and isinstance(doc.get("payload"), dict)):
                    raise ValueError("no payload")
                self._doc = doc
            except (ValueError, RecursionError) as exc:
                raise ValueError(f"load: {self.where}: the thinet_fast metadata in the safetensors header "
                                 f"is damaged ({type(exc).__name__}: {str(exc)[:120]})") from exc
        return self._doc

    def _tensor(self, name: str) -> torch.Tensor:
        if name in self._cache:
            return self._cache[name]
        try:
            t = self._all[name] if self._all is not None else self._file.get_tensor(name)
        except Exception as exc:
            raise ValueError(f"load: {self.where}: the metadata names tensor {name!r}, which the file "
                             "does not hold") from exc
        # safetensors gives views into the file's bytes at 8-byte offsets: a copy is the
        # model's own, writable memory, aligned as torch allocates it (kernels on
        # misaligned data round differently, and run slower)
        t = t.clone()
        doc = self._document()
        if name in doc.get("as", {}):  # stored as bytes: view it as what it was
            spec = doc["as"][name]
            t = t.view(_dtype(spec["dtype"])).reshape([int(s) for s in spec["shape"]])
        saved = doc.get("devices", {}).get(name, "cpu")
        device = _target(saved, self.map_location)
        if device.type != "cpu":
            try:
                t = t.to(device)
            except (RuntimeError, AssertionError) as exc:  # e.g. saved on CUDA, read without a GPU
                raise ValueError(f"load: {self.where}: tensor {name!r} was saved on {saved}, which is not "
                                 f"available here ({str(exc)[:80]}); pass map_location='cpu'") from exc
        self._cache[name] = t
        return t

    def payload(self, keys: Optional[Iterable[str]] = None) -> dict:
        body = self._document()["payload"]
        want = list(body) if keys is None else [k for k in keys if k in body]
        try:
            out = {k: decode(body[k], self._tensor) for k in want}
        except (ValueError, TypeError, RuntimeError, RecursionError) as exc:
            if str(exc).startswith("load: "):
                raise
            raise ValueError(f"load: {self.where}: the thinet_fast metadata in the safetensors header is "
                             f"damaged ({type(exc).__name__}: {str(exc)[:160]})") from exc
        out["format"], out["version"] = self.metadata.get("format"), self.version
        return out

    @property
    def version(self):
        """The header's format version, as an int where it is one."""
        v = self.metadata.get("version")
        return int(v) if isinstance(v, str) and v.isdigit() else v

    def close(self) -> None:
        if self._file is not None:
            self._file.__exit__(None, None, None)
            self._file = None


def _target(saved: str, map_location) -> torch.device:
    """Where a tensor saved on ``saved`` goes, as ``torch.load(map_location=...)`` would
    put it (None: where it was; a device or a string; a dict from saved device names)."""
    if map_location is None:
        dev = saved
    elif isinstance(map_location, (str, torch.device)):
        dev = map_location
    elif isinstance(map_location, dict):
        dev = map_location.get(saved, saved)
    else:
        raise TypeError("load: map_location for a safetensors model file must be None, a device, a string or "
                        f"a dict, not {type(map_location).__name__}")
    return torch.device(dev)

"""What :func:`thinet_fast.finetune` needs to stop and pick up again exactly: random
number states, the data order, checkpoint files and the JSON-lines log.

Checkpoint files are ordinary :func:`thinet_fast.save` model files (so
``thinet_fast.load("last.pt")`` gives the model back); ``last.pt`` also carries the
training state under ``meta["finetune"]``: optimizer, scheduler and GradScaler state
dicts, the step, the epoch and batches seen in it, the RNG states, the best and last
validation metrics and the options; under torch.distributed also every rank's RNG
states (``ranks``: each rank resumes its own streams). All of it is tensors and plain
Python values, so the file is read without unpickling anything
(:func:`thinet_fast.serialization.read_payload`).
Files are written atomically (``<path>.tmp``, then ``os.replace``).

Data order: the batches of an epoch are a function of the random states at the moment
the epoch's iterator is created (a ``DataLoader`` draws its shuffle permutation and its
workers' seeds then, from its ``generator`` or, without one, from the global torch RNG).
So the checkpoint stores those states as they were at the start of the current epoch,
and a resume restores them, creates the iterator again, skips the batches already
trained on (they are loaded, not trained: at most one epoch of data loading), then
restores the states of the checkpoint step. Exact for lists of batches and for
DataLoaders with ``persistent_workers=False`` (the default).
"""
from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterator

import torch
from torch import nn

from .files import atomic_write, check_writable
from .serialization import FORMAT, load_meta, read_payload, save

__all__ = ["STATE_FORMAT", "rng_state", "set_rng_state", "seed_all", "data_generators", "set_epoch",
           "one_pass", "write_checkpoint", "write_best", "best_step", "restore", "read_checkpoint", "saved_flags",
           "JsonLog"]

STATE_FORMAT = "thinet_fast.finetune_state"
STATE_VERSION = 1


# --------------------------------------------------------------------------- random states
def _numpy():
    try:
        import numpy as np
    except ImportError:  # numpy is optional: nothing to save then
        return None
    return np


def rng_state(generators=()) -> dict:
    """Global torch (CPU and initialised CUDA), Python and numpy RNG states, and the
    states of ``generators`` (e.g. a DataLoader's), as tensors and plain values."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "data": [g.get_state() for g in generators]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = _numpy()
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return state


def set_rng_state(state: dict, generators=()) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    np = _numpy()
    if np is not None and state.get("numpy") is not None:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    saved = state.get("data", [])
    if len(saved) != len(generators):
        raise ValueError(f"resume: the checkpoint has {len(saved)} data generator state(s), train_data has "
                         f"{len(generators)}; pass train_data built the same way (same DataLoader options)")
    for g, s in zip(generators, saved):
        g.set_state(s)


def seed_all(seed: int) -> None:
    """Seed torch (all devices), Python's ``random`` and numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np = _numpy()
    if np is not None:
        np.random.seed(seed % 2 ** 32)


# --------------------------------------------------------------------------- data order
def data_generators(data) -> list[torch.Generator]:
    """The torch.Generators that decide a DataLoader's order (its own, its sampler's)."""
    found: list[torch.Generator] = []
    batch_sampler = getattr(data, "batch_sampler", None)
    for obj in (data, getattr(data, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
    return found


def set_epoch(data, epoch: int) -> None:
    """Call ``set_epoch`` where the data has one (DistributedSampler, some datasets):
    their shuffles then depend on the epoch, as in a straight run."""
    for obj in (data, getattr(data, "sampler", None)):
        fn = getattr(obj, "set_epoch", None)
        if callable(fn) and not isinstance(obj, nn.Module):
            fn(epoch)


def one_pass(data) -> bool:
    """True for an iterator: a second ``iter()`` gives no new batches."""
    return isinstance(data, Iterator)


# --------------------------------------------------------------------------- files
class saved_flags:
    """Context manager: the model's train/eval flags as the caller had them (so files
    load in the caller's modes), restored to the current ones on exit."""

    def __init__(self, flags):
        self.flags = flags

    def __enter__(self):
        self.now = [(m, m.training) for m, _ in self.flags]
        for m, flag in self.flags:
            m.training = flag

    def __exit__(self, *exc):
        for m, flag in self.now:
            m.training = flag


def write_checkpoint(model: nn.Module, path: str, state: dict, flags) -> None:
    """``last.pt``: the model (thinet_fast.save format) and the training ``state``."""
    with saved_flags(flags):
        save(model, path, meta={"finetune": {"format": STATE_FORMAT, "version": STATE_VERSION, **state}})


def write_best(model: nn.Module, path: str, record: dict, flags) -> None:
    """``best.pt``: the model and its validation record (plain values: load_meta reads them)."""
    with saved_flags(flags):
        save(model, path, meta={"finetune_best": dict(record)})


def best_step(path: str):
    """The step recorded in ``best.pt``, or None when it is missing or unreadable."""
    try:
        return load_meta(path).get("finetune_best", {}).get("step")
    except (OSError, ValueError):
        return None


def restore(model: nn.Module, opt, sched, scaler, sd: dict, state: dict, options: dict, path: str) -> None:
    """Load a ``last.pt``'s weights and optimizer, scheduler and scaler states, after
    checking that it was written with ``options`` (the same number of processes too)."""
    theirs, ours = {"world_size": 1, **state["options"]}, {"world_size": 1, **options}
    diff = [f"{k}={theirs.get(k)!r} there, {v!r} now" for k, v in ours.items() if theirs.get(k) != v]
    if diff:
        raise ValueError(f"resume: {path!r} was written with other options ({'; '.join(diff)}); "
                         "pass the same ones, or resume=False to start over")
    have = {k: tuple(v.shape) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    saved = {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}
    try:
        if have != saved:  # checked first: a failing load_state_dict has already copied some tensors
            odd = sorted(set(have) ^ set(saved)) or [k for k in have if have[k] != saved[k]]
            raise ValueError(f"other tensors or shapes, e.g. {odd[:3]}")
        model.load_state_dict(sd, strict=True)
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        why = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"resume: {path!r} does not fit this model ({why}); pass the model the run "
                         "started from, or resume=False to start over") from exc
    sched.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


def read_checkpoint(path: str) -> tuple[dict, dict]:
    """(state_dict, training state) from a ``last.pt``; reads no code."""
    again = "delete it or pass resume=False to start over"
    try:
        payload = read_payload(path, "cpu", keys=("state_dict", "meta"))
    except (OSError, ValueError) as exc:  # read_payload's message names the path and what is wrong
        raise ValueError(f"resume: {path!r} is not a readable fine-tune checkpoint ({exc}); {again}") from exc
    meta = payload.get("meta") if isinstance(payload, dict) else None
    state = meta.get("finetune") if isinstance(meta, dict) else None
    if payload.get("format") != FORMAT or not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"resume: {path!r} is not a fine-tune checkpoint (no '{STATE_FORMAT}' state); {again}")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"resume: {path!r} has fine-tune state version {state.get('version')}, this "
                         f"thinet_fast reads version {STATE_VERSION}; {again}")
    return payload["state_dict"], state


# --------------------------------------------------------------------------- log
def _plain(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON has no NaN/Inf
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


class JsonLog:
    """A JSON-lines log, one object per line, flushed as written.

    A fresh run truncates the file; a resumed one keeps the lines up to the resumed
    step (lines written after the checkpoint, before the stop, are dropped: the resumed
    run writes them again) and appends."""

    def __init__(self, path, resume_step: int | None = None):
        self.f = None
        if path is None:
            return
        path = os.fspath(path)
        check_writable(path, "log=")
        kept = []
        if resume_step is not None and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue  # a line cut short by the stop
                    if isinstance(rec, dict) and rec.get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        atomic_write(path, lambda f: f.write("".join(kept).encode()))
        self.f = open(path, "a", encoding="utf-8")

    def write(self, **record) -> None:
        if self.f is not None:
            self.f.write(json.dumps(_plain(record), allow_nan=False) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None

"""Checkpoints of the sequential schedule: safe to read, and tied to what made them.

A checkpoint is a :func:`thinet_fast.save` file (no pickled code: the module tree is a
plain description) whose ``meta`` holds the options, the per-unit records and the
*source*: a fingerprint of the caller's model (architecture and weights), the selected
units and their kept counts, the ``filter_fn`` name, and the calibration data (a digest
of the first image, then of every image once a pass has read them all). ``resume=``
refuses a checkpoint whose options or source differ, naming the path and what differs.
Under torch.distributed every rank checks, rank 0 writes, and the data digest covers
every rank's shard.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..fingerprint import DataDigest, callable_name, model_fingerprint
from ..ops.draws import image_keys
from ..serialization import load, load_meta, save
from ..units import Unit
from .collect import world_size
from .config import PruneConfig

CHECKPOINT_FORMAT = "thinet_fast-checkpoint/2"


def run_source(model: nn.Module, units: list[Unit], n_keep: dict[str, int], first_image: torch.Tensor,
               cfg: PruneConfig) -> dict:
    """What a resumable run is made from (compared on ``resume=``); ``first_image`` is
    the calibration stream's first image (1, ...), as ``prune`` read it."""
    first = image_keys(first_image)[:1]
    if world_size() > 1:  # rank 0's first image is the stream's first (DistributedSampler order)
        torch.distributed.broadcast(first, src=0)
    return {"model": model_fingerprint(model), "units": [u.producer for u in units],
            "n_keep": {u.producer: int(n_keep[u.producer]) for u in units},
            "filter_fn": callable_name(cfg.filter_fn), "finetune": callable_name(cfg.finetune),
            "first_image": f"{int(first):08x}"}


def writes_checkpoints() -> bool:
    """Under torch.distributed only rank 0 writes (every rank reads)."""
    dist = torch.distributed
    return world_size() == 1 or dist.get_rank() == 0


def save_checkpoint(path: str, model: nn.Module, cfg: PruneConfig, source: dict, records: list[dict],
                    data: dict | None, coupled: list | None = None) -> None:
    """Atomically write the partly pruned model and what was done (``coupled``: the
    refused groups, once the coupled stage has run)."""
    meta = {"format": CHECKPOINT_FORMAT, "options": cfg.fingerprint(), "source": source,
            "data": data, "records": [r.to_dict() for r in records]}
    if coupled is not None:
        meta["coupled"] = coupled
    save(model, path, meta=meta)


def _differences(theirs: dict, ours: dict) -> list[str]:
    return sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))


def load_checkpoint(path: str, cfg: PruneConfig, source: dict, like: nn.Module, device) -> tuple[nn.Module, dict]:
    """(model, meta) of the checkpoint at ``path``, after checking it was made with the
    same options from the same model, units and data. ``like`` is the unpruned working
    model: its classes are the ones the checkpoint may name."""
    try:
        meta = load_meta(path)
    except Exception as exc:
        raise ValueError(f"checkpoint {path} cannot be read ({exc}); delete it to start over, "
                         "or pass another resume= path") from exc
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a thinet_fast checkpoint (format {meta.get('format')!r}); delete it or "
                         "pass another resume= path")
    diff = _differences(meta.get("options", {}), cfg.fingerprint())
    if diff:
        raise ValueError(f"checkpoint {path} was written with different options ({', '.join(diff)}); "
                         "pass the same options to resume, or a new resume= path")
    diff = _differences(meta.get("source", {}), source)
    if diff:
        what = {"model": "another model (architecture or weights)", "units": "other units",
                "n_keep": "other kept counts", "filter_fn": "another filter_fn", "finetune": "another finetune",
                "first_image": "other calibration data (the first image differs)"}
        raise ValueError(f"checkpoint {path} was made from {', '.join(what.get(k, k) for k in diff)}; "
                         "resume with the same model and data, or pass a new resume= path")
    roots = {type(m).__module__.split(".")[0] for m in like.modules()}
    try:
        model = load(path, map_location=device, trusted_modules=roots)
    except Exception as exc:
        raise ValueError(f"checkpoint {path} cannot be loaded ({exc}); delete it to start over") from exc
    return model, meta


def check_data(path: str, saved: dict | None, digest: DataDigest) -> None:
    """Refuse to go on when the images of this run are not the checkpoint's."""
    if saved is not None and saved != digest.as_dict():
        raise ValueError(f"checkpoint {path} was made from other calibration data ({saved['images']} images, "
                         f"hash {saved['hash'][:12]}; now {digest.images} images, hash {digest.hexdigest()[:12]}); "
                         "resume with the same data in the same order, or pass a new resume= path")


def exists(path: str | None) -> bool:
    return bool(path) and os.path.exists(path)

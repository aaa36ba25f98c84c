"""torch.distributed for fine-tuning and the CLI: the process group from torchrun's
environment, sharding data by rank, and collectives that keep every rank in step.

The rule everywhere: every rank takes the same decisions (steps, whether to resume,
whether validation improved), so every rank runs the same collectives in the same
order; only rank 0 touches files. Decisions that depend on files (does ``last.pt``
exist, what is in it) are taken on rank 0 and broadcast (:func:`from_rank0`), so the
other ranks need no shared filesystem.

Sharding that reproduces one process with the *global* batch:

- training: :func:`shard_loader` gives each rank a ``DistributedSampler`` (the same
  seed on every rank, ``set_epoch`` each epoch, which :func:`thinet_fast.finetune`
  calls) and ``batch_size // world`` images per step. The ranks' batches of step k are
  then together the batch of step k of one process using ``shard_loader(loader,
  world_size=1)`` (the same permutation), as long as every step is full (the dataset
  a multiple of the global batch, or ``drop_last``).
- calibration and validation: :func:`shard_indices` (``rank::world``, no padding), an
  exact partition, so summed statistics and summed correct counts are those of one
  process on all images.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset

__all__ = ["world", "is_main", "env_world_size", "init_from_env", "process_group_from_env", "shard_spec",
           "local_device", "from_rank0", "gather", "all_sum", "mean_over_ranks", "same_on_all", "warn_unsharded",
           "shard_indices", "shard_dataset", "shard_loader", "broadcast_module", "wrap_ddp", "SyncBatchNorms"]


def world() -> tuple[int, int]:
    """(world size, rank): (1, 0) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def is_main() -> bool:
    """True on rank 0, and without torch.distributed: the process that writes files."""
    return world()[1] == 0


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def init_from_env(device=None) -> bool:
    """Under torchrun (WORLD_SIZE > 1) initialise the default process group from its
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) unless the caller already
    has: NCCL for a CUDA ``device``, gloo otherwise. Returns True if this call did."""
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    cuda = device is not None and torch.device(device).type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://")
    return True


@contextlib.contextmanager
def process_group_from_env(device=None):
    """Context manager: :func:`init_from_env` (with this rank's device), and the group
    destroyed at the end if it was made here."""
    if device is not None and env_world_size() > 1:
        device = local_device(torch.device(device))
    joined = init_from_env(device)
    try:
        yield
        if joined:
            dist.barrier()  # no rank tears its group down while a peer still talks to it
    finally:
        if joined:
            dist.destroy_process_group()


def shard_spec() -> tuple[int, int] | None:
    """(rank, world) under torch.distributed with several processes, else None."""
    size, rank = world()
    return (rank, size) if size > 1 else None


def local_device(dev: torch.device) -> torch.device:
    """``cuda`` under torchrun is this process's GPU, ``cuda:LOCAL_RANK`` (made current,
    as NCCL and object collectives expect); other devices are returned as they are."""
    if dev.type != "cuda" or dev.index is not None or "LOCAL_RANK" not in os.environ:
        return dev
    dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % max(1, torch.cuda.device_count()))
    torch.cuda.set_device(dev)
    return dev


# --------------------------------------------------------------------------- collectives
def from_rank0(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on rank 0 only; its result on every rank. An exception on
    rank 0 is raised on every rank (same type and message), so none waits forever."""
    size, rank = world()
    if size == 1:
        return fn(*args, **kwargs)
    box, error = [None], None
    if rank == 0:
        try:
            box = [("ok", fn(*args, **kwargs))]
        except Exception as exc:  # sent as type and text: any exception can travel
            error, box = exc, [("error", type(exc), str(exc))]
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "ok":
        return box[0][1]
    if error is not None:
        raise error
    _, kind, text = box[0]
    try:
        exc = kind(text)
    except Exception:
        exc = RuntimeError(text)
    raise exc


def gather(obj) -> list:
    """``obj`` of every rank (a list in rank order) on every rank."""
    size, _ = world()
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


def all_sum(values, device=None) -> list[float]:
    """Element-wise sums of ``values`` over the ranks (float64: counts stay exact)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if world()[0] > 1:
        dist.all_reduce(t)
    return t.tolist()


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over the ranks (``t`` itself with one process)."""
    if world()[0] == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / world()[0]


def same_on_all(what: str, value) -> None:
    """Raise on every rank if ``value`` differs between ranks (a run that would hang)."""
    seen = gather(value)
    if any(v != seen[0] for v in seen):
        raise ValueError(f"{what} differs between the processes ({seen} by rank); give every rank the same "
                         "number of batches (a DistributedSampler, or thinet_fast.distributed.shard_loader)")


def warn_unsharded(data) -> None:
    """Warn when a DataLoader under torch.distributed has no DistributedSampler: every
    rank would train on the same batches (a bigger batch of copies, not a sharded one)."""
    if isinstance(data, DataLoader) and not isinstance(data.sampler, DistributedSampler):
        warnings.warn(f"torch.distributed with {world()[0]} processes, but train_data's sampler is a "
                      f"{type(data.sampler).__name__}: every rank sees the same batches. Shard it: "
                      "thinet_fast.distributed.shard_loader(loader)", stacklevel=3)


# --------------------------------------------------------------------------- sharding
def _rank_world(rank, world_size):
    size, r = world()
    world_size = size if world_size is None else int(world_size)
    rank = (r if world_size == size else 0) if rank is None else int(rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return rank, world_size


def shard_indices(n: int, rank: int | None = None, world_size: int | None = None) -> list[int]:
    """This rank's items of ``range(n)``: ``rank::world`` (the order of
    ``DistributedSampler(shuffle=False)``, without its padding: an exact partition)."""
    rank, world_size = _rank_world(rank, world_size)
    return list(range(rank, n, world_size))


def shard_dataset(dataset, rank: int | None = None, world_size: int | None = None, limit: int | None = None):
    """This rank's share of the first ``limit`` items of ``dataset`` (all without
    ``limit``): the same images over all ranks as one process reading the first
    ``limit``. The dataset itself when there is one process and no limit."""
    rank, world_size = _rank_world(rank, world_size)
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    if world_size == 1 and n == len(dataset):
        return dataset
    return Subset(dataset, shard_indices(n, rank, world_size))


def shard_loader(loader: DataLoader, *, world_size: int | None = None, rank: int | None = None,
                 seed: int | None = None, drop_last: bool | None = None) -> DataLoader:
    """``loader`` rebuilt for one rank: the same dataset, workers and collate function,
    a ``DistributedSampler`` (shuffled if ``loader`` shuffles, with ``seed``: default the
    loader's generator's initial seed, else 0) and ``loader.batch_size // world`` items
    per batch, so ``loader.batch_size`` stays the global batch. ``world_size=1`` gives
    the one-process run with the same order. The loader's own generator (worker seeds)
    is offset by the rank, so random augmentations differ between ranks."""
    rank, world_size = _rank_world(rank, world_size)
    if loader.batch_size is None:
        raise ValueError("shard_loader needs a DataLoader with batch_size= (not a batch_sampler)")
    if loader.batch_size % world_size:
        raise ValueError(f"the global batch {loader.batch_size} is not a multiple of the {world_size} processes")
    gen = loader.generator
    if seed is None:
        seed = gen.initial_seed() if gen is not None else 0
    shuffle = isinstance(loader.sampler, (RandomSampler, DistributedSampler)) and getattr(
        loader.sampler, "shuffle", True)
    drop = loader.drop_last if drop_last is None else drop_last
    sampler = DistributedSampler(loader.dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                 seed=int(seed), drop_last=drop)
    g = torch.Generator().manual_seed(int(seed) + rank)
    extra = {"prefetch_factor": loader.prefetch_factor} if loader.num_workers > 0 else {}
    return DataLoader(loader.dataset, batch_size=loader.batch_size // world_size, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      drop_last=drop, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      generator=g, persistent_workers=loader.persistent_workers, **extra)


# --------------------------------------------------------------------------- the model
@torch.no_grad()
def broadcast_module(model: nn.Module, device=None) -> None:
    """Rank 0's parameters and buffers on every rank (a model built by name with a
    random initialisation differs between the processes otherwise). Through ``device``
    (NCCL needs CUDA tensors); the tensors stay where they are."""
    if world()[0] == 1:
        return
    for t in list(model.parameters()) + list(model.buffers()):
        buf = t.detach().to(device) if device is not None else t.detach()
        dist.broadcast(buf, src=0)
        if buf is not t:
            t.copy_(buf)


def wrap_ddp(model: nn.Module, dev: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel (gradients averaged over the ranks in the
    backward pass; rank 0's parameters and buffers broadcast at the start)."""
    from torch.nn.parallel import DistributedDataParallel
    ids = None
    if dev.type == "cuda":
        ids = [dev.index if dev.index is not None else torch.cuda.current_device()]
    return DistributedDataParallel(model, device_ids=ids)


_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class SyncBatchNorms:
    """Context manager: the model's BatchNorm1d/2d/3d layers normalise with the
    statistics of the whole global batch (their class is ``nn.SyncBatchNorm``
    meanwhile, same parameters and buffers, same module objects). ``plain()`` gives the
    classes back for a while (to save a checkpoint that loads without
    torch.distributed). A no-op when ``enabled`` is false. torch's SyncBatchNorm runs on
    GPUs only."""

    def __init__(self, model: nn.Module, enabled: bool = True):
        self.layers = [(m, type(m)) for m in model.modules() if type(m) in _PLAIN_BN] if enabled else []

    def _set(self, sync: bool) -> None:
        for m, cls in self.layers:
            m.__class__ = nn.SyncBatchNorm if sync else cls
            if sync:
                m.process_group = None  # the default group
            else:
                m.__dict__.pop("process_group", None)

    def __enter__(self):
        self._set(True)
        return self

    def __exit__(self, *exc):
        self._set(False)

    def plain(self):
        outer = self

        class _Plain:
            def __enter__(self):
                outer._set(False)

            def __exit__(self, *exc):
                outer._set(True)
        return _Plain()

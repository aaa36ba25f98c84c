"""Fine-tuning a (pruned) model: SGD/AdamW, schedules, label smoothing, distillation,
periodic validation, checkpoints, exact resume, mixed precision and a JSON-lines log.

Resume is exact: a run stopped after any checkpoint and resumed with ``resume=True``
ends with the same weights as one that ran straight through with the same seed (on
CPU to float rounding; on CUDA up to its non-deterministic kernels). The checkpoint
holds everything the rest of the run depends on (see :mod:`thinet_fast.checkpoints_ft`
for the data order). Validation runs with the random states saved and restored, so
``val_every`` and ``checkpoint_dir`` never change the trajectory.

Under torch.distributed (torchrun; the group is joined from its environment if the
caller has not) the model trains in DistributedDataParallel, each rank on its shard of
``train_data`` (:func:`thinet_fast.distributed.shard_loader`). DDP averages the ranks'
mean-loss gradients, which is the mean over the global batch: the run equals one
process on the same global batches to float rounding (tested with 2 gloo processes)
but for what is drawn per rank: BatchNorm batch statistics (the rank's B/world inputs,
torch's default; ``sync_bn=True``, CUDA only, uses the global batch's) and dropout
masks (seeded ``seed + rank``). The logged loss is the ranks' mean, validation counts
are summed over the ranks (give each its shard of ``val_data``), only rank 0 writes
files, ``last.pt`` holds every rank's random states and a resume (read on rank 0, sent
to the others) needs the same number of processes. The teacher is not wrapped.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoints_ft as ck
from . import distributed as D
from .files import check_writable
from .modes import preserved_modes
from .training import _batches, correct_counts, distillation_loss

__all__ = ["finetune", "OPTIMIZERS", "LR_SCHEDULES", "AMP_MODES"]

OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "step", "constant")
AMP_MODES = (None, "bf16", "fp16")


def _int(name, v, lo, fix=""):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo} or None; got {v!r}{fix}")
    return int(v)


def _real(name, v, lo, hi=math.inf, *, hi_open=False, lo_open=False, fix=""):
    ok = not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        span = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {span}; got {v!r}{fix}")
    return float(v)


def _check(model, teacher, optimizer, schedule, amp, val_data, val_every, checkpoint_dir, resume, kw):
    if not isinstance(model, nn.Module) or not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model must be an nn.Module with trainable parameters")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise ValueError(f"teacher must be an nn.Module or None; got {type(teacher).__name__}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not 'sgd' or 'adamw'")
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not 'cosine', 'step' or 'constant'")
    if amp not in AMP_MODES:
        raise ValueError(f"amp={amp!r} is not None, 'bf16' or 'fp16'")
    if not 0 <= kw["distill_weight"] <= 1:
        raise ValueError(f"distill_weight must lie in [0, 1]; got {kw['distill_weight']}")
    _real("epochs", kw["epochs"], 0, lo_open=True, fix="; or pass steps=")
    _real("lr", kw["lr"], 0)
    _real("momentum", kw["momentum"], 0, 1, hi_open=True, fix=" (0 turns momentum off)")
    _real("weight_decay", kw["weight_decay"], 0)
    _real("label_smoothing", kw["label_smoothing"], 0, 1, hi_open=True, fix=" (0 is plain cross-entropy)")
    _real("gamma", kw["gamma"], 0, lo_open=True)
    _real("temperature", kw["temperature"], 0, lo_open=True)
    for name in ("steps", "step_size", "val_every", "val_batches"):
        _int(name, kw[name], 1)
    _int("log_every", kw["log_every"], 0, fix=" (0 logs every step)")
    if kw["seed"] is not None and (isinstance(kw["seed"], bool) or not isinstance(kw["seed"], numbers.Integral)):
        raise ValueError(f"seed must be an integer or None; got {kw['seed']!r}")
    if val_every is not None and val_data is None and checkpoint_dir is None:
        raise ValueError("val_every= needs val_data= (to validate) or checkpoint_dir= (to checkpoint) as well")
    if not (resume is None or isinstance(resume, (bool, str, os.PathLike))):
        raise ValueError(f"resume must be True, False or the path of a last.pt; got {type(resume).__name__}")


def _paths(checkpoint_dir, resume):
    """(checkpoint directory or None, last.pt to resume from or None)."""
    path = None
    if isinstance(resume, (str, os.PathLike)):
        path = os.fspath(resume)
        if not os.path.isfile(path):
            raise ValueError(f"resume={path!r}: no such file; pass the last.pt of an earlier run, or "
                             "checkpoint_dir= with resume=True (which starts fresh when there is none)")
        if checkpoint_dir is None:
            checkpoint_dir = os.path.dirname(os.path.abspath(path))  # keep writing next to it
    elif resume is True and checkpoint_dir is None:
        raise ValueError("resume=True reads <checkpoint_dir>/last.pt: pass checkpoint_dir= as well, "
                         "or resume=<path of a last.pt>")
    if checkpoint_dir is not None:
        checkpoint_dir = os.fspath(checkpoint_dir)
        if os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
            raise ValueError(f"checkpoint_dir={checkpoint_dir!r} is a file; pass a directory")
        os.makedirs(checkpoint_dir, exist_ok=True)
        check_writable(os.path.join(checkpoint_dir, "last.pt"), "checkpoint_dir=")
        if resume is True and os.path.isfile(os.path.join(checkpoint_dir, "last.pt")):
            path = os.path.join(checkpoint_dir, "last.pt")
    return checkpoint_dir, path


def _amp(amp, dev: torch.device):
    """(autocast context factory, GradScaler or None)."""
    if amp is None:
        return contextlib.nullcontext, None
    if amp == "fp16" and dev.type != "cuda":
        raise ValueError(f"amp='fp16' needs a CUDA device (fp16 needs a GradScaler); on {dev.type} "
                         "use amp='bf16' or amp=None")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"amp={amp!r} runs on cuda or cpu, not {dev.type}; pass amp=None")
    if amp == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("amp='bf16': this GPU has no bfloat16; use amp='fp16'")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    return (lambda: torch.autocast(dev.type, dtype=dtype)), scaler


def _one(_):
    return 1.0  # a module-level function: the scheduler's state_dict stays plain


def _optim(params, optimizer, schedule, steps, o):
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"],
                              nesterov=o["momentum"] > 0)
    else:
        opt = torch.optim.AdamW(params, lr=o["lr"], weight_decay=o["weight_decay"])
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    elif schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=o["step_size"] or max(1, steps // 3),
                                                gamma=o["gamma"])
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _one)
    return opt, sched


def finetune(model: nn.Module, train_data, *, epochs: float = 1.0, steps: int | None = None, lr: float = 0.01,
             optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 1e-4,
             schedule: str = "cosine", step_size: int | None = None, gamma: float = 0.1,
             label_smoothing: float = 0.0, teacher: nn.Module | None = None, temperature: float = 4.0,
             distill_weight: float = 0.5, val_data=None, val_every: int | None = None,
             val_batches: int | None = None, checkpoint_dir=None, resume=False, amp: str | None = None,
             seed: int | None = None, log=None, log_every: int = 0, device=None, progress: bool = True,
             sync_bn: bool = False) -> dict:
    """Fine-tune ``model`` in place on (input, target) batches.

    Args:
        epochs: passes over ``train_data`` (fractions allowed) unless ``steps`` is given.
        optimizer: "sgd" (``momentum``, Nesterov when momentum > 0) or "adamw".
        schedule: per-step "cosine" (to 0 at the last step), "step" (``gamma`` every
            ``step_size`` steps, default steps // 3) or "constant".
        label_smoothing: as in ``F.cross_entropy`` (the CE part when distilling).
        teacher: the unpruned model for knowledge distillation (frozen, eval mode);
            ``temperature``, ``distill_weight``: its settings (weight 0 = plain CE).
        val_data: (input, target) batches for top-1/top-5 (:func:`evaluate`, at most
            ``val_batches``) every ``val_every`` steps and after the last step.
        checkpoint_dir: write ``last.pt`` (model and training state) every ``val_every``
            steps and at the end, and ``best.pt`` (the model with the best val top-1).
            Both load with :func:`thinet_fast.load`; created if missing.
        resume: True: continue from ``<checkpoint_dir>/last.pt`` if there is one (else
            start fresh); a path: continue from that file (which must exist). The
            options must be those of the run that wrote it; the model's weights are
            replaced by the checkpoint's.
        amp: None, "bf16" (CUDA with bfloat16, or CPU autocast) or "fp16" (CUDA only,
            with a GradScaler). The loss and validation run in float32.
        seed: seeds torch, random and numpy at a fresh start (a resume restores the
            saved states instead). A DataLoader with its own ``generator`` keeps it.
        log: path of a JSON-lines log: a "train" line (step, loss, avg_loss, lr) every
            ``log_every`` steps (0: every step), a "val" line per validation.
        device: where to train (the model and teacher are moved there); default: the
            model's device. Under torchrun, each rank's own device (``cuda:LOCAL_RANK``).
        sync_bn: under torch.distributed, BatchNorm layers use the statistics of the
            global batch (``nn.SyncBatchNorm`` for the run; CUDA only) instead of the rank's.
    Returns:
        {"steps", "loss" (running average), "last_loss", "lr", "val" and "best_val"
        ({"step", "top1", "top5"} or None), "seconds" (this call), "resumed_from"
        (a step or None), "checkpoint_dir", "world_size"}: plain values, JSON-serialisable,
        the same on every rank.
    """
    t0 = time.perf_counter()
    o = dict(epochs=epochs, steps=steps, lr=lr, momentum=momentum, weight_decay=weight_decay, gamma=gamma,
             step_size=step_size, label_smoothing=label_smoothing, temperature=temperature,
             distill_weight=distill_weight, val_every=val_every, val_batches=val_batches, log_every=log_every,
             seed=seed)
    _check(model, teacher, optimizer, schedule, amp, val_data, val_every, checkpoint_dir, resume, o)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    D.init_from_env(dev)  # under torchrun, join its process group unless the caller has
    world, rank = D.world()
    main = rank == 0
    if sync_bn and world > 1 and dev.type != "cuda":
        raise ValueError(f"sync_bn=True runs on CUDA only (torch's SyncBatchNorm); this run is on {dev.type}")
    try:
        n_batches = len(train_data)
    except TypeError:
        n_batches = None
    if steps is None:
        if n_batches is None:
            raise ValueError("train_data has no len(); pass steps=")
        if n_batches == 0:
            raise ValueError("train_data is empty")
        steps = max(1, int(math.ceil(epochs * n_batches)))
    if world > 1:  # ranks that disagree would wait for each other's all-reduce forever
        D.warn_unsharded(train_data)
        D.same_on_all("the steps and len(train_data)", (steps, n_batches))
    ckpt_dir, resume_path = D.from_rank0(_paths, checkpoint_dir, resume)  # rank 0's disk decides
    if log is not None and main:
        check_writable(log, "log=")  # now, not after the first hour of training
    if resume_path is not None and ck.one_pass(train_data):
        raise ValueError("resume= needs train_data that gives the same batches again (a DataLoader, a list); "
                         "got a one-pass iterator")
    if device is not None:
        model.to(dev)
    autocast, scaler = _amp(amp, dev)
    opt, sched = _optim([p for p in model.parameters() if p.requires_grad], optimizer, schedule, steps, o)
    # what decides the trajectory: a resume with other values is refused
    options = {"steps": steps, "optimizer": optimizer, "lr": lr, "momentum": momentum,
               "weight_decay": weight_decay, "schedule": schedule, "step_size": step_size, "gamma": gamma,
               "label_smoothing": label_smoothing, "amp": amp, "teacher": teacher is not None,
               "temperature": temperature, "distill_weight": distill_weight, "batches_per_epoch": n_batches}
    if world > 1:  # absent with one process: earlier checkpoints still resume
        options["world_size"] = world
    gens = ck.data_generators(train_data)
    flags = [(m, m.training) for m in model.modules()]  # files carry the caller's modes
    last_path = best_path = None
    if ckpt_dir is not None:
        last_path, best_path = os.path.join(ckpt_dir, "last.pt"), os.path.join(ckpt_dir, "best.pt")

    st = None
    if resume_path is not None:
        sd, st = D.from_rank0(ck.read_checkpoint, resume_path)  # read once, sent to every rank
        ck.restore(model, opt, sched, scaler, sd, st, options, resume_path)
        if world > 1:  # each rank goes on with its own random streams
            st.update(st["ranks"][rank])
        best = st["best"]
        if main and best is not None and best["step"] == st["step"] and ck.best_step(best_path) != best["step"]:
            ck.write_best(model, best_path, best, flags)  # stopped between last.pt and best.pt
    elif seed is not None:
        ck.seed_all(int(seed) + rank)  # rank 0 as one process; other ranks draw other dropout masks
    done, epoch, seen = (st["step"], st["epoch"], st["seen"]) if st else (0, 0, 0)
    running, last_loss, last_lr = (st["running_loss"], st["last_loss"], st["last_lr"]) if st else (
        float("nan"), float("nan"), float(opt.param_groups[0]["lr"]))
    best, last_val = (st["best"], st["last_val"]) if st else (None, None)
    prior_seconds = st["seconds"] if st else 0.0
    resumed_from = st["step"] if st else None
    epoch_rng, ended = None, False

    def seconds():
        return prior_seconds + time.perf_counter() - t0

    def validate():
        nonlocal best, last_val
        saved = ck.rng_state()  # validation must not move the training's random streams
        try:
            correct, total = correct_counts(model, val_data, device=dev, topk=(1, 5), max_batches=val_batches)
        finally:
            ck.set_rng_state(saved)
        top1, top5, total = D.all_sum([correct[1], correct[5], total], dev)  # every rank's share
        if total == 0:
            raise ValueError("evaluation data is empty")
        acc = {1: top1 / total, 5: top5 / total}
        last_val = {"step": done, "top1": acc[1], "top5": acc[5]}
        improved = best is None or last_val["top1"] > best["top1"]
        if improved:
            best = dict(last_val)
        logf.write(event="val", step=done, top1=acc[1], top5=acc[5], best_top1=best["top1"], best_step=best["step"])
        return improved

    def checkpoint(improved):
        # at a known epoch end (the iterator was seen to stop) a resume starts the next epoch
        # instead of reloading this one's batches
        rng = ck.rng_state(gens)
        ranks = D.gather({"rng": rng, "epoch_rng": None if ended else epoch_rng}) if world > 1 else None
        if not main:
            return
        state = {"step": done, "epoch": epoch + ended, "seen": 0 if ended else seen,
                 "epoch_rng": None if ended else epoch_rng, "rng": rng, "ranks": ranks,
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None, "running_loss": running,
                 "last_loss": last_loss, "last_lr": last_lr, "best": best, "last_val": last_val,
                 "options": options, "seconds": seconds()}
        with sbn.plain():  # files hold plain BatchNorms
            ck.write_checkpoint(model, last_path, state, flags)  # last.pt first: see the resume repair above
            if improved:
                ck.write_best(model, best_path, best, flags)

    logf = ck.JsonLog(log if main else None, resume_step=done if st else None)
    if st:
        logf.write(event="resume", step=done, steps=steps, path=os.path.abspath(resume_path))
    else:
        logf.write(event="start", step=0, steps=steps, options=options)
    teacher_modes, teacher_device = contextlib.nullcontext(), None
    if teacher is not None:  # its forward runs under no_grad; its flags and device stay the caller's
        teacher_device = next(teacher.parameters()).device
        teacher.to(dev)
        teacher_modes = preserved_modes(teacher, train=False)
    bar = None
    sbn = D.SyncBatchNorms(model, sync_bn and world > 1)
    if progress and main:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=done, desc="finetune", leave=False)
    try:
        with preserved_modes(model, train=True), teacher_modes, sbn:
            net = D.wrap_ddp(model, dev) if world > 1 else model  # wrapped after SyncBatchNorms: DDP checks them
            while done < steps:
                skip = 0
                if st is not None and st["epoch_rng"] is not None:  # resume inside an epoch
                    epoch_rng, skip = st["epoch_rng"], st["seen"]
                    ck.set_rng_state(epoch_rng, gens)
                else:
                    if st is not None:
                        ck.set_rng_state(st["rng"], gens)
                    epoch_rng = ck.rng_state(gens)  # the epoch's order is drawn from these
                ck.set_epoch(train_data, epoch)
                it = _batches(train_data)
                for i in range(skip):  # loaded (their random draws replayed), not trained on
                    if next(it, None) is None:
                        raise ValueError(f"resume: train_data gave {i} batches in epoch {epoch}, the checkpoint "
                                         f"had seen {skip}; pass the same train_data")
                if skip:
                    ck.set_rng_state(st["rng"], gens)
                st, seen, ended, pending = None, skip, False, None
                while done < steps:
                    batch, pending = (pending, None) if pending is not None else (next(it, None), None)
                    if batch is None:
                        break
                    x, y = batch[0].to(dev), batch[1].to(dev)
                    with autocast():
                        out = net(x)
                        if teacher is not None:
                            with torch.no_grad():
                                t_out = teacher(x)
                    if teacher is not None:
                        loss = distillation_loss(out.float(), t_out.float(), y, temperature=temperature,
                                                 weight=distill_weight, label_smoothing=label_smoothing)
                    else:
                        loss = F.cross_entropy(out.float(), y, label_smoothing=label_smoothing)
                    shown = D.mean_over_ranks(loss.detach())  # the global batch's loss, on every rank
                    if not torch.isfinite(shown):  # so every rank stops here
                        raise FloatingPointError(f"loss became {float(shown)} at step {done}; lower lr={lr}")
                    opt.zero_grad(set_to_none=True)
                    last_lr = float(opt.param_groups[0]["lr"])
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.step(opt)
                        scaler.update()
                    else:
                        loss.backward()
                        opt.step()
                    sched.step()
                    last_loss = float(shown)
                    running = last_loss if math.isnan(running) else 0.9 * running + 0.1 * last_loss
                    done += 1
                    seen += 1
                    if n_batches is not None and seen == n_batches:
                        # look for the epoch's end now (no batch is loaded when len() is right)
                        pending = next(it, None)
                        ended = pending is None
                    if log_every == 0 or done % log_every == 0 or done == steps:
                        logf.write(event="train", step=done, epoch=epoch, loss=last_loss, avg_loss=running,
                                   lr=last_lr, seconds=seconds())
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{running:.3f}")
                    due = done == steps or (val_every is not None and done % val_every == 0)
                    if due:
                        improved = validate() if val_data is not None else False
                        if ckpt_dir is not None:
                            checkpoint(improved)
                    if ended:
                        break
                if seen == 0:
                    raise ValueError("train_data is empty" if done == 0 else
                                     f"train_data gave no batches in epoch {epoch}: a one-pass iterator cannot "
                                     f"be iterated again; pass a DataLoader or a list, or steps <= {done}")
                epoch += 1
        result = {"steps": done, "loss": running, "last_loss": last_loss, "lr": last_lr, "val": last_val,
                  "best_val": best, "seconds": time.perf_counter() - t0,
                  "resumed_from": resumed_from, "checkpoint_dir": ckpt_dir, "world_size": world}
        logf.write(event="end", step=done, **{k: v for k, v in result.items() if k != "checkpoint_dir"})
        return result
    finally:
        logf.close()
        if bar is not None:
            bar.close()
        if teacher is not None:
            teacher.to(teacher_device)

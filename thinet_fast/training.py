"""Fine-tuning (with optional distillation from the unpruned model) and evaluation."""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .modes import preserved_modes


def _batches(data):
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("training/evaluation data must yield (input, target) pairs")
        yield batch[0], batch[1]


@torch.no_grad()
def evaluate(model: nn.Module, data, *, device=None, topk=(1, 5), max_batches: int | None = None,
             progress: bool = False) -> dict[int, float]:
    """Top-k accuracy over ``data`` ((input, target) batches). Returns {k: accuracy}."""
    device = device or next(model.parameters()).device
    correct = {k: 0 for k in topk}
    total = 0
    it = _batches(data)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="eval", leave=False, total=_len(data, max_batches))
    with preserved_modes(model, train=False):
        for i, (x, y) in enumerate(it):
            if max_batches is not None and i >= max_batches:
                break
            logits = model(x.to(device))
            y = y.to(device)
            kmax = min(max(topk), logits.shape[1])
            pred = logits.topk(kmax, dim=1).indices
            hit = pred == y[:, None]
            for k in topk:
                correct[k] += int(hit[:, : min(k, kmax)].any(dim=1).sum())
            total += y.numel()
    if total == 0:
        raise ValueError("evaluation data is empty")
    return {k: c / total for k, c in correct.items()}


def _len(data, cap):
    try:
        n = len(data)
    except TypeError:
        return cap
    return n if cap is None else min(n, cap)


def distillation_loss(student_logits, teacher_logits, target, *, temperature: float, weight: float):
    """Hinton et al.: (1 - weight)·CE + weight·T²·KL(teacher_T ‖ student_T)."""
    ce = F.cross_entropy(student_logits, target)
    if weight == 0:
        return ce
    T = temperature
    kl = F.kl_div(F.log_softmax(student_logits / T, dim=1), F.log_softmax(teacher_logits / T, dim=1),
                  reduction="batchmean", log_target=True)
    return (1 - weight) * ce + weight * T * T * kl


def finetune(model: nn.Module, train_data, *, epochs: float = 1.0, steps: int | None = None, lr: float = 0.01,
             optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 1e-4,
             schedule: str = "cosine", step_size: int | None = None, gamma: float = 0.1,
             teacher: nn.Module | None = None, temperature: float = 4.0, distill_weight: float = 0.5,
             device=None, progress: bool = True, log_every: int = 0) -> dict:
    """Fine-tune ``model`` in place on (input, target) batches.

    Args:
        epochs: passes over ``train_data`` (fractions allowed) unless ``steps`` is given.
        optimizer: "sgd" (momentum, nesterov) or "adamw".
        schedule: "cosine", "step" (``gamma`` every ``step_size`` steps) or "constant".
        teacher: the unpruned model for knowledge distillation (frozen, eval mode).
        temperature, distill_weight: distillation settings (weight 0 = plain CE).
    Returns:
        {"steps": n, "loss": last running loss}.
    """
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer={optimizer!r} is not 'sgd' or 'adamw'")
    if schedule not in ("cosine", "step", "constant"):
        raise ValueError(f"schedule={schedule!r} is not 'cosine', 'step' or 'constant'")
    if not 0 <= distill_weight <= 1:
        raise ValueError(f"distill_weight must lie in [0, 1]; got {distill_weight}")
    device = device or next(model.parameters()).device
    if steps is None:
        try:
            steps = max(1, int(math.ceil(epochs * len(train_data))))
        except TypeError:
            raise ValueError("train_data has no len(); pass steps=") from None
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    elif schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size or max(1, steps // 3), gamma=gamma)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    teacher_modes = contextlib.nullcontext()
    teacher_device = None
    if teacher is not None:  # its forward runs under no_grad; its flags and device stay the caller's
        teacher_device = next(teacher.parameters()).device
        teacher.to(device)
        teacher_modes = preserved_modes(teacher, train=False)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="finetune", leave=False)
    done, running = 0, float("nan")
    try:
        with preserved_modes(model, train=True), teacher_modes:
            while done < steps:
                for x, y in _batches(train_data):
                    x, y = x.to(device), y.to(device)
                    out = model(x)
                    if teacher is not None:
                        with torch.no_grad():
                            t_out = teacher(x)
                        loss = distillation_loss(out, t_out, y, temperature=temperature, weight=distill_weight)
                    else:
                        loss = F.cross_entropy(out, y)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"loss became {float(loss)} at step {done}; lower lr={lr}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    lv = float(loss.detach())
                    running = lv if math.isnan(running) else 0.9 * running + 0.1 * lv
                    done += 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{running:.3f}")
                    if done >= steps:
                        break
                else:
                    if done == 0:
                        raise ValueError("train_data is empty")
    finally:
        if bar is not None:
            bar.close()
        if teacher is not None:
            teacher.to(teacher_device)
    return {"steps": done, "loss": running}


def finetune_callback(train_data, *, teacher: nn.Module | None = None, **kwargs) -> Callable:
    """A per-unit callback for the sequential schedule: ``prune(..., finetune=cb)``.
    ``teacher`` is typically the unpruned model; kwargs go to :func:`finetune`."""

    def callback(model: nn.Module, unit, index: int):
        return finetune(model, train_data, teacher=teacher, **kwargs)

    return callback

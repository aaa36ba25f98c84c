"""Evaluation, the distillation loss, and the per-unit fine-tune callback.

:func:`finetune` itself lives in :mod:`thinet_fast.finetuning` (re-exported here)."""
from __future__ import annotations

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


def evaluate(model: nn.Module, data, *, device=None, topk=(1, 5), max_batches: int | None = None,
             progress: bool = False) -> dict[int, float]:
    """Top-k accuracy over ``data`` ((input, target) batches). Returns {k: accuracy}."""
    correct, total = correct_counts(model, data, device=device, topk=topk, max_batches=max_batches,
                                    progress=progress)
    if total == 0:
        raise ValueError("evaluation data is empty")
    return {k: c / total for k, c in correct.items()}


@torch.no_grad()
def correct_counts(model: nn.Module, data, *, device=None, topk=(1, 5), max_batches: int | None = None,
                   progress: bool = False) -> tuple[dict[int, int], int]:
    """({k: inputs whose target is among the top k}, inputs): what :func:`evaluate`
    divides, and what distributed validation sums over the ranks."""
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
    return correct, total


def _len(data, cap):
    try:
        n = len(data)
    except TypeError:
        return cap
    return n if cap is None else min(n, cap)


def distillation_loss(student_logits, teacher_logits, target, *, temperature: float, weight: float,
                      label_smoothing: float = 0.0):
    """Hinton et al.: (1 - weight)·CE + weight·T²·KL(teacher_T ‖ student_T); the CE part
    with ``label_smoothing`` as in ``F.cross_entropy``."""
    ce = F.cross_entropy(student_logits, target, label_smoothing=label_smoothing)
    if weight == 0:
        return ce
    T = temperature
    kl = F.kl_div(F.log_softmax(student_logits / T, dim=1), F.log_softmax(teacher_logits / T, dim=1),
                  reduction="batchmean", log_target=True)
    return (1 - weight) * ce + weight * T * T * kl


def finetune_callback(train_data, *, teacher: nn.Module | None = None, **kwargs) -> Callable:
    """A per-unit callback for the sequential schedule: ``prune(..., finetune=cb)``.
    ``teacher`` is typically the unpruned model; kwargs go to :func:`finetune`."""

    def callback(model: nn.Module, unit, index: int):
        return finetune(model, train_data, teacher=teacher, **kwargs)

    return callback


# at the end: finetuning imports evaluate and distillation_loss from this module
from .finetuning import finetune  # noqa: E402

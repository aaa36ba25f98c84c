"""Which rows and columns of a weight a structured cut kept.

Pruning tools (Torch-Pruning among them) cut a layer by indexing its weight, so the cut
weight is a sub-block of the old one, value for value. :func:`kept_indices` recovers
the kept output rows and input columns from the two tensors alone, and verifies them
exactly, so a wrong answer is an error, never a silently wrong index.
"""
from __future__ import annotations

import torch

__all__ = ["kept_indices"]


def kept_indices(before: torch.Tensor, after: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` with ``after == before[rows][:, cols]`` exactly (weights (K, C, ...)).

    Each row and column of ``after`` is located by one of its values that occurs exactly
    once in ``before``: such a value can only have come from that place. Raises
    ValueError when a row or column has no such value (all zeros, repeated values) or
    when ``after`` is not a sub-block of ``before``."""
    b = before.detach().cpu().reshape(before.shape[0], before.shape[1], -1)
    a = after.detach().cpu().reshape(after.shape[0], after.shape[1], -1)
    if a.shape[2] != b.shape[2] or a.shape[0] > b.shape[0] or a.shape[1] > b.shape[1]:
        raise ValueError(f"weight {tuple(after.shape)} is not a cut of {tuple(before.shape)}")
    vals, idx = b.reshape(-1).sort()
    q = a.reshape(-1)
    lo, hi = torch.searchsorted(vals, q), torch.searchsorted(vals, q, right=True)
    unique = ((hi - lo) == 1).reshape(a.shape)
    src = idx[lo.clamp(max=vals.numel() - 1)].reshape(a.shape)
    C0, t = b.shape[1], b.shape[2]

    def locate(mask, origin):  # (n, m) -> the origin of each row's first unique value
        if not bool(mask.any(1).all()):
            missing = (~mask.any(1)).nonzero().squeeze(1)[:5].tolist()
            raise ValueError(f"cannot tell which channels were kept: rows/columns {missing} of the cut weight have no "
                             "value that occurs once in the unpruned one (zeros or repeated values)")
        return origin.gather(1, mask.int().argmax(1, keepdim=True)).squeeze(1)

    rows = locate(unique.reshape(a.shape[0], -1), (src // (C0 * t)).reshape(a.shape[0], -1))
    cols = locate(unique.transpose(0, 1).reshape(a.shape[1], -1),
                  ((src // t) % C0).transpose(0, 1).reshape(a.shape[1], -1))
    if not torch.equal(b[rows][:, cols], a):
        raise ValueError("the cut weight is not a sub-block of the unpruned one (was the model changed otherwise "
                         "between record() and reconstruct()?)")
    return rows, cols

"""Train/eval flags of every submodule, saved and restored (``model.train(flag)``
would force one flag on all of them, un-freezing a frozen BatchNorm)."""
from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def preserved_modes(model: nn.Module, train: bool | None = None):
    """Inside: the whole model in train (``True``) or eval (``False``) mode, or as it is
    (``None``). On exit every submodule gets its own flag back."""
    flags = [(m, m.training) for m in model.modules()]
    if train is not None and any(flag != train for _, flag in flags):
        model.train(train)
    try:
        yield model
    finally:
        for m, flag in flags:
            if m.training != flag:  # a plain attribute test: cheap on deep models
                m.training = flag


def hooked_forward(model: nn.Module, example_inputs, handles) -> None:
    """One forward of ``example_inputs`` (a tuple is unpacked) in eval mode, for the
    hooks behind ``handles``, which are removed afterwards, even on failure."""
    try:
        with preserved_modes(model, train=False):
            model(*example_inputs) if isinstance(example_inputs, tuple) else model(example_inputs)
    finally:
        for h in handles:
            h.remove()

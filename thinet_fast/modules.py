"""Module access by fully-qualified name (``"features.0"``, ``"layer1.0.conv2"``)."""
from __future__ import annotations

import torch.nn as nn

__all__ = ["get_module", "set_module", "sync_widths"]


def get_module(model: nn.Module, fqn: str) -> nn.Module:
    """Return the submodule of ``model`` at the fully-qualified name ``fqn``.

    ``""`` is the model itself. Raises ``KeyError`` naming the missing part.
    """
    if fqn == "":
        return model
    mod = model
    walked = []
    for part in fqn.split("."):
        children = mod._modules
        if part not in children or children[part] is None:
            where = ".".join(walked) or "<root>"
            raise KeyError(
                f"no module `{fqn}` in {type(model).__name__}: `{where}` has no child `{part}` "
                f"(children: {', '.join(children) or 'none'})"
            )
        mod = children[part]
        walked.append(part)
    return mod


def set_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    """Replace the submodule at ``fqn`` by ``new`` (works inside Sequential/ModuleList too)."""
    if fqn == "":
        raise ValueError("cannot replace the root module; rebuild the model instead")
    if not isinstance(new, nn.Module):
        raise TypeError(f"set_module(`{fqn}`): expected an nn.Module, got {type(new).__name__}")
    parent_fqn, _, name = fqn.rpartition(".")
    parent = get_module(model, parent_fqn)
    if name not in parent._modules:
        raise KeyError(f"no module `{fqn}` in {type(model).__name__} to replace")
    # Sequential/ModuleList/ModuleDict all keep children in _modules; setattr registers there.
    setattr(parent, name, new)


def sync_widths(model: nn.Module) -> None:
    """Attributes that repeat a width a cut changed: torchvision's ViT reshapes its
    patches with ``hidden_dim``."""
    from torchvision.models.vision_transformer import VisionTransformer

    for m in model.modules():
        if isinstance(m, VisionTransformer):
            m.hidden_dim = m.conv_proj.out_channels

"""torchvision models pruned with coupled="prune" at keep 0.5 (random init, small
inputs): each runs, gives finite output, round-trips through save/load, and loses at
least 35% of its parameters (30% where attention, which is not pruned, holds a large
share). ``THINET_FAST_ZOO=all`` runs every classification and segmentation model."""
from __future__ import annotations

import os

import pytest
import torch
import torchvision

pytest.importorskip("torch_pruning")

import thinet_fast as tf  # noqa: E402

SMOKE = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "densenet121", "regnet_y_400mf", "mnasnet0_5",
         "squeezenet1_0", "efficientnet_b0", "resnext50_32x4d", "convnext_tiny", "lraspp_mobilenet_v3_large"]
ATTENTION = ("vit_", "swin_", "maxvit_")


def _names():
    if os.environ.get("THINET_FAST_ZOO") != "all":
        return SMOKE
    return (torchvision.models.list_models(module=torchvision.models)
            + torchvision.models.list_models(module=torchvision.models.segmentation))


def _build(name):
    kw = {"image_size": 64} if name.startswith("vit_") else {}
    if name in torchvision.models.list_models(module=torchvision.models.segmentation):
        kw = dict(weights_backbone=None, num_classes=5)
    size = 96 if name == "inception_v3" else 224 if name.startswith(("swin", "maxvit")) else 64
    return torchvision.models.get_model(name, weights=None, **kw).eval(), size


def _out(y):
    return y["out"] if isinstance(y, dict) else y


@pytest.mark.parametrize("name", _names())
def test_zoo_model_prunes(name, tmp_path):
    torch.manual_seed(0)
    model, size = _build(name)
    x = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(0))
    res = tf.prune(model, x, keep=0.5, num_images=6, coupled="prune", progress=False)
    p0 = sum(p.numel() for p in model.parameters())
    p1 = sum(p.numel() for p in res.model.parameters())
    y = _out(res.model(x[:2]))
    print(f"{name}: {p0 / 1e6:.2f}M -> {p1 / 1e6:.2f}M ({1 - p1 / p0:.0%} less)")
    assert torch.isfinite(y).all()
    assert 1 - p1 / p0 >= (0.30 if name.startswith(ATTENTION) else 0.35)
    tf.save(res.model, tmp_path / "m.pt")
    back = tf.load(tmp_path / "m.pt")
    assert torch.allclose(_out(back(x[:2])), y, atol=1e-5, rtol=1e-4)

"""torchvision models pruned with coupled="prune" at keep 0.5 (random init, small
inputs): each runs, gives finite output, round-trips through save/load, and loses at
least 35% of its parameters (attention heads included: :mod:`thinet_fast.attention`).
``THINET_FAST_ZOO=all`` runs every classification, segmentation and detection model
(detectors keep every box: score threshold 0)."""
from __future__ import annotations

import os

import pytest
import torch
import torchvision

pytest.importorskip("torch_pruning")

import thinet_fast as tf  # noqa: E402

SMOKE = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "densenet121", "regnet_y_400mf", "mnasnet0_5",
         "squeezenet1_0", "efficientnet_b0", "resnext50_32x4d", "convnext_tiny", "vit_b_32", "lraspp_mobilenet_v3_large",
         "fasterrcnn_mobilenet_v3_large_320_fpn"]
# over 100M parameters or over 90 s each on a 2-core CPU: THINET_FAST_ZOO=all only
HEAVY = {"convnext_large", "efficientnet_v2_l", "maxvit_t", "regnet_y_16gf", "regnet_y_32gf", "regnet_y_128gf",
         "regnet_x_32gf", "vit_h_14", "vit_l_16", "vit_l_32", "wide_resnet101_2", "keypointrcnn_resnet50_fpn",
         "maskrcnn_resnet50_fpn_v2"}


def _names():
    """THINET_FAST_ZOO unset: the smoke set (the suite); "ci": every model but HEAVY
    (.ci/run's bounded zoo step); "all": every classification, segmentation and
    detection model."""
    mode = os.environ.get("THINET_FAST_ZOO", "")
    if mode not in ("all", "ci"):
        return SMOKE
    every = (torchvision.models.list_models(module=torchvision.models)
             + torchvision.models.list_models(module=torchvision.models.segmentation)
             + torchvision.models.list_models(module=torchvision.models.detection))
    return every if mode == "all" else [n for n in every if n not in HEAVY]


def _build(name):
    size = 96 if name == "inception_v3" else 224 if name.startswith(("swin", "maxvit")) else 64
    size = 56 if name == "vit_h_14" else size  # its patches are 14 wide
    kw = {"image_size": size} if name.startswith("vit_") else {}
    if name in torchvision.models.list_models(module=torchvision.models.segmentation):
        kw = dict(weights_backbone=None, num_classes=5)
    if name in torchvision.models.list_models(module=torchvision.models.detection):
        kw, size = dict(weights_backbone=None), 128
        if name.startswith(("ssd", "retinanet", "fcos")):
            kw["score_thresh"] = 0.0
        else:
            kw["box_score_thresh"] = 0.0
        if not name.startswith("ssd"):
            kw.update(min_size=size, max_size=size)
    return torchvision.models.get_model(name, weights=None, **kw).eval(), size


def _out(y):
    """Every floating-point output, flattened (a detector returns a list of dicts)."""
    if isinstance(y, torch.Tensor):
        return y.flatten()
    if isinstance(y, dict):
        y = [y["out"]] if "out" in y else list(y.values())
    return torch.cat([_out(v) for v in y if not isinstance(v, torch.Tensor) or v.is_floating_point()])


@pytest.mark.parametrize("name", _names())
def test_zoo_model_prunes(name, tmp_path):
    torch.manual_seed(0)
    model, size = _build(name)
    x = torch.rand(6, 3, size, size, generator=torch.Generator().manual_seed(0))
    res = tf.prune(model, x, keep=0.5, num_images=6, coupled="prune", progress=False)
    p0 = sum(p.numel() for p in model.parameters())
    p1 = sum(p.numel() for p in res.model.parameters())
    y = _out(res.model(x[:2]))
    print(f"{name}: {p0 / 1e6:.2f}M -> {p1 / 1e6:.2f}M ({1 - p1 / p0:.0%} less)")
    assert y.numel() > 0 and torch.isfinite(y).all()
    assert 1 - p1 / p0 >= 0.35
    tf.save(res.model, tmp_path / "m.pt")
    back = tf.load(tmp_path / "m.pt")
    assert torch.allclose(_out(back(x[:2])), y, atol=1e-5, rtol=1e-4)

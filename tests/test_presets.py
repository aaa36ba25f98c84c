"""Paper presets and counting: the figures are counted on the meta device (no compute).

Counting convention (thinet_fast.counting): parameters of every layer; FLOPs = 2 x the
multiply-adds of Conv2d/Linear layers for one 3x224x224 image; torchvision architectures
built with weights=None.
"""
import dataclasses

import pytest
import torch
import torch.nn as nn
import torchvision

import thinet_fast as tf

from thinet_fast.counting import count_flops, count_params, model_size_mb, profile
from thinet_fast.models import (MODEL_BUILDERS, THINET_TINY_WIDTHS, VGG16_WIDTHS, DemoResNet, DemoVGG,
                                resnet50_original, vgg16_gap, vgg16_tiny)
from thinet_fast.presets import PRESETS, Preset, apply_preset_shapes, get_preset, preset_architecture
from thinet_fast.units import find_units

X = torch.zeros(1, 3, 224, 224, device="meta")


def figures(model):
    return round(count_params(model) / 1e6, 2), round(count_flops(model, X) / 1e9, 2)


def on_meta(builder, **kw):
    with torch.device("meta"):
        return builder(**kw)


# ------------------------------------------------------------------ unpruned baselines
def test_vgg16_counts():
    m = on_meta(torchvision.models.vgg16, weights=None)
    assert count_params(m) == 138_357_544
    assert figures(m) == (138.36, 30.94)
    # 527.8 "MB" = float32 parameter bytes / 2**20 (the paper's 528 MB)
    assert round(model_size_mb(m), 1) == 527.8


def test_resnet50_original_vs_torchvision():
    orig = on_meta(resnet50_original)
    tv = on_meta(torchvision.models.resnet50, weights=None)
    assert count_params(orig) == count_params(tv) == 25_557_032
    assert figures(orig) == (25.56, 7.72)  # ResNet v1 (paper): stride on the first 1x1
    assert figures(tv) == (25.56, 8.18)    # torchvision v1.5: stride on the 3x3
    assert orig.layer2[0].conv1.stride == (2, 2) and orig.layer2[0].conv2.stride == (1, 1)
    assert orig.layer1[0].conv1.stride == (1, 1)  # layer1 does not downsample


# ------------------------------------------------------------------ VGG presets
def test_thinet_conv():
    assert figures(preset_architecture("vgg16-thinet-conv")) == (131.45, 9.58)


def test_thinet_gap_matches_from_scratch_builder():
    m = preset_architecture("vgg16-thinet-gap")
    assert figures(m) == (8.32, 9.34)
    widths = [w // 2 for w in VGG16_WIDTHS[:10]] + list(VGG16_WIDTHS[10:])
    scratch = on_meta(vgg16_gap, widths=widths)
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in scratch.state_dict().items()}


def test_thinet_tiny_matches_from_scratch_builder():
    m = preset_architecture("vgg16-thinet-tiny")
    assert count_params(m) == 1_325_368
    assert round(count_flops(m, X) / 1e9, 2) == 2.01  # the paper prints 1.32M params, 2.01 GFLOPs
    scratch = on_meta(vgg16_tiny)
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in scratch.state_dict().items()}
    assert [c.out_channels for c in m.features if isinstance(c, nn.Conv2d)] == list(THINET_TINY_WIDTHS)
    assert isinstance(m.classifier, nn.Linear) and m.classifier.in_features == 256


# ------------------------------------------------------------------ ResNet-50 presets
@pytest.mark.parametrize("name, params, flops, params_round, flops_round, issue", [
    ("resnet50-thinet-70", 16_945_246, 4_880_052_680, 16_959_305, 4_919_679_176, 16.96),
    ("resnet50-thinet-50", 12_381_864, 3_412_852_736, 12_381_864, 3_412_852_736, 12.38),
    ("resnet50-thinet-30", 8_665_318, 2_194_985_078, 8_704_945, 2_204_756_168, 8.70),
])
def test_resnet50_presets(name, params, flops, params_round, flops_round, issue):
    preset = get_preset(name)
    assert preset.rounding == "floor" and preset.base == "resnet50_original"
    m = preset_architecture(preset)
    assert (count_params(m), count_flops(m, X)) == (params, flops)
    # floor(C * keep) reproduces the paper's printed parameters (counted without biases,
    # like the paper) and FLOPs; ThiNet-30's 2.19499G prints as 2.20 in the paper.
    paper_params, paper_gflops = preset.paper["params_m"], preset.paper["gflops"]
    assert round(count_params(m, biases=False) / 1e6, 2) == paper_params
    assert abs(flops / 1e9 - paper_gflops) < 0.0051
    # rounding to nearest gives the 16.96M / 12.38M / 8.70M figures (with biases) instead
    r = preset_architecture(dataclasses.replace(preset, rounding="round"))
    assert (count_params(r), count_flops(r, X)) == (params_round, flops_round)
    assert round(params_round / 1e6, 2) == issue


def test_paper_parameter_convention():
    """The paper counts parameters without conv/linear biases (BN affine included)."""
    vgg = on_meta(torchvision.models.vgg16, weights=None)
    assert count_params(vgg, biases=False) == 138_344_128  # paper: 138.34M
    assert round(count_params(on_meta(resnet50_original), biases=False) / 1e6, 2) == 25.56
    for name in ("vgg16-thinet-conv", "vgg16-thinet-gap", "vgg16-thinet-tiny"):
        m = preset_architecture(name)
        assert round(count_params(m, biases=False) / 1e6, 2) == PRESETS[name].paper["params_m"], name
        assert round(count_flops(m, X) / 1e9, 2) == PRESETS[name].paper["gflops"], name


def test_resnet50_70_channel_rule():
    preset = get_preset("resnet50-thinet-70")
    assert preset.n_keep(64, 0.7) == 44 and preset.n_keep(128, 0.7) == 89
    assert dataclasses.replace(preset, rounding="round").n_keep(64, 0.7) == 45
    assert preset.n_keep(10, 0.7) == 7  # 0.7 * 10 = 6.999... in floating point
    m = preset_architecture(preset)
    assert (m.layer1[0].conv1.out_channels, m.layer1[0].conv2.out_channels, m.layer1[0].conv3.out_channels) == (44, 44, 256)
    assert m.layer4[2].conv2.out_channels == 358 and m.layer4[0].downsample[0].out_channels == 2048


# ------------------------------------------------------------------ preset API
def test_keep_for_and_producers():
    preset = get_preset("resnet50-thinet-50")
    assert len(preset.producers) == 32 and preset.transform is None
    m = on_meta(torchvision.models.resnet50, weights=None)
    plan = find_units(m, X, units=preset.producers)
    keep = preset.keep_for(plan)
    assert keep["layer1.0.conv1"] == 32 and keep["layer4.2.conv2"] == 256 and len(keep) == 32


def test_keep_for_refuses_unprunable_producer():
    # a ResNet-18 has layerX.Y.conv1 units but its conv2 feed residual adds
    m = on_meta(torchvision.models.resnet18, weights=None)
    plan = find_units(m, X)
    with pytest.raises(ValueError, match=r"`layer1.0.conv2`: .*residual"):
        get_preset("resnet50-thinet-70").keep_for(plan)
    with pytest.raises(ValueError, match="layer1.0.conv2"):
        apply_preset_shapes(m, "resnet50-thinet-70")


def test_preset_validation_and_lookup():
    with pytest.raises(KeyError, match="vgg16-thinet-conv"):
        get_preset("vgg19-magic")
    with pytest.raises(ValueError, match="unknown base"):
        Preset("x", "alexnet", {"a": 0.5})
    with pytest.raises(ValueError, match="fraction"):
        Preset("x", "vgg16", {"a": 1.5})
    with pytest.raises(TypeError, match="fraction or an int"):
        Preset("x", "vgg16", {"a": True})
    with pytest.raises(ValueError, match="at least one"):
        Preset("x", "vgg16", {"a": 0})
    p = Preset("x", "vgg16", {"features.0": 16})
    with pytest.raises(ValueError, match="keep 16 of 8"):
        p.n_keep(8, 16)
    assert set(PRESETS) == {"vgg16-thinet-conv", "vgg16-thinet-gap", "vgg16-thinet-tiny",
                            "resnet50-thinet-70", "resnet50-thinet-50", "resnet50-thinet-30"}
    assert all(p.note for p in PRESETS.values())
    assert "fine-tuned" in PRESETS["vgg16-thinet-gap"].note


def test_apply_preset_shapes_copies_unless_inplace():
    m = on_meta(torchvision.models.vgg16, weights=None)
    out = apply_preset_shapes(m, "vgg16-thinet-gap")
    assert out is not m and m.features[0].out_channels == 64 and out.features[0].out_channels == 32
    assert isinstance(m.classifier, nn.Sequential) and isinstance(out.classifier, nn.Linear)


def test_gap_transform_runs_on_real_weights():
    # a real (non-meta) run of the transform on a small VGG-style model
    with torch.device("meta"):  # torchvision's VGG head alone is 120M parameters: build it on meta
        m = torchvision.models.VGG(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()), num_classes=7)
    m.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())  # real weights
    PRESETS["vgg16-thinet-gap"].transform(m)
    assert isinstance(m.classifier, nn.Linear) and (m.classifier.in_features, m.classifier.out_features) == (8, 7)
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 7)


# ------------------------------------------------------------------ counting details
def test_count_flops_by_hand_and_no_side_effects():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, groups=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).train()
    x = torch.randn(2, 3, 8, 8)
    prof = profile(m, x)
    expect = [2 * 2 * 4 * 64 * 27, 2 * 2 * 4 * 36 * 9, 2 * 2 * 5 * 144]
    assert [lc.flops for lc in prof.layers] == expect and prof.flops == sum(expect)
    assert [lc.name for lc in prof.layers] == ["0", "3", "5"]
    assert prof.params == count_params(m) and "GFLOPs" in str(prof)
    assert m[1].num_batches_tracked.item() == 0  # the fake forward changed nothing
    assert all(not mod._forward_hooks for mod in m.modules())


def test_model_size_and_shared_params():
    lin = nn.Linear(10, 10)
    m = nn.Sequential(lin, nn.ReLU(), lin, nn.BatchNorm1d(10))
    assert count_params(m) == 110 + 20
    assert model_size_mb(m, buffers=False) == 130 * 4 / 2**20
    assert model_size_mb(m) == (130 * 4 + 20 * 4 + 8) / 2**20


# ------------------------------------------------------------------ demo models and builders
@pytest.mark.parametrize("builder, n_units", [(DemoVGG, 6), (DemoResNet, 8)])
def test_demo_models(builder, n_units):
    m = builder()
    x = torch.randn(2, 1, 28, 28)
    assert m(x).shape == (2, 10)
    assert 50_000 < count_params(m) < 400_000
    assert count_flops(m, x[:1]) < 12e6
    plan = find_units(m, x)
    assert len(plan.units) == n_units


def test_model_builders():
    assert set(MODEL_BUILDERS) >= {"resnet50_original", "demo-vgg", "demo-resnet"}
    assert MODEL_BUILDERS["demo-vgg"](num_classes=3)(torch.randn(1, 1, 28, 28)).shape == (1, 3)
    with pytest.raises(ValueError, match="13"):
        vgg16_gap(widths=(8, 8))


def test_resnet50_preset_has_the_papers_parameter_count():
    """Bias compensation on the bias-free convs before BatchNorm folds into the BN's
    running mean, so the preset gives the paper's architecture exactly (12.38M)."""
    torch.manual_seed(0)
    model = tf.models.resnet50_original().eval()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    res = tf.prune(model, [x], preset="resnet50-thinet-50", num_images=4, progress=False)
    params = tf.count_params(res.model)
    print("ThiNet-50 params", params)
    assert round(params / 1e6, 2) == 12.38
    assert not any(m.bias is not None for m in res.model.modules() if isinstance(m, torch.nn.Conv2d))


def test_a_preset_refuses_another_base_before_any_work_saying_what_it_needs():
    import torchvision
    v15 = torchvision.models.resnet50()
    with pytest.raises(ValueError) as e:
        tf.prune(v15, [torch.randn(1, 3, 32, 32)], preset="resnet50-thinet-50", progress=False)
    msg = str(e.value)
    print(msg)
    assert "v1.5" in msg and "resnet50_original" in msg and "`layer2.0.conv1` should be" in msg and "stride 2" in msg
    with pytest.raises(ValueError, match="vgg16 without BatchNorm.*`features.2` should be Conv2d") as e:
        tf.prune(torchvision.models.vgg16_bn(), [torch.randn(1, 3, 32, 32)], preset="vgg16-thinet-conv", progress=False)
    assert str(e.value).count("\n") == 0 and "more)" in str(e.value)
    # the class count may differ: a 10-class VGG-16 passes the check
    tf.presets.check_base("vgg16-thinet-conv", torchvision.models.vgg16(num_classes=10))

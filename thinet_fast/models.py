"""Model builders: the paper's architectures and two small demo nets.

- :func:`resnet50_original`: ResNet-50 v1 as in the paper (stride on the first 1x1 of a
  downsampling bottleneck). torchvision's ``resnet50`` is "v1.5": it strides the 3x3,
  which costs 8.18 GFLOPs at 224x224 instead of 7.72.
- :func:`vgg16_gap`: VGG-16 convolutions with any 13 widths, then global average
  pooling and one Linear (ThiNet-GAP / ThiNet-Tiny). Module names match torchvision's
  ``vgg16`` (``features.<i>``, ``avgpool``, ``classifier``), so a pruned and transformed
  torchvision VGG-16 and a from-scratch ``vgg16_gap`` have the same state_dict keys.
- :class:`DemoVGG`, :class:`DemoResNet`: small fx-traceable nets for 1x28x28 inputs
  (Fashion-MNIST), trainable on a CPU.

All builders take ``weights=None`` semantics: random init, nothing is downloaded.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

# torchvision is imported inside the builders: importing it costs seconds (it pulls in
# torch._dynamo), and `import thinet_fast` should not pay that.

__all__ = [
    "VGG16_WIDTHS",
    "THINET_TINY_WIDTHS",
    "resnet50_original",
    "vgg16_gap",
    "vgg16_tiny",
    "VGGGAP",
    "gap_head_",
    "MODEL_BUILDERS",
    "DemoVGG",
    "DemoResNet",
]

#: torchvision VGG-16 ("D") conv widths, conv1_1 .. conv5_3 (max-pools after 2, 4, 7, 10, 13).
VGG16_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
#: ThiNet-Tiny conv widths (paper, Table 3).
THINET_TINY_WIDTHS = (16, 16, 32, 32, 64, 64, 64, 128, 128, 128, 128, 128, 256)
_VGG16_POOL_AFTER = (1, 3, 6, 9, 12)  # conv indices followed by a max-pool


def resnet50_original(num_classes: int = 1000, **kwargs) -> nn.Module:
    """ResNet-50 v1 (He et al. 2016, as used by ThiNet): stride 2 on ``conv1`` (the first
    1x1) of each downsampling bottleneck instead of on the 3x3 ``conv2``.

    Same parameters as torchvision's ``resnet50`` (v1.5), fewer FLOPs (7.72 vs 8.18
    GFLOPs at 224x224) because the 3x3 runs at the reduced resolution. Random init; extra
    kwargs go to ``torchvision.models.resnet50`` (never pass pretrained weights here:
    torchvision's weights are for v1.5).
    """
    import torchvision

    model = torchvision.models.resnet50(weights=None, num_classes=num_classes, **kwargs)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            if block.conv2.stride != (1, 1):
                block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)
    return model


def _vgg_features(widths: Sequence[int], batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for i, w in enumerate(widths):
        layers.append(nn.Conv2d(c_in, w, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(w))
        layers.append(nn.ReLU(inplace=True))
        if i in _VGG16_POOL_AFTER:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        c_in = w
    return nn.Sequential(*layers)


class VGGGAP(nn.Module):
    """VGG features -> global average pooling -> one Linear. Attribute names and forward
    match ``torchvision.models.VGG`` (``features``, ``avgpool``, ``classifier``)."""

    def __init__(self, features: nn.Sequential, num_classes: int) -> None:
        super().__init__()
        convs = [m for m in features.modules() if isinstance(m, nn.Conv2d)]
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(convs[-1].out_channels, num_classes)
        for m in self.modules():  # torchvision's VGG init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg16_gap(widths: Optional[Sequence[int]] = None, num_classes: int = 1000,
              *, batch_norm: bool = False) -> nn.Module:
    """VGG-16 convolutions with the given 13 widths, then GAP and ``Linear(widths[-1], num_classes)``.

    ``widths=None`` is VGG-16's (64 ... 512); with the first ten halved it is ThiNet-GAP's
    architecture. Pass :data:`THINET_TINY_WIDTHS` for ThiNet-Tiny. Init as torchvision's
    VGG (the head ``N(0, 0.01)``).
    """
    widths = tuple(VGG16_WIDTHS if widths is None else widths)
    if len(widths) != 13 or any(int(w) < 1 for w in widths):
        raise ValueError(f"vgg16_gap: need 13 positive conv widths, got {widths}")
    return VGGGAP(_vgg_features(widths, batch_norm), num_classes)


def gap_head_(model: nn.Module, num_classes: Optional[int] = None) -> nn.Module:
    """Replace a VGG's ``avgpool``/``classifier`` by global average pooling + one Linear, in place.

    The new head is freshly initialised (``N(0, 0.01)``, zero bias) and must be trained
    (ThiNet-GAP/Tiny fine-tune it). ``num_classes`` defaults to the old head's output.
    """
    if not all(isinstance(getattr(model, a, None), nn.Module) for a in ("features", "classifier")):
        raise TypeError(f"gap_head_ expects a VGG-style model with .features and .classifier, "
                        f"got {type(model).__name__}")
    convs = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("gap_head_: model.features has no Conv2d")
    c_last = convs[-1].out_channels
    if num_classes is None:
        lins = [m for m in model.classifier.modules() if isinstance(m, nn.Linear)]
        if not lins:
            raise ValueError("gap_head_: cannot infer num_classes from model.classifier; pass num_classes")
        num_classes = lins[-1].out_features
    w = convs[-1].weight
    head = nn.Linear(c_last, num_classes, device=w.device, dtype=w.dtype)
    if not w.is_meta:
        nn.init.normal_(head.weight, 0, 0.01)
        nn.init.zeros_(head.bias)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = head
    return model


# --------------------------------------------------------------------------- demo nets
class DemoVGG(nn.Module):
    """A small VGG for 1x28x28 inputs (Fashion-MNIST).

    conv-BN-ReLU blocks with 2x2 max-pools after conv 1, 3 and 5 (28 -> 14 -> 7 -> 3),
    flatten, then Linear-ReLU-Dropout-Linear. Default widths (8, 16, 32, 64, 64) and
    hidden 256: ~212K parameters, ~8 MFLOPs per image; an epoch of Fashion-MNIST takes
    well under a minute on two CPU cores. Units: conv -> conv (t=9, some through a
    max-pool), last conv -> fc after flatten (t=9, the 3x3 map), fc -> fc (t=1).
    ``batch_norm=False``: conv(+bias)-ReLU blocks, the plain VGG the paper pruned.
    """

    def __init__(self, widths: Sequence[int] = (8, 16, 32, 64, 64), hidden: int = 256,
                 num_classes: int = 10, in_channels: int = 1, dropout: float = 0.2,
                 batch_norm: bool = True) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 5:
            raise ValueError(f"DemoVGG: need 5 conv widths, got {widths}")
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=not batch_norm)]
            layers += [nn.BatchNorm2d(w), nn.ReLU(inplace=True)] if batch_norm else [nn.ReLU(inplace=True)]
            if i in (0, 2, 4):
                layers.append(nn.MaxPool2d(2))  # 28 -> 14 -> 7 -> 3
            c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(c * 3 * 3, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck with a residual add (stride on the 3x3, like torchvision)."""

    def __init__(self, c_in: int, mid: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class DemoResNet(nn.Module):
    """A small bottleneck ResNet for 1x28x28 inputs: stem, three stages, GAP, Linear.

    Stem: 3x3 conv (16) -> BN -> ReLU -> 2x2 max-pool (28 -> 14). Stages, as
    (mid, out, blocks, stride): (8, 32, 1, 1), (16, 64, 2, 2), (64, 256, 1, 2); each
    stage's first block has a downsample path (1x1 conv + BN), the second block of stage
    2 is an identity block. ~90K parameters, ~4.6 MFLOPs per image. Prunable units:
    conv1 and conv2 of every block (conv3, the downsample and the stem feed residual adds
    and are refused).
    """

    def __init__(self, stem: int = 16, stages: Sequence[tuple[int, int, int, int]] = (
            (8, 32, 1, 1), (16, 64, 2, 2), (64, 256, 1, 2)), num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        c = stem
        self._stages: list[str] = []
        for i, (mid, out, blocks, stride) in enumerate(stages):
            blk = [Bottleneck(c, mid, out, stride)] + [Bottleneck(out, mid, out) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blk))
            self._stages.append(f"layer{i + 1}")
            c = out
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self._stages:  # unrolled by fx
            x = getattr(self, name)(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def vgg16_tiny(num_classes: int = 1000) -> nn.Module:
    """ThiNet-Tiny's architecture from scratch: :func:`vgg16_gap` with :data:`THINET_TINY_WIDTHS`."""
    return vgg16_gap(THINET_TINY_WIDTHS, num_classes)


#: name -> builder(num_classes=...), for the CLI and configs.
MODEL_BUILDERS = {
    "resnet50_original": resnet50_original,
    "vgg16_gap": vgg16_gap,
    "vgg16_tiny": vgg16_tiny,
    "demo-vgg": DemoVGG,
    "demo-resnet": DemoResNet,
}

"""Print the paper presets' parameter and FLOP counts (meta device, no weights).

    .venv/bin/python bench/preset_table.py
"""
import dataclasses

import torch
import torchvision

from thinet_fast.counting import count_flops, count_params
from thinet_fast.presets import PRESETS, get_preset, preset_architecture


def rows():
    x = torch.zeros(1, 3, 224, 224, device="meta")
    out = []
    bases = {"vgg16": "VGG-16 (torchvision)", "resnet50_original": "ResNet-50 (v1, stride on the first 1x1)"}
    for base, label in bases.items():
        with torch.device("meta"):
            m = get_preset(next(p for p in PRESETS.values() if p.base == base)).build_base()
        out.append((label, "-", count_params(m), count_params(m, biases=False), count_flops(m, x), "-"))
    with torch.device("meta"):
        m = torchvision.models.resnet50(weights=None)
    out.append(("ResNet-50 v1.5 (torchvision, stride on the 3x3)", "-", count_params(m),
                count_params(m, biases=False), count_flops(m, x), "-"))
    for name, preset in PRESETS.items():
        m = preset_architecture(preset)
        paper = f"{preset.paper['params_m']}M / {preset.paper['gflops']}G" if preset.paper else "-"
        out.append((name, preset.rounding, count_params(m), count_params(m, biases=False), count_flops(m, x), paper))
        if preset.base.startswith("resnet"):
            r = preset_architecture(dataclasses.replace(preset, rounding="round"))
            out.append((name, "round", count_params(r), count_params(r, biases=False), count_flops(r, x), ""))
    return out


def main():
    print("| model | rounding | params | params w/o biases | GFLOPs | paper prints |")
    print("|---|---|---|---|---|---|")
    for name, rnd, p, pnb, f, paper in rows():
        print(f"| {name} | {rnd} | {p / 1e6:.3f}M | {pnb / 1e6:.3f}M | {f / 1e9:.3f} | {paper} |")


if __name__ == "__main__":
    main()

"""``prune(coupled="prune")`` against Torch-Pruning at the same parameter count.

For each model (random init, the same calibration images): Torch-Pruning's magnitude
pruner at ``pruning_ratio`` (every group, uniform), Torch-Pruning with thinet_fast's
``ThiNetImportance``, and ``thinet_fast.prune(keep=1 - ratio, coupled="prune")``.
Printed: parameters after pruning, relative output deviation from the unpruned model on
held-out images, wall time. Where ``prune`` lands more than 2% away from Torch-Pruning's
parameter count (it keeps the channels a LayerNorm normalises together), Torch-Pruning
magnitude is also run at the ratio that gives ``prune``'s count (bisection). The last
column is ``prune(params_target=<Torch-Pruning magnitude's count>, coupled="prune")``:
the budget allocator spreads the cut over units, groups and heads by their error
curves, at exactly Torch-Pruning's parameter count or below.

    .venv/bin/python -W ignore bench/vs_torch_pruning.py resnet50 densenet121 mobilenet_v2
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torchvision
import torch_pruning as tp

import thinet_fast as tf
from thinet_fast.integrations.torch_pruning import ThiNetImportance


def _params(m):
    return sum(p.numel() for p in m.parameters())


def _dev(model, ref, x):
    with torch.no_grad():
        y, y0 = model(x), ref(x)
    if isinstance(y, dict):
        y, y0 = y["out"], y0["out"]
    return float((y - y0).norm() / y0.norm().clamp_min(1e-30))


def _tp(model, x, importance, ratio):
    m = copy.deepcopy(model)
    head = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)][-1:]
    heads = getattr(getattr(m, "encoder", None), "layers", None)
    round_to = heads[0].num_heads if heads is not None and hasattr(heads[0], "num_heads") else None
    pruner = tp.pruner.BasePruner(m, x[:1], importance=importance, pruning_ratio=ratio, ignored_layers=head,
                                  round_to=round_to)
    pruner.step()
    if hasattr(m, "hidden_dim") and hasattr(m, "conv_proj"):  # torchvision's ViT reads it in forward
        m.hidden_dim = m.conv_proj.out_channels
    return m


@torch.no_grad()
def _bn_stats(model, x):
    """Re-estimate BatchNorm's statistics on the calibration images (the same model for
    every method). Random weights with normalised activations sit at the edge of chaos,
    where any small change moves the output a lot, so this is off by default."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    for chunk in x.split(16):
        model(chunk)
    model.eval()


def _timed(fn, model, held):
    t = time.perf_counter()
    try:
        m = fn()
        seconds = time.perf_counter() - t
        return (_params(m), _dev(m, model, held), seconds)
    except Exception as exc:  # one method failing must not hide the others
        return (None, f"{type(exc).__name__}: {exc}"[:120], time.perf_counter() - t)


def run(name: str, images: int, size: int, ratio: float, seed: int = 0, bn_stats: bool = False) -> dict:
    torch.manual_seed(seed)
    kw = {"image_size": size} if name.startswith("vit") else {}
    model = torchvision.models.get_model(name, weights=None, **kw).eval()
    g = torch.Generator().manual_seed(seed)
    calib = torch.randn(images, 3, size, size, generator=g)
    held = torch.randn(16, 3, size, size, generator=g)
    for m in model.modules():  # torchvision's ViT zeroes its head: every output would equal the bias
        if isinstance(m, torch.nn.Linear) and not bool(m.weight.any()):
            m.reset_parameters()
    if bn_stats:
        _bn_stats(model, calib)
    rows = {"model": name, "params": _params(model)}
    rows["tp_magnitude"] = _timed(lambda: _tp(model, calib, tp.importance.MagnitudeImportance(p=1), ratio),
                                  model, held)
    rows["tp_thinet_importance"] = _timed(
        lambda: _tp(model, calib, ThiNetImportance([calib], num_images=images), ratio), model, held)
    for key, recon in (("thinet_fast", "scale"), ("thinet_fast_full", "full")):
        rows[key] = _timed(lambda: tf.prune(model, calib, keep=1 - ratio, num_images=images, coupled="prune",
                                            reconstruction=recon, progress=False).model, model, held)
    ours, theirs = rows["thinet_fast_full"][0], rows["tp_magnitude"][0]
    rows["thinet_fast_budget"] = None
    if theirs is not None:  # the budget allocator at Torch-Pruning's count: equal parameters by construction
        rows["thinet_fast_budget"] = _timed(
            lambda: tf.prune(model, calib, params_target=theirs, num_images=images, coupled="prune",
                             reconstruction="full", progress=False).model, model, held)
    rows["tp_matched"] = None
    if ours is not None and theirs is not None and abs(ours - theirs) > 0.02 * ours:
        rows["tp_matched"] = _matched(model, calib, held, ours, ratio)
    return rows


def _matched(model, calib, held, target: int, ratio: float):
    """Torch-Pruning magnitude at the ratio whose parameter count is closest to ``target``."""
    lo, hi = 0.0, 0.95
    best = None
    for _ in range(12):
        r = (lo + hi) / 2
        cell = _timed(lambda: _tp(model, calib, tp.importance.MagnitudeImportance(p=1), r), model, held)
        if cell[0] is None:
            return cell
        if best is None or abs(cell[0] - target) < abs(best[0] - target):
            best = cell + (r,)
        lo, hi = (r, hi) if cell[0] > target else (lo, r)
    return best


def _cell(r):
    p, d, s = r
    return f"failed ({d}), {s:.1f}" if p is None else f"{p / 1e6:.2f}M, {d:.3f}, {s:.1f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--bn-stats", action="store_true",
                    help="re-estimate BatchNorm statistics on the calibration images first (random nets are then "
                         "chaotic: 3%% weight noise on the first conv moves resnet50's output by 56%%)")
    args = ap.parse_args()
    print("| model | params | TP magnitude: params, dev, s | TP + ThiNetImportance | prune(coupled), scale "
          "| prune(coupled), full refit | TP magnitude at prune's params (ratio) "
          "| prune(coupled, params_target=TP magnitude's), full refit |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        r = run(name, args.images, args.size, args.ratio, bn_stats=args.bn_stats)
        cells = [_cell(r[k]) for k in ("tp_magnitude", "tp_thinet_importance", "thinet_fast",
                                         "thinet_fast_full")]
        m = r["tp_matched"]
        cells.append("same params" if m is None else _cell(m[:3]) + (f" ({m[3]:.3f})" if len(m) > 3 else ""))
        cells.append("-" if r["thinet_fast_budget"] is None else _cell(r["thinet_fast_budget"]))
        print(f"| {name} | {r['params'] / 1e6:.2f}M | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

"""Whole-prune speed against the forward passes it cannot avoid (issue 7), under
pytest-benchmark. The workloads and the timing live in ``bench/prune_speed.py``.

Each benchmark times a plain forward pass over the calibration batches, then the
prune, in the same process, and asserts the ratio target for this 2-core CPU
(VGG-16 one-shot <= 1.3x, VGG-16 sequential <= 1.5x, ResNet-50 sequential <= 2.0x) and,
for VGG-16 one-shot, peak RSS <= 2.5 GB. Before timing, the pruned model is checked
(finite outputs, the channels the workload asked for). The figures go to
``extra_info`` and are printed.

    .venv/bin/python -m pytest bench/test_bench_prune.py -s -p no:cacheprovider
    .venv/bin/python -m pytest bench/test_bench_prune.py -s -k resnet50   # one workload

A workload takes 0.5-2 minutes on the 2-core machine; RSS is the process's peak, so
run ``vgg16-oneshot`` in its own process (``-k vgg16-oneshot``) for its RSS figure.
"""
from __future__ import annotations

import pytest
import torch

from bench import prune_speed


@pytest.mark.parametrize("name", sorted(prune_speed.TARGETS))
def test_prune_vs_forward(benchmark, name):
    result = {}

    def once():
        result.update(prune_speed.run(name, keep_model=True))

    benchmark.pedantic(once, rounds=1, iterations=1)
    pruned = result.pop("model")
    model, batches, _ = prune_speed.workload(name)
    with torch.no_grad():
        out = pruned(batches[0][:2])
    assert torch.isfinite(out).all()
    assert all(u["kept"] < u["channels"] for u in result["units"])
    benchmark.extra_info.update({k: v for k, v in result.items() if k != "units"})
    print("\n" + prune_speed.describe(result))
    assert result["ratio"] <= prune_speed.TARGETS[name], \
        f"{name}: prune took {result['ratio']:.2f}x the forward pass (target {prune_speed.TARGETS[name]}x)"
    if name in prune_speed.RSS_TARGET_GB:
        assert result["peak_rss_gb"] <= prune_speed.RSS_TARGET_GB[name]

"""The selection-method registry: a new method is one function and one call (issue 9)."""
from __future__ import annotations

import pytest
import torch

import thinet_fast as tf
from thinet_fast.models import DemoVGG
from thinet_fast.pipeline.methods import REGISTRY


@pytest.fixture
def registered():
    names = []

    def register(method):
        tf.register_method(method)
        names.append(method.name)
        return method

    yield register
    for n in names:
        REGISTRY.pop(n, None)


def _data():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 1, 28, 28, generator=g) for _ in range(2)]


def test_a_toy_method_takes_one_registration(registered):
    seen = []

    def largest_diagonal(stats, n_keep, ctx):
        seen.append((stats.channels, n_keep, type(ctx.producer).__name__))
        return tf.Selection(tf.top_k(stats.gram.diagonal(), n_keep))

    registered(tf.Method("diag", largest_diagonal, summary="largest Gram diagonal"))
    model = DemoVGG().eval()
    res = tf.prune(model, _data(), method="diag", keep=0.5, num_images=16, progress=False)
    plan = tf.find_units(model, _data()[0][:1])
    assert [c for c, _, _ in seen] == [u.channels for u in plan.units]
    assert all(p == "Conv2d" or p == "Linear" for _, _, p in seen)
    assert all(u["method"] == "diag" for u in res.report.units)
    # it really chose by the diagonal: the first unit keeps the largest-diagonal channels
    stats = tf.collect_statistics(model, plan.units[:1], _data(), num_images=16)[plan.units[0].producer]
    want = tf.top_k(stats.gram.diagonal(), res.report.units[0]["kept"]).tolist()
    assert res.model.features[0].weight.shape[0] == len(want)
    torch.testing.assert_close(res.model.features[0].weight, model.features[0].weight[want])


def test_registry_feeds_validation_needs_and_the_cli(registered):
    zero_counts = []

    def fewest_zeros(stats, n_keep, ctx):
        zero_counts.append(stats.zero_fraction)
        return tf.Selection(tf.top_k(-stats.zero_fraction, n_keep))

    registered(tf.Method("zeros_first", fewest_zeros, needs={"zeros"}))
    tf.prune(DemoVGG().eval(), _data(), method="zeros_first", keep=0.5, num_images=16, progress=False,
             schedule="oneshot")
    assert zero_counts and all(z is not None and z.numel() > 0 for z in zero_counts)
    assert "zeros_first" in tf.method_names()
    from thinet_fast.cli import build_parser
    args = build_parser().parse_args(["prune", "--model", "demo-vgg", "--data", "x", "--method", "zeros_first"])
    assert args.method == "zeros_first"


def test_registration_errors():
    with pytest.raises(ValueError, match="registered already"):
        tf.register_method(tf.Method("thinet", lambda s, n, c: None))
    with pytest.raises(ValueError, match="collector provides"):
        tf.Method("x", lambda s, n, c: None, needs={"activations"})
    with pytest.raises(TypeError, match="thinet_fast.Method"):
        tf.register_method("thinet")
    with pytest.raises(ValueError, match="register_method"):
        tf.PruneConfig(method="not_registered")


def test_builtin_methods_are_in_the_registry():
    assert set(tf.METHODS) <= set(tf.method_names())
    assert {"thinet", "thinet_ls"} <= {m.name for m in REGISTRY.values() if m.rank is not None}

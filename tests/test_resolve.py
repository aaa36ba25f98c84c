"""One backend resolver (ops/dispatch.resolve): every fallback is its decision, with a
reason, and the report records it (issue 9)."""
import pytest
import torch

import thinet_fast as tf
from thinet_fast.models import DemoVGG
from thinet_fast.ops import dispatch, gram
from thinet_fast.ops.patches import ConsumerGeometry


def test_preference_an_op_lacks_falls_back_with_a_reason():
    r = dispatch.resolve("statistics", "cpu", "cpu")
    assert r.backend == "torch" and "no 'cpu' implementation" in r.reason
    assert dispatch.resolve("statistics", "torch", "cpu") == dispatch.Resolution("statistics", "torch", "")
    assert dispatch.resolve("direct_gram", "auto", "cpu").backend == "torch"
    with pytest.raises(ValueError, match="unknown op"):
        dispatch.resolve("nope", "auto", "cpu")
    with pytest.raises(ValueError, match="backend='gpu'"):
        dispatch.resolve("statistics", "gpu", "cpu")


@pytest.mark.skipif(not dispatch.backends()["triton"], reason="triton cannot run here")
def test_dtype_a_kernel_lacks_is_the_resolvers_decision():
    r = dispatch.resolve("statistics", "triton", "cpu", torch.float64)
    assert r.backend == "torch" and "accumulates in" in r.reason
    assert dispatch.resolve("sampled_gram", "auto", "cpu", torch.float64).backend == "torch"
    # an op called directly with an explicit backend never switches silently
    x, w = torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)
    i = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="accumulates in"):
        gram.sampled_gram(x, w, ConsumerGeometry.conv(3, padding=1), i, i, i, i, acc_dtype=torch.float64,
                          backend="triton")


def test_report_records_the_fallback_reason():
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 1, 28, 28, generator=g)]
    res = tf.prune(DemoVGG().eval(), data, keep=0.5, num_images=8, progress=False, backend="torch",
                   method="random")
    assert all(not any("backend:" in n for n in u.notes) for u in res.report.units)
    if dispatch.backends()["cpu"]:
        res = tf.prune(DemoVGG().eval(), data, keep=0.5, num_images=8, progress=False, backend="cpu")
        u = res.report.units[0]
        print(u.notes, u.statistics_backend, u.selection_backend)
        assert u.selection_backend == "cpu" and u.statistics_backend == "torch"
        assert any("statistics backend:" in n and "'cpu'" in n for n in u.notes)

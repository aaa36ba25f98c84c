"""Every option and input is validated with a message naming it and the fix (issue 8)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import thinet_fast as tf
from thinet_fast.models import DemoVGG
from thinet_fast.ops.greedy import greedy_keep_ls, greedy_keep_ls_ref, greedy_remove, removal_to_keep


def _data(n=16, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 1, 28, 28, generator=g) for _ in range(n // batch)]


@pytest.mark.parametrize("option,value,error,match", [
    ("num_images", 10.0, TypeError, "num_images must be an int"),
    ("num_images", True, TypeError, "num_images must be an int"),
    ("num_images", 0, ValueError, "num_images must be >= 1"),
    ("samples_per_image", 2.5, TypeError, "samples_per_image must be an int"),
    ("samples_per_image", 0, ValueError, "samples_per_image must be >= 1"),
    ("seed", "1", TypeError, "seed must be an int"),
    ("seed", 1.0, TypeError, "seed must be an int"),
    ("ridge", math.inf, ValueError, "ridge must be a finite number"),
    ("ridge", math.nan, ValueError, "ridge must be a finite number"),
    ("ridge", -1.0, ValueError, "ridge must be a finite number"),
    ("units", "features.0", TypeError, "wrap one name in a list"),
    ("units", [0, 4], TypeError, "units must hold module names"),
    ("filter_fn", "features", TypeError, "filter_fn must be a callable"),
    ("bias_compensation", "yes", TypeError, "bias_compensation must be True or False"),
])
def test_options_are_type_checked(option, value, error, match):
    with pytest.raises(error, match=match):
        tf.PruneConfig(**{option: value})


def test_data_that_is_not_iterable():
    with pytest.raises(TypeError, match="not iterable"):
        tf.prune(DemoVGG(), 42, keep=0.5, progress=False)


def test_three_d_batches_are_refused():
    x = torch.randn(8, 28, 28)  # the channel dim is missing: C would be taken as the batch
    with pytest.raises(ValueError, match=r"\(N, C, H, W\).*unsqueeze"):
        tf.prune(DemoVGG(), [x], keep=0.5, num_images=8, progress=False)


def test_an_empty_batch_in_the_middle_is_skipped():
    torch.manual_seed(0)
    model = DemoVGG().eval()
    data = _data(24)
    with_gap = [data[0], data[0][:0], data[1], data[2]]
    kw = dict(keep=0.5, num_images=24, samples_per_image=4, progress=False)
    a = tf.prune(model, data, **kw)
    b = tf.prune(model, with_gap, **kw)
    for ua, ub in zip(a.report.units, b.report.units):
        assert ua["kept"] == ub["kept"]
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k  # every later batch still counted


def test_meta_model_is_refused_before_statistics():
    with torch.device("meta"):
        model = DemoVGG()
    with pytest.raises(ValueError, match="meta tensors"):
        tf.prune(model, _data(), keep=0.5, progress=False)


def test_removal_to_keep_rejects_bad_sets():
    order = torch.tensor([3, 1, 0, 2])
    assert removal_to_keep(order, 4, 2).tolist() == [0, 2]
    with pytest.raises(ValueError, match="n_keep=5"):
        removal_to_keep(order, 4, 5)
    with pytest.raises(ValueError, match="outside"):
        removal_to_keep(torch.tensor([3, -1, -1]), 4, 1)
    # a batched result's padded rows are refused, the real rows give the right sets
    g = torch.Generator().manual_seed(0)
    Y = torch.randn(20, 6, generator=g, dtype=torch.float64)
    G = torch.zeros(2, 6, 6, dtype=torch.float64)
    G[0] = Y.T @ Y
    G[1, :3, :3] = (Y[:, :3].T @ Y[:, :3])
    orders = greedy_remove(G, torch.tensor([5, 2]), sizes=torch.tensor([6, 3]))
    print(orders)
    with pytest.raises(ValueError, match="outside"):
        removal_to_keep(orders[1], 6, 1)
    assert removal_to_keep(orders[1], 3, 1).numel() == 1


@pytest.mark.parametrize("fn", [greedy_keep_ls, greedy_keep_ls_ref])
def test_greedy_keep_ls_rejects_a_non_psd_gram(fn):
    g = torch.Generator().manual_seed(1)
    Y = torch.randn(30, 8, generator=g, dtype=torch.float64)
    G = Y.T @ Y
    assert fn(G, 3).numel() == 3
    bad = G.clone()  # positive diagonal, but a 2x2 minor with a negative determinant
    bad[0, 1] = bad[1, 0] = 3 * float((G[0, 0] * G[1, 1]).sqrt())
    with pytest.raises(ValueError, match="not positive semi-definite"):
        fn(bad, 3)
    asym = G.clone()
    asym[0, 1] += 10.0
    with pytest.raises(ValueError, match="not symmetric"):
        fn(asym, 3)


def test_nan_activations_name_the_consumer_and_leave_the_model():
    torch.manual_seed(0)
    model = DemoVGG().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 1, 28, 28)
    x[0, 0, 5, 5] = float("nan")
    for schedule in ("sequential", "oneshot"):
        with pytest.raises(FloatingPointError, match=r"consumer 'features\.\d+'.*NaN"):
            tf.prune(model, [x], keep=0.5, num_images=8, progress=False, schedule=schedule, inplace=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

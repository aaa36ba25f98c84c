"""Per-unit records are typed (issue 9): frozen, with to_dict/from_dict, and the report,
its JSON and the table read them."""
import dataclasses
import json

import pytest
import torch

import thinet_fast as tf
from thinet_fast.models import DemoVGG


def test_prune_returns_typed_records_that_round_trip():
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 1, 28, 28, generator=g) for _ in range(2)]
    res = tf.prune(DemoVGG().eval(), data, keep=0.5, num_images=16, progress=False)
    recs = res.report.units
    assert recs and all(isinstance(r, tf.UnitRecord) for r in recs)
    r = recs[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.kept = 1
    assert tf.UnitRecord.from_dict(r.to_dict()) == r
    assert r["kept"] == r.kept and r.get("missing", 7) == 7  # reads like the old dicts
    with pytest.raises(KeyError):
        r["missing"]
    out = json.loads(res.report.to_json())
    assert [u["kept"] for u in out["units"]] == [x.kept for x in recs]
    assert out["units"][0]["notes"] == list(r.notes)
    assert r.producer in res.report.table()


def test_records_carry_the_greedy_error_curve_for_thinet_only():
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(8, 1, 28, 28, generator=g) for _ in range(2)]
    res = tf.prune(DemoVGG().eval(), data, keep=0.5, num_images=16, progress=False)
    for r in res.report.units:
        curve = torch.tensor(r.error_curve)
        print(r.producer, curve[:4].tolist())
        assert curve.numel() == r.channels - 1 and torch.isfinite(curve).all() and (curve >= 0).all()
        assert tf.UnitRecord.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    other = tf.prune(DemoVGG().eval(), data, keep=0.5, num_images=16, method="random", progress=False)
    assert all(r.error_curve == () for r in other.report.units)

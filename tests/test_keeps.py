"""Keep policies (pipeline/keeps.py): one rounding rule each."""
import pytest
import torch

from thinet_fast.models import DemoVGG
from thinet_fast.pipeline import keeps
from thinet_fast.presets import Preset
from thinet_fast.units import find_units


def _plan():
    return find_units(DemoVGG(), torch.randn(1, 1, 28, 28))


def test_uniform_rounds_to_nearest_and_keeps_one():
    plan = _plan()
    got = keeps.uniform(plan, 0.3)
    for u in plan.units:
        assert got[u.producer] == max(1, round(u.channels * 0.3))
    assert min(keeps.uniform(plan, 1e-6).values()) == 1


def test_per_unit_fractions_and_exact_counts():
    plan = _plan()
    first, second = plan.units[0], plan.units[1]
    got = keeps.per_unit(type(plan)([first, second], []), {first.producer: 3, second.producer: 0.26})
    assert got == {first.producer: 3, second.producer: round(second.channels * 0.26)}
    with pytest.raises(ValueError, match="more channels"):
        keeps.per_unit(type(plan)([first], []), {first.producer: first.channels + 1})


def test_preset_floors_and_budget_floor():
    plan = _plan()
    u = plan.units[1]  # 16 channels: 0.7 * 16 = 11.2
    preset = Preset("t", "vgg16", {u.producer: 0.7})
    assert keeps.from_preset(plan, preset) == {u.producer: 11}
    assert keeps.min_counts(plan.units, 0.1) == [max(1, round(0.1 * x.channels)) for x in plan.units]

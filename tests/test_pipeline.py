"""End-to-end pruning: schedules, options, resume, and the caller's model."""
import copy

import pytest
import torch
from torch import nn

import thinet_fast as tf
from thinet_fast.models import DemoResNet, DemoVGG


def _data(n=24, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(10, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def _model(cls=DemoVGG, seed=0):
    torch.manual_seed(seed)
    m = cls().eval()
    # non-trivial BN statistics so BN followers matter
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.1, 0.3)
    return m


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["thinet", "thinet_ls", "random", "weight_sum", "apoz", "lasso"])
@pytest.mark.parametrize("cls", [DemoVGG, DemoResNet])
def test_every_method_prunes_and_runs(method, cls):
    model, data = _model(cls), _data()
    before = _state(model)
    res = tf.prune(model, data, keep=0.5, method=method, num_images=16, samples_per_image=5, progress=False)
    assert _same_state(before, _state(model)), "the caller's model changed"
    x = data[0][0]
    out = res.model(x)
    assert out.shape == (x.shape[0], 10) and torch.isfinite(out).all()
    plan = tf.find_units(model, x[:1])
    for u in plan.units:
        prod = tf.units.get_module(res.model, u.producer)
        n = prod.out_channels if isinstance(prod, nn.Conv2d) else prod.out_features
        print(method, u.producer, u.channels, "->", n)
        assert n == max(1, round(u.channels * 0.5))
    assert res.report.params < tf.count_params(model)
    assert res.report.params == tf.count_params(res.model)
    assert res.report.flops == tf.count_flops(res.model, x[:1])
    assert len(res.report.units) == len(plan.units)
    assert "producer" in res.report.table() and method in res.report.table()


@pytest.mark.parametrize("recon", ["none", "scale", "full"])
def test_keep_one_leaves_outputs_unchanged(recon):
    model, data = _model(DemoResNet), _data()
    res = tf.prune(model, data, keep=1.0, reconstruction=recon, statistics="full", num_images=16, progress=False)
    x = data[1][0]
    err = (res.model(x) - model(x)).abs().max().item()
    print("keep=1 max abs diff", recon, err)
    assert err < 1e-3


def test_sequential_equals_oneshot_for_one_unit():
    model, data = _model(DemoVGG), _data()
    unit = tf.find_units(model, data[0][0][:1]).units[1].producer
    kw = dict(keep=0.5, units=[unit], num_images=16, samples_per_image=5, progress=False, seed=3)
    a = tf.prune(model, data, schedule="sequential", **kw).model
    b = tf.prune(model, data, schedule="oneshot", **kw).model
    assert _same_state(_state(a), _state(b))


def test_oneshot_batched_selection_matches_per_unit_greedy():
    model, data = _model(DemoResNet), _data()
    plan = tf.find_units(model, data[0][0][:1])
    stats = tf.collect_statistics(model, plan.units, data, statistics="sampled", num_images=16, seed=1)
    res = tf.prune(model, data, keep=0.5, schedule="oneshot", num_images=16, statistics="sampled", seed=1,
                   progress=False)
    consumers = {u.consumer for u in plan.units}
    checked = 0
    for u in plan.units:
        if u.producer in consumers:
            continue  # its weight was also reconstructed as the previous unit's consumer
        checked += 1
        n = round(u.channels * 0.5)
        order = tf.greedy_remove_ref(stats[u.producer].gram, u.channels - n)
        keep = tf.removal_to_keep(order, u.channels, n)
        got = tf.units.get_module(res.model, u.producer)
        # the kept producer filters are the original ones, in order
        assert torch.equal(got.weight, tf.units.get_module(model, u.producer).weight[keep])
    assert checked >= 3


def test_thinet_beats_random_and_reconstruction_helps():
    model, data = _model(DemoVGG), _data(48)
    kw = dict(keep=0.5, num_images=48, samples_per_image=10, progress=False, schedule="oneshot")
    thinet = tf.prune(model, data, method="thinet", **kw).report.units
    rand = tf.prune(model, data, method="random", **kw).report.units
    for t, r in zip(thinet, rand):
        print(t["producer"], t["error_selected"], r["error_selected"], t["error_reconstructed"])
        assert t["error_selected"] <= r["error_selected"] + 1e-9
        assert t["error_reconstructed"] <= t["error_selected"] + 1e-9


def test_inplace_changes_the_given_model():
    model, data = _model(DemoVGG), _data()
    n0 = tf.count_params(model)
    res = tf.prune(model, data, keep=0.5, num_images=16, inplace=True, progress=False)
    assert res.model is model and tf.count_params(model) < n0


class _Interrupt(RuntimeError):
    pass


def test_resume_after_interruption_gives_the_same_model(tmp_path):
    model, data = _model(DemoResNet), _data()
    kw = dict(keep=0.5, num_images=16, samples_per_image=5, progress=False, reconstruction="full")
    full = tf.prune(model, data, **kw).model

    fired = []

    def crash_at_3(m, unit, index):
        if index == 3 and not fired:
            fired.append(index)
            raise _Interrupt("simulated crash")

    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(_Interrupt):
        tf.prune(model, data, resume=str(ckpt), finetune=crash_at_3, **kw)
    assert ckpt.exists()
    done = tf.load_meta(str(ckpt))["records"]
    assert len(done) == 3
    resumed = tf.prune(model, data, resume=str(ckpt), finetune=crash_at_3, **kw)
    assert len(resumed.report.units) == len(tf.find_units(model, data[0][0][:1]).units)
    assert _same_state(_state(full), _state(resumed.model))
    with pytest.raises(ValueError, match="different options"):
        tf.prune(model, data, resume=str(ckpt), finetune=crash_at_3, **{**kw, "keep": 0.25})


def test_hooks_removed_after_an_exception():
    model = _model(DemoVGG)
    bad = [torch.randn(4, 1, 28, 28), torch.randn(4, 3, 28, 28)]  # the second batch breaks conv 0
    with pytest.raises(RuntimeError):
        tf.prune(model, bad, keep=0.5, num_images=8, progress=False, inplace=True)
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    assert hooks == 0
    assert tf.count_params(model) == tf.count_params(DemoVGG()), "a failed inplace run must not half-prune"


def test_bad_options_raise_clear_errors():
    model, data = _model(DemoVGG), _data()
    with pytest.raises(ValueError, match="method"):
        tf.prune(model, data, method="magic")
    with pytest.raises(ValueError, match="keep"):
        tf.prune(model, data, keep=1.5)
    with pytest.raises(TypeError, match="unknown option"):
        tf.prune(model, data, kepp=0.5)
    with pytest.raises(ValueError, match="features.99"):
        tf.prune(model, data, units=["features.99"], progress=False)
    with pytest.raises(TypeError, match="one-pass iterator"):
        tf.prune(model, iter(data), keep=0.5)


def test_bn_recalibration_restores_bn_statistics():
    model, data = _model(DemoVGG), _data(64, 16)
    # a model whose BN stats match the data: re-estimation should then barely move the output
    tf.recalibrate_batchnorm(model, data, num_images=64)
    res = tf.prune(model, data, keep=1.0, num_images=64, bn_recalibration=True, progress=False)
    x = data[0][0]
    err = (res.model(x) - model(x)).abs().max().item()
    print("bn recalibration drift", err)
    assert err < 1e-3
    assert any("BatchNorm" in n for n in res.report.notes)


def test_config_dataclass_equals_keywords():
    model, data = _model(DemoVGG), _data()
    cfg = tf.PruneConfig(keep=0.5, num_images=16, progress=False, seed=2)
    a = tf.prune(model, data, cfg).model
    b = tf.prune(model, data, keep=0.5, num_images=16, progress=False, seed=2).model
    assert _same_state(_state(a), _state(b))
    with pytest.raises(TypeError):
        tf.prune(model, data, cfg, keep=0.3)


def test_keep_dict_prunes_only_listed_units():
    model, data = _model(DemoVGG), _data()
    units = tf.find_units(model, data[0][0][:1]).units
    conv, fc, other = units[0].producer, units[-1].producer, units[1].producer
    assert units[-1].producer_kind == "linear"
    res = tf.prune(model, data, keep={conv: 4, fc: 0.25}, num_images=16, progress=False)
    get = tf.units.get_module
    assert get(res.model, conv).out_channels == 4
    assert get(res.model, fc).out_features == round(units[-1].channels * 0.25)
    assert get(res.model, other).out_channels == get(model, other).out_channels
    assert res.model(_data()[0][0]).shape == (8, 10)


def test_preset_through_prune_gives_the_paper_architecture():
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()
    data = [torch.randn(2, 3, 32, 32)]  # statistics only need the convs; 32x32 keeps it quick
    res = tf.prune(model, data, preset="vgg16-thinet-gap", keep=None, num_images=2, samples_per_image=3,
                   statistics="sampled", progress=False)
    params = tf.count_params(res.model)
    flops = tf.count_flops(res.model, torch.randn(1, 3, 224, 224))
    print("ThiNet-GAP via prune():", params, flops)
    assert round(params / 1e6, 2) == 8.32
    assert round(flops / 1e9, 2) == 9.34
    assert res.model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert any("vgg16-thinet-gap" in n for n in res.report.notes)


@pytest.mark.parametrize("backend", ["torch", "cpu", "auto"])
def test_backend_preference_is_recorded(backend):
    if backend == "cpu" and not tf.backends()["cpu"]:
        pytest.skip("_C is not built")
    model, data = _model(DemoVGG), _data()
    res = tf.prune(model, data, keep=0.5, num_images=8, backend=backend, progress=False)
    want = {"torch": "torch", "cpu": "cpu", "auto": "cpu" if tf.backends()["cpu"] else "torch"}[backend]
    assert res.report.backend["selection_backend"] == want
    assert res.report.backend["statistics_backend"] == "torch"


def test_resume_keeps_what_the_per_unit_finetune_changed_elsewhere(tmp_path):
    model, data = _model(DemoVGG), _data()
    kw = dict(keep=0.5, num_images=16, samples_per_image=5, progress=False)

    def nudge_head(m, unit, index):  # a fine-tune touches layers outside the unit too
        with torch.no_grad():
            m.classifier[-1].bias.add_(1.0)

    crashed = []

    def nudge_then_crash(m, unit, index):
        if index == 2 and not crashed:
            crashed.append(index)
            raise _Interrupt("simulated crash")
        nudge_head(m, unit, index)

    full = tf.prune(model, data, finetune=nudge_head, **kw).model
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(_Interrupt):
        tf.prune(model, data, resume=str(ckpt), finetune=nudge_then_crash, **kw)
    resumed = tf.prune(model, data, resume=str(ckpt), finetune=nudge_then_crash, **kw).model
    assert _same_state(_state(full), _state(resumed))


def test_option_combinations_that_cannot_work_are_refused():
    model, data = _model(DemoVGG), _data()
    with pytest.raises(ValueError, match="resume"):
        tf.prune(model, data, schedule="oneshot", resume="x.ckpt")
    units = tf.find_units(model, data[0][0][:1]).units
    with pytest.raises(ValueError, match="did not select"):
        tf.prune(model, data, keep={units[0].producer: 0.5, units[1].producer: 0.5},
                 units=[units[0].producer], progress=False)
    with pytest.raises(ValueError, match=r"keep\['"):
        tf.prune(model, data, keep={units[0].producer: 10_000}, progress=False)
    cfg = tf.PruneConfig().replace(flops_target=0.5)
    assert cfg.keep is None and cfg.flops_target == 0.5


def test_report_speed_and_evaluate_leave_grads_and_module_flags_alone():
    model, data = _model(DemoVGG), _data()
    model.train()
    model.features[1].eval()  # a frozen BatchNorm inside a training model
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    grads = [p.grad.clone() for p in model.parameters()]
    tf.report.measure_speed(model, data[0][0][:1], repeats=1, warmup=0)
    tf.evaluate(model, data)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert model.training and not model.features[1].training

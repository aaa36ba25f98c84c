"""finetune as a practitioner runs it: validation, checkpoints, exact resume, label
smoothing, mixed precision, the JSON-lines log and argument checks (tiny DemoVGGs on
random 1x28x28 images, so each test takes seconds on a CPU)."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import thinet_fast as tf
from thinet_fast.models import DemoVGG
from thinet_fast.training import distillation_loss
from conftest import Preempted, StopAfter


def _ds(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(10, (n,), generator=g))


def _loader(ds, shuffle=True, seed=0):
    return DataLoader(ds, batch_size=8, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def _model(seed=0):
    torch.manual_seed(seed)
    return DemoVGG(widths=(4, 4, 8, 8, 8), hidden=16).eval()  # BN and dropout: both must resume exactly


def _lines(path):
    with open(path) as f:
        return [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for line in f]




def test_validation_steps_checkpoints_and_log(tmp_path):
    model, val = _model(), _loader(_ds(24, seed=1), shuffle=False)
    log = tmp_path / "ft.jsonl"
    out = tf.finetune(model, _loader(_ds()), steps=7, lr=0.1, val_data=val, val_every=3,
                      checkpoint_dir=tmp_path / "ck", log=log, seed=0, progress=False)
    recs = _lines(log)
    vals = [r for r in recs if r["event"] == "val"]
    print(out, vals)
    assert [r["step"] for r in vals] == [3, 6, 7]  # every 3 steps and after the last
    train = [r for r in recs if r["event"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 8))
    assert all(set(r) >= {"step", "loss", "lr", "avg_loss"} and math.isfinite(r["loss"]) for r in train)
    # the logged lr is the per-step cosine schedule
    assert [r["lr"] for r in train] == pytest.approx([0.05 * (1 + math.cos(math.pi * t / 7)) for t in range(7)])
    assert out["steps"] == 7 and out["loss"] == pytest.approx(train[-1]["avg_loss"])
    assert out["last_loss"] == pytest.approx(train[-1]["loss"]) and out["seconds"] > 0
    assert out["val"] == {"step": 7, "top1": vals[-1]["top1"], "top5": vals[-1]["top5"]}
    best = max(vals, key=lambda r: (r["top1"], -r["step"]))  # the first of the highest
    assert out["best_val"] == {"step": best["step"], "top1": best["top1"], "top5": best["top5"]}
    json.dumps(out)  # the CLI prints it

    b, last = tf.load(tmp_path / "ck" / "best.pt"), tf.load(tmp_path / "ck" / "last.pt")
    acc_b, acc_l = tf.evaluate(b, val), tf.evaluate(last, val)
    assert (acc_b[1], acc_b[5]) == pytest.approx((best["top1"], best["top5"]))
    assert (acc_l[1], acc_l[5]) == pytest.approx((vals[-1]["top1"], vals[-1]["top5"]))
    assert tf.load_meta(tmp_path / "ck" / "best.pt")["finetune_best"]["step"] == best["step"]
    assert not b.training and not last.training  # saved in the caller's modes (eval)
    for (k, v), w in zip(model.state_dict().items(), last.state_dict().values()):
        assert torch.equal(v, w), k

    # resuming a finished run trains nothing and gives the same answer
    before = copy.deepcopy(model.state_dict())
    again = tf.finetune(model, _loader(_ds()), steps=7, lr=0.1, val_data=val, val_every=3,
                        checkpoint_dir=tmp_path / "ck", resume=True, log=log, seed=0, progress=False)
    assert again["steps"] == 7 and again["resumed_from"] == 7 and again["best_val"] == out["best_val"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("stop,optimizer,amp,device", [
    (3, "sgd", None, "cpu"), (4, "sgd", None, "cpu"), (5, "adamw", "bf16", "cpu"),
    pytest.param(5, "sgd", "fp16", "cuda", marks=cuda), pytest.param(3, "adamw", "bf16", "cuda", marks=cuda),
])
def test_resume_equals_a_straight_run(tmp_path, stop, optimizer, amp, device):
    """6 steps, 4 batches an epoch: stopped inside epoch 0 (3), at its end (4) or inside
    epoch 1 (5), then resumed in a 'new process' (fresh loader, fresh model)."""
    ds, val = _ds(), _loader(_ds(16, seed=1), shuffle=False)
    kw = dict(steps=6, lr=0.05, optimizer=optimizer, amp=amp, seed=0, progress=False, device=device)
    tol = dict(rtol=1e-5, atol=1e-6) if device == "cpu" else dict(rtol=1e-3, atol=1e-4)  # CUDA: atomics
    straight = _model()
    want = tf.finetune(straight, _loader(ds), log=tmp_path / "a.jsonl", **kw)  # no validation, no checkpoints

    ck = dict(val_data=val, val_every=1, checkpoint_dir=tmp_path / "ck", log=tmp_path / "b.jsonl")
    with pytest.raises(Preempted):
        tf.finetune(_model(), _loader(StopAfter(ds, 8 * stop)), **ck, **kw)
    resumed = _model(seed=123)  # other weights: the checkpoint's replace them
    got = tf.finetune(resumed, _loader(ds), resume=True, **ck, **kw)
    print(want, got)
    assert got["resumed_from"] == stop and got["steps"] == 6
    for (k, v), w in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(v.float().cpu(), w.float().cpu(), **tol), k
    assert got["loss"] == pytest.approx(want["loss"], rel=tol["rtol"])
    a = [r for r in _lines(tmp_path / "a.jsonl") if r["event"] == "train"]
    b = [r for r in _lines(tmp_path / "b.jsonl") if r["event"] == "train"]
    assert [r["step"] for r in b] == list(range(1, 7))  # lines after the checkpoint written once
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=tol["rtol"])


def test_gradscaler_state_resumes(tmp_path, monkeypatch):
    """The fp16 path's GradScaler state goes through last.pt: without a GPU, run it with
    CPU fp16 autocast and a CPU GradScaler in place of CUDA's."""
    import thinet_fast.finetuning as ftm
    real = ftm._amp
    monkeypatch.setattr(ftm, "_amp", lambda amp, dev: real(amp, dev) if amp != "fp16" else (
        lambda: torch.autocast("cpu", dtype=torch.float16), torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1)))
    test_resume_equals_a_straight_run(tmp_path, 5, "sgd", "fp16", "cpu")
    state = tf.load_meta(tmp_path / "ck" / "last.pt")["finetune"]
    # the scale doubles every step without an overflow: 6 doublings only if it was restored
    assert state["scaler"]["scale"] == 2.0 ** 8 * 2 ** 6


def test_label_smoothing_is_torchs_and_changes_the_loss():
    g = torch.Generator().manual_seed(2)
    s, t, y = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g), torch.randint(10, (16,), generator=g)
    got = distillation_loss(s, t, y, temperature=2.0, weight=0.0, label_smoothing=0.2)
    assert torch.allclose(got, F.cross_entropy(s, y, label_smoothing=0.2))
    assert not torch.allclose(got, F.cross_entropy(s, y))

    torch.manual_seed(0)
    model, teacher = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    x, y = _ds(8).tensors
    with torch.no_grad():
        logits, t_logits = model(x), teacher(x)
    losses = {}
    for ls in (0.0, 0.2):  # lr=0: the step's loss is that of the model as it is
        out = tf.finetune(copy.deepcopy(model), [(x, y)], steps=1, lr=0.0, label_smoothing=ls, progress=False)
        losses[ls] = out["last_loss"]
        assert out["last_loss"] == pytest.approx(float(F.cross_entropy(logits, y, label_smoothing=ls)), rel=1e-5)
        kd = tf.finetune(copy.deepcopy(model), [(x, y)], steps=1, lr=0.0, label_smoothing=ls, teacher=teacher,
                         distill_weight=0.5, temperature=3.0, progress=False)
        want = distillation_loss(logits, t_logits, y, temperature=3.0, weight=0.5, label_smoothing=ls)
        assert kd["last_loss"] == pytest.approx(float(want), rel=1e-5)
    print(losses)
    assert losses[0.2] != pytest.approx(losses[0.0], rel=1e-3)


def test_log_every_and_strict_json(tmp_path):
    log = tmp_path / "ft.jsonl"
    tf.finetune(_model(), _loader(_ds(16)), steps=5, lr=0.05, log=log, log_every=2, progress=False)
    recs = _lines(log)
    assert [r["event"] for r in recs][0] == "start" and recs[-1]["event"] == "end"
    assert [r["step"] for r in recs if r["event"] == "train"] == [2, 4, 5]
    assert recs[-1]["steps"] == 5


def test_bf16_autocast_runs_on_cpu():
    model, dtypes = _model(), set()
    model.features[0].register_forward_hook(lambda m, a, out: dtypes.add(out.dtype))
    out = tf.finetune(model, _loader(_ds(16)), steps=2, lr=0.05, amp="bf16", device="cpu", progress=False)
    assert dtypes == {torch.bfloat16} and math.isfinite(out["loss"])
    assert model.features[0].weight.dtype == torch.float32  # the weights stay float32


@pytest.mark.parametrize("kw,match", [
    (dict(steps=0), "steps must be an integer >= 1"), (dict(steps=2.5), "steps"), (dict(lr=-1.0), "lr"),
    (dict(momentum=1.0), "momentum"), (dict(weight_decay=float("nan")), "weight_decay"),
    (dict(label_smoothing=1.0), "label_smoothing"), (dict(epochs=0), "epochs"), (dict(amp="fp8"), "amp="),
    (dict(amp="fp16", device="cpu"), "needs a CUDA device"), (dict(val_every=0, val_data=[]), "val_every"),
    (dict(val_every=2), "val_every= needs val_data="), (dict(log_every=-1), "log_every"),
    (dict(seed="1"), "seed"), (dict(resume=True), "pass checkpoint_dir="), (dict(resume=3), "resume must be"),
    (dict(temperature=0.0), "temperature"), (dict(val_batches=0, val_data=[]), "val_batches"),
    (dict(distill_weight=1.5), "distill_weight"), (dict(optimizer="lbfgs"), "optimizer"),
])
def test_bad_input_names_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        tf.finetune(_model(), _loader(_ds(16)), progress=False, **kw)


def test_bad_resume_and_data(tmp_path):
    data = [(x.unsqueeze(0), y.unsqueeze(0)) for x, y in _ds(4)]
    with pytest.raises(ValueError, match="no such file"):
        tf.finetune(_model(), data, resume=tmp_path / "nope.pt", progress=False)
    tf.finetune(_model(), data, steps=2, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"other options \(lr=0.01 there, 0.5 now"):
        tf.finetune(_model(), data, steps=2, lr=0.5, checkpoint_dir=tmp_path, resume=True, progress=False)
    other = DemoVGG(widths=(4, 4, 8, 8, 4), hidden=16)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="does not fit this model"):
        tf.finetune(other, data, steps=2, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # left as it was
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt.*start over"):
        tf.finetune(_model(), data, steps=2, resume=tmp_path / "junk.pt", progress=False)
    with pytest.raises(ValueError, match="one-pass iterator"):  # would loop forever before
        tf.finetune(_model(), iter(data), steps=len(data) + 1, progress=False)
    with pytest.raises(ValueError, match="empty"):
        tf.finetune(_model(), [], progress=False)
    with pytest.raises(FileNotFoundError, match="log=.*does not exist"):  # checked before any step
        tf.finetune(_model(), data, steps=2, log=tmp_path / "no" / "ft.jsonl", progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir=.*is a file"):
        tf.finetune(_model(), data, steps=2, checkpoint_dir=tmp_path / "junk.pt", progress=False)

"""Fine-tuning, distillation and evaluation."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import thinet_fast as tf
from thinet_fast.training import distillation_loss


def _toy(seed=0, n=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 5, generator=g)
    y = (x @ w).argmax(1)
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]


def test_evaluate_matches_a_manual_topk():
    torch.manual_seed(0)
    model = nn.Linear(8, 5)
    data = _toy()
    acc = tf.evaluate(model, data, topk=(1, 3))
    x = torch.cat([b[0] for b in data]); y = torch.cat([b[1] for b in data])
    with torch.no_grad():
        logits = model(x)
    top3 = logits.topk(3, dim=1).indices
    want1 = (logits.argmax(1) == y).double().mean().item()
    want3 = (top3 == y[:, None]).any(1).double().mean().item()
    print(acc, want1, want3)
    assert acc[1] == pytest.approx(want1) and acc[3] == pytest.approx(want3)


def test_distillation_loss_limits():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(16, 5, generator=g), torch.randn(16, 5, generator=g)
    y = torch.randint(5, (16,), generator=g)
    assert torch.allclose(distillation_loss(s, t, y, temperature=4, weight=0.0), F.cross_entropy(s, y))
    # KL(p||p) = 0: distilling from itself leaves only the CE part
    same = distillation_loss(s, s, y, temperature=3, weight=0.5)
    assert torch.allclose(same, 0.5 * F.cross_entropy(s, y), atol=1e-6)
    kl = distillation_loss(s, t, y, temperature=2, weight=1.0)
    want = 4 * F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean")
    print(float(kl), float(want))
    assert torch.allclose(kl, want, atol=1e-6)


@pytest.mark.parametrize("optimizer,schedule", [("sgd", "cosine"), ("adamw", "step"), ("sgd", "constant")])
def test_finetune_lowers_the_loss_and_keeps_the_teacher(optimizer, schedule):
    torch.manual_seed(0)
    data = _toy()
    model, teacher = nn.Linear(8, 5), nn.Linear(8, 5)
    teacher.train()
    t_state = copy.deepcopy(teacher.state_dict())
    before = tf.evaluate(model, data)[1]
    out = tf.finetune(model, data, epochs=6, lr=0.05, optimizer=optimizer, schedule=schedule, teacher=teacher,
                      distill_weight=0.2, progress=False)
    after = tf.evaluate(model, data)[1]
    print(optimizer, schedule, before, after, out)
    assert out["steps"] == 6 * len(data)
    assert after > before
    assert teacher.training and all(torch.equal(v, t_state[k]) for k, v in teacher.state_dict().items())
    assert all(p.requires_grad for p in teacher.parameters())


def test_finetune_rejects_bad_options():
    with pytest.raises(ValueError, match="optimizer"):
        tf.finetune(nn.Linear(8, 5), _toy(), optimizer="lbfgs")
    with pytest.raises(ValueError, match="distill_weight"):
        tf.finetune(nn.Linear(8, 5), _toy(), distill_weight=2.0)


def test_finetune_callback_runs_per_unit_in_the_sequential_schedule():
    from thinet_fast.models import DemoVGG
    torch.manual_seed(0)
    model = DemoVGG().eval()
    x = torch.randn(16, 1, 28, 28)
    data = [(x[:8], torch.randint(10, (8,))), (x[8:], torch.randint(10, (8,)))]
    calls = []
    cb = tf.finetune_callback(data, teacher=model, steps=1, lr=1e-3, progress=False)

    def spy(m, unit, index):
        calls.append((unit.producer, index))
        return cb(m, unit, index)

    res = tf.prune(model, data, keep=0.5, num_images=16, finetune=spy, progress=False)
    assert [i for _, i in calls] == list(range(len(res.report.units)))

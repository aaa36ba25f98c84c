"""resume= refuses checkpoints from another model, other data or other units, and reads
no pickled code (issue 8)."""
from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

import thinet_fast as tf
from thinet_fast.models import DemoResNet, DemoVGG
from thinet_fast.serialization import read_payload


def _data(seed=0, n=16, batch=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    return [(x[i:i + batch],) for i in range(0, n, batch)]


def _model(seed=0, cls=DemoVGG):
    torch.manual_seed(seed)
    return cls().eval()


KW = dict(keep=0.5, num_images=16, samples_per_image=4, progress=False)


class _Stop(RuntimeError):
    pass


class CrashOnce:
    """A per-unit callback that interrupts the run once, after ``at`` units are
    checkpointed (the same callback resumes: a checkpoint records which one ran)."""

    def __init__(self, at):
        self.at, self.fired = at, False

    def __call__(self, m, unit, index):
        if index == self.at and not self.fired:
            self.fired = True
            raise _Stop


def _interrupted(model, data, path, after=2, **kw):
    crash = CrashOnce(after)
    with pytest.raises(_Stop):
        tf.prune(model, data, resume=str(path), finetune=crash, **{**KW, **kw})
    assert path.exists()
    return crash


def test_checkpoint_is_safe_and_resumes_exactly(tmp_path):
    model, data = _model(), _data()
    want = tf.prune(model, data, finetune=CrashOnce(-1), **KW).model
    path = tmp_path / "run.ckpt"
    crash = _interrupted(model, data, path)
    payload = read_payload(path)  # no pickled objects anywhere: a safetensors file
    assert payload["version"] == 3 and payload["skeleton"] is None and payload["architecture"] is not None
    assert len(payload["meta"]["records"]) == 2
    got = tf.prune(model, data, resume=str(path), finetune=crash, **KW).model
    for (k, a), (_, b) in zip(want.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), k


def test_refuses_another_model(tmp_path):
    path = tmp_path / "run.ckpt"
    crash = _interrupted(_model(0), _data(), path)
    with pytest.raises(ValueError, match=r"run\.ckpt.*another model"):
        tf.prune(_model(1), _data(), resume=str(path), finetune=crash, **KW)
    with pytest.raises(ValueError, match="another finetune"):
        tf.prune(_model(0), _data(), resume=str(path), **KW)


def test_refuses_other_data(tmp_path):
    path = tmp_path / "run.ckpt"
    model, data = _model(), _data()
    crash = _interrupted(model, data, path)
    with pytest.raises(ValueError, match="first image differs"):
        tf.prune(model, _data(seed=5), resume=str(path), finetune=crash, **KW)
    later = [data[0], (data[1][0] + 1.0,)]  # same first image, other later images
    with pytest.raises(ValueError, match=r"run\.ckpt.*other calibration data"):
        tf.prune(model, later, resume=str(path), finetune=crash, **KW)
    # other batch sizes are the same data
    rebatched = [(torch.cat([data[0][0], data[1][0]])[i:i + 4],) for i in range(0, 16, 4)]
    # the refused runs left the checkpoint as it was: the right data still resumes
    tf.prune(model, rebatched, resume=str(path), finetune=crash, **KW)
    # a finished checkpoint still checks the data
    with pytest.raises(ValueError, match="other calibration data"):
        tf.prune(model, later, resume=str(path), finetune=crash, **KW)


def test_refuses_other_units_and_filter(tmp_path):
    path = tmp_path / "run.ckpt"
    model, data = _model(), _data()
    crash = _interrupted(model, data, path)
    first = tf.find_units(model, data[0][0][:1]).units[0].producer
    with pytest.raises(ValueError, match="units"):
        tf.prune(model, data, resume=str(path), units=[first], finetune=crash, **KW)


def test_corrupt_and_old_pickled_checkpoints(tmp_path):
    model, data = _model(), _data()
    path = tmp_path / "run.ckpt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"run\.ckpt.*delete it"):
        tf.prune(model, data, resume=str(path), **KW)
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.write_bytes(pickle.dumps({"format": "thinet_fast-checkpoint/1", "model": Boom()}))
    with pytest.raises(ValueError, match="delete it"):
        tf.prune(model, data, resume=str(path), **KW)
    assert not marker.exists()


def test_unwritable_resume_path_fails_before_any_unit(tmp_path):
    calls = []
    with pytest.raises(FileNotFoundError, match="resume=.*missing_dir"):
        tf.prune(_model(), _data(), resume=str(tmp_path / "missing_dir" / "x.ckpt"),
                 finetune=lambda *a: calls.append(a), **KW)
    assert calls == []


def test_resnet_checkpoint_round_trip(tmp_path):
    model, data = _model(cls=DemoResNet), _data()
    want = tf.prune(model, data, finetune=CrashOnce(-1), **KW).model
    path = tmp_path / "r.ckpt"
    crash = _interrupted(model, data, path, after=3)
    got = tf.prune(model, data, resume=str(path), finetune=crash, **KW).model
    x = data[0][0]
    torch.testing.assert_close(got(x), want(x), rtol=0, atol=0)

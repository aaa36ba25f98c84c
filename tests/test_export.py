"""Deployable outputs: pruned models export to ONNX (run in onnxruntime) and with
torch.export, and save as valid safetensors files that load back exactly."""
from __future__ import annotations

import io
import json

import pytest
import torch
import torchvision
from torch import nn

import thinet_fast as tf
from thinet_fast.models import DemoResNet, DemoVGG

BUILDERS = {  # name -> (unpruned model builder, input shape)
    "demo_vgg": (DemoVGG, (1, 28, 28)),
    "demo_resnet": (DemoResNet, (1, 28, 28)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
}


def _unpruned(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = BUILDERS[name][0]()
    with torch.no_grad():  # BN statistics that matter, so a lost buffer shows in the outputs
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(11)
    return model.eval()


@pytest.fixture(scope="module", params=list(BUILDERS))
def pruned(request):
    """(name, pruned model in eval mode, an input batch of 2)."""
    name, shape = request.param, BUILDERS[request.param][1]
    model = _unpruned(name)
    g = torch.Generator().manual_seed(1)
    res = tf.prune(model, [torch.randn(8, *shape, generator=g)], keep=0.5, num_images=8, progress=False)
    small = res.model.eval()
    assert tf.count_params(small) < 0.6 * tf.count_params(model)  # it really is pruned
    return name, small, torch.randn(2, *shape, generator=g)


def _max_err(a, b) -> float:
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


# --------------------------------------------------------------------------- ONNX
def test_onnx_export_runs_in_onnxruntime(pruned, tmp_path):
    ort = pytest.importorskip("onnxruntime")  # a fallback only: CI installs it
    onnx = pytest.importorskip("onnx")
    name, model, x = pruned
    path = tmp_path / f"{name}.onnx"
    check = tf.export_onnx(model, x, path)  # torch.onnx.export (dynamo), checked before writing
    print(name, check)
    assert check.batch_sizes == (2, 3) and check.max_abs_error < 1e-4
    onnx.checker.check_model(onnx.load(str(path)))
    # and independently of the helper: the written file, at two batch sizes
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    for batch in (x, torch.cat([x, -x, 2 * x])):
        got = session.run(None, {inp.name: batch.numpy()})[0]
        with torch.no_grad():
            want = model(batch)
        err = _max_err(got, want)
        print(name, "onnxruntime batch", batch.shape[0], "max abs err", err)
        assert got.shape == tuple(want.shape) and err < 1e-4


def test_export_onnx_refuses_a_graph_that_does_not_match(tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 3))
    model.train()
    x = torch.randn(2, 1, 28, 28)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"the old file")
    real_run = ort.InferenceSession.run

    def off_by_a_bit(self, names, feeds, *a, **k):  # what a wrong kernel or a bad graph would give
        return [o + 1e-2 for o in real_run(self, names, feeds, *a, **k)]

    monkeypatch.setattr(ort.InferenceSession, "run", off_by_a_bit)
    with pytest.raises(tf.OnnxMismatch, match=r"differs from PyTorch by up to 0\.01.*not written"):
        tf.export_onnx(model, x, path)
    assert path.read_bytes() == b"the old file" and not (tmp_path / "m.onnx.tmp").exists()
    assert model.training and model[1].training  # the caller's modes are restored
    monkeypatch.setattr(ort.InferenceSession, "run", real_run)
    check = tf.export_onnx(model, x, path, dynamic_batch=False)
    assert check.batch_sizes == (2,) and check.max_abs_error < 1e-5 and path.read_bytes()[:8] != b"the old "


# --------------------------------------------------------------------------- torch.export
def test_torch_export_program_matches(pruned):
    name, model, x = pruned
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    for inp in (x, torch.cat([x, x.flip(0), x])):
        with torch.no_grad():
            got, want = program.module()(inp), model(inp)
        err = _max_err(got, want)
        print(name, "torch.export batch", inp.shape[0], "max abs err", err)
        assert got.shape == want.shape and err < 1e-5


# --------------------------------------------------------------------------- safetensors
def test_saved_file_is_valid_safetensors_and_loads_back_exactly(pruned, tmp_path):
    from safetensors import safe_open

    name, model, x = pruned
    path = tmp_path / f"{name}.safetensors"
    tf.save(model, path, meta={"keep": 0.5})
    state = model.state_dict()
    with safe_open(str(path), framework="pt") as f:  # any safetensors reader sees the weights
        assert f.metadata()["format"] == "thinet_fast.model" and f.metadata()["version"] == "3"
        assert set(state) <= set(f.keys())
        for k, v in state.items():
            t = f.get_tensor(k)
            assert t.dtype == v.dtype and torch.equal(t, v), k
        nbt = [k for k in state if k.endswith("num_batches_tracked")]
        assert nbt and all(f.get_tensor(k).dtype == torch.int64 and int(f.get_tensor(k)) == 11 for k in nbt)
    with torch.no_grad():
        want = model(x)
        back = tf.load(path)
        err = _max_err(back(x), want)
        print(name, "load max abs err", err)
        assert type(back) is type(model) and err == 0.0
        base = tf.load(path, base=_unpruned(name))  # the full-width architecture, reshaped
        assert _max_err(base(x), want) == 0.0
    assert tf.load_meta(path) == {"keep": 0.5}


def _rewrite(path, out, edit_header=None, cut=0):
    """Copy a safetensors file with its JSON header edited, or ``cut`` bytes short."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    if edit_header:
        edit_header(header)
    raw = json.dumps(header).encode()
    out.write_bytes((len(raw).to_bytes(8, "little") + raw + body)[:len(data) - cut if cut else None])
    return out


def test_tampered_files_are_refused_naming_the_path(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    good = tmp_path / "good.safetensors"
    tf.save(model, good)

    def grow_a_tensor(h):  # offsets that no longer tile the data: safetensors' own check
        h["0.weight"]["data_offsets"][1] += 4

    def meta_of(h, **kw):
        h["__metadata__"].update(kw)

    def drop_payload_tensor(h):
        doc = json.loads(h["__metadata__"]["thinet_fast"])
        doc["payload"]["tensors"]["0.weight"] = {"$tensor": "no.such.tensor"}
        h["__metadata__"]["thinet_fast"] = json.dumps(doc)

    def bad_tag(h):
        doc = json.loads(h["__metadata__"]["thinet_fast"])
        doc["payload"]["meta"] = {"$pickle": "gASV"}
        h["__metadata__"]["thinet_fast"] = json.dumps(doc)

    cases = [
        (dict(edit_header=grow_a_tensor), r"bad\.safetensors.* not a valid safetensors file"),
        (dict(cut=5), r"bad\.safetensors.* not a valid safetensors file"),
        (dict(edit_header=lambda h: meta_of(h, thinet_fast="{not json")), r"bad\.safetensors.*metadata.*damaged"),
        (dict(edit_header=lambda h: meta_of(h, version="99")), r"bad\.safetensors.*format version 99"),
        (dict(edit_header=lambda h: meta_of(h, format="other")), r"bad\.safetensors.*not a thinet_fast model"),
        (dict(edit_header=drop_payload_tensor), r"bad\.safetensors.*'no\.such\.tensor'.*does not hold"),
        (dict(edit_header=bad_tag), r"bad\.safetensors.*unknown tagged value"),
    ]
    for kw, match in cases:
        bad = _rewrite(good, tmp_path / "bad.safetensors", **kw)
        with pytest.raises(ValueError, match=match):
            tf.load(bad)
    # a tampered header in memory (a file object) is refused the same way
    buf = io.BytesIO(_rewrite(good, tmp_path / "b2", edit_header=grow_a_tensor).read_bytes())
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        tf.load(buf)
    # and the untouched file still loads: the checks above refused the edits, not the format
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(tf.load(good).eval()(x), model.eval()(x))

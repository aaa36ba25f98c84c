"""Files we read run no code; files we write are replaced atomically (issue 8)."""
from __future__ import annotations

import base64
import io
import json
import os
import pickle
import sys

import pytest
import torch
import torchvision
from torch import nn

import thinet_fast as tf
from thinet_fast import architecture
from thinet_fast.serialization import FORMAT, FORMATS, load, save


class _Boom:
    """Unpickling this writes a marker file: what an attacker's payload would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payload(**fields):
    base = {"format": FORMAT, "version": 2, "architecture": None, "tensors": {}, "state_dict": {},
            "spec": {}, "modules": {}, "meta": {}, "skeleton": None}
    base.update(fields)
    return base


def _edit_safetensors(path, edit, out=None):
    """Rewrite the thinet_fast JSON in a safetensors model file's header with
    ``edit(payload_json)``: what a crafted file could say."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    doc = json.loads(header["thinet_fast"])
    edit(doc["payload"])
    save_file(tensors, str(out or path), metadata={**header, "thinet_fast": json.dumps(doc)})
    return out or path


@pytest.mark.parametrize("fmt", FORMATS)
def test_crafted_skeleton_is_never_unpickled_by_default(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    evil = pickle.dumps(_Boom(str(marker)))
    if fmt == "torch":
        torch.save(_payload(skeleton=evil), path)
    else:  # a real file whose description is dropped and whose skeleton is the payload
        save(nn.Linear(2, 2), path)
        _edit_safetensors(path, lambda p: p.update(architecture=None,
                                                   skeleton={"$bytes": base64.b64encode(evil).decode()}))
    with pytest.raises(ValueError, match="unsafe_unpickle=True"):
        load(path)
    assert not marker.exists()
    # the opt-in is explicit and does what it says
    with pytest.raises(Exception):
        load(path, unsafe_unpickle=True)
    assert marker.exists()


def test_crafted_architecture_names_no_callable(tmp_path):
    good = architecture.describe(nn.Sequential(nn.Linear(2, 2)))
    for bad_class in ("os:system", "builtins:eval", "subprocess:Popen"):
        desc = {**good, "modules": [dict(good["modules"][0], **{"class": bad_class})] + good["modules"][1:]}
        with pytest.raises(architecture.DescriptionError, match="not a plain nn.Module"):
            architecture.rebuild(desc, {"0.weight": torch.zeros(2, 2), "0.bias": torch.zeros(2)})
    # an attribute referring outside the model's packages is refused
    rec = dict(good["modules"][1])
    rec["attrs"] = dict(rec["attrs"], hook={"__ref__": "os:system"})
    desc = {**good, "modules": [good["modules"][0], rec]}
    with pytest.raises(architecture.DescriptionError, match="refused"):
        architecture.rebuild(desc, {"0.weight": torch.zeros(2, 2), "0.bias": torch.zeros(2)})


def test_untrusted_package_is_not_imported(tmp_path, monkeypatch):
    pkg = tmp_path / "sideeffect_pkg"
    pkg.mkdir()
    marker = tmp_path / "imported"
    (pkg / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nimport torch.nn as nn\nclass Net(nn.Module):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    good = architecture.describe(nn.Identity())
    desc = {**good, "modules": [dict(good["modules"][0], **{"class": "sideeffect_pkg:Net"})]}
    with pytest.raises(architecture.DescriptionError, match="trusted_modules"):
        architecture.rebuild(desc, {})
    assert not marker.exists()
    m = architecture.rebuild(desc, {}, trusted_modules=["sideeffect_pkg"])  # opted in
    assert type(m).__name__ == "Net" and marker.exists()
    sys.modules.pop("sideeffect_pkg", None)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "mnasnet0_5", "convnext_tiny",
                                  "vit_b_16", "efficientnet_b0", "googlenet"])
def test_torchvision_models_round_trip_without_pickle(name, tmp_path):
    torch.manual_seed(0)
    kw = {"image_size": 32} if name == "vit_b_16" else {}
    if name == "googlenet":
        kw = {"aux_logits": False, "init_weights": False}
    model = getattr(torchvision.models, name)(**kw).eval()
    path = tmp_path / f"{name}.pt"
    save(model, path)
    back = load(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        err = float((back(x) - model(x)).abs().max())
    print(name, err)
    assert type(back) is type(model) and err == 0.0
    # the base= route keeps the state dict's version metadata (MNASNet checks it)
    fresh = getattr(torchvision.models, name)(**kw).eval()
    with torch.no_grad():
        assert float((load(path, base=fresh)(x) - model(x)).abs().max()) == 0.0


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_is_atomic_and_reuses_a_stale_tmp(tmp_path, monkeypatch, fmt):
    import safetensors.torch

    path = tmp_path / "m.pt"
    first = nn.Linear(3, 3)
    save(first, path, format=fmt)
    before = path.read_bytes()
    (tmp_path / "m.pt.tmp").write_bytes(b"stale half-written file")

    def dies_half_way(obj, f, *a, **k):  # torch.save(obj, f) or save_file(tensors, filename)
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as fh:
                fh.write(b"partial")
        else:
            f.write(b"partial")
        raise KeyboardInterrupt

    writer = (torch, "save") if fmt == "torch" else (safetensors.torch, "save_file")
    with monkeypatch.context() as mp:
        mp.setattr(*writer, dies_half_way)
        with pytest.raises(KeyboardInterrupt):
            save(nn.Linear(3, 3), path, format=fmt)
    assert path.read_bytes() == before  # the old file is whole
    assert not (tmp_path / "m.pt.tmp").exists()  # and the temporary is gone
    torch.testing.assert_close(load(path).weight, first.weight)
    (tmp_path / "m.pt.tmp").write_bytes(b"stale")
    save(nn.Linear(3, 3), path, format=fmt)  # a stale temporary is overwritten
    assert not (tmp_path / "m.pt.tmp").exists()


def test_unwritable_paths_fail_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        save(nn.Linear(2, 2), tmp_path / "no_such_dir" / "m.pt")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        save(nn.Linear(2, 2), tmp_path)
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(PermissionError, match="not writable"):
            save(nn.Linear(2, 2), ro / "m.pt")


def _crafted(tmp_path, fmt, **root_attrs):
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    path = tmp_path / "good.pt"
    save(m, path, format=fmt)
    if fmt == "safetensors":  # the attributes are JSON there; these carry no $-tags
        return _edit_safetensors(path, lambda p: p["architecture"]["modules"][0]["attrs"].update(root_attrs),
                                 out=tmp_path / "crafted.pt")
    payload = torch.load(path, weights_only=True)
    payload["architecture"]["modules"][0]["attrs"].update(root_attrs)
    torch.save(payload, tmp_path / "crafted.pt")
    return tmp_path / "crafted.pt"


@pytest.mark.parametrize("attrs,match", [
    # a method of the class replaced by a file-chosen callable
    ({"eval": {"__ref__": "torch.nn.functional:relu"}}, "would replace Sequential.eval"),
    ({"_forward_hooks": {"__dict__": {}}}, "internal"),
    # a name reached through another module's attribute (torch imports os)
    ({"act": {"__ref__": "torch:os.system"}}, "not defined in `torch` itself"),
    # a partial binds arguments the model never chose
    ({"act": {"__partial__": {"__ref__": "torch:save"}, "args": {"__tuple__": ["/tmp/x"]},
              "keywords": {"__dict__": {}}}}, "refused"),
    ({"act": {"__ref__": "torch.serialization:load"}}, "reads or writes files"),
    ({"act": {"__ref__": "builtins:open"}}, "outside the model's own packages"),
    # plain objects: only plain classes of the model's packages, no methods replaced
    ({"coder": {"__object__": "subprocess:Popen", "state": {}}}, "outside the model's own packages"),
    ({"coder": {"__object__": "torch:os.PathLike", "state": {}}}, "not a plain class defined in `torch`"),
    ({"coder": {"__object__": "torch.nn:Linear", "state": {}}}, "not a plain class"),
    ({"coder": {"__object__": "torchvision.models.detection._utils:BoxCoder",
                "state": {"__dict__": {"encode": {"__ref__": "torch:relu"}}}}}, "refused"),
])
@pytest.mark.parametrize("fmt", FORMATS)
def test_crafted_attributes_are_refused(tmp_path, attrs, match, fmt):
    with pytest.raises(ValueError, match=match):
        load(_crafted(tmp_path, fmt, **attrs))


def test_plain_helper_objects_round_trip(tmp_path):
    from torchvision.models.detection._utils import BoxCoder

    m = nn.Sequential(nn.Linear(2, 2))
    m.coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    save(m, tmp_path / "m.pt")
    back = load(tmp_path / "m.pt")
    assert type(back.coder) is BoxCoder and back.coder.weights == (10.0, 10.0, 5.0, 5.0)
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    assert torch.equal(back.coder.encode_single(boxes, boxes), m.coder.encode_single(boxes, boxes))


class _Act(nn.Module):
    def __init__(self):
        super().__init__()
        self.fn = torch.nn.functional.gelu  # a function attribute from a trusted package
        self.norm = __import__("functools").partial(nn.BatchNorm1d, eps=1e-3)

    def forward(self, x):
        return self.fn(x)


def test_plain_function_and_module_partial_attributes_load(tmp_path):
    m = _Act()
    save(m, tmp_path / "a.pt")
    back = load(tmp_path / "a.pt")
    assert back.fn is torch.nn.functional.gelu and back.norm.keywords == {"eps": 1e-3}

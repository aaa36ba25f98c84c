"""save/load round trips of pruned models, with and without unpickling."""
import io

import pytest
import torch
import torch.nn as nn

from thinet_fast.models import DemoResNet, DemoVGG
from thinet_fast.rewrite import prune_units
from thinet_fast.serialization import FORMAT, FORMATS, load, load_meta, read_payload, save
from thinet_fast.units import find_units

X = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def pruned_resnet():
    torch.manual_seed(0)
    model = DemoResNet()
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    plan = find_units(model, X)
    keeps = {u.producer: torch.arange(0, u.channels, 2) for u in plan}
    return prune_units(model, plan, keeps).eval()


@pytest.mark.parametrize("fmt", FORMATS)  # "torch": the version-2 files written before safetensors
def test_roundtrip_pickled_skeleton(tmp_path, fmt):
    model = pruned_resnet()
    path = tmp_path / "m.pt"
    save(model, path, meta={"preset": None, "keep": 0.5}, format=fmt)
    assert read_payload(path)["version"] == (3 if fmt == "safetensors" else 2)
    back = load(path)
    assert type(back) is DemoResNet and not back.training
    assert {k: v.shape for k, v in back.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    torch.testing.assert_close(back(X), model(X))
    assert load_meta(path) == {"preset": None, "keep": 0.5}
    # it trains
    back.train()
    back(X).sum().backward()
    assert all(p.grad is not None for p in back.parameters())


@pytest.mark.parametrize("fmt", FORMATS)
def test_weights_stored_once(tmp_path, fmt):
    model = pruned_resnet()
    path = tmp_path / "m.pt"
    save(model, path, format=fmt)
    n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert path.stat().st_size < 1.5 * n_bytes + 200_000


def test_roundtrip_with_base_no_unpickling(tmp_path):
    model = pruned_resnet()
    buf = io.BytesIO()
    save(model, buf)
    buf.seek(0)
    assert read_payload(buf)["skeleton"] is None  # nothing pickled
    buf.seek(0)
    torch.testing.assert_close(load(buf)(X), model(X))  # from the plain description
    buf.seek(0)
    base = DemoResNet()  # full width: rebuilt from the saved spec
    back = load(buf, base=base)
    assert back is base and back.layer1[0].conv1.out_channels == model.layer1[0].conv1.out_channels
    torch.testing.assert_close(back(X), model(X))


def test_base_gets_replaced_head(tmp_path):
    # a structural change of the kind the GAP presets make: classifier Sequential -> Linear
    model = DemoVGG()
    plan = find_units(model, X)
    model = prune_units(model, plan, {"features.0": torch.tensor([0, 2, 4])})
    model.classifier = nn.Sequential(nn.Linear(64 * 9, 10))
    model.eval()
    path = tmp_path / "vgg.pt"
    save(model, path)
    back = load(path, base=DemoVGG())
    assert isinstance(back.classifier, nn.Sequential) and len(back.classifier) == 1
    assert back.features[0].out_channels == 3 and back.features[4].in_channels == 3
    torch.testing.assert_close(back.eval()(X), model(X))
    with pytest.raises(ValueError, match="base has no module `features`"):
        load(path, base=DemoResNet())


@pytest.mark.parametrize("fmt", FORMATS)
def test_map_location_dtype_and_ties(tmp_path, fmt):
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin).double()
    path = tmp_path / "tied.pt"
    save(model, path, format=fmt)
    other = nn.Linear(4, 4)
    for back in (load(path, map_location="cpu"), load(path, base=nn.Sequential(other, nn.ReLU(), other).double())):
        assert back[0].weight is back[2].weight and back[0].weight.dtype == torch.float64
        x = torch.randn(2, 4, dtype=torch.float64)
        torch.testing.assert_close(back(x), model(x))


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("scale", torch.tensor([3.0, 4.0]), persistent=False)

    def forward(self, x):
        return self.lin(x) * self.scale


def test_non_persistent_buffers(tmp_path):
    model = WithBuffer()
    path = tmp_path / "b.pt"
    save(model, path)
    back = load(path)
    assert torch.equal(back.scale, model.scale)


def test_rejects_foreign_files(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(DemoVGG().state_dict(), path)
    with pytest.raises(ValueError, match="not a thinet_fast model file"):
        load(path)
    from safetensors.torch import save_file
    save_file(DemoVGG().state_dict(), tmp_path / "sd.safetensors")  # plain weights, no format tag
    with pytest.raises(ValueError, match="sd.safetensors.*safetensors file but not a thinet_fast model file"):
        load(tmp_path / "sd.safetensors")
    (tmp_path / "junk").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="junk.*not a thinet_fast model file"):
        load_meta(tmp_path / "junk")
    with pytest.raises(ValueError, match="format must be one of"):
        save(DemoVGG(), tmp_path / "x.pt", format="pickle")
    torch.save({"format": FORMAT, "version": 99}, path)
    with pytest.raises(ValueError, match="version 99"):
        load(path)
    with pytest.raises(ValueError, match="meta tensors"):
        with torch.device("meta"):
            m = DemoVGG()
        save(m, tmp_path / "meta.pt")


def test_undescribable_model_loads_with_base_only(tmp_path):
    model = DemoVGG()
    model.fn = lambda x: x  # neither described nor pickled
    with pytest.warns(UserWarning, match="no plain description.*base="):
        save(model, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="base="):
        load(tmp_path / "x.pt")
    assert isinstance(load(tmp_path / "x.pt", base=DemoVGG()), DemoVGG)
    with pytest.raises(RuntimeError, match="cannot pickle"), pytest.warns(UserWarning):
        save(model, tmp_path / "y.pt", skeleton=True)


class Odd(nn.Module):
    """Tensors safetensors cannot take as they are: shared memory, non-contiguous and
    complex128 buffers, a plain tensor attribute, every integer and float dtype."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4).to(torch.bfloat16)
        base = torch.arange(12.0).reshape(3, 4)
        self.register_buffer("whole", base)
        self.register_buffer("row", base[1])  # a view of `whole`'s memory
        self.register_buffer("col", base[:, 2])  # non-contiguous, same memory again
        self.register_buffer("cplx", torch.tensor([1 + 2j, -3j], dtype=torch.complex128))
        self.register_buffer("empty", torch.empty(0, 5, dtype=torch.int16))
        for dt in (torch.float16, torch.float64, torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool):
            self.register_buffer(f"b_{str(dt)[6:]}", (torch.arange(5) % 3).to(dt))
        self.table = torch.tensor([0.5, 1.5])  # an attribute, not a buffer

    def forward(self, x):
        return self.lin(x.to(torch.bfloat16)).float() * self.table.sum()


def test_dtypes_views_and_buffers_round_trip(tmp_path):
    model = Odd()
    bn = nn.BatchNorm2d(3)
    bn.num_batches_tracked.fill_(7)
    path = tmp_path / "odd.pt"
    save(nn.ModuleDict({"odd": model, "bn": bn}), path)
    back = load(path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), back["odd"].state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), k
    assert back["bn"].num_batches_tracked.dtype == torch.int64 and int(back["bn"].num_batches_tracked) == 7
    assert torch.equal(back["odd"].table, model.table) and back["odd"].lin.weight.dtype == torch.bfloat16
    x = torch.randn(2, 3)
    assert torch.equal(back["odd"](x), model(x))
    back["odd"].row.add_(1)  # the loaded tensors are the model's own memory, not the file's
    assert torch.equal(load(path)["odd"].row, model.row)


def test_meta_round_trips_plain_values_and_tensors(tmp_path):
    meta = {"opt": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
                    "param_groups": [{"params": [0], "betas": (0.9, 0.999), "lr": 1e-3}]},
            "rng": (3, tuple(range(5)), None), "best": float("inf"), "nan": float("nan"),
            "raw": b"\x00\xff", "dt": torch.float16, "dev": torch.device("cpu"), "size": torch.Size([2, 3]),
            "$odd": 1, "z": 1 + 2j, "flag": True, "n": None, "s": "x"}
    save(nn.Linear(2, 2), tmp_path / "m.pt", meta=meta)
    got = load_meta(tmp_path / "m.pt")
    assert got.keys() == meta.keys() and got["rng"] == meta["rng"] and isinstance(got["rng"][1], tuple)
    assert got["opt"]["param_groups"] == meta["opt"]["param_groups"]
    assert torch.equal(got["opt"]["state"][0]["exp_avg"], torch.ones(2)) and float(got["opt"]["state"][0]["step"]) == 3
    assert got["best"] == float("inf") and got["nan"] != got["nan"]
    for k in ("raw", "dt", "dev", "size", "$odd", "z", "flag", "n", "s"):
        assert got[k] == meta[k] and type(got[k]) is type(meta[k]), k
    with pytest.raises(TypeError, match=r"save: meta\.bad is a object"):
        save(nn.Linear(2, 2), tmp_path / "n.pt", meta={"bad": object()})
    assert not (tmp_path / "n.pt").exists()  # refused before anything was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a missing GPU")
def test_tensors_saved_on_a_gpu_need_map_location_without_one(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    model = nn.Linear(2, 2)
    save(model, tmp_path / "m.pt")
    with safe_open(str(tmp_path / "m.pt"), framework="pt") as f:  # as if saved from cuda:0
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    doc = json.loads(header["thinet_fast"])
    doc["devices"] = {"weight": "cuda:0", "bias": "cuda:0"}
    save_file(tensors, str(tmp_path / "gpu.pt"), metadata={**header, "thinet_fast": json.dumps(doc)})
    with pytest.raises(ValueError, match=r"gpu\.pt.*saved on cuda:0.*map_location='cpu'"):
        load(tmp_path / "gpu.pt")
    for where in ("cpu", torch.device("cpu"), {"cuda:0": "cpu"}):
        back = load(tmp_path / "gpu.pt", map_location=where)
        assert back.weight.device.type == "cpu" and torch.equal(back.weight, model.weight)

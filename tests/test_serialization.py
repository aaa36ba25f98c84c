"""save/load round trips of pruned models, with and without unpickling."""
import io

import pytest
import torch
import torch.nn as nn

from thinet_fast.models import DemoResNet, DemoVGG
from thinet_fast.rewrite import prune_units
from thinet_fast.serialization import FORMAT, load, load_meta, save
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


def test_roundtrip_pickled_skeleton(tmp_path):
    model = pruned_resnet()
    path = tmp_path / "m.pt"
    save(model, path, meta={"preset": None, "keep": 0.5})
    back = load(path)
    assert type(back) is DemoResNet and not back.training
    assert {k: v.shape for k, v in back.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    torch.testing.assert_close(back(X), model(X))
    assert load_meta(path) == {"preset": None, "keep": 0.5}
    # it trains
    back.train()
    back(X).sum().backward()
    assert all(p.grad is not None for p in back.parameters())


def test_weights_stored_once(tmp_path):
    model = pruned_resnet()
    path = tmp_path / "m.pt"
    save(model, path)
    n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert path.stat().st_size < 1.5 * n_bytes + 200_000


def test_roundtrip_with_base_no_unpickling(tmp_path):
    model = pruned_resnet()
    buf = io.BytesIO()
    save(model, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["skeleton"] is None  # nothing pickled
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


def test_map_location_dtype_and_ties(tmp_path):
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin).double()
    path = tmp_path / "tied.pt"
    save(model, path)
    back = load(path, map_location="cpu")
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

"""The documentation cannot drift from the code: docs/options.md is PruneConfig's own
text, every relative link resolves, and every Python example in the README runs (with
the README's placeholders for the user's files swapped for tiny stand-ins)."""
import re
from pathlib import Path

import pytest
import torch

import thinet_fast
from conftest import write_image_folder
from thinet_fast.pipeline.options_doc import option_docs, render_options

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_options_page_is_generated_from_the_config_and_every_option_is_documented():
    import dataclasses
    docs = option_docs()
    missing = [f.name for f in dataclasses.fields(thinet_fast.PruneConfig) if not docs.get(f.name)]
    assert not missing, f"PruneConfig fields without a docstring entry: {missing}"
    page = (ROOT / "docs" / "options.md").read_text()
    assert page == render_options(), "docs/options.md is stale: python -m thinet_fast.pipeline.options_doc > docs/options.md"


def test_every_relative_link_in_the_docs_resolves():
    bad = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                bad.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not bad, bad


def _blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.fixture
def imagenet_like(tmp_path):
    return write_image_folder(tmp_path / "train", ("n01", "n02"), 10, 48)


def _psd(c, seed):
    x = torch.randn(4 * c, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.T @ x


def test_readme_python_examples_run(imagenet_like, tmp_path, monkeypatch):
    import torchvision
    monkeypatch.chdir(tmp_path)
    blocks = _blocks(ROOT / "README.md")
    assert len(blocks) >= 6
    small = lambda: torchvision.models.resnet18(num_classes=4).eval()  # noqa: E731
    # the names a block uses but the README leaves to the reader, and the user's files
    setup = {
        "train_loader": [(torch.randn(2, 3, 224, 224), torch.tensor([0, 1]))],
        "example_inputs": torch.randn(1, 3, 32, 32), "calib_loader": [torch.randn(4, 3, 32, 32)],
        "loader": [torch.randn(4, 3, 32, 32)],
        "G1": _psd(40, 1), "G2": _psd(40, 2), "G3": _psd(40, 3),
    }
    files = {'torch.load("vgg16-imagenet.pth")': "model.state_dict()", '"/data/imagenet/train"': repr(str(imagenet_like))}
    ns = dict(setup)
    from thinet_fast.pipeline.methods import REGISTRY
    registry = dict(REGISTRY)  # the README registers a method: leave the registry as found
    try:
        _run_blocks(blocks, files, ns, small)
    finally:
        REGISTRY.clear()
        REGISTRY.update(registry)
    assert isinstance(ns["result"], thinet_fast.PruneResult)
    assert ns["kept_ls"].numel() == 256 and len(ns["orders"]) == 3


def _run_blocks(blocks, files, ns, small):
    for i, code in enumerate(blocks):
        for placeholder, stand_in in files.items():
            code = code.replace(placeholder, stand_in)
        if "thinet_pruner" in code or 'coupled="prune"' in code or "register_method" in code:
            ns.update(model=small(), calib=[torch.randn(4, 3, 32, 32)])  # a small model where any will do
        exec(compile(code, f"README.md python block {i + 1}", "exec"), ns)

"""The layers of DESIGN.md §8 hold: ops know tensors, the module layer knows modules,
the pipeline joins them, and nothing imports upward."""
import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[1] / "thinet_fast"

# a lower rank never imports a higher one
RANK = {"ops": 0, "module": 1, "pipeline": 2, "top": 3}
TOP = {"cli", "demo", "integrations", "training", "finetuning", "checkpoints_ft", "data", "study", "__init__"}


def _layer(parts: tuple) -> str:
    if parts[0] == "ops":
        return "ops"
    if parts[0] == "pipeline":
        return "pipeline"
    return "top" if parts[0] in TOP else "module"


def _imports(path: pathlib.Path):
    """thinet_fast-internal modules imported at module level (lazy imports inside
    functions are allowed: they run after every layer is loaded)."""
    rel = path.relative_to(PKG).with_suffix("").parts
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative to this module's package
                package = list(rel[:-1])
                base = package[:len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("thinet_fast"):
                target = node.module.split(".")[1:]
            else:
                continue
            names = [a.name for a in node.names]
            yield tuple(target), names


def test_no_module_imports_upward():
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("").parts
        mine = _layer(rel)
        for target, names in _imports(path):
            # `from . import x` / `from .ops import x`: the names are the modules
            targets = [target + (n,) for n in names] if len(target) < 1 or target in (("ops",), ("pipeline",)) \
                else [target]
            for t in targets:
                theirs = _layer(t)
                if RANK[theirs] > RANK[mine]:
                    bad.append(f"{'/'.join(rel)} ({mine}) imports {'.'.join(t)} ({theirs})")
    print("\n".join(bad))
    assert not bad

"""``docs/options.md`` from :class:`PruneConfig` itself (its fields, defaults and
docstring), so the options page cannot drift from the code: a test compares them.
Regenerate with ``python -m thinet_fast.pipeline.options_doc > docs/options.md``."""
from __future__ import annotations

import dataclasses
import re

from .config import PruneConfig

__all__ = ["option_docs", "render_options"]


def option_docs() -> dict[str, str]:
    """field name -> its text in the ``Attributes:`` section (``a / b:`` entries
    document both names)."""
    doc = PruneConfig.__doc__ or ""
    body = doc.split("Attributes:", 1)[1] if "Attributes:" in doc else ""
    entries, name = {}, None
    for line in body.splitlines():
        m = re.match(r"^ {8}([a-z_]+(?: / [a-z_]+)*): ?(.*)$", line)
        if m:
            name = m.group(1)
            entries[name] = m.group(2).strip()
        elif name and line.strip():
            entries[name] += " " + line.strip()
    out = {}
    for names, text in entries.items():
        for n in names.split(" / "):
            out[n] = text
    return out


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "required"


def render_options() -> str:
    docs = option_docs()
    lines = ["# The options of `thinet_fast.prune`", "",
             "Generated from `thinet_fast.PruneConfig` (`python -m thinet_fast.pipeline.options_doc > "
             "docs/options.md`); a test keeps it equal to the code. Pass them as keywords to `prune()`, or "
             "build a `PruneConfig` (validated on construction) and pass that.", "",
             "| option | default | what it does |", "|---|---|---|"]
    for f in dataclasses.fields(PruneConfig):
        text = docs.get(f.name, "").replace("|", "\\|")
        lines.append(f"| `{f.name}` | `{_default(f)}` | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_options(), end="")

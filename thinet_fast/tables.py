"""Plain-text tables: the one formatter behind every report, plan and profile table."""
from __future__ import annotations

from typing import Sequence

__all__ = ["format_table"]


def format_table(rows: Sequence[Sequence]) -> str:
    """Left-aligned columns, two spaces apart, with a dashed rule under the header row
    (``rows[0]``)."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

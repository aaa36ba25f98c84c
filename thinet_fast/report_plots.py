"""PNG plots of a prune's report (matplotlib, the ``plots`` extra): kept channels per
unit before and after, each unit's greedy error curve with the chosen point, and the
allocation (the fraction each unit keeps against the whole model's)."""
from __future__ import annotations

from pathlib import Path

from .records import UnitRecord

__all__ = ["write_report_plots"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'thinet_fast[plots]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _records(units) -> list[UnitRecord]:
    return [u if isinstance(u, UnitRecord) else UnitRecord.from_dict(u) for u in units]


def _per_unit(units, path: Path, title: str, ylabel: str, draw) -> Path:
    """A bar figure with one slot per unit, front to back; ``draw(ax)`` adds the bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(units) + 3), 4.5))
    draw(ax)
    ax.set_xticks(range(len(units)), [u.producer for u in units], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("unit (producer), front to back")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def kept_channels(units, path: Path, title: str) -> Path:
    def draw(ax):
        x = range(len(units))
        ax.bar([i - 0.2 for i in x], [u.channels for u in units], width=0.4, label="before")
        ax.bar([i + 0.2 for i in x], [u.kept for u in units], width=0.4, label="after")
    return _per_unit(units, path, f"{title}\nkept channels per unit", "output channels of the producer", draw)


def greedy_curves(units, path: Path, title: str) -> Path | None:
    with_curves = [u for u in units if u.error_curve]
    if not with_curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for u in with_curves:
        x = [(n + 1) / u.channels for n in range(len(u.error_curve))]
        (line,) = ax.plot(x, u.error_curve, lw=1, label=u.producer if len(with_curves) <= 16 else None)
        removed = u.channels - u.kept
        if 0 < removed <= len(u.error_curve):
            ax.plot([removed / u.channels], [u.error_curve[removed - 1]], "o", color=line.get_color(), ms=4)
    ax.set_xlabel("fraction of channels removed (greedy order)")
    ax.set_ylabel("E(n) / E(all removed)")
    ax.set_title(f"{title}\ngreedy error curves (dot: the chosen point)")
    ax.grid(alpha=0.3)
    if len(with_curves) <= 16:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def allocation(units, path: Path, title: str) -> Path:
    overall = sum(u.kept for u in units) / max(sum(u.channels for u in units), 1)

    def draw(ax):
        ax.bar(range(len(units)), [u.kept / u.channels for u in units], color="tab:green")
        ax.axhline(overall, color="k", ls="--", lw=1, label=f"all units: {overall:.2f}")
        ax.set_ylim(0, 1.05)
    return _per_unit(units, path, f"{title}\nallocation: the fraction each unit keeps", "fraction of channels kept",
                     draw)


def write_report_plots(units, out: str | Path, title: str = "pruned model") -> list[Path]:
    """Write the report's plots under ``out`` (created); returns the files written.
    ``units``: the report's :class:`UnitRecord` list, or their dicts from its JSON."""
    units = _records(units)
    if not units:
        raise ValueError("the report has no pruned units to plot (was the model pruned by thinet_fast?)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = [kept_channels(units, out / "kept-channels.png", title),
            greedy_curves(units, out / "greedy-curves.png", title),
            allocation(units, out / "allocation.png", title)]
    return [p for p in made if p is not None]

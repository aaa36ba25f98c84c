"""The study's PNG plots (matplotlib, the ``plots`` extra): top-1 against the keep
fraction per method with error bars over seeds, each unit's relative reconstruction
error, and the greedy error curves with the chosen point."""
from __future__ import annotations

from pathlib import Path

from .run import STAGES
from .summary import MODEL_NAMES, STAGE_NAMES, aggregate, keeps_of, rows_of


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the study's plots need matplotlib: pip install 'thinet_fast[plots]' "
                          "(or pass --no-plots)") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def accuracy_vs_keep(result: dict, model: str, schedule: str, path: Path) -> Path | None:
    agg = aggregate(result)
    keeps, rows = keeps_of(agg, model, schedule), rows_of(agg, model, schedule)
    if not keeps or not rows:
        return None
    plt = _pyplot()
    orig = result["originals"][model]["top1"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))  # own y range: fine-tuned spreads are small
    for ax, stage in zip(axes, STAGES):
        for row in rows:
            pts = [(k, agg[(model, row, schedule, k)][stage]) for k in keeps if (model, row, schedule, k) in agg]
            pts = [(k, ms) for k, ms in pts if ms[2]]
            if pts:
                ax.errorbar([k for k, _ in pts], [100 * ms[0] for _, ms in pts], yerr=[100 * ms[1] for _, ms in pts],
                            marker="o", capsize=3, label=row)
        ax.axhline(100 * orig, color="k", ls="--", lw=1, label="unpruned")
        ax.set_title(STAGE_NAMES[stage])
        ax.set_xlabel("keep fraction (channels kept per unit)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.set_ylabel("top-1 on the Fashion-MNIST test set (%)")
    axes[-1].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"{MODEL_NAMES.get(model, model)}, Fashion-MNIST, {schedule} schedule\ntop-1 vs keep fraction "
                 "(mean ± sd over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _first_run(result: dict, model: str, row: str, keep: float = 0.5):
    runs = [r for r in result["runs"] if r["model"] == model and r["row"] == row and r["keep"] == keep
            and r["schedule"] == "sequential"]
    return min(runs, key=lambda r: r["seed"]) if runs else None


def unit_errors(result: dict, model: str, path: Path, rows=("thinet_noscale", "thinet", "thinet_ls", "thinet_exact"),
                keep: float = 0.5) -> Path | None:
    runs = [(row, _first_run(result, model, row, keep)) for row in rows]
    runs = [(row, r) for row, r in runs if r is not None]
    if not runs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [u["producer"] for u in runs[0][1]["units"]]
    for row, r in runs:
        ax.plot(range(len(r["units"])), [max(u["error_reconstructed"], 1e-6) for u in r["units"]], marker="o", label=row)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("unit (producer), front to back")
    ax.set_ylabel("relative consumer-output error after reconstruction")
    ax.set_title(f"{MODEL_NAMES.get(model, model)}, Fashion-MNIST\nper-unit error, sequential, keep {keep:g}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def greedy_curves(result: dict, model: str, path: Path, row: str = "thinet", keep: float = 0.5) -> Path | None:
    r = _first_run(result, model, row, keep)
    if r is None or not any(u["error_curve"] for u in r["units"]):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for u in r["units"]:
        curve = u["error_curve"]
        if not curve:
            continue
        x = [(n + 1) / u["channels"] for n in range(len(curve))]
        (line,) = ax.plot(x, curve, lw=1.2, label=f"{u['producer']} ({u['channels']} ch)")
        removed = u["channels"] - u["kept"]
        if 0 < removed <= len(curve):
            ax.plot([removed / u["channels"]], [curve[removed - 1]], "o", color=line.get_color())
    ax.set_xlabel("fraction of channels removed (greedy order)")
    ax.set_ylabel("E(n) / E(all removed)")
    ax.set_title(f"{MODEL_NAMES.get(model, model)}, Fashion-MNIST\nThiNet greedy error curves "
                 f"(dot: the chosen point at keep {keep:g})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_plots(result: dict, out: Path) -> dict[str, list[str]]:
    """Every plot of the study under ``out``; model -> file names (relative to ``out``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = {}
    for model in result["originals"]:
        paths = [accuracy_vs_keep(result, model, sched, out / f"{model}-{sched}-top1.png")
                 for sched in ("sequential", "oneshot")]
        paths += [unit_errors(result, model, out / f"{model}-unit-errors.png"),
                  greedy_curves(result, model, out / f"{model}-greedy-curves.png")]
        made[model] = [p.name for p in paths if p is not None]
    return made


__all__ = ["accuracy_vs_keep", "unit_errors", "greedy_curves", "write_plots"]

"""The method study (``thinet-fast study`` / ``python bench/study.py``): selection
methods, the exact variants and the ablation grid on Fashion-MNIST, with the markdown
table and PNG plots under ``bench/results/``."""
from __future__ import annotations

from pathlib import Path

from .run import ABLATION_AXES, BASELINES, ROWS, StudySettings, ablation_variants, planned, run_study
from .summary import aggregate, markdown

__all__ = ["ABLATION_AXES", "BASELINES", "ROWS", "StudySettings", "ablation_variants", "planned", "run_study",
           "aggregate", "markdown", "write_study"]


def write_study(s: StudySettings | None = None, *, resume: bool = True, plots: bool = True, log=print) -> Path:
    """Run (or finish) the study, then write ``study.md`` and the plots under ``s.out``;
    returns the markdown's path."""
    s = s or StudySettings()
    result = run_study(s, resume=resume, log=log)
    made = {}
    if plots:
        from .plots import write_plots
        made = write_plots(result, Path(s.out))
    path = Path(s.out) / "study.md"
    path.write_text(markdown(result, made))
    log(f"study: wrote {path}" + (f" and {sum(map(len, made.values()))} plots" if made else ""))
    return path

"""The method study (``thinet-fast study`` / ``python bench/study.py``): selection
methods, the exact variants and the ablation grid on Fashion-MNIST, with the markdown
table and PNG plots under ``bench/results/``."""
from __future__ import annotations

import os
from pathlib import Path

from .run import ABLATION_AXES, BASELINES, ROWS, StudySettings, ablation_variants, planned, run_study
from .summary import aggregate, markdown

__all__ = ["ABLATION_AXES", "BASELINES", "ROWS", "StudySettings", "ablation_variants", "planned", "run_study",
           "aggregate", "markdown", "write_study"]


def write_study(s: StudySettings | None = None, *, resume: bool = True, plots: bool = True, log=print,
                readme: str | Path | None = None) -> Path:
    """Run (or finish) the study, then write ``study.md`` and the plots under ``s.out``
    and, with ``readme``, its compact table between the file's ``<!-- study:start -->``
    and ``<!-- study:end -->`` markers; returns the markdown's path."""
    s = s or StudySettings()
    result = run_study(s, resume=resume, log=log)
    made = {}
    if plots:
        from .plots import write_plots
        made = write_plots(result, Path(s.out))
    path = Path(s.out) / "study.md"
    path.write_text(markdown(result, made))
    if readme is not None:
        from .summary import readme_section, replace_between
        readme = Path(readme)
        prefix = os.path.relpath(Path(s.out).resolve(), readme.resolve().parent).replace(os.sep, "/") + "/"
        readme.write_text(replace_between(readme.read_text(), readme_section(result, made, prefix)))
        log(f"study: updated {readme}")
    log(f"study: wrote {path}" + (f" and {sum(map(len, made.values()))} plots" if made else ""))
    return path

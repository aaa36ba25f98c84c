"""The only layer that knows both modules and math: statistics → selection →
reconstruction → rewrite, under a schedule."""
from .config import PruneConfig
from .keeps import n_keep_for
from .prune import PruneResult, prune
from .collect import collect_statistics
from .calibrate import recalibrate_batchnorm
from .plan import DryRun, dry_run

__all__ = ["PruneConfig", "PruneResult", "prune", "collect_statistics", "recalibrate_batchnorm", "n_keep_for",
           "DryRun", "dry_run"]

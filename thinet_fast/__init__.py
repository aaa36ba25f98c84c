"""thinet_fast: fast and exact ThiNet filter-level pruning (Luo, Wu, Lin, ICCV 2017).

Low level (tensors)::

    order, errors = thinet_fast.greedy_remove(G, C - 1, return_errors=True)
    w = thinet_fast.ls_scale(G, keep)

High level (modules)::

    result = thinet_fast.prune(model, loader, keep=0.5)
    print(result.report)

Importing never fails for lack of a GPU, Triton, cupy or the ``_C`` extension;
``thinet_fast.backends()`` says what is available and why not.
"""
from .ops.dispatch import BackendUnavailable, backends
from .ops.greedy import greedy_keep_ls, greedy_keep_ls_ref, greedy_remove, greedy_remove_ref, removal_to_keep
from .ops.reconstruct import bias_compensation, ls_scale, refit_full
from .ops.baselines import lasso_keep, top_k
from .ops.patches import ConsumerGeometry
from .ops.stats import Statistics, StatsAccumulator
from .units import Unit, UnitPlan, find_units
from .rewrite import prune_unit_, prune_units
from .serialization import load, load_meta, save
from .export import OnnxExport, OnnxMismatch, export_onnx
from .records import UnitRecord
from .counting import count_flops, count_params, model_size_mb
from .pipeline import DryRun, PruneConfig, PruneResult, collect_statistics, dry_run, prune, recalibrate_batchnorm
from .pipeline.config import BACKENDS, METHODS, RECONSTRUCTIONS, SCHEDULES, STATISTICS
from .pipeline.methods import Method, SelectContext, Selection, get_method, method_names, register_method
from .training import evaluate, finetune, finetune_callback
from . import data, demo, models, presets, report, report_plots

__version__ = "0.1.0"

__all__ = [
    "backends", "BackendUnavailable", "dry_run", "DryRun",
    "greedy_remove", "greedy_remove_ref", "greedy_keep_ls", "greedy_keep_ls_ref", "removal_to_keep",
    "ls_scale", "refit_full", "bias_compensation", "lasso_keep", "top_k",
    "ConsumerGeometry", "StatsAccumulator", "Statistics",
    "Unit", "UnitPlan", "find_units", "prune_unit_", "prune_units", "save", "load", "load_meta", "UnitRecord",
    "export_onnx", "OnnxExport", "OnnxMismatch",
    "count_params", "count_flops", "model_size_mb",
    "PruneConfig", "PruneResult", "prune", "collect_statistics", "recalibrate_batchnorm",
    "Method", "Selection", "SelectContext", "register_method", "get_method", "method_names",
    "METHODS", "STATISTICS", "RECONSTRUCTIONS", "SCHEDULES", "BACKENDS",
    "evaluate", "finetune", "finetune_callback",
    "data", "demo", "models", "presets", "report",
]

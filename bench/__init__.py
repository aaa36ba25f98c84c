"""Benchmarks and analysis scripts (run from the repository root: ``python bench/x.py``,
or import ``bench.roofline`` / ``bench.prune_speed``; pytest puts the root on the path)."""

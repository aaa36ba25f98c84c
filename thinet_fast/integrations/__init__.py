"""Integrations of thinet_fast with other pruning frameworks.

Each integration is a submodule that imports its framework when it is imported, never
before: ``import thinet_fast`` (and ``import thinet_fast.integrations``) works without
any of them installed.

- :mod:`thinet_fast.integrations.torch_pruning`: ThiNet as a Torch-Pruning
  importance criterion (``ThiNetImportance``) and a ready pruner (``thinet_pruner``).
  Needs ``pip install torch-pruning``.
"""

__all__: list[str] = []

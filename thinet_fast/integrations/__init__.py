"""Integrations of thinet_fast with other pruning frameworks.

Each integration is a submodule that imports its framework when it is imported, never
before: ``import thinet_fast`` (and ``import thinet_fast.integrations``) works without
any of them installed.

- :mod:`thinet_fast.integrations.torch_pruning`: ThiNet as a Torch-Pruning
  importance criterion (``ThiNetImportance``) and a ready pruner (``thinet_pruner``).
  Needs ``pip install torch-pruning``. It also re-exports ``reconstructing`` /
  ``record`` / ``reconstruct`` (ThiNet's least-squares refit of every layer a
  Torch-Pruning step cut).
- :mod:`thinet_fast.integrations.reconstruction`: that refit; it compares weights
  before and after the step, so it needs no Torch-Pruning import.
"""

__all__: list[str] = []

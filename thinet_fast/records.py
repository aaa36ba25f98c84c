"""The per-unit record of a pruning run: one frozen dataclass, read by the report, the
JSON output, checkpoints and the CLI."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

__all__ = ["UnitRecord"]


@dataclass(frozen=True)
class UnitRecord:
    """What was done to one unit.

    Attributes:
        producer, consumer: module names of the unit.
        channels: the producer's channels before pruning; kept: how many it kept.
        method, statistics, reconstruction: what ran (``reconstruction`` may say
            "scale" where a full refit fell back; the notes say why).
        error_selected: relative consumer-output error of the kept set with the
            original weights; error_reconstructed: after reconstruction, on held-out
            images when ``heldout_images`` > 0 (else in sample).
        seconds: wall time of the decision; notes: what the run noticed.
        pass_seconds: wall time of the unit's own statistics pass (forward, hooks),
            sequential schedule; 0 where one pass serves every unit (one-shot).
        statistics_backend, selection_backend: where the kernels ran.
        ridge: the relative ridge of the reconstruction (None: no solve).
        replay: where the unit's statistics pass started (sequential schedule).
        error_curve: the greedy error curve E(n)/E(all removed), n = 1..channels-1
            (ThiNet's greedy selection only; empty otherwise): how fast the error grows
            with each channel removed, which the budget allocation and the plots read.
    """

    producer: str
    consumer: str
    channels: int
    kept: int
    method: str
    statistics: str
    reconstruction: str
    error_selected: float
    error_reconstructed: float
    seconds: float = 0.0
    notes: tuple = ()
    statistics_backend: str = "torch"
    selection_backend: str = "torch"
    heldout_images: int = 0
    ridge: Optional[float] = None
    replay: Optional[str] = None
    error_curve: tuple = ()
    pass_seconds: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "notes", tuple(self.notes))
        object.__setattr__(self, "error_curve", tuple(float(e) for e in self.error_curve))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["notes"] = list(self.notes)
        out["error_curve"] = list(self.error_curve)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UnitRecord":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes) -> "UnitRecord":
        return dataclasses.replace(self, **changes)

    # read like the dicts of earlier versions: record["kept"]
    def __getitem__(self, key: str):
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        return getattr(self, key, default)

    def keys(self):
        return [f.name for f in dataclasses.fields(self)]

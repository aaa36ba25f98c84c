"""Streaming statistics for one consumer (DESIGN.md §3).

An accumulator is fed the consumer's input batch by batch and keeps only small
matrices: the Gram G (C×C), the sample count m, the first moment of the patches,
the per-channel zero counts (APoZ) and, in ``full`` mode, the patch covariance P.
Accumulators with the same settings add (``merge``/``+``); ``tensors()`` lists the
buffers a distributed all-reduce sums.

Modes:
  * ``sampled`` — the paper: L random locations per image, one random output each.
  * ``full``    — P over the sampled (or all) locations; G = (WᵀW ∘ P) summed per
                  channel pair: exact over every output channel.
  * ``direct``  — X for every (or R sampled) outputs per sample; for large t.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import dispatch
from .gram import direct_gram, gram_from_cov, patch_moments, patch_sum, sampled_gram
from .patches import ConsumerGeometry, sample_locations

__all__ = ["Statistics", "StatsAccumulator", "choose_mode", "MODES"]

MODES = ("sampled", "full", "direct")
STATS_BACKENDS = ("triton", "torch")
# P is (C·t)²: above this it no longer pays to keep it (VGG conv5: 4608).
MAX_COV_DIM = 8192


def choose_mode(channels: int, taps: int, max_cov_dim: int = MAX_COV_DIM) -> str:
    """Cost model for ``statistics="auto"``: exact ``full`` while (C·t)² is small,
    ``direct`` otherwise (a Linear after flatten)."""
    return "full" if channels * taps <= max_cov_dim else "direct"


@dataclass
class Statistics:
    """What selection and reconstruction need, for one consumer."""

    mode: str
    gram: torch.Tensor                 # (C, C)
    count: int                         # rows of X that built G
    patch_count: int                   # patches seen (for the moments)
    patch_sum: torch.Tensor            # (C, t) Σ z_s
    zeros: torch.Tensor                # (C,) zero entries of the consumer input, per channel
    elements: int                      # entries per channel looked at for `zeros`
    cov: torch.Tensor | None = None    # (C·t, C·t) Σ vec(z) vec(z)ᵀ, full mode only
    backend: str = "torch"

    @property
    def channels(self) -> int:
        return self.gram.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        """μ: the mean patch (C, t)."""
        return self.patch_sum / max(self.patch_count, 1)

    @property
    def zero_fraction(self) -> torch.Tensor:
        """APoZ of each input channel."""
        return self.zeros.to(torch.float64) / max(self.elements, 1)


@dataclass
class StatsAccumulator:
    """Accumulate statistics for a consumer with weight ``kernel`` (Conv2d (K, C, kh, kw)
    or Linear (K, C·t)) and ``geometry``.

    Args:
        samples_per_image: L locations per image (paper: 10); None = every location.
            For a Linear consumer there is one location per image; ``sampled`` mode
            still draws L outputs per image.
        outputs_per_sample: ``direct`` mode: R random outputs per sample, None = all K.
        seed: samples are drawn from a CPU generator with this seed, so the same data
            in the same order gives the same statistics on every device.
        dtype: accumulation dtype (float32 or float64).
        with_cov: also keep the patch covariance P in ``sampled``/``direct`` mode (the
            ``full`` reconstruction needs it).
        count_zeros: count zero inputs per channel (APoZ); it reads the whole input.
    """

    kernel: torch.Tensor
    geometry: ConsumerGeometry
    mode: str = "sampled"
    samples_per_image: int | None = 10
    outputs_per_sample: int | None = None
    seed: int = 0
    dtype: torch.dtype = torch.float32
    backend: str = "auto"
    with_cov: bool = False
    count_zeros: bool = True
    images_seen: int = 0
    _gen: torch.Generator = field(init=False, repr=False)
    _state: dict = field(init=False, repr=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"statistics mode {self.mode!r} is not one of {MODES}")
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64; got {self.dtype}")
        if self.samples_per_image is not None and self.samples_per_image < 1:
            raise ValueError(f"samples_per_image must be >= 1 or None; got {self.samples_per_image}")
        if self.outputs_per_sample is not None and self.outputs_per_sample < 1:
            raise ValueError(f"outputs_per_sample must be >= 1 or None; got {self.outputs_per_sample}")
        if self.mode == "sampled" and self.samples_per_image is None and not self.geometry.linear:
            raise ValueError("sampled mode draws one output per location; give samples_per_image (the paper uses 10)")
        self.kernel = self.geometry.as_kernel(self.kernel.detach())
        K, C = self.kernel.shape[:2]
        t = self.geometry.taps
        dev = self.kernel.device
        self._gen = torch.Generator().manual_seed(int(self.seed))
        self._state = {
            "gram": torch.zeros(C, C, dtype=self.dtype, device=dev),
            "patch_sum": torch.zeros(C * t, dtype=self.dtype, device=dev),
            "zeros": torch.zeros(C, dtype=torch.int64, device=dev),
            "count": 0, "patch_count": 0, "elements": 0,
        }
        if self.keeps_cov:
            self._state["cov"] = torch.zeros(C * t, C * t, dtype=self.dtype, device=dev)
        requested = self.backend
        self.backend = dispatch.choose(requested, dev, STATS_BACKENDS, "statistics")
        if self.backend == "triton" and (self.dtype != torch.float32 or self.mode == "direct"):
            # the Triton kernels accumulate in float32 and have no direct mode
            if requested == "auto":
                self.backend = "torch"
            else:
                raise ValueError(f"backend='triton' runs float32 sampled/full statistics; got dtype={self.dtype}, "
                                 f"mode={self.mode!r}: use dtype=torch.float32 and another mode, or backend='torch'")

    @property
    def channels(self) -> int:
        return self.kernel.shape[1]

    @property
    def keeps_cov(self) -> bool:
        return self.mode == "full" or self.with_cov

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add one batch of the consumer's input."""
        x = self.geometry.as_map(x.detach())
        if x.shape[1] != self.channels:
            raise ValueError(f"consumer input has {x.shape[1]} channels; the consumer weight expects {self.channels}")
        x = x.to(self.kernel.device)
        st, N = self._state, x.shape[0]
        oh, ow = self.geometry.out_size(x.shape[2], x.shape[3])
        if self.count_zeros:
            st["zeros"] += (x == 0).sum(dim=(0, 2, 3))
            st["elements"] += N * x.shape[2] * x.shape[3]
        # a Linear has one location: only sampled mode repeats it (with other outputs)
        per_image = None if (self.geometry.linear and self.mode != "sampled") else self.samples_per_image
        img, oy, ox = sample_locations(self._gen, N, (oh, ow), per_image)
        S = img.numel()
        if self.mode == "sampled":
            k = torch.randint(self.kernel.shape[0], (S,), generator=self._gen)
            st["gram"] += sampled_gram(x, self.kernel, self.geometry, img, oy, ox, k,
                                       acc_dtype=self.dtype, backend=self.backend)
            st["count"] += S
        elif self.mode == "full":
            st["count"] += S * self.kernel.shape[0]
        else:
            R = self.outputs_per_sample
            k = None if R is None else torch.randint(self.kernel.shape[0], (S, R), generator=self._gen)
            st["gram"] += direct_gram(x, self.kernel, self.geometry, img, oy, ox, k,
                                      acc_dtype=self.dtype)
            st["count"] += S * (self.kernel.shape[0] if R is None else R)
        if self.keeps_cov:
            P, zsum = patch_moments(x, self.geometry, img, oy, ox, acc_dtype=self.dtype, backend=self.backend)
            st["cov"] += P
        else:  # the first moment of the sampled patches, for bias compensation
            zsum = patch_sum(x, self.geometry, img, oy, ox, acc_dtype=self.dtype)
        st["patch_sum"] += zsum
        st["patch_count"] += S
        self.images_seen += N

    # -- combining --------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        """The buffers to sum across processes (counts included, as a tensor)."""
        st = self._state
        counts = torch.tensor([st["count"], st["patch_count"], st["elements"], self.images_seen],
                              dtype=torch.float64, device=st["gram"].device)
        out = [st["gram"], st["patch_sum"], st["zeros"], counts]
        if self.keeps_cov:
            out.append(st["cov"])
        return out

    def load_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Inverse of ``tensors()`` (after an all-reduce)."""
        st = self._state
        st["gram"], st["patch_sum"], st["zeros"] = tensors[0], tensors[1], tensors[2]
        c = [int(round(float(v))) for v in tensors[3].tolist()]
        st["count"], st["patch_count"], st["elements"], self.images_seen = c
        if self.keeps_cov:
            st["cov"] = tensors[4]

    def _check_compatible(self, other: "StatsAccumulator"):
        if not isinstance(other, StatsAccumulator) or other.mode != self.mode or \
                other.geometry != self.geometry or other.kernel.shape != self.kernel.shape or \
                other.dtype != self.dtype or other.keeps_cov != self.keeps_cov:
            raise ValueError("only accumulators with the same mode, geometry, kernel shape and dtype can be merged")

    def merge(self, other: "StatsAccumulator") -> "StatsAccumulator":
        """Add ``other``'s statistics into this accumulator (in place)."""
        self._check_compatible(other)
        a, b = self._state, other._state
        for key in a:
            a[key] = a[key] + (b[key].to(a[key].device) if isinstance(b[key], torch.Tensor) else b[key])
        self.images_seen += other.images_seen
        return self

    def __add__(self, other: "StatsAccumulator") -> "StatsAccumulator":
        out = StatsAccumulator(self.kernel, self.geometry, self.mode, self.samples_per_image,
                               self.outputs_per_sample, self.seed, self.dtype, self.backend, self.with_cov,
                               self.count_zeros)
        return out.merge(self).merge(other)

    def result(self) -> Statistics:
        """A snapshot: later ``update()`` calls do not change it."""
        st = self._state
        C, t = self.channels, self.geometry.taps
        cov = st["cov"].clone() if "cov" in st else None
        gram = gram_from_cov(self.kernel, cov, backend=self.backend) if self.mode == "full" else st["gram"].clone()
        return Statistics(
            mode=self.mode, gram=gram, count=st["count"], patch_count=st["patch_count"],
            patch_sum=st["patch_sum"].reshape(C, t).clone(), zeros=st["zeros"].clone(), elements=st["elements"],
            cov=cov, backend=self.backend,
        )

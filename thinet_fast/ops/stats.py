"""Streaming statistics for one consumer (DESIGN.md §3).

An accumulator is fed the consumer's input batch by batch and keeps only small
matrices: the Gram G (C×C), the sample count m, the first moment of the patches,
the per-channel zero counts (APoZ) and, in ``full`` mode, the patch covariance P.
Accumulators with the same settings add (``merge``/``+``); ``tensors()`` lists the
buffers a distributed all-reduce sums.

About one image in ``holdout_every`` (by its key) also goes to a held-out fold (its Gram, and its
patches where P is kept, up to ``holdout_max`` samples): the totals include it, and a
reconstruction fitted on the rest can be scored on images it never saw (DESIGN §5).

Modes:
  * ``sampled`` — the paper: L random locations per image, one random output each.
  * ``full``    — P over the sampled (or all) locations; G = (WᵀW ∘ P) summed per
                  channel pair: exact over every output channel.
  * ``direct``  — X for every (or R sampled) outputs per sample; for large t.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import dispatch
from .gram import (add_upper_gram_, direct_gram, gram_from_covs, mirror_upper_, patch_moments, patch_sum,
                   sampled_gram)
from .draws import keyed, keyed_locations, position_keys
from .patches import ConsumerGeometry, gather_patches

__all__ = ["Statistics", "HeldOut", "StatsAccumulator", "choose_mode", "MODES", "STATISTICS", "HOLDOUT_EVERY"]

MODES = ("sampled", "full", "direct")  # what an accumulator can build
STATISTICS = MODES + ("auto",)         # the choices of the statistics= option ("auto": per unit, by cost)
STATS_BACKENDS = dispatch.OPS["statistics"][0]
# P is (C·t)²: above this it no longer pays to keep it (VGG conv5: 4608).
MAX_COV_DIM = 8192
HOLDOUT_EVERY = 5           # one image in five is held out
_HELD_BYTES = 64 << 20      # bound on one unit's held-out patches


def choose_mode(channels: int, taps: int, max_cov_dim: int = MAX_COV_DIM) -> str:
    """Cost model for ``statistics="auto"``: exact ``full`` while (C·t)² is small,
    ``direct`` otherwise (a Linear after flatten)."""
    return "full" if channels * taps <= max_cov_dim else "direct"


def _patch_cov(Z: torch.Tensor) -> torch.Tensor:
    """P = ZᵀZ of patches (S, C·t), by the symmetric update."""
    return mirror_upper_(add_upper_gram_(Z.new_zeros(Z.shape[1], Z.shape[1]), Z))


@dataclass
class HeldOut:
    """The held-out fold: statistics of images that reconstruction fits must not see."""

    gram: torch.Tensor                 # (C, C) G over the held-out samples only
    count: int                         # rows of X that built it
    images: int
    patches: torch.Tensor | None = None  # (m, C·t) the held-out patches, where P is kept
    rows: torch.Tensor | None = None     # their rows in Statistics.patches, when that is kept

    @property
    def samples(self) -> int:
        return 0 if self.patches is None else self.patches.shape[0]


@dataclass
class Statistics:
    """What selection and reconstruction need, for one consumer."""

    statistics: str                    # the mode that built it, one of MODES
    gram: torch.Tensor                 # (C, C)
    count: int                         # rows of X that built G
    patch_count: int                   # patches seen (for the moments)
    patch_sum: torch.Tensor            # (C, t) Σ z_s
    zeros: torch.Tensor                # (C,) zero entries of the consumer input, per channel
    elements: int                      # entries per channel looked at for `zeros`
    cov: torch.Tensor | None = None    # (C·t, C·t) Σ vec(z) vec(z)ᵀ, full mode only
    backend: str = "torch"
    backend_note: str = ""                   # why ``backend`` is not the requested one, if it is not
    heldout: HeldOut | None = None     # part of the totals above, also kept apart
    patches: torch.Tensor | None = None  # (S, C·t) every sampled patch, while fewer than C·t/2

    @property
    def channels(self) -> int:
        return self.gram.shape[0]

    @property
    def mode(self) -> str:
        """Alias of ``statistics`` (the older name)."""
        return self.statistics

    @property
    def mean(self) -> torch.Tensor:
        """μ: the mean patch (C, t)."""
        return self.patch_sum / max(self.patch_count, 1)

    def covariance(self) -> torch.Tensor | None:
        """P: kept, or formed from the kept patches (released results keep only these
        while they are the smaller)."""
        if self.cov is not None or self.patches is None:
            return self.cov
        return _patch_cov(self.patches)

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
        seed: every random draw is a hash of the seed and the image's key
            (:mod:`thinet_fast.ops.draws`), so the same images give the same statistics
            on every device, batching and number of processes.
        statistics: the mode, one of ``MODES`` (``mode=`` is an alias).
        acc_dtype: accumulation dtype, float32 or float64 (``dtype=`` is an alias).
        with_cov: also keep the patch covariance P in ``sampled``/``direct`` mode (the
            ``full`` reconstruction needs it).
        count_zeros: count zero inputs per channel (APoZ); it reads the whole input.
        holdout_every: about one image in n (chosen by its key) is also kept apart
            as the held-out fold; 0 = none.
        holdout_max: at most this many held-out samples (None: as many as fit in 64 MiB,
            at least 256); images past it join only the totals.
        fold_seed: seeds the held-out choice (None: ``seed``); accumulators with one
            fold seed hold out the same images.
        expected_images: the images of the whole pass (all processes), if known: the
            fold is then thinned by key to fit ``holdout_max``, the same whatever the
            order or sharding (without it, images past the cap join only the totals).
    """

    kernel: torch.Tensor
    geometry: ConsumerGeometry
    statistics: str = "sampled"
    samples_per_image: int | None = 10
    outputs_per_sample: int | None = None
    seed: int = 0
    acc_dtype: torch.dtype = torch.float32
    backend: str = "auto"
    with_cov: bool = False
    count_zeros: bool = True
    holdout_every: int = HOLDOUT_EVERY
    holdout_max: int | None = None
    fold_seed: int | None = None
    expected_images: int | None = None
    images_seen: int = 0
    backend_note: str = field(init=False, default="")
    _state: dict = field(init=False, repr=False)

    def __post_init__(self):
        if self.statistics not in MODES:
            raise ValueError(f"statistics mode {self.statistics!r} is not one of {MODES}")
        if self.acc_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"acc_dtype must be torch.float32 or torch.float64; got {self.acc_dtype}")
        if self.samples_per_image is not None and self.samples_per_image < 1:
            raise ValueError(f"samples_per_image must be >= 1 or None; got {self.samples_per_image}")
        if self.outputs_per_sample is not None and self.outputs_per_sample < 1:
            raise ValueError(f"outputs_per_sample must be >= 1 or None; got {self.outputs_per_sample}")
        if self.holdout_every < 0 or self.holdout_every == 1:
            raise ValueError(f"holdout_every must be 0 (no held-out fold) or >= 2; got {self.holdout_every}")
        if self.holdout_max is not None and self.holdout_max < 0:
            raise ValueError(f"holdout_max must be >= 0 or None; got {self.holdout_max}")
        if self.statistics == "sampled" and self.samples_per_image is None and not self.geometry.linear:
            raise ValueError("sampled mode draws one output per location; give samples_per_image (the paper uses 10)")
        self.kernel = self.geometry.as_kernel(self.kernel.detach())
        K, C = self.kernel.shape[:2]
        t = self.geometry.taps
        dev = self.kernel.device
        self._state = {
            "gram": torch.zeros(C, C, dtype=self.acc_dtype, device=dev),
            "patch_sum": torch.zeros(C * t, dtype=self.acc_dtype, device=dev),
            "zeros": torch.zeros(C, dtype=torch.int64, device=dev),
            "count": 0, "patch_count": 0, "elements": 0,
            "held_gram": torch.zeros(C, C, dtype=self.acc_dtype, device=dev),
            "held_count": 0, "held_images": 0, "held_samples": 0, "held_patches": [],
        }
        if self.holdout_max is None:
            self.holdout_max = max(256, _HELD_BYTES // (C * t * torch.finfo(self.acc_dtype).bits // 8))
        if self.keeps_cov:
            # P is deferred: the patches are buffered (one gather feeds P, the first moment
            # and the held-out fold) and turned into P = ZᵀZ in large products, once they
            # would outgrow it or at result(); few samples never hold a (C·t)² matrix
            self._state["cov"] = None
            self._state["cov_rows"] = []
            self._state["cov_held"] = []   # which buffered rows are held out
            self._state["folded"] = False  # True once P holds rows: then not every patch is kept
        # the Triton kernels accumulate in float32 and have no direct mode: the resolver
        # decides, and its reason goes to the report with the backend
        choice = dispatch.resolve("direct_gram" if self.statistics == "direct" else "statistics", self.backend, dev,
                                  self.acc_dtype)
        self.backend, self.backend_note = choice.backend, choice.reason

    @property
    def channels(self) -> int:
        return self.kernel.shape[1]

    @property
    def keeps_cov(self) -> bool:
        return self.statistics == "full" or self.with_cov

    @torch.no_grad()
    def update(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        """Add one batch of the consumer's input. ``keys`` (N,) keys its images'
        random draws (:func:`thinet_fast.ops.draws.image_keys` of the images the batch
        came from); without them, the images' positions in this accumulator's stream."""
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
        per_image = None if (self.geometry.linear and self.statistics != "sampled") else self.samples_per_image
        if keys is None:
            keys = position_keys(self.images_seen + torch.arange(N))
        elif keys.numel() != N:
            raise ValueError(f"keys has {keys.numel()} entries for a batch of {N}")
        img, oy, ox = keyed_locations(keys, self.seed, (oh, ow), per_image)
        S = img.numel()
        hs = self._held_images(keys, S // N)[img]  # held-out samples, by their image
        held = (img[hs], oy[hs], ox[hs]) if bool(hs.any()) else None
        if self.statistics == "sampled":
            k = (keyed(keys, self.seed, "output", S // N) % self.kernel.shape[0]).reshape(-1)
            st["gram"] += sampled_gram(x, self.kernel, self.geometry, img, oy, ox, k,
                                       acc_dtype=self.acc_dtype, backend=self.backend)
            st["count"] += S
            if held:
                st["held_gram"] += sampled_gram(x, self.kernel, self.geometry, *held, k[hs],
                                                acc_dtype=self.acc_dtype, backend=self.backend)
                st["held_count"] += held[0].numel()
        elif self.statistics == "full":
            st["count"] += S * self.kernel.shape[0]
            if held:  # its Gram comes from its patches in result()
                st["held_count"] += held[0].numel() * self.kernel.shape[0]
        else:
            R = self.outputs_per_sample
            k = None if R is None else (keyed(keys, self.seed, "outputs", (S // N) * R)
                                        % self.kernel.shape[0]).reshape(S, R)
            st["gram"] += direct_gram(x, self.kernel, self.geometry, img, oy, ox, k,
                                      acc_dtype=self.acc_dtype)
            st["count"] += S * (self.kernel.shape[0] if R is None else R)
            if held:
                st["held_gram"] += direct_gram(x, self.kernel, self.geometry, *held, None if k is None else k[hs],
                                               acc_dtype=self.acc_dtype)
                st["held_count"] += held[0].numel() * (self.kernel.shape[0] if R is None else R)
        if held:
            st["held_samples"] += held[0].numel()
        if self.keeps_cov and self.backend == "torch":
            Z = gather_patches(x, self.geometry, img, oy, ox).reshape(S, -1).to(self.acc_dtype)
            zsum = Z.sum(0)
            if held:
                st["held_patches"].append(Z[hs.to(Z.device)])
            st["cov_rows"].append(Z)
            st["cov_held"].append(hs.to(Z.device))
            if sum(z.shape[0] for z in st["cov_rows"]) >= Z.shape[1] // 2:
                self._fold_rows(mirror=False)
        elif self.keeps_cov:
            if held:
                z = gather_patches(x, self.geometry, *held).reshape(held[0].numel(), -1).to(self.acc_dtype)
                st["held_patches"].append(z)
            P, zsum = patch_moments(x, self.geometry, img, oy, ox, acc_dtype=self.acc_dtype, backend=self.backend)
            st["cov"] = P if st["cov"] is None else st["cov"].add_(P)
        else:  # the first moment of the sampled patches, for bias compensation
            zsum = patch_sum(x, self.geometry, img, oy, ox, acc_dtype=self.acc_dtype)
        st["patch_sum"] += zsum
        st["patch_count"] += S
        self.images_seen += N

    def _fold_rows(self, mirror: bool = True) -> torch.Tensor:
        """P with the buffered patches added, whole (symmetric).

        P += ZᵀZ runs as a symmetric rank-k update: only the upper block rows are
        formed, the lower half is mirrored from them when P is read."""
        st = self._state
        D = self.channels * self.geometry.taps
        if st["cov"] is None:
            st["cov"] = torch.zeros(D, D, dtype=self.acc_dtype, device=self.kernel.device)
        P = st["cov"]
        if st["cov_rows"]:
            Z = torch.cat(st["cov_rows"]) if len(st["cov_rows"]) > 1 else st["cov_rows"][0]
            add_upper_gram_(P, Z)
            st["cov_rows"], st["cov_held"], st["folded"] = [], [], True
        return mirror_upper_(P) if mirror else P

    def _held_images(self, keys: torch.Tensor, per_image: int) -> torch.Tensor:
        """(n,) bool: which images of this batch join the held-out fold (about one in
        ``holdout_every``, chosen by their keys)."""
        if not self.holdout_every:
            return torch.zeros(keys.numel(), dtype=torch.bool)
        st = self._state
        seed = self.seed if self.fold_seed is None else self.fold_seed
        h = keyed(keys, seed, "holdout", 2)
        mask = h[:, 0] % self.holdout_every == 0
        if self.expected_images:
            # thin the fold by key so that its patches fit holdout_max with room to spare:
            # then the first-come cap below (which depends on order) practically never binds
            expected = self.expected_images / self.holdout_every * max(per_image, 1)
            mask &= h[:, 1] % max(1, math.ceil(2 * expected / max(self.holdout_max, 1))) == 0
        room = max(0, (self.holdout_max - st["held_samples"]) // max(per_image, 1))
        mask &= mask.cumsum(0) <= room
        st["held_images"] += int(mask.sum())
        return mask

    # -- combining --------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        """The buffers to sum across processes (counts included, as a tensor)."""
        st = self._state
        counts = torch.tensor([st["count"], st["patch_count"], st["elements"], self.images_seen,
                               st["held_count"], st["held_images"], st["held_samples"]],
                              dtype=torch.float64, device=st["gram"].device)
        out = [st["gram"], st["patch_sum"], st["zeros"], counts, st["held_gram"]]
        if self.keeps_cov:
            out.append(self._fold_rows())
        return out

    def load_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Inverse of ``tensors()`` (after an all-reduce)."""
        st = self._state
        st["gram"], st["patch_sum"], st["zeros"] = tensors[0], tensors[1], tensors[2]
        c = [int(round(float(v))) for v in tensors[3].tolist()]
        st["count"], st["patch_count"], st["elements"], self.images_seen = c[:4]
        st["held_count"], st["held_images"], st["held_samples"] = c[4:]
        st["held_gram"] = tensors[4]
        if self.keeps_cov:
            st["cov"] = tensors[5]

    def held_patches(self) -> torch.Tensor:
        """The held-out patches (m, C·t); distributed runs gather them (not summed)."""
        st = self._state
        D = self.channels * self.geometry.taps
        if st["held_patches"]:
            st["held_patches"] = [torch.cat(st["held_patches"])]
            return st["held_patches"][0]
        return torch.zeros(0, D, dtype=self.acc_dtype, device=self.kernel.device)

    def load_held_patches(self, patches: torch.Tensor) -> None:
        self._state["held_patches"] = [patches] if patches.numel() else []

    def _check_compatible(self, other: "StatsAccumulator"):
        if not isinstance(other, StatsAccumulator) or other.statistics != self.statistics or \
                other.geometry != self.geometry or other.kernel.shape != self.kernel.shape or \
                other.acc_dtype != self.acc_dtype or other.keeps_cov != self.keeps_cov:
            raise ValueError("only accumulators with the same mode, geometry, kernel shape and dtype can be merged")

    def merge(self, other: "StatsAccumulator") -> "StatsAccumulator":
        """Add ``other``'s statistics into this accumulator (in place)."""
        self._check_compatible(other)
        if self.keeps_cov:
            self._fold_rows()
            other._fold_rows()
        a, b = self._state, other._state
        for key in a:
            a[key] = a[key] + (b[key].to(a[key].device) if isinstance(b[key], torch.Tensor) else b[key])
        self.images_seen += other.images_seen
        return self

    def __add__(self, other: "StatsAccumulator") -> "StatsAccumulator":
        out = StatsAccumulator(self.kernel, self.geometry, self.statistics, self.samples_per_image,
                               self.outputs_per_sample, self.seed, self.acc_dtype, self.backend, self.with_cov,
                               self.count_zeros, self.holdout_every, self.holdout_max, self.fold_seed,
                               self.expected_images)
        return out.merge(self).merge(other)

    def result(self, *, release: bool = False) -> Statistics:
        """A snapshot: later ``update()`` calls do not change it. ``release=True`` hands
        over the buffers instead of copying them; the accumulator is then spent."""
        st = self._state
        C, t = self.channels, self.geometry.taps
        own = (lambda v: v) if release else (lambda v: v.clone())  # noqa: E731
        patches = rows = None
        if self.keeps_cov and not st["folded"] and st["cov_rows"]:
            patches = torch.cat(st["cov_rows"])
            rows = torch.cat(st["cov_held"]).nonzero().reshape(-1)
        heldout = None
        Z = self.held_patches() if self.keeps_cov and st["held_images"] else None
        held_z = [Z] if Z is not None else []
        if patches is not None:
            # few samples: G from the patches block by block; P only if asked to keep it
            cov = None if release else _patch_cov(patches)
            if self.statistics == "full":
                grams = gram_from_covs(self.kernel, [], patches=[patches] + held_z, backend=self.backend)
        else:
            cov = own(self._fold_rows()) if self.keeps_cov else None
            if self.statistics == "full":  # one WᵀW for both grams
                grams = gram_from_covs(self.kernel, [cov], patches=held_z, backend=self.backend)
        if self.statistics == "full":
            gram, held_gram = grams[0], grams[-1]
        else:
            gram, held_gram = own(st["gram"]), own(st["held_gram"])
        if st["held_images"]:
            heldout = HeldOut(held_gram, st["held_count"], st["held_images"], None if Z is None else own(Z),
                              rows if patches is not None else None)
        return Statistics(
            statistics=self.statistics, gram=gram, count=st["count"], patch_count=st["patch_count"],
            patch_sum=st["patch_sum"].reshape(C, t).clone(), zeros=st["zeros"].clone(), elements=st["elements"],
            cov=cov, backend=self.backend, backend_note=self.backend_note, heldout=heldout, patches=patches,
        )
        if release:
            self._state = None


def _with_aliases(init):
    """``mode=`` and ``dtype=``, the older names of ``statistics=`` and ``acc_dtype=``."""
    def __init__(self, *args, mode: str | None = None, dtype: torch.dtype | None = None, **kw):
        for old, new, value in (("mode", "statistics", mode), ("dtype", "acc_dtype", dtype)):
            if value is not None:
                if new in kw:
                    raise TypeError(f"StatsAccumulator: give {new}= or its alias {old}=, not both")
                kw[new] = value
        init(self, *args, **kw)
    __init__.__doc__, __init__.__wrapped__ = init.__doc__, init
    return __init__


StatsAccumulator.__init__ = _with_aliases(StatsAccumulator.__init__)
StatsAccumulator.mode = property(lambda self: self.statistics, doc="Alias of ``statistics``.")
StatsAccumulator.dtype = property(lambda self: self.acc_dtype, doc="Alias of ``acc_dtype``.")

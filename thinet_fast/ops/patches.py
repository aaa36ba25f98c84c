"""Consumer geometry and patch sampling (DESIGN.md §2).

A Linear consumer is treated as a convolution whose kernel covers its whole input:
its (N, C*t) input becomes an (N, C, t, 1) map and its (K, C*t) weight a (K, C, t, 1)
kernel, so every statistic has one code path. ``t = 1`` is a Linear after global
pooling, ``t = in_features / C`` a Linear after flatten (channel-major features).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["ConsumerGeometry", "sample_locations", "gather_patches", "gather_patches_ref", "contributions",
           "tokens_as_map"]


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(e) for e in v)
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair; got {v}")
    return v


class UnsupportedConsumer(ValueError):
    """A consumer whose input patches the statistics cannot gather (the message says why)."""


@dataclass(frozen=True)
class ConsumerGeometry:
    """How the consumer reads its C input channels."""

    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    linear: bool = False

    def __post_init__(self):
        for name in ("kernel_size", "stride", "padding", "dilation"):
            object.__setattr__(self, name, _pair(getattr(self, name)))
        if min(self.kernel_size + self.stride + self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(f"invalid consumer geometry {self}")

    @classmethod
    def conv(cls, kernel_size, stride=1, padding=0, dilation=1) -> "ConsumerGeometry":
        if isinstance(padding, str):
            raise ValueError("string padding ('same'/'valid') is not supported; give the consumer explicit integer padding")
        return cls(kernel_size, stride, padding, dilation, linear=False)

    @classmethod
    def from_module(cls, module, taps: int = 1) -> "ConsumerGeometry":
        """The geometry of a Conv2d-like (``kernel_size``, ``stride``, ``padding``,
        ``dilation``, ``padding_mode``) or Linear-like (``in_features``; ``taps`` features
        per channel) consumer. Raises :class:`UnsupportedConsumer` with the reason when
        its patches are not what the statistics gather: non-zero padding modes, an
        asymmetric ``padding="same"``, convs other than 2-D."""
        if hasattr(module, "kernel_size"):
            ks = tuple(module.kernel_size)
            if len(ks) != 2:
                raise UnsupportedConsumer(f"a {len(ks)}-D convolution; only 2-D convs are supported")
            mode = getattr(module, "padding_mode", "zeros")
            padding = module.padding
            if mode != "zeros" and (padding == "valid" or (not isinstance(padding, str) and not any(padding))):
                mode = "zeros"  # no padding at all: the mode never applies
            if mode != "zeros":
                raise UnsupportedConsumer(f"padding_mode={mode!r}; the patch statistics gather zero-padded "
                                          "patches only")
            if isinstance(padding, str):
                if padding == "valid":
                    padding = (0, 0)
                else:  # "same": symmetric only when each total padding is even (stride is 1 then)
                    total = [d * (k - 1) for d, k in zip(module.dilation, ks)]
                    if any(p % 2 for p in total):
                        raise UnsupportedConsumer(f"padding='same' with kernel {ks} and dilation "
                                                  f"{tuple(module.dilation)} pads asymmetrically")
                    padding = tuple(p // 2 for p in total)
            return cls.conv(ks, module.stride, padding, module.dilation)
        if hasattr(module, "in_features"):
            return cls.dense(taps)
        raise UnsupportedConsumer(f"a {type(module).__name__} is neither a Conv2d nor a Linear")

    @classmethod
    def dense(cls, taps: int = 1) -> "ConsumerGeometry":
        """A Linear consumer with ``taps`` input features per channel."""
        return cls((int(taps), 1), 1, 0, 1, linear=True)

    @property
    def taps(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    def as_map(self, x: torch.Tensor) -> torch.Tensor:
        """The consumer input as an (N, C, H, W) map."""
        if self.linear:
            if x.dim() == 4 and tuple(x.shape[2:]) == (self.taps, 1):
                return x  # already a map: as_map is idempotent (the accumulator maps before the kernels)
            if x.dim() != 2 or x.shape[1] % self.taps:
                raise ValueError(f"a Linear consumer with {self.taps} taps per channel needs (N, C*{self.taps}) input; got {tuple(x.shape)}")
            return x.reshape(x.shape[0], x.shape[1] // self.taps, self.taps, 1)
        if x.dim() != 4:
            raise ValueError(f"a Conv2d consumer needs (N, C, H, W) input; got {tuple(x.shape)}")
        return x

    def as_kernel(self, weight: torch.Tensor) -> torch.Tensor:
        """The consumer weight as (K, C, kh, kw)."""
        if self.linear:
            if weight.dim() == 4 and tuple(weight.shape[2:]) == (self.taps, 1):
                return weight  # already in kernel form: as_kernel is idempotent
            if weight.dim() != 2 or weight.shape[1] % self.taps:
                raise ValueError(f"Linear weight of shape {tuple(weight.shape)} is not (K, C*{self.taps})")
            return weight.reshape(weight.shape[0], weight.shape[1] // self.taps, self.taps, 1)
        if weight.dim() != 4 or tuple(weight.shape[2:]) != self.kernel_size:
            raise ValueError(f"conv weight of shape {tuple(weight.shape)} does not match kernel {self.kernel_size}")
        return weight

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if oh < 1 or ow < 1:
            raise ValueError(f"input {h}x{w} is smaller than the consumer's receptive field {self}")
        return oh, ow


def tokens_as_map(x: torch.Tensor) -> torch.Tensor:
    """A Linear's (N, ..., C) input (tokens, channels-last maps) as the (N, C, L, 1) map
    of a 1x1 conv: every position is a location. A view, no copy."""
    if x.dim() < 3:
        raise ValueError(f"tokens_as_map needs an (N, ..., C) input with positions; got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2).unsqueeze(-1)


def sample_locations(generator: torch.Generator, n_images: int, out_hw: tuple[int, int],
                     per_image: int | None, image_offset: int = 0):
    """Random output positions: ``per_image`` per image (with replacement), or every
    position when ``per_image`` is None. Drawn on the CPU so a seed gives the same
    samples on every device. Returns int64 (img, oy, ox)."""
    oh, ow = out_hw
    if per_image is None:
        img = torch.arange(n_images).repeat_interleave(oh * ow)
        pos = torch.arange(oh * ow).repeat(n_images)
    else:
        img = torch.arange(n_images).repeat_interleave(per_image)
        pos = torch.randint(oh * ow, (n_images * per_image,), generator=generator)
    return img + image_offset, pos // ow, pos % ow


def gather_patches(x: torch.Tensor, geometry: ConsumerGeometry, img, oy, ox) -> torch.Tensor:
    """Patches z_s (S, C, t) at the given output positions, zero padding applied."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry.kernel_size, geometry.stride, geometry.padding, geometry.dilation
    dev = x.device
    img, oy, ox = img.to(dev), oy.to(dev), ox.to(dev)
    H, W = x.shape[2], x.shape[3]
    # index the unpadded map and zero the taps that fall in the padding: padding the
    # whole map would copy it for a few patches
    rows = oy[:, None] * sh - ph + torch.arange(kh, device=dev) * dh
    cols = ox[:, None] * sw - pw + torch.arange(kw, device=dev) * dw
    z = x[img[:, None, None], :, rows.clamp(0, H - 1)[:, :, None], cols.clamp(0, W - 1)[:, None, :]]  # (S, kh, kw, C)
    if ph or pw:
        inside = ((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]
        z = z * inside[..., None].to(z.dtype)
    return z.permute(0, 3, 1, 2).reshape(z.shape[0], x.shape[1], kh * kw)


def gather_patches_ref(x: torch.Tensor, geometry: ConsumerGeometry, img, oy, ox) -> torch.Tensor:
    """Reference: full im2col with ``F.unfold``, then pick the samples."""
    oh, ow = geometry.out_size(x.shape[2], x.shape[3])
    cols = F.unfold(x, geometry.kernel_size, dilation=geometry.dilation, padding=geometry.padding, stride=geometry.stride)
    z = cols[img.to(x.device), :, (oy * ow + ox).to(x.device)]  # (S, C*t)
    return z.reshape(z.shape[0], x.shape[1], geometry.taps)


def contributions(z: torch.Tensor, kernel: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
    """x̂_{s,k}[c] = Σ_u W[k,c,u] z_s[c,u].

    With ``k`` (S,) one output per sample: (S, C). Without: every output, (S, K, C).
    """
    Wr = kernel.reshape(kernel.shape[0], kernel.shape[1], -1).to(z.dtype)
    if k is None:
        return torch.einsum("kcu,scu->skc", Wr, z)
    return (Wr[k.to(z.device)] * z).sum(-1)

"""Attention heads as prunable groups (modules, no math).

A head is a coupled group of its own: its query, key and value rows in the input
projection, its slice of any per-head parameter (relative position bias, logit scale)
and its columns in the output projection. Removing a head leaves every other head's
output unchanged, so the only reader to reconstruct is the output projection, a Linear
over the concatenated heads (tokens are samples).

Supported: ``nn.MultiheadAttention`` (ViT, ``nn.TransformerEncoderLayer`` and any model
built on it; same query/key/value width, no ``bias_k``/``add_zero_attn``),
torchvision's Swin ``ShiftedWindowAttention`` / ``ShiftedWindowAttentionV2`` and MaxViT's
``RelativePositionalMultiHeadAttention``. A pruned one becomes
:class:`HeadPrunedAttention`, :class:`HeadPrunedWindowAttention` (``V2``) or
:class:`HeadPrunedRelativeAttention`, which take the same calls with
``num_heads·head_dim`` below the model width (what the originals cannot express).
Other attention modules are left as they are.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

from .modules import set_module
from .ops.reconstruct import channel_taps

__all__ = ["HeadSite", "find_heads", "pre_projection", "cut_heads", "cut_first_heads", "cut_width",
           "HeadPrunedAttention",
           "HeadPrunedWindowAttention", "HeadPrunedWindowAttentionV2", "HeadPrunedRelativeAttention",
           "HEAD_PRUNED_TYPES", "heads_of",
           "window_attention", "ATTENTION_TYPES"]


@dataclass
class HeadSite:
    """One attention module whose heads can be pruned."""

    name: str
    module: nn.Module
    heads: int
    head_dim: int

    @property
    def projection_name(self) -> str:
        """The output projection's child name: the reader of the concatenated heads."""
        return next(n for n in ("out_proj", "proj", "merge") if isinstance(getattr(self.module, n, None), nn.Linear))

    @property
    def projection(self) -> nn.Linear:
        return getattr(self.module, self.projection_name)

    @property
    def qkv_weight(self) -> torch.Tensor:
        """The fused (q; k; v) input projection weight (3·heads·head_dim, width)."""
        m = self.module
        return m.in_proj_weight if isinstance(m, (nn.MultiheadAttention, HeadPrunedAttention)) else \
            (m.qkv if hasattr(m, "qkv") else m.to_qkv).weight


def _why_not(m: nn.Module) -> Optional[str]:
    if isinstance(m, nn.MultiheadAttention):
        if not m._qkv_same_embed_dim:
            return "its keys or values are not as wide as its queries (kdim/vdim)"
        if m.bias_k is not None or m.add_zero_attn:
            return "it has bias_k/bias_v or add_zero_attn"
    return None


def find_heads(model: nn.Module, ignored: Iterable[str] = ()) -> tuple[list[HeadSite], list[tuple[str, str]]]:
    """The attention modules whose heads can be pruned (not inside ``ignored`` fqns),
    and the refused ones with the reason."""
    ignored = tuple(ignored)
    sites, refused = [], []
    for name, m in model.named_modules():
        if any(name == i or name.startswith(i + ".") for i in ignored):
            continue
        if isinstance(m, (_WindowForward, HeadPrunedRelativeAttention)):
            continue  # pruned once already
        if isinstance(m, HeadPrunedAttention):  # from a head or a width cut: its heads can go too
            sites.append(HeadSite(name, m, m.num_heads, m.head_dim))
        elif isinstance(m, nn.MultiheadAttention):
            why = _why_not(m)
            if why:
                refused.append((name, f"heads kept: {why}"))
            else:
                sites.append(HeadSite(name, m, m.num_heads, m.head_dim))
        elif isinstance(m, ShiftedWindowAttention):
            dim = m.proj.in_features
            sites.append(HeadSite(name, m, m.num_heads, dim // m.num_heads))
        elif isinstance(m, RelativePositionalMultiHeadAttention):
            sites.append(HeadSite(name, m, m.n_heads, m.head_dim))
    return sites, refused


@contextlib.contextmanager
def pre_projection(site: HeadSite):
    """While inside, ``site.module`` returns the concatenated heads before its output
    projection (the projection is the identity with zero bias: it is the module's last
    token-wise op, so the rest of its forward only moves tokens; its width may differ
    from the model's after a cut)."""
    proj = site.projection
    w, b = proj.weight.data, None if proj.bias is None else proj.bias.data
    inner = w.shape[1]
    proj.weight.data = torch.eye(inner, dtype=w.dtype, device=w.device)
    if b is not None:
        proj.bias.data = b.new_zeros(inner)
    try:
        yield
    finally:
        proj.weight.data = w
        if b is not None:
            proj.bias.data = b


def _head_rows(keep: torch.Tensor, head_dim: int, width: int) -> torch.Tensor:
    """Rows of a fused (q; k; v) projection of ``width`` rows per part for the kept heads."""
    one = channel_taps(keep, head_dim)
    return torch.cat([one + i * width for i in range(3)])


def cut_heads(model: nn.Module, site: HeadSite, keep: torch.Tensor, weight: torch.Tensor,
              bias: Optional[torch.Tensor]) -> nn.Module:
    """Replace ``site.module`` in ``model`` by one with only the ``keep`` heads (sorted
    indices) and the output projection ``weight`` (E, |keep|·head_dim), ``bias`` (E,)."""
    m, d = site.module, site.head_dim
    keep = keep.cpu().sort().values
    rows = _head_rows(keep, d, site.heads * d)
    if isinstance(m, (nn.MultiheadAttention, HeadPrunedAttention)):
        again = isinstance(m, HeadPrunedAttention)  # masks stay sized for the first module's heads
        new = HeadPrunedAttention(m.embed_dim, keep.numel(), d, bias=m.in_proj_bias is not None,
                                  out_bias=m.out_proj.bias is not None or bias is not None,
                                  batch_first=m.batch_first, dropout=m.dropout,
                                  kept_heads=m.kept_heads.cpu()[keep] if again else keep,
                                  source_heads=m.source_heads if again else site.heads)
        new = new.to(device=m.in_proj_weight.device, dtype=m.in_proj_weight.dtype)
        with torch.no_grad():
            new.in_proj_weight.copy_(m.in_proj_weight[rows.to(m.in_proj_weight.device)])
            if m.in_proj_bias is not None:
                new.in_proj_bias.copy_(m.in_proj_bias[rows.to(m.in_proj_bias.device)])
        new.train(m.training)
    else:
        new = _cut_torchvision(m, keep, rows, d)
    proj = getattr(new, site.projection_name)
    with torch.no_grad():
        proj.weight.copy_(weight.to(proj.weight))
        if bias is not None:
            proj.bias.copy_(bias.to(proj.bias))
    set_module(model, site.name, new)
    return new


def cut_first_heads(model: nn.Module, site: HeadSite, n: int) -> nn.Module:
    """``site`` cut to its first ``n`` heads, the projection's columns for them kept: the
    shapes of any ``n``-head cut (for counting, or for saved weights to fill)."""
    proj = site.projection
    return cut_heads(model, site, torch.arange(n), proj.weight[:, :n * site.head_dim], proj.bias)


def cut_width(m: nn.Module, keep: torch.Tensor) -> "HeadPrunedAttention":
    """``m`` (``nn.MultiheadAttention`` or :class:`HeadPrunedAttention`) on the model
    width channels ``keep`` only: the input projection loses those columns, the output
    projection those rows; heads and their width stay. A new module, sharing nothing."""
    if isinstance(m, nn.MultiheadAttention):
        why = _why_not(m)
        if why:
            raise ValueError(f"cannot cut the width of this MultiheadAttention: {why}")
        heads, d, kept, source = m.num_heads, m.head_dim, None, None
    elif isinstance(m, HeadPrunedAttention):
        heads, d, kept, source = m.num_heads, m.head_dim, m.kept_heads.cpu(), m.source_heads
    else:
        raise TypeError(f"cut_width: a MultiheadAttention or HeadPrunedAttention is needed, got {type(m).__name__}")
    w = m.in_proj_weight
    keep = keep.to(w.device)
    new = HeadPrunedAttention(keep.numel(), heads, d, bias=m.in_proj_bias is not None,
                              out_bias=m.out_proj.bias is not None, batch_first=m.batch_first, dropout=m.dropout,
                              kept_heads=kept, source_heads=source).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.in_proj_weight.copy_(w[:, keep])
        if m.in_proj_bias is not None:
            new.in_proj_bias.copy_(m.in_proj_bias)
        new.out_proj.weight.copy_(m.out_proj.weight[keep])
        if m.out_proj.bias is not None:
            new.out_proj.bias.copy_(m.out_proj.bias[keep])
    new.train(m.training)
    return new


def _linear(old: nn.Linear, rows=None, cols=None, bias: bool | None = None) -> nn.Linear:
    w = old.weight.detach()
    w = w if rows is None else w[rows.to(w.device)]
    w = w if cols is None else w[:, cols.to(w.device)]
    has_bias = old.bias is not None if bias is None else bias
    new = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if old.bias is not None and has_bias:
            b = old.bias.detach()
            new.bias.copy_(b if rows is None else b[rows.to(b.device)])
        elif has_bias:
            new.bias.zero_()
    return new


def _cut_torchvision(m: nn.Module, keep: torch.Tensor, rows: torch.Tensor, d: int) -> nn.Module:
    """The Swin or MaxViT module as its head-pruned subclass, sharing nothing with ``m``."""
    cls = HeadPrunedWindowAttentionV2 if isinstance(m, ShiftedWindowAttentionV2) else \
        HeadPrunedWindowAttention if isinstance(m, ShiftedWindowAttention) else HeadPrunedRelativeAttention
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for k, v in vars(m).items():  # plain attributes: window_size, shift_size, dropouts, training
        if not k.startswith("_"):
            setattr(new, k, v)
    for k, v in m._buffers.items():
        new.register_buffer(k, v, persistent=k not in m._non_persistent_buffers_set)
    cols = channel_taps(keep, d)
    if cls is HeadPrunedRelativeAttention:
        new.n_heads, new.head_dim = keep.numel(), d
        new.to_qkv = _linear(m.to_qkv, rows=rows)
        new.merge = _linear(m.merge, cols=cols, bias=True)
    else:
        new.num_heads, new.head_dim = keep.numel(), d
        new.qkv = _linear(m.qkv, rows=rows)
        new.proj = _linear(m.proj, cols=cols, bias=True)
    kd = keep.to(m.relative_position_index.device)
    if cls is not HeadPrunedWindowAttentionV2:
        new.relative_position_bias_table = nn.Parameter(m.relative_position_bias_table.detach()[:, kd].clone())
    else:
        new.logit_scale = nn.Parameter(m.logit_scale.detach()[kd].clone())
        layers = list(m.cpb_mlp)
        new.cpb_mlp = nn.Sequential(*layers[:-1], _linear(layers[-1], rows=keep))
    return new


class HeadPrunedAttention(nn.Module):
    """``nn.MultiheadAttention`` with some heads removed: ``num_heads·head_dim`` may be
    below ``embed_dim``. The same call and results as the module it replaces (masks
    sized for the original heads, ``(N·source_heads, L, S)``, are taken per kept head);
    attention weights, when asked for, are averaged over the kept heads."""

    # keeps nn.TransformerEncoderLayer off its fused path, which assumes heads·head_dim == embed_dim
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool = True, out_bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, kept_heads=None, source_heads: int | None = None):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        self.source_heads = num_heads if source_heads is None else source_heads
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=out_bias)
        kept = torch.arange(num_heads) if kept_heads is None else torch.as_tensor(kept_heads, dtype=torch.long)
        self.register_buffer("kept_heads", kept)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def _mask(self, attn_mask, key_padding_mask, N, L, S, dtype, device):
        """One additive (N, heads, L, S) mask, or None."""
        out = None
        if attn_mask is not None:
            m = _additive(attn_mask, dtype)
            if m.dim() == 3:  # (N·source_heads, L, S)
                m = m.view(N, self.source_heads, L, S).index_select(1, self.kept_heads)
            out = m
        if key_padding_mask is not None:
            k = _additive(key_padding_mask, dtype).view(N, 1, 1, S)
            out = k if out is None else out + k
        return out

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        N, L, _ = query.shape
        S = key.shape[1]
        H, d = self.num_heads, self.head_dim
        w = self.in_proj_weight.chunk(3)
        b = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        q, k, v = (F.linear(t, wi, bi).view(N, -1, H, d).transpose(1, 2)
                   for t, wi, bi in zip((query, key, value), w, b))
        mask = self._mask(attn_mask, key_padding_mask, N, L, S, q.dtype, q.device)
        if is_causal and mask is None:
            mask = torch.full((L, S), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(d)
            attn = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            weights = attn.mean(1) if average_attn_weights else attn
            out = F.dropout(attn, p, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, H * d))
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:  # True: not attended
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _shift_mask(pad_h: int, pad_w: int, window, shift, like: torch.Tensor) -> torch.Tensor:
    """(windows, N, N) additive mask: after the cyclic shift, tokens of different
    regions in one window must not attend to each other."""
    label = like.new_zeros(pad_h, pad_w)
    count = 0
    for hs in ((0, pad_h - window[0]), (pad_h - window[0], pad_h - shift[0]), (pad_h - shift[0], pad_h)):
        for ws in ((0, pad_w - window[1]), (pad_w - window[1], pad_w - shift[1]), (pad_w - shift[1], pad_w)):
            label[hs[0]:hs[1], ws[0]:ws[1]] = count
            count += 1
    label = label.view(pad_h // window[0], window[0], pad_w // window[1], window[1]).permute(0, 2, 1, 3)
    label = label.reshape(-1, window[0] * window[1])
    diff = label[:, None, :] - label[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def window_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, position_bias, window, shift, heads: int,
                     head_dim: int, *, logit_scale=None, attention_dropout: float = 0.0, dropout: float = 0.0,
                     training: bool = False) -> torch.Tensor:
    """Swin's (shifted) window attention on (B, H, W, C) for any ``heads·head_dim``."""
    B, Hh, Ww, C = x.shape
    wh, ww = window
    x = F.pad(x, (0, 0, 0, (ww - Ww % ww) % ww, 0, (wh - Hh % wh) % wh))
    _, ph, pw, _ = x.shape
    shift = [0 if wh >= ph else shift[0], 0 if ww >= pw else shift[1]]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nw, n = (ph // wh) * (pw // ww), wh * ww
    x = x.view(B, ph // wh, wh, pw // ww, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B * nw, n, C)
    if logit_scale is not None and qkv_bias is not None:  # V2: no key bias
        qkv_bias = qkv_bias.clone()
        qkv_bias[qkv_bias.numel() // 3: 2 * qkv_bias.numel() // 3] = 0
    q, k, v = F.linear(x, qkv_weight, qkv_bias).reshape(B * nw, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
    attn = attn + position_bias
    if sum(shift) > 0:
        mask = _shift_mask(ph, pw, window, shift, x)
        attn = (attn.view(B, nw, heads, n, n) + mask[None, :, None]).view(-1, heads, n, n)
    attn = F.dropout(torch.softmax(attn, dim=-1), p=attention_dropout, training=training)
    out = (attn @ v).transpose(1, 2).reshape(B * nw, n, heads * head_dim)
    out = F.dropout(F.linear(out, proj_weight, proj_bias), p=dropout, training=training)
    E = out.shape[-1]
    out = out.view(B, ph // wh, pw // ww, wh, ww, E).permute(0, 1, 3, 2, 4, 5).reshape(B, ph, pw, E)
    if sum(shift) > 0:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    return out[:, :Hh, :Ww, :].contiguous()


torch.fx.wrap("window_attention")  # a leaf for torch.fx, as torchvision wraps its own


class _WindowForward:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_attention(x, self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias,
                                self.get_relative_position_bias(), self.window_size, self.shift_size,
                                self.num_heads, self.head_dim, logit_scale=getattr(self, "logit_scale", None),
                                attention_dropout=self.attention_dropout, dropout=self.dropout,
                                training=self.training)


class HeadPrunedWindowAttention(_WindowForward, ShiftedWindowAttention):
    """Swin's ``ShiftedWindowAttention`` with ``num_heads·head_dim`` below its width."""


class HeadPrunedWindowAttentionV2(_WindowForward, ShiftedWindowAttentionV2):
    """Swin V2's ``ShiftedWindowAttentionV2`` with ``num_heads·head_dim`` below its width."""


class HeadPrunedRelativeAttention(RelativePositionalMultiHeadAttention):
    """MaxViT's ``RelativePositionalMultiHeadAttention`` with ``n_heads·head_dim`` below
    its width (the original reshapes the heads' output to the input width)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, G, P, _ = x.shape
        H, d = self.n_heads, self.head_dim
        q, k, v = self.to_qkv(x).view(B, G, P, 3, H, d).permute(3, 0, 1, 4, 2, 5)
        scores = q @ (k * self.scale_factor).transpose(-2, -1) + self.get_relative_positional_bias()
        out = torch.softmax(scores, dim=-1) @ v                      # (B, G, H, P, d)
        return self.merge(out.transpose(2, 3).reshape(B, G, P, H * d))


#: what :func:`cut_heads` returns
HEAD_PRUNED_TYPES = (HeadPrunedAttention, HeadPrunedWindowAttention, HeadPrunedWindowAttentionV2,
                     HeadPrunedRelativeAttention)


def heads_of(m: nn.Module) -> int:
    """The heads an attention module computes."""
    return m.n_heads if isinstance(m, RelativePositionalMultiHeadAttention) else m.num_heads


#: attention modules counted as one layer (projections and attention products together)
ATTENTION_TYPES = (nn.MultiheadAttention, HeadPrunedAttention, ShiftedWindowAttention,
                   RelativePositionalMultiHeadAttention)

#!/usr/bin/env python
"""Roofline floors for ThiNet pruning at ImageNet sampling scale: arithmetic, not timing.

    python bench/roofline.py [--json out.json] [--models vgg16 resnet50]
                             [--images 10000] [--per-image 10] [--batch 64] [--keep 0.5]

For torchvision VGG-16 and ResNet-50 (built on the meta device, so no weights and no
compute) this counts each kernel's flops and DRAM bytes and prints its *roofline floor*,
``max(flops / peak, bytes / bandwidth)``, on an H100 SXM and on a Tesla M40, at the
paper's sampling scale: 10 images x 1000 classes = 10 000 images, 10 locations each
(m = 100 000 samples per conv consumer). A floor is a lower bound on the time of a
kernel that does this work, not a measurement: real kernels reach some fraction of
peak, so measured times will be higher (typically 1.3-3x for large convs/GEMMs, more
for small or latency-bound ones). The floor of a sequence of kernels is the sum of
their floors (each kernel is bounded on its own; they do not overlap).

Device peaks (vendor datasheets; dense, no sparsity; boost clocks):

* **H100 SXM5 80 GB** (NVIDIA H100 Tensor Core GPU datasheet): FP32 66.9 TFLOP/s (CUDA
  cores), TF32 tensor core 494.7 TFLOP/s dense (the datasheet's 989 is with 2:4
  sparsity; BF16 dense is 989.4), FP64 tensor core 66.9 TFLOP/s (FP64 non-tensor 33.5),
  HBM3 3.35 TB/s, 132 SMs, 50 MB L2, host link PCIe Gen5 x16 (64 GB/s per direction).
* **Tesla M40 24 GB** (Maxwell GM200; NVIDIA Tesla M40 datasheet): FP32 "up to 7
  TFLOP/s" (3072 cores x 2 x 1.114 GHz = 6.84; 7.0 used), FP64 at 1/32 rate = 0.213
  TFLOP/s, GDDR5 288 GB/s, 24 SMs, 3 MB L2, no tensor cores, PCIe Gen3 x16 (15.75 GB/s).

Columns: "fp32" puts every fp32 flop on the CUDA cores (exact fp32; this is what the
Triton statistics kernels do as written, ``input_precision="ieee"``). "TC" lets the
matmul-shaped parts (convolutions, GEMMs, XᵀX, ZᵀZ, WᵀW) run on TF32 tensor cores;
note PyTorch runs cuDNN convolutions in TF32 by default (``torch.backends.cudnn.
allow_tf32 = True``), so for the forward passes the TC column is the realistic floor on
an H100. The M40 has no tensor cores: one column. The small C x C solves use fp64.

Counting conventions and assumptions (honest, and deliberately simple):

* **Forward passes** (``trace_forward``): every aten op of a meta-device forward is
  recorded by a ``TorchDispatchMode``. Flops: 2 x MACs of convolutions and GEMMs only
  (the paper's convention; cross-checked against ``thinet_fast.counting.profile``),
  elementwise ops (BN, ReLU, pooling, residual add) count 0 flops but their bytes count.
  Bytes of an op: every tensor it reads plus every tensor it writes (an in-place ReLU
  reads and writes its input; max-pool writes its int64 indices, as CUDA eager does;
  views are free). Separating per-image activation bytes from per-batch weight bytes
  is done by tracing at batch 1 and batch 2 (bytes are affine in the batch), so weights
  are read once per batch of ``--batch`` images. No cross-op fusion and no cache reuse
  between ops is assumed. cuDNN's Winograd/FFT algorithms do fewer multiplies than
  direct convolution for 3x3 layers, so a measured forward *can* beat this flop floor,
  by up to ~2.25x on the 3x3 layers; the floor counts direct-convolution flops.
* **Sequential schedule** (paper): unit i runs its own forward over the 10 000 images,
  stopped at its consumer (``pipeline.collect`` raises in the consumer's pre-hook), on
  the model in which units < i are already pruned. Reported twice: with unpruned
  prefixes (an upper bound on this floor) and with every earlier unit cut to
  ``--keep`` (the model is really pruned on the meta device with
  ``thinet_fast.prune_unit_`` and re-traced). **One-shot**: one forward, stopped at the
  last consumer.
* **Sequential by activation replay** (what ``schedule="sequential"`` runs): the
  planner of ``thinet_fast.pipeline.replay`` is followed unit by unit on the meta
  model: each unit's pass runs only the graph segment from the cached cut point to its
  consumer (``thinet_fast.segments.Segments``, recorded op by op like the forward), on
  the model with earlier units pruned; the activations it captures (the consumer's
  input, cut to the kept channels, or the last cut point before the producer) become
  the next cache if they fit ``--replay-memory`` GB (default 64, half a 128 GB host),
  else the next unit starts from the images again. The cache is assumed to live on the
  host: every replayed pass uploads it over the host link (a cache on the GPU would
  remove that; the real budget tries the GPU first).
* **Input upload** (a'): fp32 images, 3x224x224, over the host link once per forward
  pass (decoding JPEGs on the CPU is not counted; caching the decoded images on the
  GPU as uint8, 1.5 GB, would remove it).
* **Statistics** (per unit; mode from ``thinet_fast.ops.stats.choose_mode(C, t)``, the
  default ``statistics="auto"``; the paper's "sampled" mode is also totalled). D = C·t.
  S = patches: images x locations for a conv consumer; for a Linear consumer one
  location per image (S = 10 000), and "sampled" still draws 10 outputs per image, so
  it has 100 000 rows built from 10 000 distinct patches. Activations are fp32 (4 B),
  accumulators fp32. DRAM bytes of a fused kernel: each operand read once, each result
  written once; on-chip tiles of G / P are free.

  - *sampled Gram* (fused gather + per-channel tap dot + XᵀX): per row 2·D flops for
    the contributions and D adds for the first moment, 2·C² matmul-shaped flops for
    the Gram update (the upper triangle alone would halve it; the Triton kernel also
    recomputes the tap dot ceil(C/64) times, not counted); bytes: the distinct patches,
    one filter row W[k_s] (D values) per row, G once.
  - *patch covariance P* (full mode): 2·D² per patch (symmetric: could be halved) + D
    adds (first moment); bytes: patches + P once.  *G from P*: A = WᵀW, 2·K·D²
    matmul-shaped flops, fused with the elementwise product and the tap-block
    reduction (2·D² flops); bytes: W, P, G once (A is never written). (The torch path
    forms only A's upper block rows, about half of these flops; the floor counts all.)
  - *direct* (VGG fc6, t = 49): every output per sample: 2·K·D (contributions, a
    batched matmul) + 2·K·C² (Gram) per patch; bytes: patches, W once per forward
    batch, X written and read back (S·K·C, as the torch path materialises it per chunk),
    G. (The torch path's memory bound chunks hold ~7 samples for fc6, so it re-reads W
    ~9x more often than counted here.)
  - *zero count* (APoZ, always collected): reads the whole consumer input once, one op
    per element.
* **Selection and reconstruction** (c):
  - *greedy removal* on G, run to C-1 removals (the whole order): per step 3·C flops
    (the score G_ii + 2·a_i as one FMA, a compare for the argmin, an add for the update
    a += G[:, i*]) and one column of G (C values), plus the diagonal; one
    thread block per problem, so a problem gets 1/SMs of the chip's flops, and C-1
    dependent steps each cost at least ``STEP_LATENCY`` (an assumption: 1 µs for a
    block-wide argmin plus one dependent global-memory read; not a datasheet figure).
    One-shot runs all units in one launch (plus copying the G's into a padded batch);
    sequential runs one launch per unit.
  - *ls_scale*: fp64 Cholesky of G_SS (n³/3), two triangular solves (2n²) and
    b = G_S,: 1 (n·C), n = kept channels; bytes: G read once (fp32), G_SS once (fp64).
  - *forward LS* (the journal variant, ``method="thinet_ls"``, not in the totals):
    incremental Cholesky, Σ_s (2·C·s + 2·s²) ≈ C·n² + 2n³/3 fp64 flops, n dependent
    steps on one block.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from torch.utils._pytree import tree_flatten

try:
    import thinet_fast  # noqa: F401
except ImportError:  # run from a checkout without an install
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from thinet_fast.counting import profile
from thinet_fast.ops.stats import choose_mode
from thinet_fast.pipeline.keeps import n_keep_for
from thinet_fast.rewrite import prune_unit_
from thinet_fast.segments import Segments, values
from thinet_fast.units import Unit, find_units

__all__ = [
    "Device", "Cost", "Sampling", "H100", "M40", "DEVICES", "STEP_LATENCY",
    "OpCount", "ForwardTrace", "trace_forward", "forward_costs", "floor_sum",
    "consumer_out_hw", "sample_counts", "sampled_gram_cost", "full_costs", "direct_cost",
    "zero_count_cost", "statistics_costs", "greedy_cost", "pad_batch_cost", "ls_scale_cost",
    "forward_ls_cost", "build_model", "replay_passes", "analyse", "main",
]

STEP_LATENCY = 1e-6  # s per dependent greedy step (assumption, see the docstring)


# ----------------------------------------------------------------------------- devices
@dataclass(frozen=True)
class Device:
    """Peak rates of one GPU (FLOP/s, bytes/s)."""

    name: str
    fp32: float          # CUDA-core fp32
    tensor: float        # matmul-shaped fp32 work on tensor cores (TF32 dense); == fp32 without them
    fp64: float
    bandwidth: float     # DRAM
    sms: int
    host_link: float     # host -> device, one direction
    step_latency: float = STEP_LATENCY


H100 = Device("H100 SXM5", fp32=66.9e12, tensor=494.7e12, fp64=66.9e12, bandwidth=3.35e12, sms=132,
              host_link=64e9)
M40 = Device("Tesla M40 24GB", fp32=7.0e12, tensor=7.0e12, fp64=7.0e12 / 32, bandwidth=288e9, sms=24,
             host_link=15.75e9)
DEVICES = (H100, M40)


# ----------------------------------------------------------------------------- costs
@dataclass(frozen=True)
class Cost:
    """The work of one kernel (or of one kernel launched over all batches).

    ``flops``: fp32 work that is not matmul-shaped (CUDA cores); ``mm_flops``: fp32
    matmul-shaped work (tensor cores may take it); ``fp64_flops``; ``bytes``: DRAM
    traffic. ``blocks`` > 0: the kernel runs one thread block per problem, so it gets
    ``min(blocks, SMs) / SMs`` of the chip's flops; ``serial_steps``: a chain of dependent
    steps per block, each at least ``Device.step_latency``, repeated for each wave of
    ``ceil(blocks / SMs)`` blocks.
    """

    name: str
    flops: float = 0.0
    mm_flops: float = 0.0
    fp64_flops: float = 0.0
    bytes: float = 0.0
    blocks: int = 0
    serial_steps: int = 0

    @property
    def total_flops(self) -> float:
        return self.flops + self.mm_flops + self.fp64_flops

    def compute_time(self, dev: Device, tensor_cores: bool = False) -> float:
        t = self.flops / dev.fp32 + self.mm_flops / (dev.tensor if tensor_cores else dev.fp32) \
            + self.fp64_flops / dev.fp64
        if self.blocks:
            t *= dev.sms / min(self.blocks, dev.sms)
        return t

    def memory_time(self, dev: Device) -> float:
        return self.bytes / dev.bandwidth

    def latency_time(self, dev: Device) -> float:
        waves = math.ceil(self.blocks / dev.sms) if self.blocks else 1
        return waves * self.serial_steps * dev.step_latency

    def floor(self, dev: Device, tensor_cores: bool = False) -> float:
        """Roofline floor in seconds: max(flops / peak, bytes / bandwidth[, latency chain])."""
        return max(self.compute_time(dev, tensor_cores), self.memory_time(dev), self.latency_time(dev))


def floor_sum(costs: Iterable[Cost], dev: Device, tensor_cores: bool = False) -> float:
    """Floor of kernels run one after another: the sum of their floors."""
    return sum(c.floor(dev, tensor_cores) for c in costs)


def _tot(costs: Iterable[Cost], attr: str) -> float:
    return sum(getattr(c, attr) if attr != "total_flops" else c.total_flops for c in costs)


@dataclass(frozen=True)
class Sampling:
    """The paper's calibration budget (ImageNet: 10 images x 1000 classes, 10 locations)."""

    images: int = 10_000
    per_image: int = 10
    batch: int = 64          # images per forward batch (the CLI's default --batch-size)
    act_bytes: int = 4       # fp32 feature maps
    acc_bytes: int = 4       # fp32 weights and accumulators
    image_shape: tuple = (3, 224, 224)

    @property
    def batches(self) -> int:
        return math.ceil(self.images / self.batch)

    @property
    def input_bytes(self) -> int:
        return self.images * math.prod(self.image_shape) * 4


# ----------------------------------------------------------------------------- forward
@dataclass(frozen=True)
class OpCount:
    """One aten op of a forward: flops and activation bytes per image, weight bytes per call."""

    op: str
    flops_per_image: float
    mm: bool
    act_bytes_per_image: float
    weight_bytes: float


@dataclass
class ForwardTrace:
    ops: list[OpCount]
    consumer_at: dict[str, int] = field(default_factory=dict)  # consumer fqn -> ops run before it

    def flops_per_image(self, upto: Optional[int] = None) -> float:
        return sum(o.flops_per_image for o in self.ops[:upto])


_CONV = {torch.ops.aten.convolution.default, torch.ops.aten._convolution.default}
_GEMM = {torch.ops.aten.addmm.default, torch.ops.aten.mm.default, torch.ops.aten.bmm.default}


def _op_flops(func, args, kwargs, out) -> float:
    """torch's own FLOP formula for ``func`` (``torch.utils.flop_counter``, what
    ``FlopCounterMode`` and ``thinet_fast.counting`` use), 0 for ops it does not count."""
    count = flop_registry.get(func.overloadpacket)
    return float(count(*args, **kwargs, out_val=out)) if count is not None else 0.0


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, float, bool, float]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
            return out  # a view: no traffic
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not ins:
            return out  # a factory (empty/zeros): allocation, not traffic
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        nbytes = sum(t.numel() * t.element_size() for t in ins + outs)
        flops = _op_flops(func, args, kwargs, out) if (func in _CONV or func in _GEMM) else 0.0
        self.ops.append((str(func), flops, flops > 0, float(nbytes)))
        return out


def _record(model: nn.Module, batch: int, image_shape, consumers: Sequence[str]):
    dev = next(model.parameters()).device
    x = torch.empty(batch, *image_shape, device=dev)
    rec = _Recorder()
    marks: dict[str, int] = {}
    handles = []
    modules = dict(model.named_modules())
    for fqn in consumers:
        def hook(m, a, fqn=fqn):
            marks.setdefault(fqn, len(rec.ops))
        handles.append(modules[fqn].register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), rec:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return rec.ops, marks


def trace_forward(model: nn.Module, consumers: Sequence[str] = (), image_shape=(3, 224, 224)) -> ForwardTrace:
    """Count one forward op by op (see the module docstring). ``model`` should live on the
    meta device (no compute); it is run in eval mode and left as it was."""
    was_training = model.training
    model.eval()
    try:
        ops1, marks = _record(model, 1, image_shape, consumers)
        ops2, _ = _record(model, 2, image_shape, consumers)
    finally:
        model.train(was_training)
    if [o[0] for o in ops1] != [o[0] for o in ops2]:
        raise RuntimeError("the forward ran different ops at batch 1 and batch 2; cannot split weight bytes")
    ops = []
    for (name, f1, mm, b1), (_, f2, _, b2) in zip(ops1, ops2):
        act = b2 - b1
        ops.append(OpCount(name, f1, mm, act, b1 - act))
    return ForwardTrace(ops, marks)


def forward_costs(trace: ForwardTrace, upto: Optional[int], s: Sampling, label: str = "forward") -> list[Cost]:
    """One Cost per op of the forward (ops[:upto]) over ``s.images`` images in batches."""
    out = []
    for o in trace.ops[:upto]:
        f = s.images * o.flops_per_image
        out.append(Cost(f"{label}:{o.op}", flops=0.0 if o.mm else f, mm_flops=f if o.mm else 0.0,
                        bytes=s.images * o.act_bytes_per_image + s.batches * o.weight_bytes))
    return out


# ----------------------------------------------------------------------------- statistics
def consumer_out_hw(unit: Unit) -> tuple[int, int]:
    """(H_out, W_out) of the consumer, from the unit's geometry; (1, 1) for a Linear."""
    if unit.consumer_kind == "linear":
        return (1, 1)
    if isinstance(unit.padding, str):
        raise ValueError(f"{unit.consumer}: string padding {unit.padding!r} is not supported")
    _, h, w = unit.consumer_in_shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = unit.kernel_size, unit.stride, unit.padding, unit.dilation
    return ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def sample_counts(unit: Unit, mode: str, s: Sampling) -> tuple[int, int]:
    """(rows, patches): rows of X (one sampled output each, in "sampled" mode) and
    distinct patches gathered, as ``StatsAccumulator.update`` draws them."""
    n, L = s.images, s.per_image
    if unit.consumer_kind == "linear":
        return (n * L, n) if mode == "sampled" else (n, n)
    return n * L, n * L


def sampled_gram_cost(C: int, t: int, rows: int, patches: int, s: Sampling = Sampling()) -> Cost:
    D = C * t
    return Cost("sampled Gram", flops=2.0 * D * rows + 1.0 * D * rows, mm_flops=2.0 * C * C * rows,
                bytes=patches * D * s.act_bytes + rows * D * s.acc_bytes + C * C * s.acc_bytes)


def full_costs(C: int, t: int, K: int, patches: int, s: Sampling = Sampling()) -> list[Cost]:
    D = C * t
    P = Cost("patch covariance P", flops=1.0 * D * patches, mm_flops=2.0 * D * D * patches,
             bytes=patches * D * s.act_bytes + (D * D + D) * s.acc_bytes)
    GP = Cost("G from P", flops=2.0 * D * D, mm_flops=2.0 * K * D * D,
              bytes=(K * D + D * D + C * C) * s.acc_bytes)
    return [P, GP]


def direct_cost(C: int, t: int, K: int, patches: int, s: Sampling = Sampling()) -> Cost:
    D = C * t
    return Cost("direct Gram", flops=1.0 * D * patches,
                mm_flops=2.0 * K * D * patches + 2.0 * K * C * C * patches,
                bytes=patches * D * s.act_bytes + s.batches * K * D * s.acc_bytes
                + 2.0 * patches * K * C * s.acc_bytes + C * C * s.acc_bytes)


def zero_count_cost(unit: Unit, s: Sampling = Sampling()) -> Cost:
    e = s.images * math.prod(unit.consumer_in_shape)
    return Cost("zero count (APoZ)", flops=float(e), bytes=float(e * s.act_bytes))


def statistics_costs(unit: Unit, mode: str, s: Sampling = Sampling()) -> list[Cost]:
    """Every statistics kernel one unit runs in ``mode`` over the whole budget."""
    C, t, K = unit.channels, unit.taps, unit.consumer_out
    rows, patches = sample_counts(unit, mode, s)
    if mode == "sampled":
        main = [sampled_gram_cost(C, t, rows, patches, s)]
    elif mode == "full":
        main = full_costs(C, t, K, patches, s)
    elif mode == "direct":
        main = [direct_cost(C, t, K, patches, s)]
    else:
        raise ValueError(f"unknown statistics mode {mode!r}")
    return main + [zero_count_cost(unit, s)]


# ----------------------------------------------------------------------------- selection
def greedy_cost(channels: Sequence[int], acc_bytes: int = 4) -> Cost:
    """Greedy removal to C-1 for each problem, all problems in one launch."""
    cs = [int(c) for c in channels]
    return Cost("greedy removal", flops=sum(3.0 * c * (c - 1) for c in cs),
                bytes=sum((c * (c - 1) + c) * acc_bytes for c in cs),
                blocks=len(cs), serial_steps=max(c - 1 for c in cs))


def pad_batch_cost(channels: Sequence[int], acc_bytes: int = 4) -> Cost:
    """Copying the G's into one zero-padded (B, Cmax, Cmax) batch (one-shot only)."""
    cmax = max(channels)
    return Cost("pad G batch", bytes=(len(channels) * cmax * cmax + sum(c * c for c in channels)) * acc_bytes)


def ls_scale_cost(C: int, n: int) -> Cost:
    return Cost("ls_scale (fp64)", fp64_flops=n ** 3 / 3.0 + 2.0 * n * n + 1.0 * n * C,
                bytes=C * C * 4 + n * n * 8)


def forward_ls_cost(C: int, n: int) -> Cost:
    return Cost("forward LS (fp64)", fp64_flops=sum(2.0 * C * k + 2.0 * k * k for k in range(1, n + 1)),
                bytes=C * C * 4 + n * n * 8, blocks=1, serial_steps=n)


# ----------------------------------------------------------------------------- analysis
def build_model(name: str) -> nn.Module:
    import torchvision.models as tvm
    with torch.device("meta"):
        return getattr(tvm, name)(weights=None).eval()


def _summary(costs: Sequence[Cost]) -> dict:
    return {
        "flops": _tot(costs, "total_flops"), "mm_flops": _tot(costs, "mm_flops"),
        "fp64_flops": _tot(costs, "fp64_flops"), "bytes": _tot(costs, "bytes"),
        "floor_s": {d.name: {"fp32": floor_sum(costs, d), "tc": floor_sum(costs, d, True)} for d in DEVICES},
    }


def _upload(passes: int, s: Sampling, nbytes: Optional[float] = None) -> dict:
    b = passes * s.input_bytes if nbytes is None else nbytes
    return {"passes": passes, "bytes": b, "floor_s": {d.name: {"fp32": b / d.host_link, "tc": b / d.host_link}
                                                        for d in DEVICES}}


def _value_at(model: nn.Module, seg: Segments, pos: int, batch: int, image_shape):
    x = torch.empty(batch, *image_shape, device="meta")
    return x if pos == seg.input else seg.run(model, seg.input, x, capture=pos, stop=pos)


def _segment_ops(model: nn.Module, seg: Segments, start: int, stop: int, image_shape) -> list[OpCount]:
    """The ops of one segment (cut point ``start`` up to node ``stop``), per image and
    per call, split as in :func:`trace_forward` (batch 1 and batch 2)."""
    recs = []
    with torch.no_grad():
        for batch in (1, 2):
            v = _value_at(model, seg, start, batch, image_shape)
            rec = _Recorder()
            with rec:
                seg.run(model, start, v, stop=stop)
            recs.append(rec.ops)
    if [o[0] for o in recs[0]] != [o[0] for o in recs[1]]:
        raise RuntimeError("a segment ran different ops at batch 1 and batch 2")
    return [OpCount(n, f1, mm, b2 - b1, b1 - (b2 - b1)) for (n, f1, mm, b1), (_, _, _, b2) in zip(*recs)]


def replay_passes(model: nn.Module, units: Sequence[Unit], s: Sampling, keep: float,
                  memory_bytes: float) -> list[dict]:
    """Follow ``Replay.plan``/``commit`` on a copy of the meta ``model``: per unit, where
    its pass starts, its forward costs, the bytes it uploads and whether it cached."""
    pruned = copy.deepcopy(model)
    seg = Segments(pruned)
    cache = None  # (position, bytes over all images)
    out = []
    for u in units:
        target = seg.input_of(u.consumer)
        start, capture = seg.plan(u.producer, u.consumer, None if cache is None else cache[0])
        start_bytes = cache[1] if start != seg.input else s.input_bytes
        ops = _segment_ops(pruned, seg, start, target, s.image_shape)
        costs = forward_costs(ForwardTrace(ops), None, s, "replay")
        prune_unit_(pruned, u, torch.arange(n_keep_for(u.channels, keep)))
        cached = None
        if capture is not None:
            with torch.no_grad():
                v = _value_at(pruned, seg, capture, 1, s.image_shape)
            cached = sum(t.numel() for t in values(v) if isinstance(t, torch.Tensor)) * s.act_bytes * s.images
        cache = (capture, cached) if cached is not None and cached <= memory_bytes else None
        out.append({"consumer": u.consumer, "start": seg.name(start), "upload_bytes": start_bytes,
                    "cached": seg.name(capture) if cache is not None else None,
                    "cache_bytes": cached, "_costs": costs})
    return out


def analyse(name: str, s: Sampling = Sampling(), keep: float = 0.5, replay_memory_gb: float = 64.0) -> dict:
    """All counts for one torchvision model (see the module docstring)."""
    model = build_model(name)
    example = torch.empty(1, *s.image_shape)
    plan = find_units(model, example)
    units = list(plan.units)
    consumers = [u.consumer for u in units]
    trace = trace_forward(model, consumers, s.image_shape)
    prof = profile(model, example)
    if trace.flops_per_image() != prof.flops:
        raise AssertionError(f"{name}: traced conv/GEMM flops {trace.flops_per_image():.0f} != "
                             f"thinet_fast.counting.profile {prof.flops}")

    # sequential forward on the partly pruned model (units < i cut to `keep`)
    pruned = copy.deepcopy(model)
    seq_pruned: list[list[Cost]] = []
    for u in units:
        tr = trace_forward(pruned, [u.consumer], s.image_shape)
        seq_pruned.append(forward_costs(tr, tr.consumer_at[u.consumer], s, "forward"))
        prune_unit_(pruned, u, torch.arange(n_keep_for(u.channels, keep)))

    replay = replay_passes(model, units, s, keep, replay_memory_gb * 1e9)

    rows = []
    for i, u in enumerate(units):
        mode = choose_mode(u.channels, u.taps)
        st = statistics_costs(u, mode, s)
        st_sampled = statistics_costs(u, "sampled", s)
        n = n_keep_for(u.channels, keep)
        sel = [greedy_cost([u.channels]), ls_scale_cost(u.channels, n)]
        fwd = forward_costs(trace, trace.consumer_at[u.consumer], s)
        r_rows, r_patches = sample_counts(u, mode, s)
        rows.append({
            "index": i, "producer": u.producer, "consumer": u.consumer, "C": u.channels, "t": u.taps,
            "K": u.consumer_out, "in_shape": list(u.consumer_in_shape), "out_hw": list(consumer_out_hw(u)),
            # rows of the (implicit) sample matrix X: one per (s, k) pair
            "mode": mode, "rows": r_rows if mode == "sampled" else r_patches * u.consumer_out,
            "patches": r_patches, "n_keep": n,
            "statistics": _summary(st), "statistics_kernels": [asdict(c) for c in st],
            "statistics_sampled": _summary(st_sampled),
            "selection": _summary(sel), "forward_ls": _summary([forward_ls_cost(u.channels, n)]),
            "forward_prefix": _summary(fwd), "forward_prefix_pruned": _summary(seq_pruned[i]),
            "_st": st, "_st_sampled": st_sampled, "_sel": sel, "_fwd": fwd,
        })

    last = max(trace.consumer_at[c] for c in consumers)
    oneshot_fwd = forward_costs(trace, last, s)
    channels = [u.channels for u in units]
    oneshot_sel = [pad_batch_cost(channels), greedy_cost(channels)] + \
                  [ls_scale_cost(u.channels, n_keep_for(u.channels, keep)) for u in units]
    all_st = [c for r in rows for c in r["_st"]]
    all_st_sampled = [c for r in rows for c in r["_st_sampled"]]
    seq_sel = [c for r in rows for c in r["_sel"]]
    seq_fwd = [c for r in rows for c in r["_fwd"]]
    seq_fwd_pruned = [c for p in seq_pruned for c in p]
    totals = {
        "forward_oneshot": _summary(oneshot_fwd),
        "forward_sequential_unpruned": _summary(seq_fwd),
        "forward_sequential_pruned": _summary(seq_fwd_pruned),
        "forward_full_model": _summary(forward_costs(trace, None, s)),
        "upload_oneshot": _upload(1, s),
        "upload_sequential": _upload(len(units), s),
        "statistics_auto": _summary(all_st),
        "statistics_sampled": _summary(all_st_sampled),
        "selection_oneshot": _summary(oneshot_sel),
        "selection_sequential": _summary(seq_sel),
        "forward_ls_sequential": _summary([forward_ls_cost(u.channels, n_keep_for(u.channels, keep)) for u in units]),
        "forward_replay": _summary([c for p in replay for c in p["_costs"]]),
        "upload_replay": _upload(len(units), s, sum(p["upload_bytes"] for p in replay)),
    }
    for sched, parts in (("sequential", ("forward_sequential_pruned", "upload_sequential", "statistics_auto",
                                         "selection_sequential")),
                         ("sequential_unpruned_prefixes", ("forward_sequential_unpruned", "upload_sequential",
                                                           "statistics_auto", "selection_sequential")),
                         ("sequential_replay", ("forward_replay", "upload_replay", "statistics_auto",
                                                "selection_sequential")),
                         ("oneshot", ("forward_oneshot", "upload_oneshot", "statistics_auto", "selection_oneshot"))):
        totals[f"total_{sched}"] = {"parts": list(parts), "floor_s": {
            d.name: {k: sum(totals[p]["floor_s"][d.name][k] for p in parts) for k in ("fp32", "tc")}
            for d in DEVICES}}
    for r in rows:
        for k in ("_st", "_st_sampled", "_sel", "_fwd"):
            del r[k]
    for p in replay:
        p["forward"] = _summary(p.pop("_costs"))
    return {
        "replay": replay, "replay_memory_gb": replay_memory_gb,
        "model": name, "units": rows, "refused": len(plan.refused), "totals": totals,
        "flops_per_image": prof.flops, "params": prof.params,
        "sampling": asdict(s), "keep": keep,
    }


# ----------------------------------------------------------------------------- printing
def _ms(x: float) -> str:
    return f"{x * 1e3:,.1f}" if x < 10 else f"{x * 1e3:,.0f}"


def _s(x: float) -> str:
    if x < 1:
        return f"{x:.3f}"
    return f"{x:,.2f}" if x < 100 else f"{x:,.0f}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.rjust(w[i]) for i, c in enumerate(cells)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in rows])


def render(res: dict) -> str:
    h, m = H100.name, M40.name
    s = res["sampling"]
    out = [f"### {res['model']}: {len(res['units'])} units ({res['refused']} producers refused), "
           f"{s['images']:,} images x {s['per_image']} locations, batch {s['batch']}, fp32, keep {res['keep']}",
           "",
           "Per unit. stats = the auto-mode kernels + zero count; sel = greedy to C-1 + ls_scale; "
           "fwd = the sequential schedule's forward for this unit (unpruned prefix, stopped at the consumer). "
           "X rows = (s, k) pairs that G sums over (full mode: implicit, every k). Floors in ms (stats, sel) "
           "and s (fwd); fp32 = CUDA cores only, TC = matmul-shaped parts on TF32 tensor cores.", ""]
    head = ("#", "consumer", "C", "t", "K", "out HxW", "mode", "patches S", "X rows", "stats GFLOP", "stats GB",
            "stats H100 ms fp32/TC", "stats M40 ms", "sel H100 ms", "sel M40 ms", "fwd TFLOP", "fwd GB",
            "fwd H100 s fp32/TC", "fwd M40 s")
    rows = []
    for r in res["units"]:
        st, sel, fw = r["statistics"], r["selection"], r["forward_prefix"]
        rows.append((str(r["index"]), r["consumer"], str(r["C"]), str(r["t"]), str(r["K"]),
                     "x".join(map(str, r["out_hw"])), r["mode"], f"{r['patches']:,}", f"{r['rows']:,}",
                     f"{st['flops'] / 1e9:,.1f}", f"{st['bytes'] / 1e9:,.2f}",
                     f"{_ms(st['floor_s'][h]['fp32'])}/{_ms(st['floor_s'][h]['tc'])}", _ms(st["floor_s"][m]["fp32"]),
                     _ms(sel["floor_s"][h]["fp32"]), _ms(sel["floor_s"][m]["fp32"]),
                     f"{fw['flops'] / 1e12:,.1f}", f"{fw['bytes'] / 1e9:,.0f}",
                     f"{_s(fw['floor_s'][h]['fp32'])}/{_s(fw['floor_s'][h]['tc'])}", _s(fw["floor_s"][m]["fp32"])))
    out += [_table(head, rows), ""]
    T = res["totals"]
    labels = [
        ("(a) forward, one-shot (1 pass, to the last consumer)", "forward_oneshot"),
        ("(a) forward, sequential, unpruned prefixes (upper bound)", "forward_sequential_unpruned"),
        (f"(a) forward, sequential, earlier units cut to keep {res['keep']}", "forward_sequential_pruned"),
        ("(a') input upload, one-shot (1 pass)", "upload_oneshot"),
        (f"(a') input upload, sequential ({len(res['units'])} passes)", "upload_sequential"),
        (f"(a) forward, sequential by replay (segments, cache <= {res['replay_memory_gb']:g} GB)", "forward_replay"),
        ("(a') upload, sequential by replay (images or the cache, per pass)", "upload_replay"),
        ("(b) statistics, auto modes (both schedules)", "statistics_auto"),
        ("(b) statistics, if all 'sampled' (paper)", "statistics_sampled"),
        ("(c) selection, one-shot (1 batched greedy + ls_scale)", "selection_oneshot"),
        ("(c) selection, sequential (greedy + ls_scale per unit)", "selection_sequential"),
        ("(c) alt: forward LS (thinet_ls) per unit, not in totals", "forward_ls_sequential"),
    ]
    trows = []
    for label, key in labels:
        t = T[key]
        fl = t.get("flops")
        trows.append((label, "-" if fl is None else f"{fl / 1e12:,.2f}", f"{t['bytes'] / 1e9:,.1f}",
                      _s(t["floor_s"][h]["fp32"]), _s(t["floor_s"][h]["tc"]), _s(t["floor_s"][m]["fp32"])))
    for label, key in (("TOTAL sequential by replay (what schedule='sequential' runs)", "total_sequential_replay"),
                       ("TOTAL sequential re-run from the images (a pruned + a' + b + c)", "total_sequential"),
                       ("TOTAL sequential, unpruned prefixes", "total_sequential_unpruned_prefixes"),
                       ("TOTAL one-shot (a + a' + b + c)", "total_oneshot")):
        f = T[key]["floor_s"]
        trows.append((label, "", "", _s(f[h]["fp32"]), _s(f[h]["tc"]),
                      f"{_s(f[m]['fp32'])} ({f[m]['fp32'] / 60:.1f} min)"))
    out += [_table(("part", "TFLOP", "GB", "H100 s fp32", "H100 s TC", "M40 s"), trows)]
    prow = [(p["consumer"], p["start"], p["cached"] or "-",
             "-" if p["cache_bytes"] is None else f"{p['cache_bytes'] / 1e9:,.1f}",
             f"{p['forward']['flops'] / 1e12:,.2f}", _s(p["forward"]["floor_s"][m]["fp32"]))
            for p in res["replay"]]
    out += ["", "Sequential by replay, per unit: where its pass starts, what it leaves cached (its size; '-' = "
            "none, or over the budget, so the next pass starts from the images).", "",
            _table(("consumer", "pass starts at", "caches", "cache GB", "fwd TFLOP", "fwd M40 s"), prow)]
    return "\n".join(out)


def verdict(results: Sequence[dict], efficiency: tuple[float, float] = (0.4, 0.6)) -> str:
    lo, hi = efficiency
    lines = ["Does 'minutes on an M40-class GPU' hold? Roofline floors are lower bounds, not measurements; "
             f"the ranges assume the kernels reach {lo:.0%}-{hi:.0%} of these peaks (an assumption, typical of "
             "cuDNN convolutions), and 'minutes' is read as under an hour."]
    for res in results:
        T = res["totals"]
        seq = T["total_sequential"]["floor_s"][M40.name]["fp32"]
        sequ = T["total_sequential_unpruned_prefixes"]["floor_s"][M40.name]["fp32"]
        one = T["total_oneshot"]["floor_s"][M40.name]["fp32"]
        fwd_share = T["forward_sequential_pruned"]["floor_s"][M40.name]["fp32"] / seq
        rep = T["total_sequential_replay"]["floor_s"][M40.name]["fp32"]
        rep_h = T["total_sequential_replay"]["floor_s"][H100.name]["tc"]
        worst = sequ / lo
        lines.append(
            f"- {res['model']}: M40 floor {one / 60:.1f} min one-shot, {seq / 60:.1f} min sequential "
            f"({sequ / 60:.1f} min with unpruned prefixes); forward passes are {fwd_share:.0%} of the sequential "
            f"floor. At {lo:.0%}-{hi:.0%} of peak: {one / 60 / hi:.1f}-{one / 60 / lo:.1f} min one-shot, "
            f"{seq / 60 / hi:.1f}-{seq / 60 / lo:.1f} min sequential, at most {worst / 60:.0f} min with unpruned "
            f"prefixes: {'minutes, yes' if worst < 3600 else 'NOT minutes'}. Sequential by replay: M40 floor "
            f"{rep / 60:.1f} min ({rep / one:.2f}x one-shot), H100 TC {rep_h:.1f} s "
            f"(arithmetic only; nothing was timed on a GPU).")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="also write every count and floor to this JSON file")
    p.add_argument("--models", nargs="+", default=["vgg16", "resnet50"], help="torchvision model names")
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--per-image", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--keep", type=float, default=0.5, help="keep fraction of every unit (sequential prefixes, ls_scale)")
    p.add_argument("--replay-memory", type=float, default=64.0, help="GB the replay cache may hold")
    args = p.parse_args(argv)
    s = Sampling(images=args.images, per_image=args.per_image, batch=args.batch)
    print(f"Peaks: {H100.name}: fp32 {H100.fp32 / 1e12:.1f} TF, TF32-TC {H100.tensor / 1e12:.1f} TF, "
          f"fp64 {H100.fp64 / 1e12:.1f} TF, {H100.bandwidth / 1e12:.2f} TB/s, host {H100.host_link / 1e9:.0f} GB/s; "
          f"{M40.name}: fp32 {M40.fp32 / 1e12:.1f} TF, fp64 {M40.fp64 / 1e12:.3f} TF, "
          f"{M40.bandwidth / 1e9:.0f} GB/s, host {M40.host_link / 1e9:.2f} GB/s. Greedy step latency "
          f"{STEP_LATENCY * 1e6:.0f} us (assumed).\n")
    results = []
    for name in args.models:
        res = analyse(name, s, args.keep, args.replay_memory)
        results.append(res)
        print(render(res))
        print()
    print(verdict(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"devices": [asdict(d) for d in DEVICES], "step_latency_s": STEP_LATENCY,
                       "results": results}, f, indent=1)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()

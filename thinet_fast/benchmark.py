"""Selection-speed benchmarks: each fast op against its ``*_ref``, on every backend here.

    rows = thinet_fast.benchmark.run_bench()            # the default grid: seconds on a CPU
    print(thinet_fast.benchmark.format_table(rows))
    thinet_fast.benchmark.write_json(rows, "bench.json")

For each op, problem size and backend the kernel first runs once and is compared with
the pure-torch reference on the same inputs (llm.c ``dev/cuda`` style): a kernel whose
result is wrong is **refused**, its error printed, and it is not timed (``status="wrong"``,
no times). Only then is it warmed up and timed ``repeats`` times (synchronising the GPU
around each call); a row holds the median, the interquartile spread and the minimum.

Ops (``ops=``) on sizes ``(C, batch, m)``: ``"greedy"`` (greedy removal to C-1, the whole
order, on ``batch`` Grams C×C at once, each XᵀX of an (m, C) X built untimed),
``"forward_ls"`` (forward least squares keeping C/2, same problems), ``"gram"`` (the
sampled Gram of a 3x3 conv with K = C filters at m locations, ``batch`` problems in
turn); also ``"moments"`` (patch covariance P, D = 9C) and ``"gram_from_cov"``, the
``statistics="full"`` kernels.

Backends: the op's in ``dispatch.OPS`` that ``backends()`` says can run here, or those
asked for (a missing one gives a row with the reason). ``cpu`` gets host tensors;
``cuda``/``cupy`` CUDA tensors, and ``torch``/``triton`` too when there is a GPU. Triton
without a GPU runs only under ``TRITON_INTERPRET=1`` (set before importing
thinet_fast), far too slowly to time: tiny sizes only, for the checks.

Roofline: on a GPU whose peaks are known (H100, H200, M40), or with ``peak=`` (a
``bench/roofline.py`` ``Device``), rows get the floor of their work from the cost model
of ``bench/roofline.py`` (source checkouts only) and the fraction reached
(floor / median; 1.0 is the roofline).
"""
from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from .ops import dispatch, gram, greedy
from .ops.patches import ConsumerGeometry

__all__ = ["Size", "BenchRow", "BENCH_OPS", "DEFAULT_SIZES", "DEFAULT_OPS", "run_bench", "format_table",
           "write_json", "read_json", "parse_sizes", "roofline_module"]

FORMAT = "thinet-fast-bench/1"


class Size(NamedTuple):
    C: int       # channels
    batch: int   # independent problems
    m: int       # samples (rows of X for the selection ops, sampled locations for the Gram kernels)


DEFAULT_SIZES = (Size(64, 1, 2000), Size(256, 1, 10_000), Size(64, 16, 2000))
DEFAULT_OPS = ("greedy", "forward_ls", "gram")


@dataclass
class BenchRow:
    op: str
    backend: str
    C: int
    batch: int
    m: int
    device: str
    dtype: str
    status: str                         # "ok", "wrong" (refused), "unchecked", "unavailable", "error"
    median_ms: Optional[float] = None
    spread_ms: Optional[float] = None   # interquartile range of the timed calls
    min_ms: Optional[float] = None
    repeats: int = 0
    max_err: Optional[float] = None     # relative to the reference's largest value (inf: wrong indices)
    tol: Optional[float] = None
    floor_ms: Optional[float] = None    # roofline floor of the work
    fraction: Optional[float] = None    # floor / median
    message: str = ""


# ----------------------------------------------------------------- the problems
def _grams(size: Size, device, dtype, g: torch.Generator) -> torch.Tensor:
    """(batch, C, C) Grams of correlated contributions with uneven channel scales: the
    running sum interacts with the candidates, and no two scores tie."""
    out = []
    for _ in range(size.batch):
        X = torch.randn(size.m, size.C, generator=g, dtype=torch.float64)
        X = X * (torch.rand(size.C, generator=g, dtype=torch.float64) + 0.5)
        X += torch.randn(size.m, 8, generator=g, dtype=torch.float64) @ (
            torch.randn(8, size.C, generator=g, dtype=torch.float64) * 0.3)
        out.append(X.T @ X)
    return torch.stack(out).to(device, dtype)


def _conv_problems(size: Size, device, dtype, g: torch.Generator, kernels: bool = True):
    """``batch`` sampled-statistics problems of a 3x3 conv (padding 1) on 8x8 post-ReLU maps."""
    geo, hw, n = ConsumerGeometry.conv(3, 1, 1), 8, max(1, min(64, size.m // 10))
    probs = []
    for _ in range(size.batch):
        x = torch.randn(n, size.C, hw, hw, generator=g).relu().to(device, dtype)
        w = torch.randn(size.C, size.C, 3, 3, generator=g).to(device, dtype) / (3 * size.C ** 0.5)
        img, oy, ox, k = (torch.randint(v, (size.m,), generator=g).to(device) for v in (n, hw, hw, size.C))
        probs.append(dict(x=x, w=w, geo=geo, img=img, oy=oy, ox=ox, k=k))
    if not kernels:
        for p in probs:  # gram_from_cov reads P, built once by the reference
            p["P"] = gram.patch_moments_ref(p["x"], geo, p["img"], p["oy"], p["ox"], acc_dtype=dtype)[0]
    return probs


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    err = float((got.double() - ref.double()).abs().max()) if got.numel() else 0.0
    return err / max(float(ref.double().abs().max()) if ref.numel() else 0.0, 1e-300)


def _indices(got, ref, what: str) -> str:
    """Empty when the index tensors agree, else where they first differ."""
    got, ref = got.cpu(), ref.cpu()
    if got.shape != ref.shape:
        return f"{what} has shape {tuple(got.shape)}, the reference {tuple(ref.shape)}"
    bad = (got != ref).nonzero()
    if not len(bad):
        return ""
    b, j = bad[0].tolist()
    return f"{what} differs from the reference in {len(bad)} places, first at problem {b}, step {j}: " \
           f"{int(got[b, j])} instead of {int(ref[b, j])}"


def _compare_pair(what: str):
    def compare(out, ref):  # (indices, values): indices exactly, values to the tolerance
        msg = _indices(out[0], ref[0], what)
        return (float("inf"), msg) if msg else (_rel(out[1], ref[1]), "")
    return compare


def _compare_list(out, ref):
    return max(_rel(a, b) for a, b in zip(out, ref)), ""


@dataclass(frozen=True)
class BenchOp:
    """One benchmarked op: its problems, the kernel on a backend, the reference, how the
    two are compared (max relative error, message if indices differ) and its work in
    the roofline cost model (``bench/roofline.py``)."""

    name: str
    dispatch_op: str
    make: Callable
    run: Callable        # (problem, backend) -> output
    ref: Callable        # problem -> output
    compare: Callable    # (output, reference) -> (max error, message)
    costs: Callable      # (roofline module, size, dtype) -> list of Cost


def _n_keep(C: int) -> int:
    return max(1, C // 2)


def _sampling(R, dtype):
    b = torch.finfo(dtype).bits // 8
    return R.Sampling(act_bytes=b, acc_bytes=b)


def _sampled_costs(R, s, dtype):
    return [R.sampled_gram_cost(s.C, 9, s.m, s.m, _sampling(R, dtype)) for _ in range(s.batch)]


def _full_costs(i):
    return lambda R, s, dtype: [R.full_costs(s.C, 9, s.C, s.m, _sampling(R, dtype))[i] for _ in range(s.batch)]


def _ls_costs(R, s, dtype):
    c = R.forward_ls_cost(s.C, _n_keep(s.C))  # one block per problem, all in one launch
    return [R.Cost(c.name, fp64_flops=c.fp64_flops * s.batch, bytes=c.bytes * s.batch, blocks=s.batch,
                   serial_steps=c.serial_steps)]


BENCH_OPS: dict[str, BenchOp] = {op.name: op for op in (
    BenchOp("greedy", "greedy_remove", _grams,
            lambda G, b: greedy.greedy_remove(G, G.shape[-1] - 1, return_errors=True, backend=b),
            lambda G: greedy.greedy_remove_ref(G, G.shape[-1] - 1, return_errors=True),
            _compare_pair("the removal order"),
            lambda R, s, dtype: [R.greedy_cost([s.C] * s.batch, torch.finfo(dtype).bits // 8)]),
    BenchOp("forward_ls", "greedy_keep_ls", _grams,
            lambda G, b: greedy.greedy_keep_ls(G, _n_keep(G.shape[-1]), return_weights=True, backend=b),
            lambda G: greedy.greedy_keep_ls_ref(G, _n_keep(G.shape[-1]), return_weights=True),
            _compare_pair("the kept set"), _ls_costs),
    BenchOp("gram", "sampled_gram", _conv_problems,
            lambda ps, b: [gram.sampled_gram(p["x"], p["w"], p["geo"], p["img"], p["oy"], p["ox"], p["k"],
                                             acc_dtype=p["x"].dtype, backend=b) for p in ps],
            lambda ps: [gram.sampled_gram_ref(p["x"], p["w"], p["geo"], p["img"], p["oy"], p["ox"], p["k"],
                                              acc_dtype=p["x"].dtype) for p in ps],
            _compare_list, _sampled_costs),
    BenchOp("moments", "patch_moments", _conv_problems,
            lambda ps, b: [gram.patch_moments(p["x"], p["geo"], p["img"], p["oy"], p["ox"], acc_dtype=p["x"].dtype,
                                              backend=b)[0] for p in ps],
            lambda ps: [gram.patch_moments_ref(p["x"], p["geo"], p["img"], p["oy"], p["ox"],
                                               acc_dtype=p["x"].dtype)[0] for p in ps],
            _compare_list, _full_costs(0)),
    BenchOp("gram_from_cov", "gram_from_cov", lambda s, d, t, g: _conv_problems(s, d, t, g, kernels=False),
            lambda ps, b: [gram.gram_from_cov(p["w"], p["P"], backend=b) for p in ps],
            lambda ps: [gram.gram_from_cov_ref(p["w"], p["P"]) for p in ps],
            _compare_list, _full_costs(1)),
)}


# ----------------------------------------------------------------- where and how fast
def _device(backend: str) -> torch.device:
    gpu = torch.cuda.is_available()
    if backend in ("cuda", "cupy") or (backend in ("torch", "triton") and gpu):
        return torch.device("cuda")
    return torch.device("cpu")


def _tolerance(op: str, dtype: torch.dtype) -> float:
    # float32 statistics sum up to 10^5 products in another order than the reference
    if dtype == torch.float64:
        return 1e-9
    return 1e-4 if op in ("greedy", "forward_ls") else 2e-4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def roofline_module():
    """``bench/roofline.py`` (the cost model and device peaks), or None outside a source
    checkout."""
    try:
        from bench import roofline  # noqa: F401 - run from the repository root
        return roofline
    except ImportError:
        pass
    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "roofline.py"
    if not path.is_file():
        return None
    if "thinet_fast_bench_roofline" in sys.modules:
        return sys.modules["thinet_fast_bench_roofline"]
    spec = importlib.util.spec_from_file_location("thinet_fast_bench_roofline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


def _gpu_peak(R):
    """The roofline ``Device`` of the GPU in hand, if its model is known (SXM peaks)."""
    words = torch.cuda.get_device_name().split() if torch.cuda.is_available() else []
    if "H200" in words:  # H200 SXM: the H100's SMs and clocks, HBM3e at 4.8 TB/s
        return R.Device("H200 SXM", fp32=66.9e12, tensor=494.7e12, fp64=66.9e12, bandwidth=4.8e12, sms=132,
                        host_link=64e9)
    return next((d for d in R.DEVICES if any(w in words for w in d.name.split() if w[-1].isdigit())), None)


# ----------------------------------------------------------------- the run
def run_bench(sizes: Sequence = DEFAULT_SIZES, backends: Optional[Sequence[str]] = None,
              ops: Sequence[str] = DEFAULT_OPS, repeats: int = 5, *, warmup: int = 1, check: bool = True,
              dtype: torch.dtype = torch.float32, seed: int = 0, peak=None,
              log: Optional[Callable[[str], None]] = print) -> list[BenchRow]:
    """Check, then time, every op in ``ops`` on every size and backend. Returns one
    :class:`BenchRow` per (op, size, backend).

    Args:
        sizes: ``(C, batch, m)`` triples (or :class:`Size`).
        backends: names to run (default: every backend the op has that can run here;
            triton only on a GPU).
        repeats, warmup: timed calls, and untimed calls before them (after the check).
        check: compare with the reference first and refuse a wrong kernel; False times
            unchecked (``status="unchecked"``).
        dtype: float32 (the pipeline's statistics) or float64.
        peak: a ``bench/roofline.py`` ``Device`` for the floors of every row (default:
            the GPU's, when known, for the rows on the GPU; none on the CPU).
        log: called with each row as it is done and with every refusal (None: quiet).
    """
    unknown = [o for o in ops if o not in BENCH_OPS]
    if unknown:
        raise ValueError(f"unknown ops {unknown}; choose from {sorted(BENCH_OPS)}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
    if backends is not None and any(b not in dispatch.BACKEND_NAMES for b in backends):
        raise ValueError(f"backends must be among {dispatch.BACKEND_NAMES}; got {list(backends)}")
    if int(repeats) < 1 or int(warmup) < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0; got {repeats}, {warmup}")
    sizes = [Size(*map(int, s)) for s in sizes]
    if any(s.C < 2 or s.batch < 1 or s.m < 1 for s in sizes):
        raise ValueError(f"sizes need C >= 2, batch >= 1, m >= 1; got {sizes}")
    info = dispatch.backends()
    R = roofline_module() if peak is not None or torch.cuda.is_available() else None
    gpu_peak = _gpu_peak(R) if peak is None and R is not None else None
    rows = []
    for name in ops:
        op = BENCH_OPS[name]
        supported, dtypes = dispatch.OPS[op.dispatch_op]
        # by default triton runs on a GPU only: the interpreter would take hours on the grid
        wanted = [b for b in supported if b in backends] if backends is not None else \
            [b for b in supported if info[b] and (b != "triton" or torch.cuda.is_available())]
        for size in sizes:
            for backend in wanted:
                floor = peak if peak is not None else (gpu_peak if _device(backend).type == "cuda" else None)
                row = _one(op, size, backend, info[backend], dtypes, dtype, seed, check, int(repeats), int(warmup),
                           R, floor, log)
                rows.append(row)
                if log is not None:
                    log(format_table([row], header=False))
    return rows


def _one(op, size, backend, info, dtypes, dtype, seed, check, repeats, warmup, R, peak, log) -> BenchRow:
    device = _device(backend)
    row = BenchRow(op.name, backend, size.C, size.batch, size.m, device.type, str(dtype).replace("torch.", ""),
                   "unavailable")
    if not info:
        row.message = info.reason
        return row
    if dtype not in dtypes.get(backend, (dtype,)):
        row.message = f"{op.dispatch_op} on {backend} accumulates in {dtypes[backend]} only"
        return row
    g = torch.Generator().manual_seed(seed * 1_000_003 + size.C * 7919 + size.batch * 104_729 + size.m)
    problem = op.make(size, device, dtype, g)

    def call():
        return op.run(problem, backend)

    try:
        if check:
            row.tol = _tolerance(op.name, dtype)
            row.max_err, msg = op.compare(call(), op.ref(problem))
            if msg or not row.max_err <= row.tol:
                row.status = "wrong"
                row.message = msg or f"max relative error {row.max_err:.3g} > tolerance {row.tol:g}"
                if log is not None:
                    log(f"REFUSED {op.name} on {backend} (C={size.C}, batch={size.batch}, m={size.m}): "
                        f"{row.message}; not timed")
                return row
        times = _time(call, device, repeats, warmup)
    except Exception as exc:  # a kernel that raises is reported, the others still run
        row.status, row.message = "error", f"{type(exc).__name__}: {exc}"
        if log is not None:
            log(f"ERROR {op.name} on {backend} (C={size.C}, batch={size.batch}, m={size.m}): {row.message}")
        return row
    row.status = "ok" if check else "unchecked"
    row.repeats, row.median_ms, row.min_ms = repeats, statistics.median(times), min(times)
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    row.spread_ms = q[2] - q[0]
    if R is not None and peak is not None:
        row.floor_ms = R.floor_sum(op.costs(R, size, dtype), peak, tensor_cores=False) * 1e3
        row.fraction = row.floor_ms / row.median_ms if row.median_ms > 0 else None
        row.message = f"floor on {peak.name}"
    return row


# ----------------------------------------------------------------- output
def _fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    return format(v, spec) if math.isfinite(v) else str(v)


def format_table(rows: Sequence[BenchRow], header: bool = True) -> str:
    """Rows as an aligned text table."""
    head = ("op", "backend", "device", "C", "batch", "m", "median ms", "spread", "min ms", "max err", "floor ms",
            "of floor", "status", "note")
    body = [(r.op, r.backend, r.device, str(r.C), str(r.batch), str(r.m), _fmt(r.median_ms, ".3f"),
             _fmt(r.spread_ms, ".3f"), _fmt(r.min_ms, ".3f"), _fmt(r.max_err, ".1e"), _fmt(r.floor_ms, ".4f"),
             "-" if r.fraction is None else f"{100 * r.fraction:.1f}%", r.status, r.message) for r in rows]
    table = ([head] if header else []) + body
    widths = [max([len(h) for h in head][i:i + 1] + [len(t[i]) for t in table]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip() for t in table)


def _encode(v):
    return v if not isinstance(v, float) or math.isfinite(v) else repr(v)  # strict JSON has no inf/nan


def _decode(v, kind):
    return float(v) if isinstance(v, str) and kind is not str else v


def write_json(rows: Sequence[BenchRow], path, meta: Optional[dict] = None) -> None:
    """Write ``{"format", "meta", "rows"}`` (meta: torch version, threads, device, backends)."""
    meta = dict(meta or {})
    meta.setdefault("torch", torch.__version__)
    meta.setdefault("threads", torch.get_num_threads())
    meta.setdefault("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    meta.setdefault("backends", {k: v.reason for k, v in dispatch.backends().items()})
    data = {"format": FORMAT, "meta": meta, "rows": [{k: _encode(v) for k, v in asdict(r).items()} for r in rows]}
    pathlib.Path(path).write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")


def read_json(path) -> list[BenchRow]:
    """The rows of a :func:`write_json` file."""
    data = json.loads(pathlib.Path(path).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (format={data.get('format')!r})")
    kinds = {f.name: f.type for f in fields(BenchRow)}
    return [BenchRow(**{k: _decode(v, str if kinds[k] in ("str", str) else float) for k, v in r.items()})
            for r in data["rows"]]


def parse_sizes(text: str) -> list[Size]:
    """``"64x1x2000,256x16x10000"`` -> sizes (C x batch x m), for the command line."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        bits = part.lower().split("x")
        if len(bits) != 3 or not all(b.isdigit() for b in bits):
            raise ValueError(f"size {part!r} is not CxBATCHxM (e.g. 256x1x10000)")
        out.append(Size(*map(int, bits)))
    if not out:
        raise ValueError("no sizes given")
    return out

"""thinet_fast.benchmark: every timed kernel is first checked against its reference,
a wrong one is refused (not timed), rows round-trip through JSON."""
import json
import os
import subprocess
import sys

import pytest
import torch

from thinet_fast import benchmark as B
from thinet_fast.ops import dispatch, gram, greedy

SIZES = [(16, 1, 200), (24, 3, 300)]


def host_backends():
    return [b for b in ("torch", "cpu") if dispatch.backends()[b]]


def test_rows_for_the_host_backends_checked_and_timed():
    log = []
    rows = B.run_bench(SIZES, backends=host_backends(), repeats=3, log=log.append)
    print(B.format_table(rows))
    want = {(op, b, s) for op in B.DEFAULT_OPS for s in SIZES for b in host_backends()
            if b in dispatch.OPS[B.BENCH_OPS[op].dispatch_op][0]}
    assert {(r.op, r.backend, (r.C, r.batch, r.m)) for r in rows} == want
    for r in rows:
        assert r.status == "ok" and r.device == "cpu" and r.repeats == 3, r
        assert 0 < r.min_ms <= r.median_ms and r.spread_ms >= 0
        assert r.max_err <= r.tol and r.floor_ms is None  # no roofline on the CPU
    assert len(log) == len(rows)
    table = B.format_table(rows)
    assert all(op in table for op in B.DEFAULT_OPS)


def test_a_wrong_removal_order_is_refused_and_not_timed(monkeypatch):
    calls = []
    real = greedy._greedy_remove_impl

    def broken_impl(backend):
        core = real(backend)

        def swapped(G, sizes, n):  # the right channels, two of them in the wrong order
            calls.append(1)
            order, errors = core(G, sizes, n)
            order[:, [0, 1]] = order[:, [1, 0]]
            return order, errors
        return swapped

    monkeypatch.setattr(greedy, "_greedy_remove_impl", broken_impl)
    log = []
    (row,) = B.run_bench([(16, 1, 200)], backends=["torch"], ops=["greedy"], repeats=4, warmup=2, log=log.append)
    print("\n".join(log))
    assert row.status == "wrong" and "removal order" in row.message and row.max_err == float("inf")
    assert row.median_ms is None and row.repeats == 0
    assert len(calls) == 1, "a refused kernel must run once (the check), never in the timing loop"
    assert any(line.startswith("REFUSED greedy on torch") for line in log)


def test_a_small_value_error_is_refused_unless_unchecked(monkeypatch):
    real = gram.sampled_gram
    monkeypatch.setattr(gram, "sampled_gram", lambda *a, **k: real(*a, **k) * (1 + 1e-3))
    (row,) = B.run_bench([(16, 1, 200)], backends=["torch"], ops=["gram"], repeats=2, log=None)
    print(row)
    assert row.status == "wrong" and row.median_ms is None
    assert row.tol < row.max_err < 2e-3 and "tolerance" in row.message
    (row,) = B.run_bench([(16, 1, 200)], backends=["torch"], ops=["gram"], repeats=2, check=False, log=None)
    assert row.status == "unchecked" and row.median_ms > 0 and row.max_err is None


def test_json_round_trip(tmp_path):
    rows = B.run_bench([(16, 2, 200)], backends=["torch"], ops=["greedy", "gram"], repeats=2, log=None)
    rows.append(B.BenchRow("greedy", "cuda", 16, 2, 200, "cuda", "float32", "wrong", max_err=float("inf"),
                           tol=1e-4, message="the removal order differs"))
    path = tmp_path / "bench.json"
    B.write_json(rows, path, meta={"note": "test"})

    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")
    data = json.loads(path.read_text(), parse_constant=no_constants)  # strict JSON: no Infinity
    assert data["format"] == B.FORMAT and data["meta"]["note"] == "test" and "torch" in data["meta"]
    back = B.read_json(path)
    print(B.format_table(back))
    assert back == rows
    path.write_text(json.dumps({"format": "other", "rows": []}))
    with pytest.raises(ValueError, match="not a"):
        B.read_json(path)


def test_roofline_floor_and_fraction_with_a_given_peak():
    R = B.roofline_module()
    if R is None:
        pytest.skip("bench/roofline.py is not in this checkout")
    rows = B.run_bench([(16, 2, 200)], backends=["torch"], ops=["greedy", "forward_ls", "gram"], repeats=2,
                       peak=R.H100, log=None)
    want = {"greedy": R.greedy_cost([16, 16], 4).floor(R.H100),
            "forward_ls": R.Cost("ls", fp64_flops=2 * R.forward_ls_cost(16, 8).fp64_flops,
                                 bytes=2 * R.forward_ls_cost(16, 8).bytes, blocks=2, serial_steps=8).floor(R.H100),
            "gram": 2 * R.sampled_gram_cost(16, 9, 200, 200).floor(R.H100)}
    for r in rows:
        print(r.op, r.floor_ms, want[r.op] * 1e3, r.fraction)
        assert r.floor_ms == pytest.approx(want[r.op] * 1e3, rel=1e-12)
        assert r.fraction == pytest.approx(r.floor_ms / r.median_ms) and "H100" in r.message


def test_missing_backend_and_bad_arguments():
    if dispatch.backends()["cuda"]:
        pytest.skip("this machine has the cuda backend")
    (row,) = B.run_bench([(16, 1, 100)], backends=["cuda"], ops=["greedy"], log=None)
    assert row.status == "unavailable" and row.message == dispatch.backends()["cuda"].reason
    with pytest.raises(ValueError, match="unknown ops"):
        B.run_bench(ops=["nope"])
    with pytest.raises(ValueError, match="sizes"):
        B.run_bench([(1, 1, 10)])
    assert B.parse_sizes("64x1x2000, 256x16x10000") == [B.Size(64, 1, 2000), B.Size(256, 16, 10000)]
    with pytest.raises(ValueError, match="CxBATCHxM"):
        B.parse_sizes("64x2000")


def test_triton_rows_under_the_interpreter():
    """Triton without a GPU: a fresh interpreter with TRITON_INTERPRET=1 (set before
    triton is imported), tiny sizes; the timings mean nothing, the checks do."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("on a GPU the triton rows come from the ordinary run")
    code = ("import json, thinet_fast.benchmark as B\n"
            "rows = B.run_bench([(8, 2, 64)], backends=['triton'], ops=['greedy', 'gram'], repeats=1, warmup=0, "
            "log=None)\n"
            "print(json.dumps([[r.op, r.backend, r.status, r.max_err, r.tol, r.message] for r in rows]))\n")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    print(out.stdout, out.stderr[-2000:])
    assert out.returncode == 0
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert [(op, b, s) for op, b, s, *_ in rows] == [("greedy", "triton", "ok"), ("gram", "triton", "ok")]
    assert all(err <= tol for *_, err, tol, _ in rows)

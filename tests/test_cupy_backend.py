"""The cupy/NVRTC path (thinet_fast.ops.cupy_backend).

The pure-Python parts (source assembly, NVRTC options, launch geometry, argument
packing) are tested on the CPU. Where the NVRTC library is importable (cuda-bindings,
which CUDA builds of torch pull in) the assembled source is compiled for real, without a
GPU. The launch tests need cupy and a CUDA device and are skipped otherwise.
"""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from thinet_fast.ops import cupy_backend as cb
from thinet_fast.ops.greedy import _greedy_keep_ls_core_ref, _greedy_remove_core_ref


# ------------------------------------------------------------------ sources
def test_import_does_not_need_cupy():
    code = ("import sys; import thinet_fast.ops.cupy_backend as m; "
            "print('cupy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    print("cupy imported by the module:", out.stdout.strip())
    assert out.stdout.strip() == "False"


def test_find_source_dir_has_all_files():
    d = cb.find_source_dir()
    print("kernel sources in", d)
    for f in cb.KERNEL_FILES:
        assert (d / f).is_file()


def test_find_source_dir_reports_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        cb.find_source_dir([tmp_path])


def test_source_env_override(tmp_path, monkeypatch):
    for f in cb.KERNEL_FILES:
        (tmp_path / f).write_text(f"// {f}\n")
    monkeypatch.setenv(cb.SOURCE_ENV, str(tmp_path))
    assert cb.source_dirs()[0] == tmp_path
    assert cb.find_source_dir() == tmp_path


def test_load_source_inlines_core_once():
    src = cb.load_source()
    assert '#include "greedy_core.cuh"' not in src
    assert not re.search(r"#\s*pragma\s+once", src)
    assert src.count("// ---- begin greedy_core.cuh") == 1
    assert src.index("greedy_remove_scan") < src.index("tf_greedy_remove_kernel")
    for name in ("tf_greedy_remove_kernel", "tf_keep_ls_kernel", "argmin_better", "keep_ls_update"):
        assert name in src
    # system headers of the core are guarded for NVRTC
    assert "#if !defined(__CUDACC_RTC__)" in src


def test_assemble_source_nested_cycle_missing():
    files = {"a.cuh": '#pragma once\n#include "b.cuh"\n#include "c.cuh"\nint a;\n',
             "b.cuh": '#pragma once\n#include "c.cuh"\nint b;\n',
             "c.cuh": "#pragma once\n#include <cmath>\nint c;\n"}
    out = cb.assemble_source(files, entry="a.cuh")
    print(out)
    assert out.count("int c;") == 1
    assert out.index("int c;") < out.index("int b;") < out.index("int a;")
    assert "#include <cmath>" in out  # system include left alone
    with pytest.raises(ValueError, match="cycle"):
        cb.assemble_source({"x.cuh": '#include "y.cuh"\n', "y.cuh": '#include "x.cuh"\n'}, entry="x.cuh")
    with pytest.raises(KeyError, match="nope.cuh"):
        cb.assemble_source({"x.cuh": '#include "nope.cuh"\n'}, entry="x.cuh")


def test_nvrtc_options_and_kernel_names():
    opts = cb.nvrtc_options(("-lineinfo",))
    print(opts)
    assert "--std=c++17" in opts and opts[-1] == "-lineinfo"
    assert not any("fast-math" in o or "fast_math" in o for o in opts)  # greedy must stay exact
    assert not any(o.startswith(("-arch", "--gpu-architecture")) for o in opts)  # cupy picks it
    assert cb.kernel_names(torch.float32) == {"remove": "tf::tf_greedy_remove_kernel<float>",
                                              "keep_ls": "tf::tf_keep_ls_kernel<float>"}
    assert cb.kernel_names(np.dtype(np.float64))["remove"] == "tf::tf_greedy_remove_kernel<double>"
    assert cb.kernel_names("float64")["keep_ls"] == "tf::tf_keep_ls_kernel<double>"
    with pytest.raises(ValueError):
        cb.kernel_names(torch.float16)


# ------------------------------------------------------------ launch geometry
def test_block_size():
    assert [cb.block_size(c) for c in (1, 32, 33, 64, 100, 512, 513, 10000)] == [32, 32, 64, 64, 128, 512, 512, 512]


def test_remove_launch_config_shared_and_global():
    B, C = 13, 512
    cfg = cb.remove_launch_config(B, C, 8, smem_limit=48 * 1024)
    print(cfg)
    assert cfg.grid == (13, 1, 1) and cfg.block == (512, 1, 1)
    assert cfg.use_smem and cfg.shared_mem == 2 * 512 * 8 + 512 and cfg.ws_bytes == 1
    big = cb.remove_launch_config(B, 20000, 8, smem_limit=227 * 1024)
    print(big)
    assert not big.use_smem and big.shared_mem == 0
    assert big.ws_stride % 256 == 0 and big.ws_stride >= cb.greedy_remove_scratch_bytes(20000, 8)
    assert big.ws_bytes == B * big.ws_stride
    forced = cb.remove_launch_config(B, C, 4, smem_limit=0)
    assert not forced.use_smem and forced.ws_bytes == B * forced.ws_stride


def test_keep_ls_launch_config():
    cfg = cb.keep_ls_launch_config(3, 100, 40)
    print(cfg)
    assert cfg.grid == (3, 1, 1) and cfg.block == (128, 1, 1) and cfg.shared_mem == 0
    assert cfg.ws_stride % 256 == 0
    assert cfg.ws_stride >= 8 * (100 * 40 + 3 * 100 + 2 * 40) + 100
    assert cfg.ws_bytes == 3 * cfg.ws_stride


# ------------------------------------------------------------- argument packing
_CTYPE_TO_NUMPY = {"long long": np.int64, "int": np.int32, "double": np.float64}


def _kernel_params(src: str, name: str) -> list[str]:
    m = re.search(r"__global__\s+void\s+" + name + r"\s*\((.*?)\)\s*\{", src, re.S)
    assert m, f"kernel {name} not found"
    return [" ".join(p.split()) for p in m.group(1).split(",")]


def _check_packing(params: list[str], args: tuple):
    print(list(zip(params, [type(a).__name__ for a in args])))
    assert len(params) == len(args)
    for p, a in zip(params, args):
        if "*" in p:
            assert isinstance(a, np.ndarray), f"{p} should be an array, got {type(a)}"
        else:
            ctype = re.sub(r"\s+\w+$", "", p.replace("const ", "")).strip()
            assert type(a) is _CTYPE_TO_NUMPY[ctype], f"{p} packed as {type(a)}"


def test_pack_remove_args_match_kernel_signature():
    src = cb.load_source()
    cfg = cb.remove_launch_config(2, 16, 8, smem_limit=0)
    arr = np.zeros(1)
    args = cb.pack_remove_args(arr, 16, arr, arr, 5, arr, arr, arr, cfg)
    _check_packing(_kernel_params(src, "tf_greedy_remove_kernel"), args)
    assert args[1] == 16 and args[4] == 5 and args[-2] == cfg.ws_stride and args[-1] == 0


def test_pack_keep_ls_args_match_kernel_signature():
    src = cb.load_source()
    cfg = cb.keep_ls_launch_config(2, 16, 5)
    arr = np.zeros(1)
    args = cb.pack_keep_ls_args(arr, 16, arr, arr, 5, 1e-8, arr, arr, arr, cfg)
    _check_packing(_kernel_params(src, "tf_keep_ls_kernel"), args)
    assert args[5] == 1e-8 and args[-1] == cfg.ws_stride


# --------------------------------------------------------------- NVRTC compile
_NVRTC_SCRIPT = r"""
import sys
from cuda.bindings import nvrtc
import thinet_fast.ops.cupy_backend as cb
ok = nvrtc.nvrtcResult.NVRTC_SUCCESS
src = cb.load_source()
err, prog = nvrtc.nvrtcCreateProgram(src.encode(), b"thinet_fast_greedy.cu", 0, [], [])
assert err == ok, err
names = [n for dt in ("float32", "float64") for n in cb.kernel_names(dt).values()]
for n in names:
    assert nvrtc.nvrtcAddNameExpression(prog, n.encode())[0] == ok, n
opts = [o.encode() for o in cb.nvrtc_options(("--gpu-architecture=compute_75",))]
res = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
err, size = nvrtc.nvrtcGetProgramLogSize(prog)
log = b" " * size
nvrtc.nvrtcGetProgramLog(prog, log)
print("NVRTC:", res, log.decode(errors="replace").strip())
assert res == ok, res
for n in names:
    err, lowered = nvrtc.nvrtcGetLoweredName(prog, n.encode())
    assert err == ok and lowered, n
nvrtc.nvrtcDestroyProgram(prog)
print("compiled", len(names), "kernels")
"""


def test_nvrtc_compiles_source_without_gpu():
    """Compile the assembled source with NVRTC (no device needed) for the oldest arch
    CUDA 13 supports, and resolve every kernel name expression. Runs in a child process:
    loading NVRTC into the test process upsets later torch.load calls."""
    pytest.importorskip("cuda.bindings.nvrtc")
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", _NVRTC_SCRIPT], capture_output=True, text=True, timeout=300)
    print(proc.stdout, proc.stderr[-2000:])
    assert proc.returncode == 0
    assert "compiled" in proc.stdout


# ------------------------------------------------------------------ GPU launch
def _cupy_or_skip():
    cupy = pytest.importorskip("cupy")
    try:
        if not cupy.cuda.is_available():
            pytest.skip("cupy has no CUDA device")
    except Exception as exc:  # no driver
        pytest.skip(f"cupy has no CUDA device ({exc})")
    return cupy


def _batch(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([3, 64, 130, 257], dtype=torch.int64)
    cmax = int(sizes.max())
    G = torch.zeros(len(sizes), cmax, cmax, dtype=dtype)
    for j, c in enumerate(sizes.tolist()):
        X = torch.randn(3 * c, c, generator=gen, dtype=torch.float64)
        G[j, :c, :c] = (X.T @ X).to(dtype)
    return G, sizes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("max_shared", [None, 0])
def test_cupy_remove_bit_exact_torch_tensors(dtype, max_shared):
    _cupy_or_skip()
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    G, sizes = _batch(dtype)
    n = sizes.clone()
    n[1] = 10
    o_ref, e_ref = _greedy_remove_core_ref(G, sizes, n)
    o, e = cb.greedy_remove_cupy(G.cuda(), sizes, n, max_shared_bytes=max_shared)
    torch.cuda.synchronize()
    o, e = o.cpu(), e.cpu()
    fin = torch.isfinite(e_ref)
    print(f"cupy {dtype}: order mismatches {int((o != o_ref).sum())}, "
          f"max |errors - ref| = {(e[fin] - e_ref[fin]).abs().max().item():.3e}")
    assert torch.equal(o, o_ref) and torch.equal(e, e_ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cupy_keep_ls_torch_tensors(dtype):
    _cupy_or_skip()
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    G, sizes = _batch(dtype, seed=1)
    n = torch.tensor([2, 30, 100, 128])
    k_ref, w_ref = _greedy_keep_ls_core_ref(G, sizes, n, 1e-8)
    k, w = cb.greedy_keep_ls_cupy(G.cuda(), sizes, n, 1e-8)
    torch.cuda.synchronize()
    k, w = k.cpu(), w.cpu()
    print(f"cupy keep_ls {dtype}: order mismatches {int((k != k_ref).sum())}, "
          f"max |w - ref| = {(w - w_ref).abs().max().item():.3e}")
    assert torch.equal(k, k_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-7, atol=1e-9)


def test_cupy_arrays_in_cupy_out():
    cupy = _cupy_or_skip()
    G, sizes = _batch(torch.float64, seed=2)
    o_ref, e_ref = _greedy_remove_core_ref(G, sizes, sizes - 1)
    o, e = cb.greedy_remove_cupy(cupy.asarray(G.numpy()), sizes.numpy(), (sizes - 1).numpy())
    assert isinstance(o, cupy.ndarray)
    print("cupy arrays: order mismatches", int((cupy.asnumpy(o) != o_ref.numpy()).sum()))
    assert np.array_equal(cupy.asnumpy(o), o_ref.numpy())
    assert np.array_equal(cupy.asnumpy(e), e_ref.numpy())

"""Test-wide settings, applied before any test module imports triton (torchvision
imports it), so the Triton kernels run in the CPU interpreter when there is no GPU."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


def _triton_interpreter_ready() -> bool:
    """Without a GPU, triton's kernels run only if they (and triton.language's own @jit
    helpers) were decorated under TRITON_INTERPRET=1."""
    if torch.cuda.is_available():
        return True
    try:
        import triton.language.standard as std
        from triton.runtime.interpreter import InterpretedFunction

        from thinet_fast.ops.triton import gram as tri_gram
    except Exception:
        return False
    return tri_gram.interpreted() and isinstance(std.zeros, InterpretedFunction)


def _have_fmnist() -> bool:
    from thinet_fast.data import fashion_mnist_root
    try:
        fashion_mnist_root()
        return True
    except FileNotFoundError:
        return False


# .ci/run installs it; elsewhere the tests that read real images skip with the fix
needs_fmnist = pytest.mark.skipif(not _have_fmnist(), reason="apt-get install dataset-fashion-mnist")


def backend_runs(name: str) -> bool:
    """True if backend ``name`` can run kernels in this process."""
    from thinet_fast.ops import dispatch

    if not dispatch.backends()[name]:
        return False
    return name != "triton" or _triton_interpreter_ready()


@pytest.fixture
def random_gram():
    """``random_gram(C, dtype=torch.float64, seed=0, samples=None)``: a PSD Gram XᵀX of
    a random (samples, C) matrix (samples = 2C + 3 by default: full rank)."""
    def make(C, dtype=torch.float64, seed=0, samples=None):
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(samples or 2 * C + 3, C, generator=g, dtype=torch.float64)
        return (X.T @ X).to(dtype)
    return make


def write_image_folder(root, classes, per_class: int, size: int, seed: int = 0):
    """An ImageNet-layout folder of random RGB PNGs: ``root/<class>/<i>.png``."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            px = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(root / c / f"{i}.png")
    return root


class Preempted(Exception):
    """A job killed mid-run (raised by :class:`StopAfter`)."""


class StopAfter(torch.utils.data.Dataset):
    """``ds``, but the (n+1)-th item raises: a job killed while loading a batch."""

    def __init__(self, ds, n):
        self.ds, self.left = ds, n

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        if self.left == 0:
            raise Preempted
        self.left -= 1
        return self.ds[i]


def _gloo_entry(rank, world, init_file, fn, args):
    import sys

    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        fn(rank, world, *args)
        dist.barrier()  # no rank tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()
    # gloo's worker threads can abort the process during interpreter finalisation
    # (pytorch/pytorch#179291); the work and the teardown are done, so skip it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_gloo(fn, world: int, tmp_path, *args):
    """Run ``fn(rank, world, *args)`` in ``world`` processes joined by a gloo group;
    an error in any rank fails the caller with that rank's traceback."""
    import torch.multiprocessing as mp
    init = tmp_path / f"gloo-init-{fn.__name__}"
    mp.spawn(_gloo_entry, args=(world, str(init), fn, args), nprocs=world, join=True)

"""Triton kernels (optional): fused sampled Gram, patch moments, G from the patch
covariance, and batched greedy removal (DESIGN.md §9).

Layout: ``gram.py`` (sampled Gram), ``cov.py`` (patch moments, gram_from_cov),
``greedy.py`` (greedy removal). Each kernel file names its ``*_ref`` twin in
``thinet_fast.ops``.

Importing this package never fails: when triton itself cannot be imported the entry
points below raise ImportError, with the way to get triton, only when called. On a
machine without a GPU set ``TRITON_INTERPRET=1`` before importing thinet_fast to run
the kernels in triton's interpreter (slow; for tests).
"""
from __future__ import annotations

__all__ = ["sampled_gram_triton", "patch_moments_triton", "gram_from_cov_triton",
           "greedy_remove_triton", "AVAILABLE", "IMPORT_ERROR"]

try:
    import triton as _triton  # noqa: F401
except Exception as _exc:  # ImportError, or a broken install
    AVAILABLE = False
    IMPORT_ERROR: BaseException | None = _exc
else:
    AVAILABLE = True
    IMPORT_ERROR = None

if AVAILABLE:
    from .gram import sampled_gram_triton
    from .cov import patch_moments_triton, gram_from_cov_triton
    from .greedy import greedy_remove_triton
else:
    def _missing(name: str):
        def fn(*args, **kwargs):
            raise ImportError(
                f"{name} needs triton, which is not importable here ({type(IMPORT_ERROR).__name__}: "
                f"{IMPORT_ERROR}). Install triton (it ships with CUDA builds of torch), or use backend='torch'.")
        fn.__name__ = name
        return fn

    sampled_gram_triton = _missing("sampled_gram_triton")
    patch_moments_triton = _missing("patch_moments_triton")
    gram_from_cov_triton = _missing("gram_from_cov_triton")
    greedy_remove_triton = _missing("greedy_remove_triton")

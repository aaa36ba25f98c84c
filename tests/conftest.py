"""Test-wide settings, applied before any test module imports triton (torchvision
imports it), so the Triton kernels run in the CPU interpreter when there is no GPU."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""Shared test setup.

Without a CUDA device the Triton kernels run in the Triton interpreter on CPU
tensors; ``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function
is defined (i.e. before ``triton_kernels`` modules are imported), so it is set
here, ahead of every test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""Kernel-test set-up: without CUDA, run the Triton kernels under TRITON_INTERPRET=1, set before Triton is imported."""

from __future__ import annotations

import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when vim_kernels.triton_scan is first imported;
# vim_kernels imports that module lazily, so setting the variable here (collection time) is early enough.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

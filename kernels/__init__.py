"""vim_kernels: selective-scan (S6) kernels for Vision Mamba -- reference, PyTorch and Triton backends."""

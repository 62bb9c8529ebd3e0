"""mamba_ssm's CUDA selective scan, compiled from its source distribution, for side-by-side timings with ours.

mamba_ssm publishes sources only and its full build (every architecture, every op) takes the better part of an
hour. The scan benchmark needs one thing from it, the `selective_scan_cuda` extension, so this compiles just that
for the local GPU's architecture (a few minutes with 16 cores) from an unpacked sdist (the source archive
`mamba_ssm-<version>.tar.gz` of https://pypi.org/project/mamba-ssm/#files):

    python tools/mamba_ssm_cuda.py --src mamba_ssm-2.3.2.post1.tar.gz --build /tmp/mamba_build   # build + check

`scan_fn(build_dir)` then returns mamba_ssm's selective scan: the installed package's when `mamba_ssm` imports,
else the checked build in `build_dir` (benchmarks/scan.py takes `--mamba-build DIR`). `selective_scan_fn` drives
the extension as mamba_ssm's own interface does (same argument order, same saved tensors, B/C given as one group).
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import time
from pathlib import Path

import torch

_EXT = None
CHECKED = "CHECKED"  # written into the build folder once main() has checked the build
# mamba_ssm's setup.py flags for its CUDA sources (the architecture comes from TORCH_CUDA_ARCH_LIST)
_NVCC_FLAGS = [
    "-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__", "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
]  # fmt: skip


def build(src: str | Path, build_dir: str | Path, verbose: bool = False):
    """Compile (or reuse, ninja is incremental) selective_scan_cuda from an unpacked mamba_ssm sdist."""
    global _EXT
    from torch.utils.cpp_extension import load as load_ext

    csrc = Path(src) / "csrc" / "selective_scan"
    if not (csrc / "selective_scan.cpp").is_file():
        raise FileNotFoundError(f"{csrc}/selective_scan.cpp not found: --src must be an unpacked mamba_ssm sdist")
    major, minor = torch.cuda.get_device_capability()
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # this GPU only
    Path(build_dir).mkdir(parents=True, exist_ok=True)
    sources = [str(csrc / "selective_scan.cpp"), *sorted(str(p) for p in csrc.glob("selective_scan_*.cu"))]
    _EXT = load_ext(
        name="selective_scan_cuda", sources=sources, extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=_NVCC_FLAGS, extra_include_paths=[str(csrc)], build_directory=str(build_dir),
        verbose=verbose,
    )  # fmt: skip
    return _EXT


def load(build_dir: str | Path | None, wait_s: float = 0.0):
    """The built extension from `build_dir`, or None when there is none (the benchmarks then skip mamba_ssm).
    A build counts once main() has checked it (its CHECKED marker); wait_s: how long to wait for one in progress."""
    global _EXT
    if _EXT is None and build_dir:
        marker = Path(build_dir) / CHECKED
        deadline = time.monotonic() + wait_s
        while not marker.is_file() and time.monotonic() < deadline:
            time.sleep(5)
        if marker.is_file():
            sys.path.insert(0, str(build_dir))
            import selective_scan_cuda

            _EXT = selective_scan_cuda
    return _EXT


class _SelectiveScanCuda(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        # the kernel wants unit stride along L; B, C as one group: (batch, 1, N, L)
        u, delta, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (u, delta, B, C))
        z = z if z is None or z.stride(-1) == 1 else z.contiguous()
        B, C = B.unsqueeze(1), C.unsqueeze(1)
        out, x, *rest = _EXT.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        ctx.delta_softplus = delta_softplus
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, x, out)
        return rest[0] if z is not None else out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, x, out = ctx.saved_tensors
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        du, ddelta, dA, dB, dC, dD, ddb, *rest = _EXT.bwd(
            u, delta, A, B, C, D, z, delta_bias, dout, x, out if z is not None else None, None, ctx.delta_softplus,
            False,
        )  # fmt: skip
        return (du, ddelta, dA, dB.squeeze(1), dC.squeeze(1), dD if D is not None else None,
                rest[0] if z is not None else None, ddb if delta_bias is not None else None, None)  # fmt: skip


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba_ssm's selective scan. u, delta, z: (batch, dim, L); A: (dim, N) fp32; B, C: (batch, N, L)."""
    if _EXT is None:
        raise RuntimeError("mamba_ssm's selective_scan_cuda is not loaded: call build() or load() first")
    return _SelectiveScanCuda.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def scan_fn(build_dir: str | Path | None = None, wait_s: float = 0.0):
    """mamba_ssm's `selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)`: from an installed
    mamba_ssm, else from the checked build in `build_dir`; None when neither is there."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as installed

        return installed
    except Exception:  # noqa: BLE001 - not installed, or an install that does not import: none
        pass
    return selective_scan_fn if load(build_dir, wait_s) is not None else None


def _check() -> float:
    """Largest relative error of the outputs and gradients against vim_kernels' fp32 reference."""
    import vim_kernels as vk

    g = torch.Generator(device="cuda").manual_seed(0)
    b, d, L, n = 2, 64, 197, 16
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    inputs = dict(u=rnd(b, d, L), delta=rnd(b, d, L) * 0.5, A=-torch.exp(rnd(d, n)), B=rnd(b, n, L), C=rnd(b, n, L),
                  D=rnd(d), z=rnd(b, d, L), delta_bias=rnd(d) * 0.1)  # fmt: skip
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    refs = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out = selective_scan_fn(**leaves, delta_softplus=True)
    ref = vk.selective_scan_ref(**refs, delta_softplus=True)
    go = torch.randn_like(ref)
    gs = torch.autograd.grad(out, list(leaves.values()), go)
    rs = torch.autograd.grad(ref, list(refs.values()), go)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    return max([rel(out, ref), *(rel(a, b) for a, b in zip(gs, rs))])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="the mamba_ssm sdist: its .tar.gz or the folder it unpacks to")
    p.add_argument("--build", required=True, help="build folder (reused by later calls)")
    args = p.parse_args()
    src = Path(args.src)
    if src.is_file():  # the archive: unpacked into the build folder
        with tarfile.open(src) as archive:
            archive.extractall(Path(args.build) / "src", filter="data")
        src = next((Path(args.build) / "src").glob("mamba_ssm-*"))
    build(src, args.build, verbose=True)
    err = _check()
    print(f"mamba_ssm selective_scan_cuda built in {args.build}; max rel. error vs vim_kernels' reference {err:.2e}")
    if not err < 1e-3:
        raise SystemExit("mamba_ssm's kernel disagrees with the reference: check the wrapper")
    (Path(args.build) / CHECKED).write_text(f"max rel. error {err:.2e}\n")


if __name__ == "__main__":
    main()

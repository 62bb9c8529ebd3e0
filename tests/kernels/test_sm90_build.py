"""Every Triton kernel, with the launch options the GPU defaults choose, builds for an H100 (sm_90) on this machine
without a GPU: the fast math, L2 prefetch and register-cap code that the interpreter tests never take compiles
through ptxas (tests/kernels/sm90_build.py does the building)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import vim_kernels as vk

HERE = Path(__file__).resolve().parent
KERNELS = Path(vk.__file__).resolve().parent


def has_ptxas() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            ptxas = get_ptxas(90)
        except TypeError:  # triton before 3.7 takes no architecture
            ptxas = get_ptxas()
        return Path(ptxas.path).is_file()
    except Exception:  # noqa: BLE001 - no NVIDIA backend in this triton build
        return False


pytestmark = pytest.mark.skipif(not (vk.HAS_TRITON and has_ptxas()), reason="needs triton with its NVIDIA backend")


def launched_kernels() -> set[str]:
    """The @triton.jit functions of kernels/ that are launched (named *_kernel), read from the sources."""
    names = set()
    for path in KERNELS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                if any("jit" in ast.unparse(d) for d in node.decorator_list):
                    names.add(node.name)
    return names


@pytest.fixture(scope="module")
def build() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(HERE / "sm90_build.py")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_launched_kernel_builds_for_sm90(build) -> None:
    built = {b["kernel"] for b in build["built"]}
    assert launched_kernels() <= built, f"never built: {launched_kernels() - built}"
    assert all(b["cubin_bytes"] > 0 for b in build["built"])


def test_the_gpu_only_options_are_the_ones_built(build) -> None:
    scans = [b for b in build["built"] if b["kernel"].startswith("_scan_")]
    assert scans and all(b["FAST"] for b in scans)  # the inline-PTX math, never taken under the interpreter
    fwd = [b for b in scans if b["kernel"].startswith("_scan_fwd")]
    assert {b["PREFETCH"] for b in fwd} == {0, 16}  # large grids without, small grids with the L2 prefetch
    assert {b["FINAL"] for b in fwd if b["kernel"] == "_scan_fwd_split_kernel"} == {False, True}
    assert {b["DTRP"] > 0 for b in fwd} == {False, True}  # delta formed in the scan (inference) and read (training)
    bwd = [b for b in scans if b["kernel"] == "_scan_bwd_seq_kernel"]
    assert {(b["T"], b["SUBS"]) for b in bwd} >= {(4, 1), (8, 2)} and any(b["SEGC"] > 0 for b in bwd)
    configs = [c["config"] for c in build["cases"]]
    assert {c["max_regs"] for c in configs} == {vk.ScanConfig().max_regs}  # the backward's register cap is set

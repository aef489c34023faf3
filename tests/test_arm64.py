"""64-bit ARM: scripts/arm64.sh --light (docs/arm64.md) as a test.

Not in the default run: it needs root (it installs debootstrap, qemu-user-static and binfmt-support, mounts /proc in an
arm64 Debian root and chroots into it), Debian's mirror and PyPI the first time, and about ten minutes under
emulation once the root exists (the first build of the root takes longer). Run it with
``LORA_EDGE_ARM64=1 python -m pytest -q tests/test_arm64.py``; the full check is ``sudo scripts/arm64.sh``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(os.environ.get("LORA_EDGE_ARM64") != "1",
                                reason="the arm64 emulation check is slow and needs root: set LORA_EDGE_ARM64=1")  # fmt: skip


def test_arm64_light_subset_passes():
    """The tiny packages (fp32, int8, int4, and int4 with w8a8 branches on the native kernel) run in the arm64 root as
    on x86, and the kernel's NEON builds (with and without SDOT) and its portable build pass the operator tests."""
    run = subprocess.run(["bash", str(ROOT / "scripts" / "arm64.sh"), "--light"], capture_output=True, text=True, check=False)
    out = run.stdout
    assert run.returncode == 0, out[-6000:] + run.stderr[-2000:]
    summary = out[out.index("arm64 summary") :]
    assert " 0 failed" in summary and "FAIL" not in summary
    for must in ("aarch64 python", "tiny-fp32 [none]: max|logits - x86|", "tiny-int4 [qv_r4]: KL vs PyTorch",
                 "tiny-int4-native on k-armv8-a+nosimd.so", "-march=armv8.2-a+dotprod on emulated max",
                 "-march=armv8-a on emulated cortex-a72", "picks -march=armv8-a on an emulated cortex-a72"):  # fmt: skip
        assert must in summary, must

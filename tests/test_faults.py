"""Faults: an export killed with SIGKILL at any moment leaves no package or the previous one intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lora_edge
from lora_edge.package.store import read_manifest

EXPORT = r"""
import sys
from lora_edge.config import AdapterSpec, ExportConfig, QuantConfig, WeightType
from lora_edge.compile.pipeline import export
export(ExportConfig(base=sys.argv[1], output=sys.argv[2], force=True, adapters=(AdapterSpec("x", sys.argv[3]),),
                    quant=QuantConfig(weights=WeightType(sys.argv[4]))))
print("done", flush=True)
"""
ROOT = Path(__file__).resolve().parents[1]


def _export_proc(base, out, adapter, quant="int4"):
    """The export in a child process (this checkout's lora_edge, through PYTHONPATH), to be killed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", EXPORT, str(base), str(out), str(adapter), quant], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip


def _full_run_seconds(base, out, adapter) -> float:
    t = time.perf_counter()
    p = _export_proc(base, out, adapter)
    assert p.wait(120) == 0
    return time.perf_counter() - t


@pytest.mark.parametrize("previous", [False, True])
def test_sigkill_during_export_leaves_no_half_package(tiny_base, tiny_adapters, tmp_path, previous):
    adapter = tiny_adapters["qv_r4"]
    out = tmp_path / "pkg"
    total = _full_run_seconds(tiny_base, out, adapter)  # also leaves a complete package behind
    before = (out / "manifest.json").read_bytes()
    if not previous:
        import shutil

        shutil.rmtree(out)
    # kill at several moments spread over the run: importing, loading, quantizing, writing, renaming
    for frac in (0.15, 0.35, 0.55, 0.7, 0.8, 0.9, 0.97):
        p = _export_proc(tiny_base, out, adapter)
        time.sleep(total * frac)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if out.exists():
            m = lora_edge.load(out)  # every checksum verified: complete, never half-written
            assert m.adapters == ["x"]
            if previous:
                # either the previous package or a complete new one (byte-identical: exports are deterministic)
                assert (out / "manifest.json").read_bytes() == before
        else:
            assert not previous, "the previous package was lost"
    # a later export cleans the temporaries the killed ones could not
    p = _export_proc(tiny_base, out, adapter)
    assert p.wait(120) == 0
    assert sorted(x.name for x in tmp_path.iterdir()) == ["pkg"]
    assert read_manifest(out).adapters.keys() == {"x"}  # every checksum verified
    assert lora_edge.load(out).forward([[1, 2, 3]], adapter="x").shape == (1, 3, 320)

"""`lora-edge profile`: latency and memory of a package, per adapter, under the limits of a device.

:func:`profile` returns a :class:`ProfileReport` (plain data); :func:`render` and :func:`plot` present it. Device
side: no torch, no transformers, no onnx. The modules, by concern:

- ``config``: the workload, the limits, presets of limits;
- ``run``: the parent: check the packages, plan and run the measuring children, collect;
- ``child``: the child process and its protocol (``python -m lora_edge.profile``);
- ``sandbox``: the child's memory limit (cgroup or RSS watchdog), CPU affinity, resident memory, machine facts;
- ``measure``: what the child measures (timings, memory, ONNX Runtime's profiler, the sweeps);
- ``report``: the result's data, JSON and CSV; ``text`` and ``chart``: the tables and the PNG.
"""

from __future__ import annotations

from .chart import plot
from .config import Limits, ProfileConfig, Workload, limits_from_preset, load_presets
from .report import (
    SCHEMA,
    DoesNotFit,
    MemoryFigures,
    OpShare,
    PackageFacts,
    Percentiles,
    ProfileReport,
    RunFigures,
    Spread,
    SweepPoint,
)
from .run import Progress, profile
from .text import render

__all__ = [
    "SCHEMA",
    "DoesNotFit",
    "Limits",
    "MemoryFigures",
    "OpShare",
    "PackageFacts",
    "Percentiles",
    "ProfileConfig",
    "ProfileReport",
    "Progress",
    "RunFigures",
    "Spread",
    "SweepPoint",
    "Workload",
    "limits_from_preset",
    "load_presets",
    "plot",
    "profile",
    "render",
]

"""What to profile and under which limits: the workload, the device's limits (or a preset of them), the packages."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .sandbox import usable_cpus

DATA = Path(__file__).resolve().parent.parent / "data"  # lora_edge/data: presets.toml, verify_text.txt
PRESET_KEYS = ("threads", "memory_mib", "provider", "affinity", "description")


@dataclass(frozen=True)
class Workload:
    prompt_tokens: tuple[int, ...] = (128,)  # several: a context-length sweep
    new_tokens: int = 64
    batch: int = 1
    warmup: int = 1
    runs: int = 3

    def __post_init__(self) -> None:
        if not self.prompt_tokens or any(not isinstance(n, int) or n < 1 for n in self.prompt_tokens):
            raise InputError(f"prompt lengths must be positive integers, got {self.prompt_tokens}")
        if self.new_tokens < 2:
            raise InputError(f"new tokens must be at least 2 (one prefill, one decode step), got {self.new_tokens}")
        if self.batch < 1 or self.warmup < 0 or self.runs < 1:
            raise InputError("batch and runs must be >= 1 and warmup >= 0")


@dataclass(frozen=True)
class Limits:
    threads: tuple[int, ...] = (1,)  # several: a thread sweep
    affinity: tuple[int, ...] | None = None  # CPU ids the child may run on
    memory_mib: int | None = None
    provider: str | None = None  # None: the package's target decides (cuda packages: CUDA when installed)

    def __post_init__(self) -> None:
        if not self.threads or any(not isinstance(t, int) or t < 1 for t in self.threads):
            raise InputError(f"threads must be positive integers, got {self.threads}")
        if self.memory_mib is not None and self.memory_mib < 16:
            raise InputError(f"a memory limit of {self.memory_mib} MiB is too small to start Python; give at least 16")
        if self.affinity is not None:
            allowed = set(usable_cpus())
            bad = sorted(set(self.affinity) - allowed)
            if not self.affinity or bad:
                raise InputError(f"CPU affinity {list(self.affinity)} names CPUs this process may not use ({bad}); allowed: {sorted(allowed)}")


@dataclass(frozen=True)
class ProfileConfig:
    packages: tuple[Path, ...]
    adapters: tuple[str, ...] | None = None  # None: the base ("none") and every adapter of each package
    workload: Workload = Workload()
    limits: Limits = Limits()
    op_profile: bool = True
    ranks: tuple[int, ...] = ()  # rank sweep: synthetic adapters of these ranks on every LoRA slot
    adapter_counts: tuple[int, ...] = ()  # memory sweep: this many adapters loaded at once

    def __post_init__(self) -> None:
        if not self.packages:
            raise InputError("give at least one package to profile")
        if any(r < 1 for r in self.ranks) or any(c < 0 for c in self.adapter_counts):
            raise InputError("ranks must be >= 1 and adapter counts >= 0")


def load_presets(extra: Path | None = None) -> dict[str, dict]:
    """Built-in presets, then ~/.config/lora-edge/presets.toml, $LORA_EDGE_PRESETS and ``extra`` (later wins)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    files = [DATA / "presets.toml", Path.home() / ".config" / "lora-edge" / "presets.toml"]
    if os.environ.get("LORA_EDGE_PRESETS"):
        files.append(Path(os.environ["LORA_EDGE_PRESETS"]))
    if extra is not None:
        if not extra.is_file():
            raise InputError(f"presets file {extra} does not exist")
        files.append(extra)
    presets: dict[str, dict] = {}
    for f in files:
        if not f.is_file():
            continue
        try:
            data = tomllib.loads(f.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise InputError(f"presets file {f} is not valid TOML: {exc}") from None
        for name, p in data.get("presets", {}).items():
            unknown = set(p) - set(PRESET_KEYS)
            if unknown:
                raise InputError(f"preset {name!r} in {f} has unknown keys {sorted(unknown)}; allowed: {', '.join(PRESET_KEYS)}")
            presets[name] = {**p, "source": str(f)}
    return presets


def limits_from_preset(name: str, presets: dict[str, dict]) -> Limits:
    if name not in presets:
        raise InputError(f"unknown preset {name!r}; known: {', '.join(sorted(presets)) or 'none'}")
    p = presets[name]
    threads = p.get("threads", 1)
    return Limits(threads=tuple(threads) if isinstance(threads, list) else (threads,), memory_mib=p.get("memory_mib"),
                  provider=p.get("provider"), affinity=tuple(p["affinity"]) if p.get("affinity") else None)  # fmt: skip

"""Typed, validated options. Built once from the CLI or by a Python caller; never a dict of strings."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

# An adapter name becomes a file name (adapters/NAME.onnx_adapter) and a CLI token.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_adapter_name(name: str) -> str:
    if not _SAFE_NAME.match(name) or name.endswith(".") or ".." in name:
        raise InputError(
            f"adapter name {name!r} is not a safe file name; use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name


class Mode(str, enum.Enum):
    """How adapters reach the graph."""

    BRANCH = "branch"  # low-rank branches with overridable A/B inputs; adapters switch per call
    MERGE = "merge"  # W + s*B*A folded into the weights; one adapter, no branches


@dataclass(frozen=True)
class AdapterSpec:
    """One ``--adapter NAME=PATH``."""

    name: str
    path: Path

    def __post_init__(self) -> None:
        check_adapter_name(self.name)

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        """Parse ``NAME=PATH``; a bare PATH takes the directory's name."""
        name, sep, path = text.partition("=")
        if not sep:
            path, name = text, Path(text.rstrip("/\\")).name
        if not path:
            raise InputError(f"--adapter {text!r} has no path; write NAME=PATH, e.g. pirate=adapters/pirate")
        return cls(name=name, path=Path(path))


@dataclass(frozen=True)
class ExportConfig:
    base: Path
    output: Path
    adapters: tuple[AdapterSpec, ...] = ()
    mode: Mode = Mode.BRANCH
    force: bool = False
    opset: int = 17
    # Default rank of the "no adapter" branch inputs. 1 (zeros) works on every provider;
    # 0 (empty tensors) skips the tiny matmuls but is reported to fail on CUDA/DirectML.
    null_rank: int = 1
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        names = [a.name for a in self.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise InputError(f"adapter name {dupes[0]!r} is given twice; give every --adapter a distinct NAME")
        if self.mode is Mode.MERGE and len(self.adapters) != 1:
            raise InputError(
                f"--mode merge folds exactly one adapter into the weights, got {len(self.adapters)}; "
                "run one export per adapter, or use --mode branch to keep them switchable"
            )
        if self.null_rank not in (0, 1):
            raise InputError(f"null_rank must be 0 or 1, got {self.null_rank}")
        if not 14 <= self.opset <= 21:
            raise InputError(f"opset must be between 14 and 21, got {self.opset}")

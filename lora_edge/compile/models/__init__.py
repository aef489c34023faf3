"""Architecture families. Each family module knows one kind of model; generic code asks the registry.

Adding a family touches one place: write ``models/<family>.py`` with a ``FAMILY`` object and list it
in ``_FAMILY_MODULES`` below.
"""

from __future__ import annotations

import importlib
from typing import Protocol

from ...errors import ModelError
from ..graph.options import GraphOptions
from .spec import BaseModel, DecoderSpec, LinearModule, Slot

_FAMILY_MODULES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gpt2", "bert")


class Family(Protocol):
    name: str
    architectures: tuple[str, ...]

    def spec_from_hf(self, hf_model) -> tuple[DecoderSpec, "object"]: ...

    def linear_modules(self, spec: DecoderSpec) -> dict[str, LinearModule]: ...

    def other_modules(self, spec: DecoderSpec) -> frozenset[str]: ...

    def groups(self, spec: DecoderSpec, fused: bool) -> list[tuple[str, tuple[str, ...]]]: ...

    def build_graph(self, base: BaseModel, weights: dict, slots: dict[str, Slot], options: GraphOptions): ...


def family_for(architecture: str) -> Family:
    for mod_name in _FAMILY_MODULES:
        fam = importlib.import_module(f"{__name__}.{mod_name}").FAMILY
        if architecture in fam.architectures:
            return fam
    supported = sorted(a for m in _FAMILY_MODULES for a in importlib.import_module(f"{__name__}.{m}").FAMILY.architectures)
    raise ModelError(
        f"architecture {architecture!r} is not supported yet (supported: {', '.join(supported)}); "
        "see the README for the list of families"
    )


__all__ = ["BaseModel", "DecoderSpec", "Family", "LinearModule", "Slot", "family_for"]

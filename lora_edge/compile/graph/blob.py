"""Which branches a w8a8 package keeps in its one blob input, and in what order: one rule, read by the graph
(each such branch's node takes its part by index) and by the exporter (which writes each adapter's blob)."""

from __future__ import annotations

from ...native.contract import Q8X_WIDTH
from ...package.manifest import EMBEDDING
from ..models.spec import Slot


def blob_slots(slots: dict[str, Slot], lora_kernel: str, lora_dtype: str) -> list[Slot]:
    """With ``--lora-kernel native --lora-dtype w8a8``, every slot but the embedding's whose B chunks (or
    outputs) are a whole number of 16-column vectors, in the blob's order; the others keep int8's own inputs."""
    if lora_kernel != "native" or lora_dtype != "w8a8":
        return []
    return [s for s in slots.values() if s.name != EMBEDDING and (s.chunk_width or s.out_features) % Q8X_WIDTH == 0]


def blob_geometry(slot: Slot) -> tuple[int, int]:
    """(chunks, c) of a slot's B in the blob: its chunks and their width, or one chunk of all its outputs."""
    return (len(slot.chunk_modules), slot.chunk_width) if slot.chunk_width else (1, slot.out_features)

"""The adapters a loaded package can use: those shipped in it, and those loaded on the device at run time (an
.onnx_adapter file, or a PEFT directory converted with numpy), at any strength or blended, per call.

Readers never lock: the set is replaced, not changed, so a call in flight keeps the tensors it started with. A
combination (a strength, a blend) is prepared once and cached until the set changes."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping

import numpy as np
import onnxruntime as ort

from ..adapters.blend import blend, stack
from ..adapters.peft import PackageModules, read_adapter
from ..adapters.storage import Storage
from ..config import Mode, check_adapter_name
from ..errors import InputError, RuntimeInputError
from ..package.manifest import INVOCATION_TOKENS, Manifest

AdapterChoice = str | Mapping[str, float] | None  # a name, {name: weight, ...} (a blend), or None (the base)
Tensors = Mapping[str, ort.OrtValue]
CACHED_COMBINATIONS = 16


class AdapterSet:
    def __init__(self, manifest: Manifest, storage: Storage, device: str) -> None:
        self.manifest, self.storage, self.device = manifest, storage, device
        self._lock = threading.Lock()
        self._tensors: dict[str, dict[str, ort.OrtValue]] = {}
        self._invocations: dict[str, tuple[int, ...]] = {}  # activated adapters' invocation tokens
        self._combined: OrderedDict[Hashable, Any] = OrderedDict()  # blends and banks
        self._shipped: dict[str, Path] = {}  # the package's own adapters not read yet
        self._reading = threading.Lock()
        self.generation = 0  # changes whenever the set does: bindings made before are stale

    @property
    def names(self) -> list[str]:
        return sorted({*self._tensors, *self._shipped})

    def ship(self, name: str, path: Path) -> None:
        """One of the package's own adapter files, checked now and read when a call first chooses it: a package that
        ships many adapters holds in memory the ones in use."""
        self.storage.check_file(path, name)
        self._shipped = {**self._shipped, name: path}

    # -- choosing ---------------------------------------------------------------------------
    def key(self, adapter: AdapterChoice, scale: float = 1.0) -> Hashable:
        """A hashable, checked form of a choice: None, a name (at strength 1), or ((name, weight), ...) sorted."""
        if adapter is None:
            if scale != 1.0:
                raise RuntimeInputError("scale needs an adapter; the base model has no strength to set")
            return None
        weights = {adapter: 1.0} if isinstance(adapter, str) else dict(adapter)
        if not weights:
            raise RuntimeInputError("an adapter blend needs at least one adapter, e.g. {'pirate': 0.7, 'shout': 0.3}")
        for name, w in weights.items():
            self._known(name)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise RuntimeInputError(f"the weight of adapter {name!r} must be a finite number, got {w!r}")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise RuntimeInputError(f"scale must be a finite number, got {scale!r}")
        items = tuple(sorted((n, float(w) * float(scale)) for n, w in weights.items()))
        activated = [n for n, _ in items if n in self._invocations]
        if activated and len(items) > 1:
            raise RuntimeInputError(f"adapter {activated[0]!r} is an activated LoRA (it applies from its invocation tokens on); "
                                    "it cannot be blended with other adapters")  # fmt: skip
        return items[0][0] if len(items) == 1 and items[0][1] == 1.0 else items

    def invocation(self, key: Hashable) -> tuple[int, ...] | None:
        """The invocation tokens of the activated adapter a :meth:`key` chooses, or None."""
        if key is None:
            return None
        return self._invocations.get(key if isinstance(key, str) else key[0][0])

    def tensors(self, key: Hashable) -> Tensors:
        """The tensors to bind for a :meth:`key`."""
        if key is None:
            return {}
        if isinstance(key, str):
            return self._known(key)
        return self._cached(key, lambda: self._values(blend([(n, self._arrays(n), w) for n, w in key], self.storage)))

    def bank(self, keys: tuple[Hashable, ...]) -> tuple[Tensors, int]:
        """The tensors that serve rows of the choices ``keys`` (:meth:`key`s, none of them None) in one call, and the rank
        each choice has in them (adapters.blend.stack); a package without the row mask, an activated adapter, DoRA or
        a replaced module is refused by name. Cached as combinations are."""
        if self.manifest.graph.row_mask is None:
            raise RuntimeInputError("this package's graph runs one adapter per call; export it with standard-op branches "
                                    "(--lora-kernel onnx, --mixed-batches) to batch rows of different adapters")  # fmt: skip
        activated = [k for k in keys if self.invocation(k)]
        if activated:
            raise RuntimeInputError(f"adapter {label(activated[0])!r} is an activated LoRA; it runs in batches of its own")

        def make() -> tuple[Tensors, int]:
            tensors, rank = stack([(label(k), {n: v.numpy() for n, v in self.tensors(k).items()}) for k in keys], self.storage)
            return self._values(tensors), rank

        return self._cached(("bank", keys), make)

    def _cached(self, key: Hashable, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._combined:
                self._combined.move_to_end(key)
                return self._combined[key]
        value = make()
        with self._lock:
            self._combined[key] = value
            while len(self._combined) > CACHED_COMBINATIONS:
                self._combined.popitem(last=False)
        return value

    def _arrays(self, name: str) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self._known(name).items()}

    def _known(self, name: str) -> Tensors:
        tensors = self._tensors.get(name)
        if tensors is None and name in self._shipped:
            tensors = self._read_shipped(name)
        if tensors is None:
            if self.manifest.mode is Mode.MERGE and name in self.manifest.adapters:
                raise RuntimeInputError(f"adapter {name!r} is merged into this package's weights; run without --adapter")
            raise RuntimeInputError(f"unknown adapter {name!r}; this package has: {', '.join(self.names) or 'none'}")
        return tensors

    def _read_shipped(self, name: str) -> Tensors | None:
        """Read a shipped adapter (once, whichever thread asks first). Nothing made before depends on it: the set's
        generation stays, and other adapters' bindings and combinations with them stay valid."""
        with self._reading:
            if name in self._shipped:
                tensors = dict(self.storage.read(self._shipped[name], name))
                tokens = invocation_tokens(tensors)
                values = self._values(tensors)
                with self._lock:
                    self._tensors = {**self._tensors, name: values}
                    self._invocations = {**self._invocations, **({name: tokens} if tokens else {})}
                    self._shipped = {k: v for k, v in self._shipped.items() if k != name}
        return self._tensors.get(name)

    # -- changing ---------------------------------------------------------------------------
    def add(self, name: str, tensors: Mapping[str, np.ndarray | ort.OrtValue]) -> None:
        """Make ``tensors`` (graph input name -> array, as an adapter file holds them) usable as ``adapter=name``."""
        check_adapter_name(name)
        shapes = {k: tuple(v.shape() if isinstance(v, ort.OrtValue) else v.shape) for k, v in tensors.items()}
        self.storage.check("tensors", name, shapes)
        self._set(name, tensors)

    def load(self, name: str, path: Path) -> None:
        """Load an .onnx_adapter file compiled for this package, or a PEFT adapter directory (converted here)."""
        path = Path(path)
        check_adapter_name(name)
        if path.is_dir():
            adapter = read_adapter(name, path, PackageModules.of(self.manifest))
            self.storage.fit(adapter)
            self.add(name, self.storage.tensors(adapter))
        elif path.is_file():
            self._set(name, self.storage.read(path, name))
        else:
            raise InputError(f"adapter {name!r}: {path} does not exist; give an .onnx_adapter file or a PEFT adapter directory")

    def remove(self, name: str) -> None:
        self._known(name)
        with self._lock:
            self._tensors = {k: v for k, v in self._tensors.items() if k != name}  # new dicts: readers never see one change
            self._shipped = {k: v for k, v in self._shipped.items() if k != name}
            self._invocations = {k: v for k, v in self._invocations.items() if k != name}
            self._changed()

    def _set(self, name: str, tensors: Mapping) -> None:
        tensors = dict(tensors)
        tokens = invocation_tokens(tensors)
        values = self._values(tensors)
        with self._lock:
            self._tensors = {**self._tensors, name: values}
            self._invocations = {**{k: v for k, v in self._invocations.items() if k != name}, **({name: tokens} if tokens else {})}
            self._shipped = {k: v for k, v in self._shipped.items() if k != name}  # (replaced before it was read)
            self._changed()

    def _changed(self) -> None:
        self._combined.clear()
        self.generation += 1

    def _values(self, tensors: Mapping) -> dict[str, ort.OrtValue]:
        return {k: v if isinstance(v, ort.OrtValue) and self.device == "cpu"
                else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy() if isinstance(v, ort.OrtValue) else v), self.device, 0)
                for k, v in tensors.items()}  # fmt: skip


def invocation_tokens(tensors: dict) -> tuple[int, ...] | None:
    """Take an activated adapter's invocation tokens out of its ``tensors`` (they are not a graph input)."""
    tokens = tensors.pop(INVOCATION_TOKENS, None)
    if tokens is None:
        return None
    return tuple(int(t) for t in (tokens.numpy() if isinstance(tokens, ort.OrtValue) else tokens))


def label(key: Hashable) -> str:
    """A :meth:`AdapterSet.key` as the text parse_choice reads: 'base', 'pirate', 'pirate@0.7+shout@0.3'."""
    if key is None:
        return "base"
    return key if isinstance(key, str) else "+".join(f"{n}@{w:g}" for n, w in key)


def parse_choice(text: str) -> AdapterChoice:
    """An adapter choice written as text (the CLI's and profile's): 'none' -> None; 'pirate' -> 'pirate';
    'pirate@0.5' -> {'pirate': 0.5}; 'a@0.7+b@0.3' -> {'a': 0.7, 'b': 0.3}."""
    if text.lower() == "none":
        return None
    if "@" not in text and "+" not in text:
        return text
    weights = {}
    for part in text.split("+"):
        name, _, weight = part.partition("@")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise InputError(f"--adapter {text!r}: {weight!r} is not a number; write NAME@STRENGTH, e.g. pirate@0.5") from None
    return weights

"""A shipped package's adapter set as something a device can change: add an adapter compiled against the package's
own slots and storage (``model.onnx`` untouched), or remove one. Each change writes a new manifest and replaces the
package in one rename, so a kill at any point leaves the old package intact."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import InputError
from ..package.manifest import AdapterInfo, Manifest
from ..package.store import read_manifest, updated_package, write_manifest
from .peft import Adapter, ModuleTable, PackageModules, read_adapter
from .storage import Storage


def add_adapter(package: Path, name: str, source: Path, base: ModuleTable | None = None, replace: bool = False) -> Manifest:
    """Compile the PEFT adapter at ``source`` for ``package`` as ``name``. ``base``: the package's base model, for
    the features whose conversion needs its float weights (DoRA, trained biases, modules_to_save)."""
    manifest = read_manifest(package)
    if name in manifest.adapters and not replace:
        raise InputError(f"{package} already has an adapter {name!r}; choose another NAME, or pass --force to replace it")
    if base is None and not manifest.modules:
        raise InputError(f"{package} does not list its base's modules (written by an older lora-edge); pass --base BASE")
    adapter = read_adapter(name, source, base if base is not None else PackageModules.of(manifest))
    storage = Storage.of(manifest)
    storage.fit(adapter)
    tensors = storage.tensors(adapter)
    file = f"adapters/{name}.onnx_adapter"
    with updated_package(package, leave_out=(file,)) as tmp:
        (tmp / "adapters").mkdir(exist_ok=True)
        storage.write(tmp / file, tensors)
        return write_manifest(tmp, _with_adapter(manifest, adapter, file))


def remove_adapter(package: Path, name: str) -> Manifest:
    manifest = read_manifest(package)
    info = manifest.adapters.get(name)
    if info is None or not info.file:
        have = ", ".join(manifest.adapter_files()) or "none"
        raise InputError(f"{package} has no adapter {name!r} to remove; it has: {have}")
    with updated_package(package, leave_out=(info.file,)) as tmp:
        slots = tuple(dataclasses.replace(s, adapters=tuple(a for a in s.adapters if a != name)) for s in manifest.slots)
        adapters = {n: a for n, a in manifest.adapters.items() if n != name}
        return write_manifest(tmp, dataclasses.replace(manifest, slots=slots, adapters=adapters))


def _with_adapter(manifest: Manifest, adapter: Adapter, file: str) -> Manifest:
    def users(slot) -> tuple[str, ...]:
        others = tuple(a for a in slot.adapters if a != adapter.name)
        return (*others, adapter.name) if {p.module for p in slot.parts} & set(adapter.modules) else others

    slots = tuple(dataclasses.replace(s, adapters=users(s)) for s in manifest.slots)
    info = AdapterInfo(**adapter.summary(), file=file, merged=False)
    return dataclasses.replace(manifest, slots=slots, adapters={**manifest.adapters, adapter.name: info})

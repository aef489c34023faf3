"""The package on disk: checksums, atomic writes, the manifest read and verified. Device side: no torch, no onnx.

Layout::

    OUT/model.onnx (+ model.onnx.data)   the graph, weights as external data
    OUT/adapters/NAME.onnx_adapter       ONNX Runtime's native adapter format, one per adapter
    OUT/manifest.json                    what this package is, and the sha256 of every file
    OUT/tokenizer.json, tokenizer_config.json, generation_config.json, config.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from ..errors import InputError, PackageError
from .manifest import FORMAT, MANIFEST, SCHEMA_VERSION, FileEntry, Manifest



def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def is_package(path: Path) -> bool:
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_output(out: Path, force: bool) -> None:
    """Refuse early (before any work) an output that exists, unless --force on a lora-edge package."""
    out = Path(out)
    if not out.exists():
        if not out.parent.exists():
            raise InputError(f"the parent directory of {out} does not exist; create it first")
        return
    if not force:
        raise InputError(f"output {out} already exists; choose another -o, or pass --force to replace a lora-edge package")
    if not is_package(out):
        raise InputError(f"output {out} exists and is not a lora-edge package; --force only replaces lora-edge packages, so remove it yourself")


@contextlib.contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; on success move it into place, on failure delete it.

    Killing the process at any moment leaves either no package or the previous one intact: the new
    package appears through a rename, and the previous one is only removed after that rename.
    """
    out = Path(out)
    _remove_stale(out)
    check_output(out, force)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        check_output(out, force)  # it may have appeared meanwhile
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def updated_package(root: Path, leave_out: tuple[str, ...] = ()) -> Iterator[Path]:
    """A staged copy of the package at ``root`` (its files hard-linked where the file system allows, so a large base
    costs nothing) to change and write a new manifest into; it replaces ``root`` as :func:`staged_output` does, so a
    kill at any point leaves the old package intact. ``leave_out``: files (relative paths) not carried over."""
    root = Path(root)
    with staged_output(root, force=True) as tmp:
        for f in sorted(root.rglob("*")):
            rel = f.relative_to(root).as_posix()
            if not f.is_file() or f.name == MANIFEST or rel in leave_out:
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, tmp / rel)
            except OSError:  # another file system, or one without hard links
                shutil.copy2(f, tmp / rel)
        yield tmp


def _remove_stale(out: Path) -> None:
    """Clean up after exports to ``out`` whose process is gone (killed mid-export).

    A previous package moved aside (``.NAME.old-PID``) by a process killed between its two renames is
    put back if ``out`` is missing; partial new packages are deleted."""
    if not out.parent.is_dir():
        return
    for pattern in (f".{out.name}.old-*", f".{out.name}.partial-*"):
        for p in sorted(out.parent.glob(pattern)):
            pid = p.name.rsplit("-", 1)[-1]
            if not (pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)) and p.is_dir()):
                continue
            if ".old-" in p.name and not out.exists() and is_package(p):
                os.replace(p, out)
            else:
                shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_manifest(root: Path, manifest: Manifest) -> Manifest:
    """``manifest`` with the sha256 and size of every file under ``root``, written as manifest.json (sorted keys,
    stable bytes)."""
    _readable_by_all(root)
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(root).as_posix()] = FileEntry(sha256=sha256_file(p), bytes=p.stat().st_size)
    manifest = dataclasses.replace(manifest, files=files, format=FORMAT, schema_version=SCHEMA_VERSION)
    (root / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")
    return manifest


def _readable_by_all(root: Path) -> None:
    """Every file 0644 and folder 0755: some writers (onnx's external data) create 0600 files, and a package is made
    to be copied to a device and run there by another user."""
    root.chmod(0o755)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


def read_manifest(root: Path, verify: bool = True) -> Manifest:
    """Read manifest.json and validate it as a :class:`Manifest`; with ``verify``, check every file's size and sha256."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"package {root} does not exist; create one with `lora-edge export`")
    path = root / MANIFEST
    if not path.is_file():
        raise PackageError(f"{root} is not a lora-edge package (no {MANIFEST}); create one with `lora-edge export`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{path} is unreadable or not valid JSON ({exc}); re-export the package") from None
    manifest = Manifest.from_json(data, str(path))
    for rel, info in manifest.files.items():
        f = root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise PackageError(f"{path}: entry {rel!r} is malformed; re-export the package")
        if not f.is_file():
            raise PackageError(f"{root}: {rel} is missing; the package is incomplete, re-export it")
        if verify:
            if f.stat().st_size != info.bytes:
                raise PackageError(f"{root}: {rel} has {f.stat().st_size} bytes, the manifest says {info.bytes}: truncated or replaced; re-export the package")
            if sha256_file(f) != info.sha256:
                raise PackageError(f"{root}: {rel} does not match its sha256 in {MANIFEST}: the file was modified; re-export the package")
    return manifest

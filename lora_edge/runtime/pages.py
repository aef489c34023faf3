"""Resident memory the runtime hands back to the system: pages that loading a package read once and that stay
resident only because nothing asked the kernel to take them back.

- The package's mapped weights (model.onnx.data): ONNX Runtime maps them and reads all of them while it loads
  (prepacking copies each MatMulNBits weight into its own layout, constant folding copies what it folds); most
  are never read again, and the tied embedding's Gather touches only the rows of the tokens it sees.
- The libraries' code: ONNX Runtime's graph optimizers, schema registry and model parser, the JSON parsing of
  tokenizer.json, Python's import machinery run once; a generating process needs a fraction of what loading
  touched (of ONNX Runtime's 22 MiB resident after loading SmolLM2, 9 MiB come back over 128 tokens).
- The C heap's free pages, which glibc keeps after large loads free what they built.

A dropped page of a file costs a page fault when read again (from the page cache; the file still holds every
byte). Only mappings with no private (copied-on-write) page are dropped: for those, dropping can lose nothing.
Linux only; elsewhere every function here does nothing.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path
from typing import Iterable, NamedTuple

MADV_DONTNEED = 4
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+ *(.*)$")

enabled = True  # False keeps every page (the memory benchmark's "pages kept" row)


class Mapping(NamedTuple):
    start: int
    end: int
    perms: str  # as /proc/self/maps writes them: "r-xp", "rw-p", ...
    path: str  # "" for anonymous memory, "[heap]" and the like for the kernel's own
    resident: int  # bytes
    anonymous: int  # bytes of private copies (written, or copied on write)


def mappings() -> list[Mapping]:
    """This process's mappings, from /proc/self/smaps; [] where it cannot be read."""
    out: list[list] = []
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                m = _MAPPING.match(line)
                if m:
                    out.append([int(m.group(1), 16), int(m.group(2), 16), m.group(3), m.group(4), 0, 0])
                elif out and line.startswith(("Rss:", "Anonymous:")):
                    out[-1][4 if line.startswith("Rss:") else 5] = int(line.split()[1]) * 1024
    except OSError:
        return []
    return [Mapping(*m) for m in out]


def file_mappings(root: Path, file: str | None = None) -> list[Mapping]:
    """The mappings of files under ``root`` (of ``root / file`` only, if given)."""
    prefix = str(Path(root).resolve()) + os.sep
    return [m for m in mappings() if (m.path == prefix + file if file else m.path.startswith(prefix))]


def after_loading(root: Path | None = None) -> None:
    """Hand back what loading left resident and will not read again: the package's mapped pages (``root``),
    the libraries' pages, the C heap's free pages."""
    if not enabled:
        return
    give_back_freed()
    if root is not None:
        drop_read_pages(root)
    drop_library_pages()


def drop_read_pages(root: Path) -> None:
    """Let the kernel take back the resident pages of the package's mapped files (ONNX Runtime maps them writable
    and private, and never writes them: a written page would be anonymous, and is kept)."""
    _drop(m for m in file_mappings(root) if m.anonymous == 0)


def drop_library_pages() -> None:
    """Let the kernel take back the resident pages of every read-only file mapping (the libraries' code and
    constants) that holds no private page; what a later call runs faults back in."""
    # (/dev: devices' mappings are the drivers', not files')
    _drop(m for m in mappings() if m.path.startswith("/") and not m.path.startswith("/dev/") and "w" not in m.perms
          and m.anonymous == 0 and m.resident)  # fmt: skip


def _drop(chosen: Iterable[Mapping]) -> None:
    """Advise each of ``chosen`` away, once a readlink confirms it is still its file's mapping (another thread may
    have unmapped it since smaps was read, leaving its addresses to the heap, which MADV_DONTNEED would zero);
    where that cannot be confirmed, nothing is dropped."""
    libc = _madvise_libc()
    if libc is None:
        return
    for m in chosen:
        try:
            if still_mapped(m.start, m.end, m.path):
                libc.madvise(m.start, m.end - m.start, MADV_DONTNEED)
        except PermissionError:
            return


def still_mapped(start: int, end: int, path: str) -> bool:
    """Whether [start, end) is one mapping of the file ``path``: one readlink of /proc/self/map_files. Raises
    PermissionError where the kernel keeps map_files to privileged processes (before 4.3)."""
    try:
        return os.readlink(f"/proc/self/map_files/{start:x}-{end:x}") == path
    except PermissionError:
        raise
    except OSError:
        return False


class RowReadPages:
    """The package's mapped tensors that a graph call reads a few rows of (the embedding tables: a row per token;
    the rotary caches: a row per position), handed back after every call. Dropping them once after loading is not
    enough: where the page cache holds the file in large folios (ext4 and others on recent kernels), a fault maps
    the whole folio, hundreds of KiB per first-seen token, and the embedding creeps back towards its full size
    (up to 16 MiB over 128 tokens of SmolLM2). After the first call, the mappings it left partly resident are
    those: a tensor every call reads in full is wholly resident then, and is never dropped (a call would fault it
    all back in). Only the graph's weights file, and each range confirmed to be still its mapping before each
    advice: a session rebuilt under the model (ONNX Runtime's ``set_providers``) maps the file elsewhere and may
    leave these addresses to the heap, which MADV_DONTNEED would zero."""

    def __init__(self, root: Path, file: str) -> None:
        self.root, self.file = root, file
        self.path = os.path.join(str(Path(root).resolve()), file)
        self.ranges: list[tuple[int, int]] | None = None  # None: not yet found (before the first call)
        self.libc = _madvise_libc() if enabled else None

    def release(self) -> None:
        if self.libc is None:
            return
        if self.ranges is None or not all(self._still_mapped(start, end) for start, end in self.ranges):
            self.ranges = [(m.start, m.end) for m in file_mappings(self.root, self.file)
                           if 0 < m.resident < m.end - m.start and m.anonymous == 0]  # fmt: skip
            if not all(self._still_mapped(start, end) for start, end in self.ranges):
                self.libc = None  # map_files cannot confirm what smaps listed: nothing is dropped unchecked
        if self.libc is None:  # (_still_mapped turns it off where map_files may not be read)
            return
        for start, end in self.ranges:
            self.libc.madvise(start, end - start, MADV_DONTNEED)

    def _still_mapped(self, start: int, end: int) -> bool:
        try:
            return still_mapped(start, end, self.path)
        except PermissionError:  # nothing is dropped unchecked
            self.libc = None
            return False


def evict_cached(path: Path) -> None:
    """Ask the kernel to drop ``path``'s clean page-cache pages that nothing maps. For a package whose weights ONNX
    Runtime copies into its own layout while it loads (no native kernel), calls afterwards read only rows of the file
    (the embedding's, by token). Loading read the file through, so the page cache holds it in large folios, and a
    row's first fault maps its whole folio: up to 15 MiB of SmolLM2's table for one 34-token prompt, transiently (the
    drop after the call takes it back, but the process's peak has counted it). Read again one fault at a time, a row
    costs its own pages. A no-op where the file cannot be opened or posix_fadvise is missing."""
    if not enabled or _libc() is None or not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def give_back_freed() -> None:
    """Return the C heap's free pages to the system (glibc keeps what large loads freed, inside its heap, resident)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _madvise_libc():
    libc = _libc()
    if libc is None or not hasattr(libc, "madvise"):
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _libc():
    if not os.path.exists("/proc/self/smaps"):  # Linux only: elsewhere the C library differs and nothing is dropped
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None

"""Build the native kernel for this machine from the C++ sources shipped in src/ and ONNX Runtime's C API headers.
Device side: needs a C++17 compiler, no torch or onnx."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import KernelError
from .contract import KERNEL_VERSION

SOURCE = Path(__file__).with_name("src")  # the kernel's C++: every *.cc compiled into one library, headers beside them
_HEADER = "onnxruntime_cxx_api.h"
# ONNX Runtime's C/C++ API headers as Debian packages them (the pip wheel ships none).
_DEBIAN_SUITE, _DEBIAN_PACKAGE = "trixie", "libonnxruntime-dev"


def cache_dir() -> Path:
    """Where built kernels and fetched headers live: ``$LORA_EDGE_CACHE``, else ``~/.cache/lora-edge``."""
    return Path(os.environ.get("LORA_EDGE_CACHE") or Path.home() / ".cache" / "lora-edge")


def _flags(march: str) -> list[str]:
    return ["-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", f"-march={march}"]


def sources() -> list[Path]:
    """The translation units :func:`build` compiles (``src/*.cc``), in a stable order."""
    return sorted(SOURCE.glob("*.cc"))


def library_file(march: str = "native") -> Path:
    """The kernel's path in the cache, named by version and a hash of every file in src/ (headers included: an edited
    header is a new build), the flags and the machine."""
    h = hashlib.sha256()
    for f in sorted(p for p in SOURCE.iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(" ".join(_flags(march) + [platform.machine()]).encode())
    digest = h.hexdigest()[:12]
    suffix = ".dll" if os.name == "nt" else ".dylib" if platform.system() == "Darwin" else ".so"
    return cache_dir() / "kernels" / f"liblora_edge_kernels-v{KERNEL_VERSION}-{digest}{suffix}"


def find_library() -> Path | None:
    """``$LORA_EDGE_KERNEL_LIB`` when set (a kernel built elsewhere, e.g. cross-compiled), else the cache's."""
    explicit = os.environ.get("LORA_EDGE_KERNEL_LIB")
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    path = library_file()
    return path if path.is_file() else None


def find_ort_include(explicit: Path | None = None) -> Path | None:
    """A folder holding ONNX Runtime's ``onnxruntime_cxx_api.h``: ``explicit``, ``$LORA_EDGE_ORT_INCLUDE``,
    the cache's fetched headers, or the system's."""
    candidates = [explicit] if explicit else []
    if os.environ.get("LORA_EDGE_ORT_INCLUDE"):
        candidates.append(Path(os.environ["LORA_EDGE_ORT_INCLUDE"]))
    candidates += [cache_dir() / "ort-include", Path("/usr/include/onnxruntime"), Path("/usr/local/include/onnxruntime")]
    for c in candidates:
        if c is not None and (c / _HEADER).is_file():
            return c
    return None


def fetch_ort_headers(progress: Callable[[str], None] = lambda msg: None) -> Path:
    """Download ONNX Runtime's headers from Debian's archive (``libonnxruntime-dev``) into the cache.

    Uses apt with a private source list and state, so the system's apt configuration is untouched."""
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise KernelError("fetching ONNX Runtime's headers needs apt-get and dpkg-deb (Debian/Ubuntu); on other systems "
                          "pass --ort-include DIR, the include folder of an onnxruntime release >= 1.21")  # fmt: skip
    dest = cache_dir() / "ort-include"
    with tempfile.TemporaryDirectory(prefix="lora-edge-apt-") as tmp:
        t = Path(tmp)
        (t / "lists" / "partial").mkdir(parents=True)
        (t / "cache" / "archives" / "partial").mkdir(parents=True)
        (t / "sources.list").write_text(f"deb [trusted=yes] http://deb.debian.org/debian {_DEBIAN_SUITE} main\n")
        opts = [f"-o=Dir::Etc::sourcelist={t / 'sources.list'}", "-o=Dir::Etc::sourceparts=-", f"-o=Dir::State::lists={t / 'lists'}",
                f"-o=Dir::Cache={t / 'cache'}", "-o=Dir::State::status=/dev/null", "-o=APT::Sandbox::User=root", "-qq"]  # fmt: skip
        progress(f"fetching {_DEBIAN_PACKAGE} ({_DEBIAN_SUITE}) from deb.debian.org for ONNX Runtime's C API headers")
        for cmd in (["apt-get", *opts, "update"], ["apt-get", *opts, "download", _DEBIAN_PACKAGE]):
            run = subprocess.run(cmd, cwd=t, capture_output=True, text=True, check=False)
            if run.returncode != 0:
                last = (run.stderr.strip().splitlines() or ["no output"])[-1]
                raise KernelError(f"could not fetch ONNX Runtime's headers ({' '.join(cmd[:1] + cmd[-2:])}: {last}); "
                                  "pass --ort-include DIR instead")  # fmt: skip
        deb = next(t.glob(f"{_DEBIAN_PACKAGE}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(t / "x")], check=True, capture_output=True)
        src = t / "x" / "usr" / "include" / "onnxruntime"
        if not (src / _HEADER).is_file():
            raise KernelError(f"{deb.name} holds no {_HEADER}; pass --ort-include DIR instead")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=".ort-include-", dir=dest.parent))  # copied whole, then moved in place
        shutil.copytree(src, staged, dirs_exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.move(str(staged), dest)
    return dest


def build(ort_include: Path | None = None, cxx: str | None = None, march: str = "native", force: bool = False,
          fetch: bool = True, progress: Callable[[str], None] = lambda msg: None) -> Path:  # fmt: skip
    """Compile the kernel into the cache (nothing half-written on failure) and return its path.

    ``ort_include``: ONNX Runtime's include folder (default: found, else fetched from Debian when ``fetch``).
    ``march``: the CPU to build for (``native``: this machine's)."""
    out = library_file(march)
    if out.is_file() and not force:
        return out
    include = find_ort_include(ort_include)
    if include is None and ort_include is not None:
        raise KernelError(f"{ort_include} holds no {_HEADER}; give the include folder of an onnxruntime release >= 1.21")
    if include is None:
        if not fetch:
            raise KernelError(f"no ONNX Runtime C API headers found ({_HEADER}); pass --ort-include DIR or allow fetching them")
        include = fetch_ort_headers(progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    progress(f"compiling {len(sources())} files of native/src for -march={march}")
    return compile_library(out, include, march, cxx)


def compile_library(out: Path, include: Path, march: str = "native", cxx: str | None = None, src: Path = SOURCE) -> Path:
    """Compile every ``src/*.cc`` into the shared library ``out`` (written whole, or not at all)."""
    compiler = cxx or os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise KernelError("no C++ compiler found (c++, g++ or clang++); install one or set CXX")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    cmd = [compiler, *_flags(march), f"-I{include}", *map(str, sorted(src.glob("*.cc"))), "-o", str(tmp)]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            first = next((ln for ln in run.stderr.splitlines() if "error" in ln), run.stderr.strip()[:300] or "no output")
            raise KernelError(f"compiling the native kernel failed: {first}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def library_version(lib: Path) -> int | None:
    """The ABI version a built kernel reports (``lora_edge_kernel_version``), or None if it reports none."""
    import ctypes

    try:
        return int(ctypes.CDLL(str(lib)).lora_edge_kernel_version())
    except (OSError, AttributeError):
        return None

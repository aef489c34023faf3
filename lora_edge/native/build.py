"""Build the native kernel for this machine from the C++ sources shipped in src/ and ONNX Runtime's C API headers.
Device side: needs a C++17 compiler, no torch or onnx."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
from pathlib import Path
from typing import Callable

from ..errors import KernelError
from .contract import KERNEL_VERSION

SOURCE = Path(__file__).with_name("src")  # the kernel's C++: every *.cc compiled into one library, headers beside them
_HEADER = "onnxruntime_cxx_api.h"
# ONNX Runtime 1.21's C/C++ API headers (the pip wheel ships none), provenance in include/README.md
BUNDLED_INCLUDE = Path(__file__).with_name("include") / "onnxruntime"


def cache_dir() -> Path:
    """Where built kernels live: ``$LORA_EDGE_CACHE``, else ``~/.cache/lora-edge``."""
    return Path(os.environ.get("LORA_EDGE_CACHE") or Path.home() / ".cache" / "lora-edge")


def _flags(march: str) -> list[str]:
    return ["-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", f"-march={target_march(march)}"]


_ARM = ("aarch64", "arm64")
_HWCAP_ASIMDDP = 1 << 20  # Linux's AT_HWCAP bit for the dot-product instructions (SDOT/UDOT)


def target_march(march: str) -> str:
    """The -march for ``march``: as given, except ``native`` on 64-bit ARM, which names the architecture from the CPU's
    feature bits (the dot-product instructions where it has them: dot_neon.h's SDOT path), because GCC's own
    ``-march=native`` there reads /proc/cpuinfo, which under emulation and in some containers describes another CPU."""
    if march != "native" or platform.machine().lower() not in _ARM:
        return march
    return "armv8.2-a+dotprod" if _arm_dotprod() else "armv8-a"


def _arm_dotprod() -> bool:
    """Whether this 64-bit ARM CPU has the dot-product instructions: the kernel's HWCAP (what the CPU really offers,
    emulated or not), else /proc/cpuinfo's ``asimddp``, else macOS's sysctl."""
    import ctypes

    try:
        return bool(ctypes.CDLL(None).getauxval(16) & _HWCAP_ASIMDDP)  # 16: AT_HWCAP
    except (OSError, AttributeError):
        pass
    try:
        return "asimddp" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        pass
    import subprocess  # (here, not at the top: the runtime imports this module to find the library, not to build it)

    try:
        run = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_DotProd"], capture_output=True, text=True, check=False)
        return run.stdout.strip() == "1"
    except OSError:
        return False


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
    """A folder holding ONNX Runtime's ``onnxruntime_cxx_api.h``: ``explicit``, ``$LORA_EDGE_ORT_INCLUDE``, else the
    headers shipped with lora-edge. Nothing is downloaded."""
    named = explicit or os.environ.get("LORA_EDGE_ORT_INCLUDE")
    chosen = Path(named) if named else BUNDLED_INCLUDE  # a folder the user named is used or refused, never passed over
    return chosen if (chosen / _HEADER).is_file() else None


def build(ort_include: Path | None = None, cxx: str | None = None, march: str = "native", force: bool = False,
          progress: Callable[[str], None] = lambda msg: None) -> Path:  # fmt: skip
    """Compile the kernel into the cache (nothing half-written on failure) and return its path.

    ``ort_include``: ONNX Runtime's include folder (default: $LORA_EDGE_ORT_INCLUDE, else the headers shipped with
    lora-edge). ``march``: the CPU to build for (``native``: this machine's)."""
    out = library_file(march)
    if out.is_file() and not force:
        return out
    include = find_ort_include(ort_include)
    if include is None:
        where = ort_include or os.environ.get("LORA_EDGE_ORT_INCLUDE") or BUNDLED_INCLUDE
        raise KernelError(f"{where} holds no {_HEADER}; give the include folder of an onnxruntime release >= 1.21 with --ort-include")
    out.parent.mkdir(parents=True, exist_ok=True)
    progress(f"compiling {len(sources())} files of native/src for -march={target_march(march)}")
    return compile_library(out, include, march, cxx)


def compile_library(out: Path, include: Path, march: str = "native", cxx: str | None = None, src: Path = SOURCE) -> Path:
    """Compile every ``src/*.cc`` into the shared library ``out`` (written whole, or not at all)."""
    import subprocess  # (here, not at the top: the runtime imports this module to find the library, not to build it)

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

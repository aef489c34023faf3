"""lora-edge's native LoRA kernel: the ``lora_edge.LoraDelta`` ONNX Runtime operator (``lora_delta.cc``).

A package exported with ``--lora-kernel native`` runs each LoRA branch as one LoraDelta node with
float16 A and B, split over the session's threads; with ``--lora-dtype int8``, one LoraDeltaQ8 node
with int8 A and B and a float32 scale per rank (half the bytes again; see :func:`encode`); with
``--lora-dtype w8a8`` the same codes in the order of integer dot products, the branch's activations in
int8 too, every branch's part in one adapter input (:func:`w8a8_blob`). The
operators are compiled on the machine that runs packages (``lora-edge build-kernel``, or
:func:`build`) for its own CPU, from the C++ source shipped here and ONNX Runtime's C API headers
(any release from 1.21: the C API is ABI-stable, so a kernel built against 1.21's headers loads
into later runtimes). The runtime registers it when a package asks for it. Each node also adds its
delta onto the base projection's output, which it takes as an input.

Device-side: no torch, no onnx; the build needs a C++17 compiler.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import LoraEdgeError

# The operators' contract (inputs, attributes); a package records the one it needs. v1: LoraDelta (float16);
# v2 adds LoraDeltaQ8 (int8) and the optional base/extra inputs both add their delta onto (v1's three
# inputs mean what they meant), so a v2 kernel runs v1 packages. v3 adds BlockOffset and LoraDelta's optional
# `offsets` input (the float-offset correction of int4 blocks, in the kernel); a package that uses neither
# records v2, which a v2 kernel still runs. v4 adds MatMulQ4, the int4 base projection itself (its own packed
# layout, lora_edge.quant.pack_q4), and the same packed weight as LoraDelta's optional last input `packed` (the
# node then computes the projection too); a package with neither records v3 or v2. v5 adds LoraDeltaQ8's q8x
# order (3-D A, 4-D B: the int8 codes laid out for 4-wide integer dot products, :func:`quantize_q8x`) and the
# w8a8 blob (every q8x branch's A, B and scales in one input, :func:`w8a8_blob`), which --lora-dtype w8a8
# packages use; the 2-D int8 layout still runs.
KERNEL_VERSION = 5
LORA_DTYPES = ("float16", "int8", "w8a8")  # how a native package stores lora_A / lora_B (see encode)
MIN_ORT = (1, 21)  # the C API version the kernel is built against (ORT_API_VERSION 21)
SOURCE = Path(__file__).with_name("lora_delta.cc")
_HEADER = "onnxruntime_cxx_api.h"
# ONNX Runtime's C/C++ API headers as Debian packages them (the pip wheel ships none).
_DEBIAN_SUITE, _DEBIAN_PACKAGE = "trixie", "libonnxruntime-dev"


class KernelError(LoraEdgeError, RuntimeError):
    """The native kernel cannot be found, built or loaded."""




def scale_names(a_name: str, b_name: str) -> tuple[str, str]:
    """The graph inputs holding the int8 scales of lora_A (one per column) and lora_B (one per row)."""
    return f"{a_name}_scale", f"{b_name}_scale"


def quantize_int8(m: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes of ``m`` with one float32 scale per slice along ``axis`` (max |m| / 127;
    an all-zero slice gets scale 0 and zero codes)."""
    m = np.asarray(m, np.float32)
    scale = np.abs(m).max(axis=axis) / np.float32(127) if m.size else np.zeros(np.delete(m.shape, axis), np.float32)
    safe = np.expand_dims(np.where(scale > 0, scale, 1), axis)
    return np.clip(np.rint(m / safe), -127, 127).astype(np.int8), scale.astype(np.float32)


Q8X_WIDTH = 16  # a q8x B's chunk width must be a multiple of this (one vector of columns)


def quantize_q8x(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(A, A_scale, B, B_scale) of a float pair in the q8x order of LoraDeltaQ8 (lora_delta.cc, kernel v5).

    ``a`` (K, R); ``b`` (R, N) (one chunk) or (chunks, r, c) with R = n_modules * r. Each module's ranks are
    zero-padded to a multiple of 4, then quantized as :func:`encode` does (A per column, B per row); the codes
    go in the order of 4-wide dot products: A (ceil(K / 32) * 8, R4, 4) with byte [q, j, i] = A[4 q + i, j]
    (K zero-padded to a multiple of 32), B (chunks, r4 / 4, c, 4) with [g, q, n, i] = B_g[4 q + i, n], each
    code stored XOR 0x80 (the kernel reads it as an unsigned byte, code + 128)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if b.ndim == 2:
        b = b[None]
    k, chunks, r, c = a.shape[0], b.shape[0], b.shape[1], b.shape[2]
    n = a.shape[1] // r if r else 0
    r4 = -(-r // 4) * 4
    a = np.pad(a.reshape(k, n, r), ((0, 0), (0, 0), (0, r4 - r))).reshape(k, n * r4)
    b = np.pad(b, ((0, 0), (0, r4 - r), (0, 0)))
    qa, sa = quantize_int8(a, axis=0)
    qb, sb = quantize_int8(b, axis=-1)
    kp = -(-k // 32) * 32
    qa = np.pad(qa, ((0, kp - k), (0, 0))).reshape(kp // 4, 4, n * r4).transpose(0, 2, 1)
    qb = qb.reshape(chunks, r4 // 4, 4, c).transpose(0, 1, 3, 2)

    def flip(codes: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray((codes.view(np.uint8) ^ np.uint8(0x80)).view(np.int8))

    return flip(qa), sa, flip(qb), sb


W8A8_BLOB = "lora.w8a8"  # the one adapter input of a w8a8 package's q8x branches


def w8a8_blob(parts: Sequence[tuple[tuple[int, int], tuple[np.ndarray, np.ndarray] | None]]) -> np.ndarray:
    """The w8a8 blob (lora_delta.cc): one int8 tensor holding every q8x branch's A, B and scales, so that a run binds
    one input for all of them. ``parts``: per branch of the package, in its order, ((chunks, c), the float (A, B) as
    :func:`quantize_q8x` takes them, or None where the adapter leaves the branch alone). Layout: int64 n, then per
    branch 8 int64 (offsets of A, A_scale, B, B_scale in bytes from the start, R, chunks, r, c), then the arrays,
    each at a multiple of 64 bytes."""
    header = np.zeros(1 + 8 * len(parts), np.int64)
    header[0] = len(parts)
    pieces, at = [header.view(np.int8)], header.nbytes

    def put(arr: np.ndarray) -> int:
        nonlocal at
        pad = -at % 64
        pieces.extend([np.zeros(pad, np.int8), np.ascontiguousarray(arr).reshape(-1).view(np.int8)])
        at += pad
        start, at = at, at + arr.nbytes
        return start

    for i, ((chunks, c), pair) in enumerate(parts):
        fields = [0, 0, 0, 0, 0, chunks, 0, c]
        if pair is not None:
            qa, sa, qb, sb = quantize_q8x(*pair)
            fields = [put(qa), put(sa), put(qb), put(sb), qa.shape[1], qb.shape[0], 4 * qb.shape[1], qb.shape[2]]
        header[1 + 8 * i : 9 + 8 * i] = fields
    return np.concatenate(pieces)


def encode(tensors: dict[str, np.ndarray], pairs: Iterable[tuple[str, str]], lora_dtype: str,
           blob_slots: Sequence[tuple[str, str, int, int]] = ()) -> dict[str, np.ndarray]:  # fmt: skip
    """``tensors`` with each (lora_A, lora_B) pair of ``pairs`` stored as a native package stores it:
    float16, or int8 with A scaled per column (rank) and B per row (rank, per chunk when chunked) —
    A (K, R) -> codes (K, R) + scales (R); B (R, N) -> (R,) or (chunks, r, c) -> (chunks, r). "w8a8": the same
    int8 codes in the q8x order (:func:`quantize_q8x`), multiplied by int8 activations (x and x @ A quantized on the
    fly), for the package's ``blob_slots`` ((lora_A, lora_B, chunks, c) per q8x branch, in its order), all in one
    tensor :data:`W8A8_BLOB` (:func:`w8a8_blob`); the other pairs as "int8"."""
    out = dict(tensors)
    in_blob = {(a, b) for a, b, _, _ in blob_slots} if lora_dtype == "w8a8" else set()
    for a_name, b_name in pairs:
        if a_name not in tensors or (a_name, b_name) in in_blob:
            continue
        if lora_dtype == "float16":
            out[a_name], out[b_name] = tensors[a_name].astype(np.float16), tensors[b_name].astype(np.float16)
        elif lora_dtype in ("int8", "w8a8"):
            sa, sb = scale_names(a_name, b_name)
            out[a_name], out[sa] = quantize_int8(tensors[a_name], axis=0)
            out[b_name], out[sb] = quantize_int8(tensors[b_name], axis=-1)
        else:
            raise ValueError(f"LoRA dtype must be one of {', '.join(LORA_DTYPES)}, got {lora_dtype!r}")
    if lora_dtype == "w8a8":
        out[W8A8_BLOB] = w8a8_blob([((chunks, c), (tensors[a], tensors[b]) if a in tensors else None) for a, b, chunks, c in blob_slots])
        for a, b, _, _ in blob_slots:
            out.pop(a, None), out.pop(b, None)
    return out


def cache_dir() -> Path:
    """Where built kernels and fetched headers live: ``$LORA_EDGE_CACHE``, else ``~/.cache/lora-edge``."""
    return Path(os.environ.get("LORA_EDGE_CACHE") or Path.home() / ".cache" / "lora-edge")


def _flags(march: str) -> list[str]:
    return ["-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", f"-march={march}"]


def library_file(march: str = "native") -> Path:
    """The kernel's path in the cache, named by version and a hash of the source, flags and machine."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(_flags(march) + [platform.machine()]).encode()).hexdigest()[:12]
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
    compiler = cxx or os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise KernelError("no C++ compiler found (c++, g++ or clang++); install one or set CXX")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    cmd = [compiler, *_flags(march), f"-I{include}", str(SOURCE), "-o", str(tmp)]
    progress(f"compiling {SOURCE.name} with {Path(compiler).name} for -march={march}")
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


def register(session_options, package: Path, need: int = 1) -> Path:
    """Register the kernel with ONNX Runtime session options, or say how to build it. ``need``: the
    kernel version the package records (a kernel built from an older lora-edge may be older)."""
    import onnxruntime as ort

    have = tuple(int(v) for v in ort.__version__.split(".")[:2] if v.isdigit())
    if have < MIN_ORT:
        raise KernelError(f"{package} runs on lora-edge's native kernel (its LoRA branches, or int4 offsets), which needs onnxruntime >= "
                          f"{'.'.join(map(str, MIN_ORT))} (this is {ort.__version__}); upgrade onnxruntime, or re-export "
                          "with --lora-kernel onnx")  # fmt: skip
    lib = find_library()
    if lib is None:
        raise KernelError(f"{package} runs on lora-edge's native kernel (its LoRA branches, or int4 offsets), which is not built on this machine; "
                          "run `lora-edge build-kernel` (needs a C++ compiler), or re-export with --lora-kernel onnx")  # fmt: skip
    have_version = library_version(lib)
    if have_version is not None and have_version < need:
        raise KernelError(f"{package} needs lora-edge's native kernel v{need}, and {lib} is v{have_version}; rebuild it "
                          "with `lora-edge build-kernel --force` (or point LORA_EDGE_KERNEL_LIB at a newer build)")  # fmt: skip
    try:
        session_options.register_custom_ops_library(str(lib))
    except Exception as exc:  # ORT raises its own types
        raise KernelError(f"onnxruntime cannot load the native kernel {lib}: {str(exc).splitlines()[0]}; "
                          "rebuild it with `lora-edge build-kernel --force`") from None  # fmt: skip
    return lib

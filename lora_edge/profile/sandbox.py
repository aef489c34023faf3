"""The measuring process's surroundings: its memory limit, its CPUs, its resident memory, and the machine's facts.

A memory limit is enforced by the kernel where the system lets us create a cgroup (v2 ``memory.max`` or v1
``memory.limit_in_bytes``, swap off): it kills the child when it needs more. Elsewhere the parent polls the
child's resident memory every few milliseconds and kills it past the limit; a spike shorter than the poll can
pass, so that method is reported alongside every limited figure."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import time
from pathlib import Path

MiB = 1 << 20


class suppress:
    """Ignore what reading /proc and /sys files can raise (gone, unreadable, not the expected format)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (OSError, ValueError, IndexError))


# -- CPUs -------------------------------------------------------------------------------------
def usable_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def pin(cpus: list[int]) -> None:
    """Restrict this process to ``cpus``; call it before onnxruntime starts its threads, which inherit it."""
    os.sched_setaffinity(0, cpus)


# -- resident memory --------------------------------------------------------------------------
def rss_of(pid: int | str = "self") -> int:
    """Resident bytes of a process now (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_mib() -> float:
    """This process's resident high-water mark. VmHWM, not ru_maxrss: ru_maxrss survives exec, so it would
    include the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return 0.0


def resident_parts(root: Path | str) -> dict[str, float]:
    """This process's resident memory by kind, in MiB: ``mapped`` the package's own files mapped in (ONNX Runtime
    maps external weights; pages it read and kept), ``libraries`` every other mapped file (Python, onnxruntime,
    numpy, tokenizers), ``anonymous`` the heap (prepacked weight copies, folded constants, adapter tensors, the KV
    cache, activations, the tokenizer, Python objects). All zero where /proc/self/smaps is absent."""
    prefix = str(Path(root).resolve()) + os.sep
    parts = {"mapped": 0.0, "libraries": 0.0, "anonymous": 0.0}
    kind = "anonymous"
    with suppress():
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 5)
                if "-" in head[0] and not head[0].endswith(":"):  # a mapping: "start-end perms offset dev inode [path]"
                    path = head[5].strip() if len(head) > 5 else ""
                    kind = "mapped" if path.startswith(prefix) else "libraries" if path.startswith("/") else "anonymous"
                elif head[0] == "Rss:":
                    parts[kind] += int(head[1]) / 1024
                elif head[0] == "Anonymous:" and kind != "anonymous":  # copied-on-write pages of a file mapping
                    parts[kind] -= int(head[1]) / 1024
                    parts["anonymous"] += int(head[1]) / 1024
    return parts


# -- memory limits ----------------------------------------------------------------------------
def cgroup_dir() -> tuple[str, Path] | None:
    """A directory under which we may create a memory cgroup: ("cgroup-v2"|"cgroup-v1", path)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hid, ctrls, path = line.split(":", 2)
        if hid == "0":  # v2
            for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                base = root / path.lstrip("/")
                try:
                    if "memory" in (base / "cgroup.subtree_control").read_text().split() and os.access(base, os.W_OK):
                        return "cgroup-v2", base
                except OSError:
                    continue
        elif "memory" in ctrls.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if (base / "memory.limit_in_bytes").exists() and os.access(base, os.W_OK):
                return "cgroup-v1", base
    return None


def limit_method() -> str:
    found = cgroup_dir()
    return found[0] if found else "rss-watchdog"


class MemoryCage:
    """A memory limit for one child process: a fresh cgroup when possible, else an RSS watchdog."""

    def __init__(self, limit_mib: int | None) -> None:
        self.limit = limit_mib * MiB if limit_mib else None
        self.method: str | None = None
        self.path: Path | None = None
        self.tripped = False
        if self.limit is None:
            return
        found = cgroup_dir()
        if found:
            kind, base = found
            path = base / f"lora-edge-profile-{os.getpid()}-{time.monotonic_ns()}"
            try:
                path.mkdir()
                if kind == "cgroup-v2":
                    (path / "memory.max").write_text(str(self.limit))
                    if (path / "memory.swap.max").exists():
                        (path / "memory.swap.max").write_text("0")
                else:
                    (path / "memory.limit_in_bytes").write_text(str(self.limit))
                    if (path / "memory.memsw.limit_in_bytes").exists():
                        (path / "memory.memsw.limit_in_bytes").write_text(str(self.limit))
                    if (path / "memory.swappiness").exists():
                        (path / "memory.swappiness").write_text("0")
                self.method, self.path = kind, path
                return
            except OSError:
                with suppress():
                    path.rmdir()
        self.method = "rss-watchdog"

    def preexec(self) -> None:
        """Runs in the child between fork and exec: join the cgroup before Python allocates anything."""
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def watch(self, proc: subprocess.Popen) -> None:
        """Until ``proc`` ends, kill it when it passes the limit (the watchdog; a cgroup needs no watching)."""
        if self.method != "rss-watchdog":
            return
        while proc.poll() is None:
            if rss_of(proc.pid) > self.limit:
                self.tripped = True
                proc.kill()
                return
            time.sleep(0.002)

    def killed_by_limit(self, returncode: int) -> bool:
        if self.limit is None:
            return False
        if self.tripped:
            return True
        if returncode != -signal.SIGKILL or self.path is None:
            return False
        for f in ("memory.events", "memory.oom_control"):  # v2, v1: "oom_kill N"
            with suppress():
                for line in (self.path / f).read_text().splitlines():
                    key, value = line.split()
                    if key == "oom_kill" and int(value) > 0:
                        return True
        return False

    def close(self) -> None:
        if self.path is not None:
            for _ in range(50):  # the kernel frees the cgroup a moment after its last process exits
                try:
                    self.path.rmdir()
                    return
                except OSError:
                    time.sleep(0.02)


# -- the machine ------------------------------------------------------------------------------
def machine_info() -> dict:
    import onnxruntime as ort

    from .. import __version__

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) // 1024
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_mib": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "lora_edge": __version__,
        "memory_limit_method": limit_method(),
    }

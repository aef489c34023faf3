"""The measuring process: every measurement runs in a fresh ``python -m lora_edge.profile``, so that its peak
memory is its own high-water mark and the thread count, CPU affinity and memory limit apply to it alone.

Protocol: the parent writes one :class:`Job` as JSON on the child's stdin and closes it; the child writes JSON
lines on stdout: ``{"tick": what}`` after each step (the parent's progress), then one line with the result, or
``{"error": message}`` for a failure the user can act on (a bad package, an unknown adapter). Anything else the
child dies of is reported from the last line of its stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import Callable, TypedDict

from ..errors import InputError, PackageError, RuntimeInputError
from .sandbox import MemoryCage, pin, suppress


class Job(TypedDict, total=False):
    kind: str  # measure | ops | sweep: the function of lora_edge.profile.measure that runs it
    package: str  # its path
    label: str  # its name in the report
    threads: int
    adapters: list[str | None]  # None: the base
    merged: str | None  # a merged package's adapter: the name its base rows carry
    workload: dict  # a Workload as a dict
    provider: str | None
    affinity: list[int] | None
    ranks: list[int]  # sweep
    counts: list[int]  # sweep


def run_child(job: Job, affinity, cage: MemoryCage, tick: Callable[[str], None]) -> dict | None:
    """Run one job in a child; None if the memory limit killed it. Raises on any other failure."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # the job's thread count is the only one that applies
    job = {**job, "affinity": list(affinity) if affinity else None}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "lora_edge.profile"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, preexec_fn=cage.preexec)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        cage.close()
        raise RuntimeInputError(f"cannot start the measuring process: {exc}") from None
    result: dict = {}
    err_lines: list[str] = []

    def read_out() -> None:
        for line in proc.stdout:
            with suppress():
                msg = json.loads(line)
                if "tick" in msg:
                    tick(msg["tick"])
                else:
                    result.update(msg)

    def read_err() -> None:
        err_lines.extend(proc.stderr)

    # both pipes drained on threads: a child blocked on a full stderr pipe would never finish
    readers = [threading.Thread(target=read_out, daemon=True), threading.Thread(target=read_err, daemon=True)]
    for t in readers:
        t.start()
    try:
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
    except OSError:
        pass
    try:
        cage.watch(proc)
        rc = proc.wait()
        for t in readers:
            t.join()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        killed = cage.killed_by_limit(proc.returncode if proc.returncode is not None else 0)
        cage.close()
    if killed:
        return None
    if "error" in result:
        raise RuntimeInputError(result["error"])
    if rc != 0 or not result:
        tail = "".join(err_lines).strip().splitlines()[-1:] or [f"exit code {rc}"]
        raise RuntimeInputError(f"the measuring process failed on {job['package']}: {tail[0]}")
    return result


def main() -> None:
    """The child's side: read the job, run it, write JSON lines."""
    job: Job = json.loads(sys.stdin.read())
    if job.get("affinity"):
        pin(job["affinity"])

    def emit(msg: dict) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    try:
        from . import measure

        fn = {"measure": measure.measure, "ops": measure.ops, "sweep": measure.sweep}[job["kind"]]
        emit(fn(job, lambda what: emit({"tick": what})))
    except (PackageError, RuntimeInputError, InputError) as exc:
        emit({"error": str(exc)})
    except MemoryError:
        sys.exit(137)  # the exit status of a process killed for memory, without a traceback

"""One thread owns generation: every ONNX Runtime call of the server is made here, one request after another, so
requests never compete for the CPU's cores and the session's per-thread bindings stay warm. HTTP handlers only
queue jobs (a bounded queue: a full one is refused at once rather than letting waits grow without bound) and
read the events each job emits.

A later step can batch queued jobs (different adapters in one graph call): :meth:`Scheduler._next` then takes several
jobs and :meth:`Scheduler._run` decodes them together; the HTTP side stays as it is."""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ..errors import LoraEdgeError
from ..runtime.decoder import Pieces
from ..runtime.sampling import Sampling

log = logging.getLogger("lora_edge.serve")

# What a job emits, from the scheduler thread: ("text", piece) any number of times, then exactly one of
# ("done", finish_reason, completion_tokens) or ("error", exception).
Event = tuple
Emit = Callable[[Event], None]


class QueueFull(Exception):
    pass


class Cancelled(Exception):
    """The job's end when it was cancelled: a handler still waiting on it (the server stopping) is not left hanging."""


@dataclass
class Job:
    prompt_ids: list[int]
    adapter: str | None
    max_tokens: int
    sampling: Sampling
    stops: tuple[str, ...]
    emit: Emit  # must be safe to call from another thread
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """The client is gone: a queued job is skipped, a running one stops at its next token."""
        self.cancelled.set()


class Scheduler:
    """Runs queued jobs on one thread, in order. ``max_queue``: how many may wait behind the running one; a cancelled
    job (its client left) stops counting at once, so it never makes another client's request a 429."""

    def __init__(self, model, max_queue: int) -> None:
        self.model, self.max_queue = model, max_queue
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="lora-edge-scheduler", daemon=True)
        self._closing = False
        self._running: Job | None = None

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down")
            self._drop_cancelled()
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"the server is busy: {self.max_queue} requests are already waiting; retry later")
            self._jobs.append(job)
            self._cond.notify()

    @property
    def waiting(self) -> int:
        with self._cond:
            return sum(not j.cancelled.is_set() for j in self._jobs)

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking jobs, cancel the waiting ones and the running one, and end the thread."""
        with self._cond:
            self._closing = True
            pending, running = list(self._jobs), self._running
            self._jobs.clear()
            self._cond.notify()
        for job in pending:
            job.cancel()
            job.emit(("error", QueueFull("the server is shutting down")))
        if running is not None:
            running.cancel()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._jobs if j.cancelled.is_set()]:
            self._jobs.remove(job)
            job.emit(("error", Cancelled("the request was cancelled")))

    def _next(self) -> Job | None:
        with self._cond:
            self._drop_cancelled()
            while not self._jobs and not self._closing:
                self._cond.wait()
                self._drop_cancelled()
            self._running = None if self._closing else self._jobs.popleft()
            return self._running

    def _loop(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._run(job)
            except Exception as exc:  # a job's failure is its client's 400/500, never the end of the thread
                if not isinstance(exc, (LoraEdgeError, Cancelled)):
                    log.exception("generation failed")
                job.emit(("error", exc))
            finally:
                self._running = None

    def _run(self, job: Job) -> None:
        tok = self.model.tokenizer
        pieces = Pieces(tok.decode, job.stops)

        def stop(tokens: list[int]) -> bool:  # called after every new token: send what is safe, end on a stop string
            if job.cancelled.is_set():
                return True
            piece, stopped = pieces.step(tokens)
            if piece:
                job.emit(("text", piece))
            return stopped

        tokens, reason = self.model.generate_ids(job.prompt_ids, job.adapter, job.max_tokens, sampling=job.sampling, stop=stop)
        if job.cancelled.is_set():
            raise Cancelled("the request was cancelled")
        if reason != "stop" and (rest := pieces.rest(tokens)):
            job.emit(("text", rest))
        job.emit(("done", reason, len(tokens)))

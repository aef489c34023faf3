"""One thread owns generation: every ONNX Runtime call of the server is made here, so requests never compete for the
CPU's cores and the session's bindings stay warm. HTTP handlers only queue jobs (a bounded queue: a full one is refused
at once rather than letting waits grow without bound) and read the events each job emits.

Jobs decode together in a continuous batch (runtime.batching): between two steps, waiting jobs join while there are
free rows and the batch can mix their adapter with those running (in arrival order: a job that cannot join yet holds
the ones behind it, so none waits forever); a job leaves at its end. A package that cannot batch (reference attention,
a GPU provider), and an activated adapter, run one job at a time."""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ..errors import LoraEdgeError
from ..runtime.batching import Row, batches, shareable
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
    min_tokens: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """The client is gone: a queued job is skipped, a running one stops at its next token."""
        self.cancelled.set()


class Scheduler:
    """Runs queued jobs on one thread. ``max_queue``: how many may wait; a cancelled job (its client left) stops
    counting at once, so it never makes another client's request a 429. ``parallel``: rows decoded together;
    ``context``: tokens per request (prompt and answer; default the model's)."""

    def __init__(self, model, max_queue: int, parallel: int = 4, context: int | None = None) -> None:
        self.model, self.max_queue = model, max_queue
        self.batch = model.batch(parallel, context) if parallel > 1 and batches(model) else None
        self.context = self.batch.capacity if self.batch else min(context or model.max_length, model.max_length)
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="lora-edge-scheduler", daemon=True)
        self._closing = False
        self._running: dict[Row, tuple[Job, Pieces]] = {}
        self.peak = 0  # the most requests that have decoded together

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
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        with self._cond:
            return sum(not j.cancelled.is_set() for j in self._jobs)

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking jobs, cancel the waiting ones and the running ones, and end the thread."""
        with self._cond:
            self._closing = True
            pending, running = list(self._jobs), [job for job, _ in self._running.values()]
            self._jobs.clear()
            self._cond.notify()
        for job in pending:
            job.cancel()
            job.emit(("error", QueueFull("the server is shutting down")))
        for job in running:
            job.cancel()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._jobs if j.cancelled.is_set()]:
            self._jobs.remove(job)
            job.emit(("error", Cancelled("the request was cancelled")))

    # -- the thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while (admitted := self._admit()) is not None:
            joining: list[Row] = []
            for job in admitted:
                self._guarded([job], lambda: self._start(job, joining))
            if joining:  # prefilled together, in one call
                self._guarded([self._running[r][0] for r in joining], lambda: self._join(joining))
            if self._running:
                self.peak = max(self.peak, len(self._running))
                self._guarded([job for job, _ in self._running.values()], self._step)

    def _admit(self) -> list[Job] | None:
        """The jobs to start now (waiting while there is nothing to do); None when closing."""
        with self._cond:
            self._drop_cancelled()
            while not self._jobs and not self._running and not self._closing:
                self._cond.wait()
                self._drop_cancelled()
            if self._closing:
                return None
            admitted: list[Job] = []
            while self._jobs and self._fits(self._jobs[0], admitted):
                admitted.append(self._jobs.popleft())
            return admitted

    def _fits(self, job: Job, admitted: list[Job]) -> bool:
        """Whether ``job`` can start now, beside the running rows and the jobs ``admitted`` before it this round."""
        if self._alone(job) or (admitted and self._alone(admitted[0])):
            return not self._running and not admitted
        keys = [r.key for r in self.batch.rows] + [self._key(j) for j in [*admitted, job]]
        return self.batch.free > len(admitted) and shareable(self.model._adapters, keys)

    def _alone(self, job: Job) -> bool:
        """Whether ``job`` runs by itself: no batch here, an activated adapter, or a choice that fails (its start
        reports the error)."""
        try:
            return self.batch is None or bool(self.model._adapters.invocation(self._key(job)))
        except LoraEdgeError:
            return True

    def _key(self, job: Job):
        return self.model._adapters.key(job.adapter)

    def _guarded(self, jobs: list[Job], work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as exc:  # a job's failure is its client's 400/500, never the end of the thread
            if not isinstance(exc, LoraEdgeError):
                log.exception("generation failed")
            for job in jobs:
                job.emit(("error", exc))
            for row in [r for r, (j, _) in self._running.items() if j in jobs]:
                self._running.pop(row)
                if self.batch is not None:
                    self.batch.cancel(row)

    def _start(self, job: Job, joining: list[Row]) -> None:
        """Run ``job`` to its end if it runs alone; else check it fits the batch and add its row to ``joining``."""
        pieces = Pieces(self.model.tokenizer.decode, job.stops)

        def stop(tokens: list[int]) -> bool:  # after every new token: send what is safe, end on a stop string
            if job.cancelled.is_set():
                return True
            piece, stopped = pieces.step(tokens)
            if piece:
                job.emit(("text", piece))
            return stopped

        row = Row(job.prompt_ids, self._key(job), job.max_tokens, job.sampling, self.model._default_eos(), job.min_tokens, stop)
        if self._alone(job):  # to its end
            self._running[row] = (job, pieces)
            row.tokens, row.reason = self.model.generate_ids(row.prompt, row.key, row.max_new_tokens, row.min_new_tokens,
                                                             sampling=row.sampling, stop=stop)  # fmt: skip
            self._finish(row)
            return
        self.batch.check(row)
        self._running[row] = (job, pieces)
        joining.append(row)

    def _join(self, rows: list[Row]) -> None:
        self.batch.add(*rows)
        for row in rows:
            if row.done:  # its first token ended it
                self._finish(row)

    def _step(self) -> None:
        for row in self.batch.step():
            self._finish(row)

    def _finish(self, row: Row) -> None:
        job, pieces = self._running.pop(row)
        if job.cancelled.is_set():
            job.emit(("error", Cancelled("the request was cancelled")))
            return
        if row.reason != "stop" and (rest := pieces.rest(row.tokens)):
            job.emit(("text", rest))
        job.emit(("done", row.reason, len(row.tokens)))

"""One thread owns generation: every ONNX Runtime call of the server is made here, one request after another, so
requests never compete for the CPU's cores and the session's per-thread bindings stay warm. HTTP handlers only
queue jobs (a bounded queue: a full one is refused at once rather than letting waits grow without bound) and
read the events each job emits.

A later step can batch queued jobs (different adapters in one graph call); only :meth:`Scheduler._run` changes."""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

from ..errors import LoraEdgeError
from ..runtime.decoder import _stop_at
from ..runtime.sampling import Sampling

log = logging.getLogger("lora_edge.serve")

# What a job emits, from the scheduler thread: ("text", piece) any number of times, then exactly one of
# ("done", finish_reason, completion_tokens) or ("error", exception).
Event = tuple
Emit = Callable[[Event], None]


class QueueFull(Exception):
    pass


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


class Pieces:
    """The text of a growing token list as pieces safe to send: held back while it could still be the start of a stop
    string, or ends in an incomplete UTF-8 character (as :meth:`DecoderModel.stream` does)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...]) -> None:
        self.decode, self.stops, self.sent = decode, stops, 0
        self.hold = max((len(s) for s in stops), default=1) - 1

    def step(self, tokens: list[int]) -> tuple[str, bool]:
        """The new piece to send, and whether a stop string has appeared (the text ends before it)."""
        text = self.decode(tokens)
        cut = _stop_at(text, self.stops)
        if cut is None and text.endswith("\ufffd"):
            return "", False
        upto = cut if cut is not None else len(text) - self.hold
        piece = text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece, cut is not None

    def rest(self, tokens: list[int]) -> str:
        """What was held back, once generation ended without a stop string."""
        return self.decode(tokens)[self.sent :]


class Scheduler:
    """Runs queued jobs on one thread, in order. ``max_queue``: how many may wait behind the running one."""

    def __init__(self, model, max_queue: int) -> None:
        self.model = model
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._loop, name="lora-edge-scheduler", daemon=True)
        self._closing = False
        self._running: Job | None = None

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self._closing:
            raise QueueFull("the server is shutting down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the server is busy: {self._queue.maxsize} requests are already waiting; retry later") from None

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking jobs, cancel the waiting ones and the running one, and end the thread."""
        self._closing = True
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.emit(("error", QueueFull("the server is shutting down")))
        if self._running is not None:
            self._running.cancel()
        if self._thread.is_alive():
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:  # (a submit raced the drain; the daemon thread ends with the process)
                return
            self._thread.join(timeout)

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancelled.is_set():
                continue
            self._running = job
            try:
                self._run(job)
            except Exception as exc:  # a job's failure is its client's 400/500, never the end of the thread
                if not isinstance(exc, LoraEdgeError):
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
            return
        if reason != "stop" and (rest := pieces.rest(tokens)):
            job.emit(("text", rest))
        job.emit(("done", reason, len(tokens)))

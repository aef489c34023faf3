"""Progress of long stages: library code reports it, the CLI decides whether and how it is shown.

Library functions take ``progress``, a callable told one line per stage (``progress("loading ...")``).
Counted work (tensors read, calibration tokens, layers quantized) goes through :func:`counting`, which
gives a ``step(done, total)`` callback: a bar where ``progress`` is a :class:`Reporter` that draws bars,
nothing otherwise, so a library caller with a plain callable (or none) sees no change.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator

Progress = Callable[[str], None]
Step = Callable[[int, int], None]  # (units done, units in all)


class Reporter:
    """The CLI's progress: ``[  12.3s] message`` lines on stderr, and bars for counted work where stderr is a
    terminal; ``quiet`` shows neither."""

    def __init__(self, start: float | None = None, quiet: bool = False, bars: bool | None = None, stream=None) -> None:
        self.start = time.perf_counter() if start is None else start
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.bars = (not quiet) and (self.stream.isatty() if bars is None else bars)

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:6.1f}s] {msg}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def bar(self, what: str) -> Iterator[Step]:
        """A ``step(done, total)`` drawing a bar of ``what`` (e.g. "tensors read"), closed on leaving."""
        if not self.bars:
            yield lambda done, total: None
            return
        from tqdm import tqdm

        state: dict = {}

        def step(done: int, total: int) -> None:
            if "bar" not in state:
                state["bar"] = tqdm(total=total, desc=f"[{time.perf_counter() - self.start:6.1f}s] {what}", file=self.stream,
                                    leave=False, unit="")  # fmt: skip
            state["bar"].update(done - state["bar"].n)

        try:
            yield step
        finally:
            if "bar" in state:
                state["bar"].close()


@contextlib.contextmanager
def counting(progress: Progress, what: str) -> Iterator[Step]:
    """``step(done, total)`` for counted work: a bar of ``what`` where ``progress`` draws bars, else a no-op."""
    if isinstance(progress, Reporter):
        with progress.bar(what) as step:
            yield step
    else:
        yield lambda done, total: None

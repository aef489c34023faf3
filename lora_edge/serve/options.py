"""What a server is started with, checked once."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError


@dataclass(frozen=True)
class ServeOptions:
    api_key: str | None = None  # required as 'Authorization: Bearer KEY' when set
    max_queue: int = 64  # requests that may wait; more are answered 429
    parallel: int = 4  # requests decoded together (rows of one batch); 1: one after another
    context: int | None = None  # tokens per request, prompt and answer; None: the model's context

    def __post_init__(self) -> None:
        for name in ("max_queue", "parallel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be an integer >= 1, got {value!r}")
        if self.context is not None and (isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 2):
            raise InputError(f"context must be an integer >= 2, got {self.context!r}")

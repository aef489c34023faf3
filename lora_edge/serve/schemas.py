"""OpenAI's request and response shapes, in plain Python: a request body is checked field by field here, so that
every mistake is a 400 naming its field before anything is queued; responses are built as OpenAI's clients read them.
No web framework here: the checks are testable alone and the server stays a thin layer over them."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..runtime.sampling import Sampling


class ApiError(Exception):
    """An error the client gets as OpenAI's JSON error body: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str) -> ApiError:
    return ApiError(400, message, param)


@dataclass(frozen=True)
class GenRequest:
    model: str
    prompt: Any  # chat: a list of {"role", "content"} messages; completions: a text, or token ids
    chat: bool
    max_tokens: int | None  # None: up to the model's context
    sampling: Sampling
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    min_tokens: int = 0  # vLLM's extension: the end-of-sequence token is not taken before this many tokens


# Fields OpenAI defines that this server cannot honour: accepted at their neutral value (clients send defaults),
# refused otherwise, so a client never silently gets something other than what it asked for.
NEUTRAL = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False, 0), "top_logprobs": (0,),
    "logit_bias": ({},), "tools": ([],), "functions": ([],), "echo": (False,), "suffix": ("",), "best_of": (1,),
}  # fmt: skip
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def parse(body: Any, chat: bool) -> GenRequest:
    """A chat (``chat``) or completions request body, checked; an :class:`ApiError` naming the first bad field."""
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "model is required: the base model's id or an adapter's name (GET /v1/models lists them)")
    for name, neutral in NEUTRAL.items():
        if body.get(name) is not None and not any(body[name] == v and type(body[name]) is type(v) for v in neutral):
            raise bad(name, f"{name} is not supported by this server; leave it out")
    n = body.get("n")
    if n is not None and (not _int(n) or n != 1):
        raise bad("n", f"n must be 1 (one answer per request), got {n!r}")
    prompt = _messages(body.get("messages")) if chat else _prompt(body.get("prompt"))
    max_tokens = _max_tokens(body)
    stream = _typed(body, "stream", bool, "a boolean", False)
    options = _typed(body, "stream_options", dict, "an object", {})
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("stream_options", "stream_options.include_usage must be a boolean")
    min_tokens = _typed(body, "min_tokens", int, "an integer >= 0", 0)
    if isinstance(min_tokens, bool) or min_tokens < 0 or (max_tokens is not None and min_tokens > max_tokens):
        raise bad("min_tokens", f"min_tokens must be an integer from 0 to max_tokens, got {min_tokens!r}"[:200])
    return GenRequest(model, prompt, chat, max_tokens, _sampling(body), _stops(body.get("stop")), stream, include_usage,
                      min_tokens)  # fmt: skip


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _typed(body: dict, name: str, kind: type, what: str, default):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise bad(name, f"{name} must be {what}, got {value!r}"[:200])
    return value


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in CHAT_ROLES:
            raise bad(f"messages[{i}].role", f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}"[:200])
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text parts can reach a text model
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise bad(f"messages[{i}].content", f"messages[{i}].content parts must be {{'type': 'text', 'text': ...}}")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", f"messages[{i}].content must be a string, got {content!r}"[:200])
        out.append({"role": CHAT_ROLES[role], "content": content})
    return out


def _prompt(prompt):
    """A text or token ids; a list holding one of those is one prompt (several would need several answers)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(_int(t) for t in prompt):
        return [int(t) for t in prompt]
    raise bad("prompt", "prompt must be a non-empty string or a non-empty list of token ids (one prompt per request)")


def _max_tokens(body: dict) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):  # the newer name wins, as in OpenAI's API
        value = body.get(name)
        if value is not None:
            if not _int(value) or value < 1:
                raise bad(name, f"{name} must be an integer >= 1, got {value!r}"[:200])
            return value
    return None


def _sampling(body: dict) -> Sampling:
    """OpenAI's sampling fields as :class:`Sampling`: temperature 0 (or top_k 1) is greedy, anything else samples, as
    OpenAI does by default (temperature 1)."""
    checks = {  # name: (is it valid, what it must be, default)
        "temperature": (lambda v: _num(v) and 0 <= v <= 2, "a number in [0, 2]", 1.0),
        "top_p": (lambda v: _num(v) and 0 < v <= 1, "a number in (0, 1]", 1.0),
        "top_k": (lambda v: _int(v) and v >= -1, "an integer >= 0 (0 or -1: off)", 0),
        "min_p": (lambda v: _num(v) and 0 <= v <= 1, "a number in [0, 1]", 0.0),
        "repetition_penalty": (lambda v: _num(v) and v > 0, "a number > 0", 1.0),
        "seed": (lambda v: _int(v) and 0 <= v < 2**63, "an integer >= 0", None),
    }
    got = {}
    for name, (ok, what, default) in checks.items():
        value = body.get(name)
        if value is not None and not ok(value):
            raise bad(name, f"{name} must be {what}, got {value!r}"[:200])
        got[name] = default if value is None else value
    top_k = max(got["top_k"], 0)
    greedy = got["temperature"] == 0 or top_k == 1
    return Sampling(do_sample=not greedy, temperature=float(got["temperature"]) if not greedy else 1.0, top_k=top_k,
                    top_p=float(got["top_p"]), min_p=float(got["min_p"]),
                    repetition_penalty=float(got["repetition_penalty"]), seed=got["seed"])  # fmt: skip


def _stops(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 16 or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "stop must be a string or a list of at most 16 strings")
    return tuple(s for s in stops if s)


# -- responses ------------------------------------------------------------------------------------
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # the runtime's reasons, as OpenAI names them


class Reply:
    """The response (or stream chunks) of one request, sharing an id and a creation time."""

    def __init__(self, req: GenRequest) -> None:
        self.req = req
        self.id = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict:
        kind = "chat.completion" if self.req.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if chunk and self.req.chat else ""), "created": self.created,
                "model": self.req.model}  # fmt: skip

    def _choice(self, text: str | None, finish: str | None, chunk: bool, first: bool = False) -> dict:
        if not self.req.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if not chunk:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def full(self, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
        return self._head(False) | {"choices": [self._choice(text, FINISH[finish], False)],
                                    "usage": usage(prompt_tokens, completion_tokens)}  # fmt: skip

    def chunk(self, text: str | None = None, finish: str | None = None, first: bool = False) -> dict:
        return self._head(True) | {"choices": [self._choice(text, finish and FINISH[finish], True, first)]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """stream_options.include_usage: one last chunk with no choices and the usage, as OpenAI sends it."""
        return self._head(True) | {"choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}

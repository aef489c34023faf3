"""`chat`: a conversation with a decoder package in the terminal, the answer streamed as it is generated.

The answer goes to stdout, everything else (notices, the tokens/s line, errors of one turn, /help) to stderr, so a
script that pipes lines in reads only the answers, one after another, each ended by a newline.
"""

from __future__ import annotations

import importlib
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import click

from ..errors import InputError, LoraEdgeError
from .app import cli
from .device import run

COMMANDS = """commands:
  /adapter NAME   answer with another adapter from now on: NAME, NAME@0.5, a@0.7+b@0.3 (the conversation stays)
  /adapter        back to the base model (also /adapter none)
  /reset          forget the conversation (the --system message stays)
  /help           this list
  /quit           leave (Ctrl-D too); Ctrl-C stops an answer and keeps the chat"""

# `run`'s options that mean the same here, taken from `run` itself so the two commands cannot drift apart
SHARED = ("loads", "do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stops", "threads",
          "providers")  # fmt: skip


@dataclass(frozen=True)
class Answer:
    """How one answer ended: its token count, the seconds it took (prefill included), and why it ended:
    "eos" | "stop" | "length" | "interrupted"."""

    tokens: int
    seconds: float
    reason: str


class Conversation:
    """The messages so far, the adapter answering, and one answer at a time generated in a worker thread so that the
    caller can stop it (Ctrl-C) between two tokens. It prints nothing."""

    def __init__(self, model, system: str | None, max_new_tokens: int, sampling, stops: tuple[str, ...]) -> None:
        self.model, self.max_new_tokens, self.sampling, self.stops = model, max_new_tokens, sampling, stops
        self.start = [{"role": "system", "content": system}] if system else []
        self.messages = list(self.start)
        self.label, self.adapter = "base", None
        self.last: Answer | None = None  # how the latest answer ended
        self.dropped = 0  # turns the latest question dropped to fit the context

    def switch(self, text: str) -> None:
        """Answer with the adapter choice ``text`` from now on ('' or 'none': the base); one line if it is unknown."""
        from ..runtime.adapter_set import parse_choice

        choice = parse_choice(text or "none")
        self.model.check_adapter(choice)  # unknown names and bad weights: one line, and the current choice stays
        self.label, self.adapter = ("base" if choice is None else text), choice

    def reset(self) -> None:
        self.messages = list(self.start)

    def fit(self, text: str) -> tuple[list[dict], list[int]]:
        """The conversation with the user's ``text`` appended, and its token ids: the oldest turns (a question and
        its answer) dropped until it and a full answer fit the model's context; the system message always stays."""
        messages = [*self.messages, {"role": "user", "content": text}]
        limit = self.model.max_length - self.max_new_tokens
        self.dropped = 0
        while len(ids := self.model.tokenizer.encode(messages, True)) > limit:
            if len(messages) - len(self.start) <= 1:
                raise InputError(f"this message takes {len(ids)} tokens with the chat template; with --max-new-tokens "
                                 f"{self.max_new_tokens} that exceeds the model's context of {self.model.max_length} tokens; "
                                 "write a shorter one or lower --max-new-tokens")  # fmt: skip
            del messages[len(self.start) : len(self.start) + 2]
            self.dropped += 1
        return messages, ids

    def ask(self, text: str) -> Iterator[str]:
        """The answer to ``text``, to iterate over in pieces as it is generated (the conversation is fitted to the
        context first, so a message that cannot fit fails here, before anything is shown)."""
        return self._answer(*self.fit(text))

    def _answer(self, messages: list[dict], ids: list[int]) -> Iterator[str]:
        """Closing this iterator early (or an exception while it waits, such as Ctrl-C's KeyboardInterrupt) stops the
        generation at the next token; what was shown until then stays in the conversation as the answer."""
        start, shown = time.perf_counter(), []
        answer = self.model.generation(ids, self.adapter, self.max_new_tokens, sampling=self.sampling, stop=self.stops)
        try:
            for piece in answer:
                shown.append(piece)
                yield piece
        finally:
            answer.close()
            if answer.reason != "interrupted" or shown:  # an answer stopped before its first word leaves no turn behind
                self.messages = [*messages, {"role": "assistant", "content": "".join(shown)}]
            self.last = Answer(answer.produced, time.perf_counter() - start, answer.reason)


class Terminal:
    """Reads the user's lines (with line editing on a terminal, plain lines from a pipe), runs the commands, shows
    the answers as they come."""

    def __init__(self, conversation: Conversation, interactive: bool) -> None:
        self.c, self.interactive = conversation, interactive

    def loop(self, greeting: str) -> None:
        if self.interactive:
            # Ctrl-C is how a person stops an answer; a chat started by a shell in the background inherits SIGINT
            # ignored, and Python then never raises KeyboardInterrupt
            signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                importlib.import_module("readline")  # importing it gives input() line editing and history
            except ImportError:  # not on every platform; input() still works without
                pass
            _note(greeting)
        while (line := self.read()) is not None:
            text = line.strip()
            try:
                if text.startswith("/"):
                    if not self.command(text):
                        return
                elif text:
                    self.reply(text)
            except KeyboardInterrupt:  # between the answer's pieces (they stop it) and the next prompt: keep the chat
                click.echo()

    def read(self) -> str | None:
        """The user's next line, or None at the end of input (Ctrl-D)."""
        while True:
            try:
                if not self.interactive:
                    return sys.stdin.readline() or None
                return input(f"{self.c.label}> ")
            except EOFError:
                click.echo()
                return None
            except KeyboardInterrupt:  # at the prompt: a fresh prompt, as a shell gives
                if not self.interactive:
                    raise
                click.echo()

    def command(self, text: str) -> bool:
        """Run a /command; False: leave."""
        name, _, arg = text.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            click.echo(COMMANDS, err=True)
        elif name == "/reset":
            self.c.reset()
            _note("(conversation cleared)")
        elif name == "/adapter":
            try:
                self.c.switch(arg.strip())
                _note(f"(answering with {self.c.label})")
            except LoraEdgeError as exc:
                _error(str(exc))
        else:
            _error(f"unknown command {name!r}; /help lists the commands")
        return True

    def reply(self, text: str) -> None:
        c = self.c
        try:
            pieces = c.ask(text)
        except LoraEdgeError as exc:
            _error(str(exc))
            return
        if c.dropped:
            _note(f"(the conversation outgrew the model's context of {c.model.max_length} tokens: dropped the oldest "
                  f"{c.dropped} turn{'s' if c.dropped > 1 else ''})")  # fmt: skip
        try:
            for piece in pieces:
                click.echo(piece, nl=False)
                sys.stdout.flush()
        except KeyboardInterrupt:  # during the answer: stop it, keep the chat
            pieces.close()
        except LoraEdgeError as exc:
            click.echo()
            _error(str(exc))
            return
        click.echo()
        a = c.last
        rate = f"{a.tokens / a.seconds:.1f}" if a.seconds > 0 else "-"
        end = {"interrupted": "; stopped", "length": f"; cut at --max-new-tokens {c.max_new_tokens}"}.get(a.reason, "")
        _note(f"({a.tokens} tokens in {a.seconds:.2f} s, {rate} tok/s{end})")


def _note(text: str) -> None:
    click.echo(click.style(text, dim=True), err=True)


def _error(text: str) -> None:
    click.echo(f"Error: {text}", err=True)


@cli.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("-a", "--adapter", default="none", show_default=True, metavar="CHOICE",
              help="Adapter to start with: NAME, NAME@STRENGTH (pirate@0.5), a blend A@W+B@W (pirate@0.7+shout@0.3), or "
                   "'none' for the base; /adapter switches it during the chat.")  # fmt: skip
@click.option("--system", default=None, metavar="TEXT", help="A system message that starts the conversation (kept by /reset).")
@click.option("-n", "--max-new-tokens", type=click.IntRange(1, None), default=256, show_default=True,
              help="The longest answer, in tokens.")  # fmt: skip
def chat(package: Path, adapter: str, system: str | None, max_new_tokens: int, **options) -> None:
    """Talk with PACKAGE in the terminal: each answer streams as it is generated, the conversation is kept (the oldest
    turns are dropped when it outgrows the model's context), and a dim line after each answer gives its tokens/s.
    Type /help for the commands: /adapter NAME switches adapter mid-conversation, /reset clears it, /quit (or
    Ctrl-D) leaves; Ctrl-C stops an answer. With stdin not a terminal it reads one message per line and writes the
    answers, one per line, to stdout (everything else goes to stderr).

    \b
    Examples:
      lora-edge chat pkg/ -a pirate
      lora-edge chat pkg/ --system "Answer in one sentence." --do-sample --temperature 0.7 --seed 1
      printf 'What is snow?\\n/adapter shout\\nAnd rain?\\n' | lora-edge chat pkg/ -a pirate -n 64
    """
    from ..config import AdapterSpec
    from ..runtime import DecoderModel, load
    from ..runtime.sampling import Sampling

    loads, stops, threads, providers = (options.pop(k) for k in ("loads", "stops", "threads", "providers"))
    sampling = Sampling(**options)  # a bad value fails before the package loads
    model = load(package, threads=threads, providers=list(providers) or None)
    if not isinstance(model, DecoderModel):
        raise InputError(f"{package} is an encoder package (it embeds or classifies); chat needs a text generation package")
    if not model.tokenizer.chat_template:
        raise InputError(f"{package} has no chat template, so it cannot hold a conversation; use `lora-edge run --raw` instead")
    for spec in map(AdapterSpec.parse, loads):
        model.load_adapter(spec.name, spec.path)
    conversation = Conversation(model, system, max_new_tokens, sampling, tuple(stops))
    conversation.switch(adapter)
    names = ", ".join(model.adapters) or "none"
    Terminal(conversation, interactive=sys.stdin.isatty()).loop(
        f"chatting with {package} (adapters: {names}); /help for the commands, /quit or Ctrl-D to leave")


chat.params.extend(p for p in run.params if p.name in SHARED)

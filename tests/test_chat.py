"""`lora-edge chat` driven as a person drives it: through a pseudo-terminal (pexpect), keys and Ctrl-C included; and
through a pipe, as a script drives it. Every answer is checked against the runtime alone: greedy ``generate`` on the
same conversation with the same adapter gives the same text, token for token."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import lora_edge
from conftest import REAL_ADAPTERS, real_gguf

pexpect = pytest.importorskip("pexpect")

ENV = os.environ | {"OMP_NUM_THREADS": "1", "TERM": "dumb"}  # a dumb terminal: readline sends no control sequences
STATS = re.compile(r"\((\d+) tokens in [\d.]+ s, [\d.]+ tok/s(; [^)]*)?\)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
SYSTEM = "Be brief."
N = 20  # new tokens per answer: enough to tell the adapters apart, few enough to stay fast


def command(pkg, *args) -> list[str]:
    return [sys.executable, "-m", "lora_edge.cli", "chat", str(pkg), "--threads", "1", *args]


def spawn(pkg, *args) -> "pexpect.spawn":
    cmd = command(pkg, *args)
    return pexpect.spawn(cmd[0], cmd[1:], env=ENV, encoding="utf-8", timeout=120, dimensions=(24, 500))


class Turn:
    """One answer as the terminal showed it: the text, the reads it arrived in, its tokens/s line."""

    def __init__(self, child, text: str, prompt: str, interrupt: bool = False) -> None:
        child.sendline(text)
        child.expect_exact(text + "\r\n")  # the terminal's echo of the line typed
        buf, self.reads = "", 0
        while not STATS.search(ANSI.sub("", buf)):
            buf += child.read_nonblocking(4096, timeout=120)
            self.reads += 1
            if interrupt and self.reads == 1:  # the first piece is there: Ctrl-C
                child.sendintr()
        self.dimmed = "\x1b[2m(" in buf  # the tokens/s line
        shown = ANSI.sub("", buf).replace("\r\n", "\n")
        if interrupt:  # the terminal echoes the key
            shown = shown.replace("^C", "", 1)
        self.stats = STATS.search(shown)
        self.tokens = int(self.stats[1])
        assert shown[self.stats.end() :].strip() in ("", prompt.strip())  # nothing else printed
        assert shown[: self.stats.start()].endswith("\n")
        self.text = shown[: self.stats.start()][:-1]
        if prompt not in shown[self.stats.end() :]:
            child.expect_exact(prompt)


def conversation(*turns: tuple[str, str]) -> list[dict]:
    """The messages of a conversation: the system message, then (user, assistant) pairs; '' leaves the last open."""
    messages = [{"role": "system", "content": SYSTEM}]
    for user, assistant in turns:
        messages.append({"role": "user", "content": user})
        if assistant:
            messages.append({"role": "assistant", "content": assistant})
    return messages


# -- the real model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_package(tmp_path_factory):
    from lora_edge.compile.pipeline import export
    from lora_edge.config import AdapterSpec, ExportConfig

    gguf = real_gguf()
    out = tmp_path_factory.mktemp("real_chat") / "pkg"
    export(ExportConfig(base=gguf, output=out, adapters=tuple(AdapterSpec(n, p) for n, p in REAL_ADAPTERS.items())))
    return out


@pytest.mark.real
def test_real_chat_in_a_terminal(real_package):
    """Streaming, the conversation kept, /adapter mid-conversation, Ctrl-C, /reset, an unknown adapter, /quit."""
    model = lora_edge.load(real_package, threads=1)
    child = spawn(real_package, "-a", "pirate", "--system", SYSTEM, "-n", str(N))
    try:
        child.expect_exact("pirate> ")
        q1, q2, q3 = "What is snow?", "And rain?", "Tell me a long story about a ship at sea."

        first = Turn(child, q1, "pirate> ")
        want = model.generate(conversation((q1, "")), adapter="pirate", max_new_tokens=N, return_result=True)
        assert first.text == want.text and first.tokens == len(want.token_ids)
        assert first.reads >= 3, "the answer came in one piece, not streamed"
        assert first.dimmed
        assert "Arr" in first.text

        child.sendline("/adapter shout")
        child.expect_exact("shout> ")
        second = Turn(child, q2, "shout> ")  # the conversation so far, answered by the other adapter
        assert second.text == model.generate(conversation((q1, first.text), (q2, "")), adapter="shout", max_new_tokens=N)
        assert second.text != model.generate(conversation((q1, first.text), (q2, "")), adapter="pirate", max_new_tokens=N)

        child.sendline("/adapter nosuch")  # one line naming the ones there are; the chat goes on
        child.expect_exact("Error: unknown adapter 'nosuch'; this package has: pirate, shout")
        child.expect_exact("shout> ")

        child.sendline("/adapter")  # the base
        child.expect_exact("base> ")
        stopped = Turn(child, q3, "base> ", interrupt=True)
        assert stopped.stats[2] == "; stopped" and stopped.tokens < N
        so_far = conversation((q1, first.text), (q2, second.text), (q3, ""))
        assert stopped.text and model.generate(so_far, max_new_tokens=N).startswith(stopped.text)
        after = Turn(child, "Thanks.", "base> ")  # the chat goes on, with the answer as far as it was shown
        so_far = conversation((q1, first.text), (q2, second.text), (q3, stopped.text), ("Thanks.", ""))
        assert after.text == model.generate(so_far, max_new_tokens=N)

        child.sendline("/reset")
        child.sendline("/adapter shout")
        child.expect_exact("shout> ")
        fresh = Turn(child, q1, "shout> ")
        assert fresh.text == model.generate(conversation((q1, "")), adapter="shout", max_new_tokens=N)

        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


# -- a tiny model ---------------------------------------------------------------------------------
def expected(model, lines: list[str], n: int) -> tuple[str, int]:
    """What the chat must print for ``lines`` (questions and /adapter commands) from the runtime alone: its stdout,
    and how many times it dropped the oldest turns to stay within the model's context."""
    messages, adapter, out, drops = conversation(), None, [], 0
    for line in lines:
        if line.startswith("/adapter"):
            adapter = line.partition(" ")[2] or None
            continue
        ask = [*messages, {"role": "user", "content": line}]
        if len(model.tokenizer.encode(ask, True)) + n > model.max_length:
            drops += 1
        while len(model.tokenizer.encode(ask, True)) + n > model.max_length:
            del ask[1:3]  # the oldest question and its answer; the system message stays
        answer = model.generate(ask, adapter=adapter, max_new_tokens=n)
        messages = [*ask, {"role": "assistant", "content": answer}]
        out.append(answer + "\n")
    return "".join(out), drops


def test_chat_from_a_pipe_keeps_to_the_context(tiny_package):
    """Lines in, answers out; the tiny model's context (256 tokens) fills after a few turns: the oldest turns go,
    with a notice, and every answer is still the runtime's for the conversation that remains."""
    model = lora_edge.load(tiny_package, threads=1)
    n = 40
    lines = ["What is snow?", "Hello pirates!", "/adapter qv_r4", "Numbers like 12345?", "What is the capital?",
             "Snow falls.", "/adapter", "Hello world."]  # fmt: skip
    want, drops = expected(model, lines, n)
    assert drops >= 2  # (the test is about the context filling up)
    done = subprocess.run(command(tiny_package, "--system", SYSTEM, "-n", str(n)), input="\n".join(lines) + "\n",
                          capture_output=True, text=True, env=ENV, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == want
    assert done.stderr.count("tok/s") == len(lines) - 2
    assert done.stderr.count("context of 256 tokens: dropped the oldest") == drops
    assert "\x1b[" not in done.stderr  # no colours where nobody sees them


def test_chat_samples_as_generate_does(tiny_package):
    """run's sampling options mean the same here: a seeded sample is the runtime's sample with that seed."""
    model = lora_edge.load(tiny_package, threads=1)
    options = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2, seed=3)
    args = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in options.items()]
    done = subprocess.run(command(tiny_package, "--system", SYSTEM, "-n", "12", *args), input="Hello pirates!\n",
                          capture_output=True, text=True, env=ENV, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    want = model.generate(conversation(("Hello pirates!", "")), max_new_tokens=12, **options)
    assert done.stdout == want + "\n" and want != model.generate(conversation(("Hello pirates!", "")), max_new_tokens=12)


def test_chat_terminal_keys_and_commands(tiny_package):
    """Ctrl-C at the prompt gives a fresh one, unknown commands and bad choices keep the chat, Ctrl-D leaves with 0."""
    model = lora_edge.load(tiny_package, threads=1)
    child = spawn(tiny_package, "-a", "qv_r4", "-n", "4", "--system", SYSTEM)
    try:
        child.expect_exact("qv_r4> ")
        child.sendintr()
        child.expect_exact("qv_r4> ")
        child.sendline("/nosuch")
        child.expect_exact("Error: unknown command '/nosuch'; /help lists the commands")
        child.sendline("/adapter qv_r4@x")
        child.expect_exact("is not a number")
        child.sendline("/help")
        child.expect_exact("/reset")
        child.sendline("/adapter qv_r4@0.5+lm_head@0.5")
        child.expect_exact("qv_r4@0.5+lm_head@0.5> ")
        turn = Turn(child, "Hello", "qv_r4@0.5+lm_head@0.5> ")
        blend = {"qv_r4": 0.5, "lm_head": 0.5}
        assert turn.text == model.generate(conversation(("Hello", "")), adapter=blend, max_new_tokens=4)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


@pytest.mark.parametrize("args, message", [
    (["-a", "nosuch"], "unknown adapter 'nosuch'; this package has: "),
    (["--temperature", "0"], "temperature must be > 0"),
])  # fmt: skip
def test_chat_refuses_bad_choices_in_one_line(tiny_package, args, message):
    done = subprocess.run(command(tiny_package, *args), input="", capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_chat_refuses_a_missing_package_in_one_line(tmp_path):
    done = subprocess.run(command(tmp_path / "nope"), input="", capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr

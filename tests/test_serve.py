"""`lora-edge serve`: a live server on loopback, driven by OpenAI's own client. Every answer is checked against the
runtime alone (greedy: the same text, token for token), for the base and for adapters, streamed or not, alone or
with 8 clients at once; bad requests get OpenAI's JSON errors naming the field, and the server keeps answering."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import lora_edge  # noqa: E402 (after the skips)
from lora_edge.serve.app import build_app  # noqa: E402
from lora_edge.serve.options import ServeOptions  # noqa: E402

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of Italy?"}]
N = 8  # new tokens per answer: enough to differ between adapters, few enough to stay fast


class Live:
    """A uvicorn server on a free loopback port, in a thread of this process."""

    def __init__(self, app) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "x"), max_retries=0, **kw)

    def close(self) -> float:
        """Stop it; the seconds that took (a request left hanging holds it for the graceful shutdown's 2 s)."""
        start = time.monotonic()
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive()
        return time.monotonic() - start


@pytest.fixture(scope="module")
def model(tiny_package):
    return lora_edge.load(tiny_package)


@pytest.fixture(scope="module")
def live(model, tiny_package):
    server = Live(build_app(model, name=tiny_package.name))
    yield server
    server.close()


def test_models_lists_base_and_adapters(live, model, tiny_package):
    models = live.client().models.list()
    assert [m.id for m in models.data] == [tiny_package.name, *model.adapters]
    assert all(m.object == "model" and m.owned_by == "lora-edge" and m.created > 0 for m in models.data)
    assert live.client().models.retrieve("qv_r4").id == "qv_r4"


@pytest.mark.parametrize("adapter", [None, "qv_r4", "lm_head"])
def test_chat_is_the_runtime_answer(live, model, tiny_package, adapter):
    """``model`` picks the adapter: the answer is the runtime's greedy answer with that adapter alone."""
    name = adapter or tiny_package.name
    out = live.client().chat.completions.create(model=name, messages=MESSAGES, max_tokens=N, temperature=0)
    want = model.generate(MESSAGES, adapter, max_new_tokens=N, return_result=True)
    assert out.choices[0].message.content == want.text and out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (want.prompt_tokens, len(want.token_ids))
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.object == "chat.completion" and out.model == name


def test_adapters_answer_differently(live, model):
    """(So that the test above tells adapters apart: on this package they all answer differently.)"""
    texts = {a: model.generate(MESSAGES, a, max_new_tokens=N) for a in (None, "qv_r4", "lm_head", "patterns")}
    assert len(set(texts.values())) == len(texts)


def test_completion_token_ids_are_generate_ids(live, model):
    ids = [5, 17, 42, 99, 7]
    for adapter in ("all_r8_rslora", "regex_layers"):
        tokens, reason = model.generate_ids(ids, adapter, N)
        out = live.client().completions.create(model=adapter, prompt=ids, max_tokens=N, temperature=0)
        assert out.choices[0].text == model.tokenizer.decode(tokens)
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), len(tokens))


def test_completions_text_prompt_has_no_template(live, model):
    out = live.client().completions.create(model="patterns", prompt="Snow is", max_tokens=N, temperature=0)
    assert out.object == "text_completion"
    assert out.choices[0].text == model.generate("Snow is", "patterns", max_new_tokens=N, chat=False)
    assert out.usage.prompt_tokens == len(model.tokenizer.encode("Snow is", chat=False))


@pytest.mark.parametrize("chat", [True, False])
def test_stream_concatenates_to_the_answer(live, model, chat):
    client = live.client()
    kw = dict(model="qv_r4", max_tokens=2 * N, temperature=0, stream_options={"include_usage": True})
    if chat:
        full = client.chat.completions.create(messages=MESSAGES, **kw)
        chunks = list(client.chat.completions.create(messages=MESSAGES, stream=True, **kw))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        want = full.choices[0].message.content
    else:
        full = client.completions.create(prompt="Snow is", **kw)
        chunks = list(client.completions.create(prompt="Snow is", stream=True, **kw))
        text, want = "".join(c.choices[0].text for c in chunks if c.choices), full.choices[0].text
    assert text == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert len({c.id for c in chunks}) == 1


def test_stop_strings_end_the_answer(live, model):
    """A stop string cuts the answer before it (streamed alike), with finish_reason "stop"."""
    whole = model.generate("Snow is", None, max_new_tokens=N, chat=False)
    stop = whole[3:5]  # (the base repeats "ital": the first occurrence is what ends it)
    client = live.client()
    out = client.completions.create(model="base", prompt="Snow is", max_tokens=N, temperature=0, stop=[stop, "zzz"])
    assert out.choices[0].text == whole[: whole.index(stop)] and out.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model="base", prompt="Snow is", max_tokens=N, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text


def test_seeded_sampling_is_the_runtime_sampling(live, model):
    kw = dict(temperature=0.8, top_p=0.9, seed=3)
    out = [live.client().chat.completions.create(model="qv_r4", messages=MESSAGES, max_tokens=N, **kw) for _ in range(2)]
    want = model.generate(MESSAGES, "qv_r4", max_new_tokens=N, do_sample=True, **kw)
    assert out[0].choices[0].message.content == out[1].choices[0].message.content == want
    extra = live.client().chat.completions.create(model="qv_r4", messages=MESSAGES, max_tokens=N, temperature=0,
                                                  extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.3})  # fmt: skip
    greedy = model.generate(MESSAGES, "qv_r4", max_new_tokens=N, top_k=5, min_p=0.1, repetition_penalty=1.3)
    assert extra.choices[0].message.content == greedy


def test_eight_concurrent_clients(live, model, tiny_package):
    """8 clients at once over the base and 3 adapters, half streaming, with their own questions and lengths: they
    decode together (a request joins the running batch at its next step and leaves at its end), and each gets what
    it gets alone."""
    adapters = [None, "qv_r4", "all_r8_rslora", "layers_exclude"] * 2
    questions = [[MESSAGES[0], {"role": "user", "content": f"What is {w}?"}] for w in "sea snow rain wind sun moon salt ice".split()]
    lengths = [N + i % 3 for i in range(8)]
    want = [model.generate(q, a, max_new_tokens=n) for q, a, n in zip(questions, adapters, lengths)]

    def ask(i: int) -> str:
        kw = dict(model=adapters[i] or tiny_package.name, messages=questions[i], max_tokens=lengths[i], temperature=0)
        client = live.client()
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw))
        return client.chat.completions.create(**kw).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(8))) == want
    assert live.server.config.app.state.api.scheduler.peak >= 3  # (4 rows at most: the default --parallel)


def test_min_tokens_holds_the_end_back(live, model):
    """vLLM's min_tokens: the end-of-sequence token is not taken before it, as the runtime's min_new_tokens."""
    ids = model.tokenizer.encode(MESSAGES, chat=True)
    want, _ = model.generate_ids(ids, "qv_r4", 12, min_new_tokens=12)
    reply = live.client().completions.create(model="qv_r4", prompt=ids, max_tokens=12, temperature=0, extra_body={"min_tokens": 12})
    assert reply.usage.completion_tokens == 12 and reply.choices[0].text == model.tokenizer.decode(want)
    with pytest.raises(openai.BadRequestError) as bad:
        live.client().completions.create(model="qv_r4", prompt=ids, max_tokens=4, extra_body={"min_tokens": 5})
    assert bad.value.body["param"] == "min_tokens"


def _chat(**fields) -> dict:
    return {"model": "qv_r4", "messages": [{"role": "user", "content": "x"}], **fields}


BAD = [  # (path, body, status, the field the error names)
    ("chat/completions", b"{not json", 400, None),
    ("chat/completions", [1, 2], 400, None),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ("chat/completions", _chat(model=7), 400, "model"),
    ("chat/completions", _chat(messages="hi"), 400, "messages"),
    ("chat/completions", _chat(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role"),
    ("chat/completions", _chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content"),
    ("chat/completions", _chat(max_tokens=-1), 400, "max_tokens"),
    ("chat/completions", _chat(max_tokens="5"), 400, "max_tokens"),
    ("chat/completions", _chat(max_tokens=10**6), 400, "max_tokens"),  # more than the context
    ("chat/completions", _chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("chat/completions", _chat(temperature="hot"), 400, "temperature"),
    ("chat/completions", _chat(top_p=0), 400, "top_p"),
    ("chat/completions", _chat(top_k=1.5), 400, "top_k"),
    ("chat/completions", _chat(seed=-1), 400, "seed"),
    ("chat/completions", _chat(stop=5), 400, "stop"),
    ("chat/completions", _chat(n=2), 400, "n"),
    ("chat/completions", _chat(stream="yes"), 400, "stream"),
    ("chat/completions", _chat(logprobs=True), 400, "logprobs"),
    ("chat/completions", _chat(model="nope"), 404, "model"),
    ("completions", {"model": "qv_r4"}, 400, "prompt"),
    ("completions", {"model": "qv_r4", "prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"model": "qv_r4", "prompt": [10**6]}, 400, "prompt"),
    ("completions", {"model": "qv_r4", "prompt": "x" * 2000}, 400, "prompt"),  # more than the context
    ("completions", b" " * (9 << 20), 413, None),  # more than any prompt: refused before it is all read
]


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[f"{p}:{f}:{s}" for p, _, s, f in BAD])
def test_bad_requests_get_json_errors(live, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{live.url}/v1/{path}", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and "Traceback" not in error["message"]
    if status == 404:
        assert "qv_r4" in error["message"]  # the available ones


def test_openai_client_sees_the_errors_and_the_server_goes_on(live, tiny_package):
    client = live.client()
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="qv_r4", messages=MESSAGES, n=2)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="pirate", messages=MESSAGES)
    assert tiny_package.name in missing.value.body["message"]
    assert httpx.get(f"{live.url}/v1/nowhere").json()["error"]["message"]
    out = client.chat.completions.create(model="qv_r4", messages=MESSAGES, max_tokens=2)
    assert out.usage.completion_tokens <= 2


class Slow:
    """The model, taking ``delay`` seconds per token: long enough to fill the queue while a client watches."""

    def __init__(self, model, delay: float) -> None:
        self.model, self.delay = model, delay

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate_ids(self, *args, stop, **kw):
        return self.model.generate_ids(*args, stop=lambda t: time.sleep(self.delay) or stop(t), **kw)


def _waiting(url: str, n: int) -> None:
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/health").json()["waiting"] != n:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_full_queue_is_429_and_gone_clients_free_their_slot(model):
    live = Live(build_app(Slow(model, 0.05), options=ServeOptions(max_queue=1, parallel=1)))  # 200 tokens: 10 s each, if they ran to the end
    try:
        body = {"model": "qv_r4", "messages": MESSAGES, "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
            with a.stream("POST", f"{live.url}/v1/chat/completions", json=body) as running:
                _waiting(live.url, 0)  # the first is generating
                with b.stream("POST", f"{live.url}/v1/chat/completions", json=body) as queued:
                    _waiting(live.url, 1)  # the second waits
                    with pytest.raises(openai.RateLimitError) as full:
                        live.client().chat.completions.create(model="qv_r4", messages=MESSAGES, max_tokens=2)
                    assert full.value.status_code == 429 and full.value.body["code"] == "queue_full"
                    assert next(running.iter_lines()).startswith("data: ")
                    assert queued.status_code == 200
        _waiting(live.url, 0)  # the queued one left: its slot is free (without waiting for the running one to stop)
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
            httpx.post(f"{live.url}/v1/chat/completions", json=body | {"stream": False}, timeout=0.5)
        start = time.monotonic()  # all three hung up: their generations stopped, so this one runs at once
        out = live.client().chat.completions.create(model="qv_r4", messages=MESSAGES, max_tokens=2, temperature=0)
        assert time.monotonic() - start < 5 and out.usage.completion_tokens == 2
        assert _waiting(live.url, 0) is None and live.close() < 1.5  # no handler is left waiting on a job
    finally:
        live.close()


@pytest.fixture(scope="module")
def cli_server(tiny_package):
    """`lora-edge serve` itself, in a subprocess, with an API key; the port it picked read from its log."""
    code = "import lora_edge.cli.serve; from lora_edge.cli import main; main()"  # (registers the command)
    args = [sys.executable, "-c", code, "serve", str(tiny_package), "--port", "0", "--api-key", "sekret", "--threads", "1"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    url, seen = None, []
    for line in proc.stderr:
        seen.append(line)
        if "Uvicorn running on " in line:
            url = line.split("Uvicorn running on ")[1].split()[0]
            break
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # (keep draining its log)
    try:
        assert url, "".join(seen)
        assert "127.0.0.1" in url and "API key required" in "".join(seen)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def test_api_key(cli_server):
    assert httpx.get(f"{cli_server}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError) as wrong:
        openai.OpenAI(base_url=cli_server + "/v1", api_key="guess", max_retries=0).models.list()
    assert wrong.value.status_code == 401 and wrong.value.body["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=cli_server + "/v1", api_key="sekret", max_retries=0)
    assert "qv_r4" in [m.id for m in client.models.list().data]
    assert client.chat.completions.create(model="qv_r4", messages=MESSAGES, max_tokens=2).usage.completion_tokens <= 2


def test_cli_without_the_extra(monkeypatch):
    from click.testing import CliRunner

    import lora_edge.cli.serve  # noqa: F401 (registers the command)
    import lora_edge.serve
    from lora_edge.cli import cli

    monkeypatch.setattr(lora_edge.serve, "missing_extra", lambda: "starlette")
    result = CliRunner().invoke(cli, ["serve", "pkg/"])
    assert result.exit_code == 2
    assert "lora-edge serve needs the serve extra: pip install 'lora-edge[serve]'" in result.output


def test_serve_is_device_side():
    check = ("import sys, lora_edge.serve, lora_edge.serve.app, lora_edge.cli.serve; "
             "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnx', 'peft') "
             "or m.startswith('lora_edge.compile')]; assert not bad, bad")  # fmt: skip
    subprocess.run([sys.executable, "-c", check], check=True)


class Broken:
    """The model, failing inside generation: a bug (qv_r4) or a bad input the runtime caught (lm_head)."""

    def __init__(self, model) -> None:
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    @staticmethod
    def fail(adapter) -> None:
        if adapter == "qv_r4":
            raise RuntimeError("secret internals")
        if adapter == "lm_head":
            raise lora_edge.RuntimeInputError("the runtime refused this")

    def generate_ids(self, ids, adapter, *args, **kw):
        self.fail(adapter)
        return self.model.generate_ids(ids, adapter, *args, **kw)

    def batch(self, rows, capacity=None):
        batch = self.model.batch(rows, capacity)
        add = batch.add
        batch.add = lambda *rows: [self.fail(r.key) for r in rows] and add(*rows)
        return batch


@pytest.mark.parametrize("parallel", [1, 4])
def test_failures_inside_generation(model, parallel):
    """A bug is a 500 without its details (the server's log has them), the runtime's refusal a 400 with its line,
    streamed or not, one request at a time or batched; the server goes on."""
    live = Live(build_app(Broken(model), options=ServeOptions(parallel=parallel)))
    try:
        client = live.client()
        with pytest.raises(openai.InternalServerError) as bug:
            client.chat.completions.create(model="qv_r4", messages=MESSAGES, max_tokens=2)
        assert bug.value.status_code == 500 and "secret" not in str(bug.value.body)
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="lm_head", messages=MESSAGES, max_tokens=2)
        assert refused.value.body["message"] == "the runtime refused this"
        body = {"model": "qv_r4", "messages": MESSAGES, "max_tokens": 2, "stream": True}
        lines = [x for x in httpx.post(f"{live.url}/v1/chat/completions", json=body).text.splitlines() if x]
        assert json.loads(lines[-2][6:])["error"]["type"] == "server_error" and lines[-1] == "data: [DONE]"
        assert client.chat.completions.create(model="patterns", messages=MESSAGES, max_tokens=2).usage.completion_tokens <= 2
    finally:
        live.close()


FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "min_tokens", "temperature", "top_p", "top_k",
          "min_p", "repetition_penalty", "seed", "stop", "stream", "stream_options", "n", "logprobs", "tools", "user"]  # fmt: skip


def _json_values():
    from hypothesis import strategies as st

    leaves = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                        max_leaves=8)  # fmt: skip


def test_fuzzed_requests_get_json_errors_and_leave_nothing_behind(live, model):
    """Valid requests with fields replaced by arbitrary JSON, and byte-level damage to their bodies: every answer is
    200 or an OpenAI error object with a 4xx status (never a 500), and afterwards nothing runs or waits and the
    server answers as before."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    url = f"{live.url}/v1"
    base = {"model": "qv_r4", "messages": MESSAGES, "max_tokens": 3, "temperature": 0}
    before = live.client().chat.completions.create(**base).choices[0].message.content
    http = httpx.Client(timeout=30)

    def check(path: str, content: bytes) -> None:
        reply = http.post(f"{url}/{path}", content=content, headers={"Content-Type": "application/json"})
        if reply.status_code == 200:
            return
        assert 400 <= reply.status_code < 500, (reply.status_code, content[:200])
        error = reply.json()["error"]
        assert isinstance(error["message"], str) and "\n" not in error["message"] and "Traceback" not in error["message"]

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["chat/completions", "completions"]), st.dictionaries(st.sampled_from(FIELDS), _json_values(), max_size=4),
           st.booleans())  # fmt: skip
    def fields(path: str, changes: dict, stream: bool) -> None:
        body = {**base, **({"prompt": "Hi"} if path == "completions" else {}), "stream": stream, **changes}
        check(path, json.dumps(body).encode())

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.integers(0, 200), st.binary(max_size=8))
    def damaged(cut: int, junk: bytes) -> None:
        raw = json.dumps(base).encode()
        check("chat/completions", raw[:cut] + junk + raw[cut:])

    try:
        fields()
        damaged()
    finally:
        http.close()
    deadline = time.monotonic() + 10
    while (health := httpx.get(f"{live.url}/health").json()) != {"status": "ok", "running": 0, "waiting": 0}:
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    assert live.client().chat.completions.create(**base).choices[0].message.content == before

"""`swarm api` with the official `openai` client, against a local swarm of a tiny model with swarm's byte-level
tokenizer and chat template: answers equal to ChatSession's and the Python API's, streamed or not, stop strings,
usage, concurrent requests, a server killed mid-stream, disconnects, the key, and refused requests."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from conftest import _FORKED, _FORKS, _run_cli, make_tokenized_model, swarm_env

from swarm import AutoDistributedModelForCausalLM
from swarm.core.chat import ChatSession, encode_chat, render_chat
from swarm.core.server import Server, ServerConfig
from swarm.core.server.adapters import AdapterConfig

KEY = "test-key-123"
FAST = ["--host", "127.0.0.1", "--no-mdns", "--gossip-period", "0.2", "--record-ttl", "3"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about swarms."}]


def post(url: str, body: bytes, key: str | None = KEY, path: str = "/chat/completions") -> tuple[int, dict]:
    """A raw POST to the API (what the openai client would not send); the status and the JSON answer."""
    conn = http.client.HTTPConnection(url.split("//")[1].split("/")[0], timeout=30)
    headers = {"Content-Type": "application/json", **({} if key is None else {"Authorization": f"Bearer {key}"})}
    try:
        conn.request("POST", "/v1" + path, body=body, headers=headers)
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        conn.close()


def health(api) -> dict:
    conn = http.client.HTTPConnection(api.url.split("//")[1].split("/")[0], timeout=30)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


class ForkedApi:
    """`swarm api ARGS` in a forked process; the URL it prints is read (bounded)."""

    def __init__(self, args: list[str], tmp: Path, env: dict[str, str], timeout: float = 60.0):
        out = tmp / f"api-{time.monotonic_ns()}.out"
        self.log_path = out.with_suffix(".log")
        self.proc = _FORKS.Process(target=_run_cli, args=(["api", "--port", "0", *args], str(out),
                                                          str(self.log_path), env, None))
        self.proc.start()
        _FORKED.append(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.is_alive():
            lines = (out.read_text() if out.exists() else "").splitlines(keepends=True)
            urls = [line.strip() for line in lines if line.startswith("http://") and line.endswith("\n")]
            if urls and urls[-1].endswith("/v1"):  # the metrics' URL, when there is one, comes first
                self.url = urls[-1]
                self.metrics_url = urls[0] if urls[0].endswith("/metrics") else None
                return
            time.sleep(0.02)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"swarm api did not start: {self.log_path.read_text(errors='replace')[-2000:]}")

    def alive(self) -> bool:
        return self.proc.is_alive()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc.is_alive() and self.proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        return self.proc.exitcode


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tokenized_model(tmp_path_factory.mktemp("api") / "tok", layers=4, seed=3)


@pytest.fixture(scope="module")
def adapter(model_dir) -> Path:
    """A LoRA of the model (PEFT's layout), served by both servers as "lora-qv"."""
    import peft
    from test_adapters import make_adapter

    config = peft.LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj"])
    return make_adapter(model_dir, model_dir.parent / "lora-qv", config, seed=5).path


@pytest.fixture(scope="module")
def servers(model_dir, adapter):
    preload = AdapterConfig(preload=(str(adapter),))
    started = [Server(ServerConfig(str(model_dir), span, host="127.0.0.1", port=0, poll_ms=20,
                                   adapters=preload)).start() for span in ((0, 2), (2, 4))]
    try:
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def api(servers, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api-run")
    proc = ForkedApi(["--initial-peers", *(s.endpoint for s in servers), "--api-key", KEY, "--metrics-port", "0"],
                     tmp, swarm_env(tmp))
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def oai(api):
    with openai.OpenAI(base_url=api.url, api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def local(model_dir, servers):
    """The Python API's client of the same swarm, and the tokenizer."""
    from transformers import AutoTokenizer

    model = AutoDistributedModelForCausalLM.from_pretrained(str(model_dir), initial_peers=[s.endpoint for s in servers])
    try:
        yield model, AutoTokenizer.from_pretrained(model_dir)
    finally:
        model.close()


def chat_session_answer(model_dir, servers, messages, max_new_tokens):
    """What ChatSession (`swarm chat --prompt`) answers to `messages`, and the number of tokens it generated."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    with ChatSession.connect(str(model_dir), [s.endpoint for s in servers], system=system, temperature=0.0,
                             max_new_tokens=max_new_tokens) as session:
        answer = session.send(messages[-1]["content"])
        prompt = encode_chat(session.tokenizer, render_chat(session.tokenizer, messages))
        return answer, len(session.ids) - len(prompt), len(prompt)


def streamed(stream):
    """Text per choice, finish reasons, and the usage, from a stream of chunks."""
    texts, reasons, use = {}, {}, None
    for part in stream:
        if part.usage is not None:
            use = part.usage
        for choice in part.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, use


def test_models_health_and_key(api, oai, model_dir):
    listed = [(m.id, m.parent) for m in oai.models.list().data]
    assert listed == [(model_dir.name, None), (f"{model_dir.name}:lora-qv", model_dir.name)]
    assert health(api)["status"] == "ok"  # no key needed there
    for key in ("wrong-key", None):
        status, answer = post(api.url, json.dumps({"model": model_dir.name}).encode(), key)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    with openai.OpenAI(base_url=api.url, api_key="nope", max_retries=0) as bad, \
            pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.slow
def test_chat_greedy_equals_chat_session_streamed_or_not(oai, model_dir, servers):
    expected, generated, prompt_tokens = chat_session_answer(model_dir, servers, MESSAGES, 24)
    whole = oai.chat.completions.create(model=model_dir.name, messages=MESSAGES, max_tokens=24, temperature=0)
    assert whole.choices[0].message.content == expected
    assert whole.usage.prompt_tokens == prompt_tokens and whole.usage.completion_tokens == generated
    assert whole.choices[0].finish_reason == ("length" if generated == 24 else "stop")
    stream = oai.chat.completions.create(model=model_dir.name, messages=MESSAGES, max_completion_tokens=24,
                                         temperature=0, stream=True, stream_options={"include_usage": True})
    texts, reasons, use = streamed(stream)
    assert texts == {0: expected} and reasons == {0: whole.choices[0].finish_reason}
    assert (use.prompt_tokens, use.completion_tokens, use.total_tokens) == (prompt_tokens, generated,
                                                                            prompt_tokens + generated)


@pytest.mark.slow
def test_completions_greedy_equal_the_python_api_and_stop_strings(oai, model_dir, local):
    model, tokenizer = local
    prompt = "The swarm"
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    got = oai.completions.create(model=model_dir.name, prompt=prompt, max_tokens=20, temperature=0)
    assert got.choices[0].text == expected and got.usage.prompt_tokens == ids.shape[1]
    texts, _, _ = streamed(oai.completions.create(model=model_dir.name, prompt=prompt, max_tokens=20, temperature=0,
                                                  stream=True))
    assert texts == {0: expected}
    # a stop string from the middle of the answer: the text ends before its first occurrence, streamed or not
    stop = expected[len(expected) // 2:len(expected) // 2 + 2]
    cut = expected[:expected.find(stop)]
    for stream in (False, True):
        answer = oai.completions.create(model=model_dir.name, prompt=prompt, max_tokens=20, temperature=0,
                                        stop=[stop, "never-there"], stream=stream)
        texts, reasons, _ = streamed(answer) if stream else ({0: answer.choices[0].text},
                                                            {0: answer.choices[0].finish_reason}, None)
        assert texts == {0: cut} and reasons == {0: "stop"}


def test_model_colon_adapter_answers_with_the_adapter(oai, model_dir, local):
    model, tokenizer = local
    ids = torch.tensor([tokenizer("With LoRA")["input_ids"]])
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
    texts = {adapter: tokenizer.decode(model.generate(ids, adapter=adapter, **kwargs)[0, ids.shape[1]:],
                                       skip_special_tokens=True) for adapter in (None, "lora-qv")}
    assert texts[None] != texts["lora-qv"]
    got = oai.completions.create(model=f"{model_dir.name}:lora-qv", prompt="With LoRA", max_tokens=10, temperature=0)
    assert got.choices[0].text == texts["lora-qv"]
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model=f"{model_dir.name}:no-such-adapter", prompt="x", max_tokens=2)


@pytest.mark.slow
def test_concurrent_requests_each_get_their_own_answer(oai, model_dir):
    prompts = [f"prompt number {i}" for i in range(4)]

    def ask(prompt, stream):
        kwargs = dict(model=model_dir.name, prompt=prompt, max_tokens=16, temperature=0)
        if stream:
            return streamed(oai.completions.create(**kwargs, stream=True))[0][0]
        return oai.completions.create(**kwargs).choices[0].text

    alone = [ask(p, False) for p in prompts]
    assert len(set(alone)) > 1  # different prompts, different answers: a mix-up would show
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, prompts, [True, False, True, False]))
    assert together == alone
    # n choices with a seed: the same seed gives the same choices, and sampling differs between them
    kwargs = dict(model=model_dir.name, prompt="x", max_tokens=12, temperature=1.0, seed=7, n=3)
    first, again = oai.completions.create(**kwargs), oai.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1 and 3 <= first.usage.completion_tokens <= 36


def test_refused_requests(api, oai, model_dir):
    base = dict(model=model_dir.name, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    refused = [dict(logit_bias={"5": 10}), dict(tools=[{"type": "function", "function": {"name": "f"}}]),
               dict(response_format={"type": "json_object"}), dict(logprobs=True), dict(max_tokens=10 ** 6),
               dict(temperature=5), dict(stop=["a", "b", "c", "d", "e"]), dict(frequency_penalty=0.5)]
    for extra in refused:
        with pytest.raises(openai.BadRequestError) as caught:
            oai.chat.completions.create(**{**base, **extra})
        error = caught.value.body
        assert caught.value.status_code == 400 and set(error) >= {"message", "type", "param", "code"}, extra
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(**base, extra_body={"frobnicate": 1})
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(**{**base, "model": "no-such-model"})
    for body in (b"{not json", b"[1, 2]", json.dumps({**base, "messages": []}).encode()):
        status, answer = post(api.url, body)
        assert status == 400 and answer["error"]["type"] == "invalid_request_error", body
    assert post(api.url, b"x" * (2 << 20), path="/completions")[0] == 413
    # no-op values of fields the API does not implement are fine
    ok = oai.chat.completions.create(**base, temperature=0, frequency_penalty=0, logprobs=False, user="me")
    assert ok.choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_a_client_leaving_mid_stream_closes_its_session(api, oai, model_dir, servers):
    request = {"model": model_dir.name, "prompt": "go", "max_tokens": 300, "temperature": 0}
    assert oai.completions.create(**request).usage.completion_tokens == 300  # no end of sequence before
    before = health(api)["tokens"]
    conn = http.client.HTTPConnection(api.url.split("//")[1].split("/")[0], timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({**request, "stream": True}),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.readline().startswith(b"data: ")
    assert any(s.handler.sessions for s in servers)
    conn.close()  # mid-answer
    deadline = time.monotonic() + 10
    while any(s.handler.sessions for s in servers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(s.handler.sessions for s in servers)
    assert health(api)["tokens"] - before < 300  # stopped before the end


@pytest.mark.slow
def test_stream_survives_a_server_killed_mid_answer(model_dir, fork_serve, tmp_path):
    first = fork_serve(str(model_dir), "--blocks", "0:2", *FAST)
    only = fork_serve(str(model_dir), "--blocks", "2:4", *FAST, "--initial-peers", first.endpoint)
    api = ForkedApi(["--initial-peers", first.endpoint, "--model", str(model_dir)], tmp_path, swarm_env(tmp_path))
    try:
        with openai.OpenAI(base_url=api.url, api_key="none", max_retries=0, timeout=120) as oai:
            request = dict(model=model_dir.name, prompt="Once upon a time", max_tokens=160, temperature=0)
            expected = oai.completions.create(**request)
            assert expected.usage.completion_tokens > 60  # long enough to be cut in the middle
            arrivals: list[tuple[float, str]] = []
            first_piece = threading.Event()

            def read() -> None:
                for part in oai.completions.create(**request, stream=True):
                    arrivals.append((time.monotonic(), part.choices[0].text if part.choices else ""))
                    first_piece.set()

            reader = threading.Thread(target=read)
            reader.start()
            assert first_piece.wait(30)
            only.stop(signal.SIGKILL)  # the only server of blocks 2:4: the answer waits for a replacement
            replacement = fork_serve(str(model_dir), "--blocks", "2:4", *FAST, "--initial-peers", first.endpoint)
            ready = time.monotonic()
            reader.join(120)
            assert not reader.is_alive() and replacement.alive()
        assert "".join(text for _, text in arrivals) == expected.choices[0].text
        assert any(at > ready and text for at, text in arrivals)  # text generated after the replacement came
    finally:
        api.stop()


def test_metrics_count_what_was_served(api, oai, model_dir):
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    oai.chat.completions.create(model=model_dir.name, messages=MESSAGES, max_tokens=5, temperature=0, stream=True)
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=model_dir.name, messages=MESSAGES, logit_bias={"1": 1})
    with urlopen(api.metrics_url, timeout=10) as reply:
        families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
    requests = {(s.labels["route"], s.labels["status"]): s.value for s in families["swarm_api_requests"].samples
                if s.name == "swarm_api_requests_total"}
    assert requests[("/v1/chat/completions", "200")] >= 1 and requests[("/v1/chat/completions", "400")] >= 1
    ttft = [s for s in families["swarm_api_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert ttft and ttft[0].value >= 1 and ttft[0].labels["model"] == model_dir.name
    generated = [s.value for s in families["swarm_api_generated_tokens"].samples if s.name.endswith("_total")]
    assert generated and generated[0] >= 5
    assert [s.value for s in families["swarm_api_tokens_per_second"].samples if s.name.endswith("_count")][0] >= 1


@pytest.mark.slow
def test_no_model_and_no_peers_starts_the_demo_swarm(tmp_path):
    api = ForkedApi(["--demo", "random", "--no-mdns"], tmp_path, swarm_env(tmp_path), timeout=240)
    try:
        with openai.OpenAI(base_url=api.url, api_key="none", max_retries=0, timeout=60) as oai:
            (model,) = [m.id for m in oai.models.list().data]
            answer = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, temperature=0)
            assert answer.usage.completion_tokens >= 1 and answer.choices[0].finish_reason in ("stop", "length")
    finally:
        code = api.stop()
    assert code == 0  # SIGTERM: the API and its demo servers stop cleanly
    assert "random" in api.log_path.read_text()

"""Errors that name the real cause, and a chat that survives Ctrl-C: no hub, a model served from a local directory,
an interrupted answer, control characters in a model's output, blocks no server covers."""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import load_reference, make_tokenized_model, swarm_env

from swarm.core.chat import ChatSession, printable
from swarm.core.client.config import ClientConfig
from swarm.core.client.model import AutoDistributedModelForCausalLM
from swarm.core.client.routing import MissingBlocks


def run_swarm(*args: str, env: dict[str, str], timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "swarm", *args], capture_output=True, text=True, env=env,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    return result, time.monotonic() - started


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return make_tokenized_model(tmp_path_factory.mktemp("ux") / "llama", layers=4, seed=3)


@pytest.fixture(scope="module")
def reference(chat_model):
    return load_reference(chat_model)


# answers long enough (in tokens and in time) that a Ctrl-C sent when the first text shows surely lands mid-answer,
# even on a busy machine
LONG_ANSWER = 600


@pytest.fixture(scope="module")
def long_chat_model(tmp_path_factory) -> Path:
    return make_tokenized_model(tmp_path_factory.mktemp("ux-long") / "llama", layers=8, seed=4, hidden=256,
                                max_position_embeddings=4096)


# ----------------------------------------------------------------------------------------------------- 1. no hub


def hubless_env(tmp_path: Path, offline: bool) -> dict[str, str]:
    env = swarm_env(tmp_path)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_DATASETS_CACHE"):
        env.pop(name, None)
    env["HF_HOME"] = str(tmp_path / "hf-home")  # an empty cache
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the discard port: nothing listens, so the hub is unreachable
    return env


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "unreachable"])
@pytest.mark.parametrize("model", ["some-org/some-model", "tinyllama"])
def test_chat_without_hub_is_one_line(tmp_path, offline, model):
    result, took = run_swarm("chat", model, "--prompt", "hi", "--initial-peers", "tcp://127.0.0.1:1",
                             env=hubless_env(tmp_path, offline))
    lines = error_lines(result)
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "not in the local Hugging Face cache" in lines[0]
    assert ("offline mode" if offline else "cannot be reached") in lines[0]
    assert "pass a local model directory" in lines[0] and "config.json" not in lines[0]
    assert took < 60  # the hub's own retries alone took about 25 s


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "unreachable"])
def test_tune_dataset_without_hub_is_one_line(tmp_path, offline):
    result, took = run_swarm("tune", "some-org/some-model", "--dataset", "sst2", env=hubless_env(tmp_path, offline))
    lines = error_lines(result)
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: dataset 'sst2'") and "local file" in lines[0]
    assert ("offline mode" if offline else "cannot be reached") in lines[0]
    assert took < 60


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "unreachable"])
def test_a_cached_hub_model_loads_without_the_hub(chat_model, tmp_path, offline):
    """A model fetched earlier (a snapshot in the hub cache, with no notes of absent files) needs no network."""
    env = hubless_env(tmp_path, offline)
    repo = Path(env["HF_HOME"]) / "hub" / "models--some-org--tiny"
    shutil.copytree(chat_model, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    script = ("from swarm.core.weights import ModelSource\n"
              "s = ModelSource('some-org/tiny')\n"
              "print(s.config().num_hidden_layers, sorted(s.load_tensors(['model.norm'])), "
              "type(s.tokenizer()).__name__)\n")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == ["4", "['model.norm.weight']"]
    assert time.monotonic() - started < 60


# ----------------------------------------------------------------------------- 2. chat with no MODEL, a directory


def test_chat_without_model_uses_the_served_local_directory(chat_model, reference, start_server, tmp_path):
    a = start_server(chat_model, (0, 2))
    b = start_server(chat_model, (2, 4))
    result, _ = run_swarm("chat", "--initial-peers", a.endpoint, b.endpoint, "--prompt", "Hi", "--temperature", "0",
                          "--max-new-tokens", "6", env=swarm_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == printable(reference_answer(chat_model, reference, [("Hi", None)], 6)) + "\n"


def test_chat_without_model_names_a_directory_this_machine_lacks(chat_model, start_server, tmp_path):
    moved = shutil.copytree(chat_model, tmp_path / "elsewhere" / "llama")
    a = start_server(moved, (0, 4))
    shutil.rmtree(moved)  # as if the servers ran on another machine: the path means nothing here
    result, took = run_swarm("chat", "--initial-peers", a.endpoint, "--prompt", "Hi", env=swarm_env(tmp_path))
    lines = error_lines(result)
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "from a local directory" in lines[0]
    assert str(moved) in lines[0] and "swarm chat PATH" in lines[0]
    assert took < 60


def test_records_carry_the_directory_path_and_validate_it(chat_model, start_server):
    from swarm.transport.errors import ProtocolError
    from swarm.transport.records import record_from_wire, record_to_wire

    server = start_server(chat_model, (0, 4))
    record = server.record()
    assert record.path == str(Path(chat_model).resolve())
    wire = record_to_wire(record)
    assert record_from_wire(wire).path == record.path
    # an older server sends none (nor a signature: its id is a random one, not a key)
    old = {**{k: v for k, v in wire.items() if k not in ("path", "signature")}, "peer_id": "ab" * 16}
    assert record_from_wire(old).path == ""
    for bad in ("x" * 2000, "/tmp/a\x1b[2J", 7):
        with pytest.raises(ProtocolError):
            record_from_wire({**wire, "path": bad})


# ------------------------------------------------------------------------------------ 3. Ctrl-C during an answer


def reference_answer(path: Path, reference, turns: list[tuple[str, list[int] | None]], max_new_tokens: int) -> str:
    """The greedy answer of plain transformers to the last user message of `turns` (earlier answers' token ids
    given), rendered with the chat template like ChatSession does for a fresh conversation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = []
    for text, answer in turns:
        messages.append({"role": "user", "content": text})
        if answer is not None:
            messages.append({"role": "assistant", "content": tokenizer.decode(answer, skip_special_tokens=True)})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def connect(path: Path, peers: list[str], max_new_tokens: int = 10, **config) -> ChatSession:
    return ChatSession.connect(str(path), peers, mdns=False, temperature=0, max_new_tokens=max_new_tokens,
                               config=ClientConfig(connect_timeout=10, **config))


def conversation(path: Path, peers: list[str], messages: list[str]) -> tuple[list[str], list[int]]:
    with connect(path, peers) as chat:
        answers = [chat.send(m) for m in messages]
        return answers, list(chat.ids)


@pytest.mark.parametrize("relay", [False, True], ids=["hop-by-hop", "relay"])
def test_an_answer_interrupted_from_the_stream_is_dropped(chat_model, start_server, relay):
    peers = [start_server(chat_model, span).endpoint for span in ((0, 2), (2, 4))]
    expected, expected_ids = conversation(chat_model, peers, ["Hello", "What now?"])
    with connect(chat_model, peers, relay=relay) as chat:
        assert chat.send("Hello") == expected[0]
        held, before = chat.model.active_session.position, (list(chat.messages), list(chat.ids))
        steps = 0

        def interrupt(piece: str) -> None:
            nonlocal steps
            steps += 1
            if steps == 3:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            chat.send("Tell me a long story", on_text=interrupt)
        assert steps == 3
        assert chat.model.active_session.position == held
        assert (chat.messages, chat.ids) == before
        assert chat.send("What now?") == expected[1]
        assert chat.ids == expected_ids


def test_an_answer_interrupted_inside_a_step_is_dropped(chat_model, start_server):
    """Ctrl-C while a step is half done (the first server has it, the second not): the servers go back too."""
    peers = [start_server(chat_model, span).endpoint for span in ((0, 2), (2, 4))]
    expected, expected_ids = conversation(chat_model, peers, ["Hello", "What now?"])
    with connect(chat_model, peers) as chat:
        chat.send("Hello")
        seq = chat.model.blocks
        call, calls = seq.call, []

        def interrupting_call(hop, msg_type, *args, **kwargs):
            if msg_type == "step":
                calls.append(hop.start)
                if len(calls) == 6 and hop.start == 2:  # the third step: its first server has it
                    raise KeyboardInterrupt
            return call(hop, msg_type, *args, **kwargs)

        seq.call = interrupting_call
        try:
            with pytest.raises(KeyboardInterrupt):
                chat.send("Tell me a long story")
        finally:
            seq.call = call
        assert chat.send("What now?") == expected[1]
        assert chat.ids == expected_ids


def test_rewind_refuses_a_position_inside_a_step(chat_model, start_server):
    from swarm.transport.errors import ConfigError

    peers = [start_server(chat_model, (0, 4)).endpoint]
    with connect(chat_model, peers) as chat:
        chat.send("Hello")
        session = chat.model.active_session
        for bad in (-1, session.position + 1, 1, True):
            with pytest.raises(ConfigError):
                session.rewind(bad)
        session.rewind(0)
        assert session.position == 0 and all(not hop.history for hop in session.hops)


def read_until(proc: subprocess.Popen, stream, wanted: str, timeout: float) -> str:
    """Read `stream` of `proc` (bounded) until `wanted` shows up; returns what was read."""
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    got = ""
    deadline = time.monotonic() + timeout
    try:
        while not got or wanted not in got:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError(f"no {wanted!r} within {timeout} s; got {got!r}")
            chunk = os.read(stream.fileno(), 65536).decode("utf-8", "replace")
            if not chunk:
                raise AssertionError(f"stream closed before {wanted!r}; got {got!r}")
            got += chunk
    finally:
        sel.close()
    return got


def long_prompt(path: Path, reference, tokens: int) -> str:
    """A message whose greedy answer from the tiny random model has text early and no end-of-turn for `tokens`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    for candidate in ("Tell me a story", "Hello", "Why?", "abc", "Go on", "What is it?", "x"):
        text = tokenizer.apply_chat_template([{"role": "user", "content": candidate}], tokenize=False,
                                             add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
        if len(out) == tokens and printable(tokenizer.decode(out[:4], skip_special_tokens=True)).strip():
            return candidate
    raise AssertionError("no candidate prompt gives a long answer")


def test_ctrl_c_in_the_chat_cli_stops_the_answer_and_the_chat_goes_on(long_chat_model, start_server, tmp_path):
    chat_model, reference = long_chat_model, load_reference(long_chat_model)
    peers = [start_server(chat_model, span).endpoint for span in ((0, 4), (4, 8))]
    tokens = LONG_ANSWER
    first = long_prompt(chat_model, reference, tokens)
    proc = subprocess.Popen([sys.executable, "-m", "swarm", "chat", str(chat_model), "--initial-peers", *peers,
                             "--temperature", "0", "--max-new-tokens", str(tokens)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=swarm_env(tmp_path))
    try:
        read_until(proc, proc.stderr, "you>", 120)
        proc.stdin.write(f"{first}\n".encode())
        proc.stdin.flush()
        read_until(proc, proc.stdout, "", 60)  # the answer has started
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        stderr = read_until(proc, proc.stderr, "you>", 60)
        assert "stopped" in stderr and "Traceback" not in stderr
        proc.stdin.write(b"Again\n")
        proc.stdin.flush()
        out, err = (b.decode("utf-8", "replace") for b in proc.communicate(timeout=240))  # closes stdin: Ctrl-D
        assert proc.returncode == 0, err
        assert "error" not in err and "Traceback" not in err
        expected = printable(reference_answer(chat_model, reference, [("Again", None)], tokens))
        assert out.endswith(expected + "\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_ctrl_c_in_a_terminal_spares_the_demo_servers(tmp_path):
    """A terminal's Ctrl-C goes to the whole foreground process group: the demo swarm's servers must not get it (they
    run in sessions of their own), so the chat goes on after the stopped answer, and they stop when it ends."""
    from swarm.core.demo import ensure_demo_model

    env = swarm_env(tmp_path)
    demo = ensure_demo_model(tmp_path / "cache")
    tokens = LONG_ANSWER
    first = long_prompt(demo, load_reference(demo), tokens)
    proc = subprocess.Popen([sys.executable, "-m", "swarm", "chat", "--demo", "random", "--temperature", "0",
                             "--max-new-tokens", str(tokens)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)  # its own group, as in a shell
    try:
        read_until(proc, proc.stderr, "you>", 180)
        proc.stdin.write(f"{first}\n".encode())
        proc.stdin.flush()
        read_until(proc, proc.stdout, "", 60)  # the answer has started
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        stderr = read_until(proc, proc.stderr, "you>", 60)
        assert "stopped" in stderr and "Traceback" not in stderr
        proc.stdin.write(b"Again\n")
        proc.stdin.flush()
        out, err = (b.decode("utf-8", "replace") for b in proc.communicate(timeout=240))
        assert proc.returncode == 0, err
        assert "failed" not in err and "error" not in err, err  # the servers answered the next message
        assert out.strip()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_ctrl_c_at_the_prompt_leaves_quietly(chat_model, start_server, tmp_path):
    peers = [start_server(chat_model, (0, 4)).endpoint]
    proc = subprocess.Popen([sys.executable, "-m", "swarm", "chat", str(chat_model), "--initial-peers", *peers],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=swarm_env(tmp_path))
    try:
        read_until(proc, proc.stderr, "you>", 120)
        proc.send_signal(signal.SIGINT)
        _, err = (b.decode("utf-8", "replace") for b in proc.communicate(timeout=60))
        assert proc.returncode == 0, err
        assert "error" not in err and "interrupted" not in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# --------------------------------------------------------------------------------------- 4. printable output only


@pytest.fixture(scope="module")
def control_model(chat_model, tmp_path_factory) -> Path:
    """The tiny model with an LM head that only ever picks ESC (27) or BEL (7): whatever the hidden state, one of
    the two has the highest logit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float32)
    with torch.no_grad():
        weight = model.lm_head.weight
        weight.zero_()
        weight[27, 0], weight[7, 0] = 50.0, -50.0
    path = tmp_path_factory.mktemp("control") / "llama"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(chat_model).save_pretrained(path)
    return path


def test_control_characters_never_reach_stdout(control_model, start_server, tmp_path):
    peers = [start_server(control_model, (0, 4)).endpoint]
    with connect(control_model, peers) as chat:
        answer = chat.send("Hi")
    assert answer and set(answer) <= {"\x1b", "\x07"}  # the model does answer with control characters
    result, _ = run_swarm("chat", str(control_model), "--initial-peers", *peers, "--prompt", "Hi", "--temperature",
                          "0", "--max-new-tokens", "12", env=swarm_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "\n"
    assert "control characters only" in result.stderr  # and the user is told why the answer is empty
    assert printable("a\x1b[31mb\r\n\tc\x00\x07\u202ed\U0001f469\u200d\U0001f4bb") == \
        "a[31mb\n\tcd\U0001f469\u200d\U0001f4bb"


# ----------------------------------------------------------------------------------------------- 5. missing blocks


def test_missing_blocks_are_named_at_once_and_in_the_error(chat_model, start_server, caplog):
    peers = [start_server(chat_model, (0, 2)).endpoint]
    config = ClientConfig(connect_timeout=1.5, wait_for_blocks=3.0)
    with caplog.at_level(logging.WARNING, logger="swarm"):
        model = AutoDistributedModelForCausalLM.from_pretrained(str(chat_model), initial_peers=peers, config=config,
                                                                mdns=False)
        try:
            joined = [r.getMessage() for r in caplog.records]
            assert any("no server covers blocks 2:4" in m and "0:2" in m for m in joined), joined
            caplog.clear()
            started = time.monotonic()
            seen: list[float] = []

            class Timing(logging.Handler):
                def emit(self, record: logging.LogRecord) -> None:
                    if "no server covers blocks 2:4" in record.getMessage():
                        seen.append(time.monotonic() - started)

            handler = Timing()
            logging.getLogger("swarm").addHandler(handler)
            try:
                ids = torch.tensor([[1, 2, 3]])
                with pytest.raises(MissingBlocks) as error:
                    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
            finally:
                logging.getLogger("swarm").removeHandler(handler)
            took = time.monotonic() - started
        finally:
            model.close()
    assert seen and seen[0] < 1.0, seen  # said at once, not after the wait
    message = next(r.getMessage() for r in caplog.records if "no server covers blocks 2:4" in r.getMessage())
    assert "waiting up to 3 s" in message
    assert "2:4" in str(error.value) and "after waiting 3 s" in str(error.value) and "0:2" in str(error.value)
    assert 2.5 < took < 15

"""`swarm tune` end to end: a synthetic classification task learnt through the swarm, the CLI on local files (outputs
that load back with the same predictions, JSON lines, Ctrl-C saves), lm tuning used by `swarm chat --prompts`, and bad
data as one clear error line."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import fork_swarm, make_tokenized_model, swarm_env

from swarm import AutoDistributedModelForCausalLM, AutoDistributedModelForSequenceClassification
from swarm.core.server import Server, ServerConfig
from swarm.core.tune import Trainer, TuneConfig, load_data, predict

LETTERS = {0: "abcdefg", 1: "tuvwxyz"}


@pytest.fixture(scope="module")
def tune_model(tmp_path_factory) -> Path:
    """A tiny random Llama with swarm's byte-level tokenizer."""
    return make_tokenized_model(tmp_path_factory.mktemp("tune") / "tune-llama", layers=4, seed=8)


@pytest.fixture(scope="module")
def servers(tune_model) -> Iterator[list[str]]:
    """Two servers of tune_model, shared by the module: tuning runs only read them."""
    started = [Server(ServerConfig(str(tune_model), span, host="127.0.0.1")) for span in ((0, 2), (2, 4))]
    try:
        yield [server.start().endpoint for server in started]
    finally:
        for server in started:
            server.stop()


def synthetic(n: int, seed: int) -> list[dict]:
    """Texts of letters from one of two sets, ending the same way: the class is in the context, not the last token."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = ["".join(rng.choice(LETTERS[label]) for _ in range(rng.randint(2, 5)))
                 for _ in range(rng.randint(2, 4))]
        rows.append({"sentence": " ".join(words) + " .", "label": ["neg", "pos"][label]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tokenizer_of(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_a_synthetic_task_is_learnt_through_the_swarm(tune_model, servers, tmp_path):
    data = load_data(str(write_jsonl(tmp_path / "train.jsonl", synthetic(160, 1))), validation_file=str(
        write_jsonl(tmp_path / "val.jsonl", synthetic(40, 2))))
    assert data.labels == ["neg", "pos"]
    torch.manual_seed(0)
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        str(tune_model), num_labels=2, tuning_mode="deep_ptune", pre_seq_len=4, initial_peers=servers)
    events = []
    with model:
        trainer = Trainer(model, tokenizer_of(tune_model), data, TuneConfig(
            mode="deep_ptune", prompt_length=4, batch_size=16, lr=0.05, max_steps=40, max_length=32, seed=0),
            on_event=events.append)
        final = trainer.run()
    assert final["step"] == 40 and not final["stopped"]
    assert final["val_accuracy"] >= 0.9, events[-3:]
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == 40 and steps[-1]["loss"] < steps[0]["loss"]


def run_swarm(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "swarm", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_tune_cli_writes_outputs_that_load_back_with_the_same_predictions(tune_model, servers, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", synthetic(96, 3))
    val = write_jsonl(tmp_path / "v.jsonl", synthetic(24, 4))
    out = tmp_path / "out"
    result = fork_swarm("tune", str(tune_model), "--dataset", str(train), "--validation-file", str(val),
                       "--text-field", "sentence", "--mode", "ptune", "--prompt-length", "4", "--max-steps", "6",
                       "--batch-size", "16", "--lr", "0.05", "--max-length", "32", "--json", "--output", str(out),
                       "--initial-peers", *servers, env=swarm_env(tmp_path))
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in events][0] == "start" and events[-1]["event"] == "done"
    assert len([e for e in events if e["event"] == "step"]) == 6
    final = events[-1]
    assert f"saved to {out}" in result.stderr
    config = json.loads((out / "tuning_config.json").read_text())
    assert config["labels"] == ["neg", "pos"] and config["tuning_mode"] == "ptune" and config["num_labels"] == 2
    # the saved result, loaded through the Python API, classifies the validation set as the run's last evaluation did
    rows = [json.loads(line) for line in val.read_text().splitlines()]
    with AutoDistributedModelForSequenceClassification.from_pretrained(str(tune_model), prompts=str(out),
                                                                       initial_peers=servers) as model:
        predictions = predict(model, tokenizer_of(tune_model), [r["sentence"] for r in rows], max_length=32)
        again = predict(model, tokenizer_of(tune_model), [r["sentence"] for r in rows], max_length=32,
                        batch_size=5)
    accuracy = sum(["neg", "pos"][p] == r["label"] for p, r in zip(predictions, rows, strict=True)) / len(rows)
    assert accuracy == pytest.approx(final["val_accuracy"], abs=1e-4)
    assert predictions == again
    # continue training from the saved result
    more = fork_swarm("tune", str(tune_model), "--dataset", str(train), "--validation-file", str(val),
                     "--prompts", str(out), "--max-steps", "2", "--batch-size", "16", "--max-length", "32",
                     "--output", str(tmp_path / "more"), "--initial-peers", *servers, env=swarm_env(tmp_path))
    assert more.returncode == 0, more.stderr
    assert json.loads((tmp_path / "more" / "tuning_config.json").read_text())["pre_seq_len"] == 4


@pytest.mark.slow
def test_ctrl_c_stops_after_the_step_and_saves(tune_model, servers, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", synthetic(64, 5))
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "swarm", "tune", str(tune_model), "--dataset", str(train),
                                "--max-steps", "100000", "--batch-size", "4", "--max-length", "32", "--json",
                                "--output", str(out), "--initial-peers", *servers],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=swarm_env(tmp_path))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait for the first steps
            line = process.stdout.readline()
            if not line or json.loads(line)["event"] == "step":
                break
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode == 0, stderr
    done = json.loads(stdout.splitlines()[-1])
    assert done["event"] == "done" and done["stopped"] and done["step"] < 100000
    assert (out / "prompts.safetensors").is_file()


def test_lm_tuning_and_chat_with_the_prompts(tune_model, servers, tmp_path):
    text = "the swarm runs the blocks and the client tunes the prompts. " * 4
    data = load_data(str(write_jsonl(tmp_path / "lm.jsonl", [{"text": text}] * 12)), task="lm")
    assert data.labels is None
    torch.manual_seed(0)
    with AutoDistributedModelForCausalLM.from_pretrained(str(tune_model), tuning_mode="ptune", pre_seq_len=4,
                                                         initial_peers=servers) as model:
        trainer = Trainer(model, tokenizer_of(tune_model), data, TuneConfig(
            task="lm", prompt_length=4, batch_size=4, lr=0.1, max_steps=8, max_length=48))
        first = trainer.evaluate()["val_perplexity"]
        final = trainer.run()
        assert final["val_perplexity"] < first
        model.save_tuned(str(tmp_path / "lm-prompts"))
    result = fork_swarm("chat", str(tune_model), "--prompts", str(tmp_path / "lm-prompts"), "--prompt", "the swarm",
                       "--temperature", "0", "--max-new-tokens", "8", "--initial-peers", *servers,
                       env=swarm_env(tmp_path))
    assert result.returncode == 0, result.stderr
    from swarm.core.chat import ChatSession

    with ChatSession.connect(str(tune_model), servers, prompts=str(tmp_path / "lm-prompts"), mdns=False,
                             temperature=0.0, max_new_tokens=8) as session:
        assert session.model.tuning is not None
        expected = session.send("the swarm")
    assert result.stdout == expected + "\n"


@pytest.mark.parametrize("content,args,message", [
    ("", [], "no examples"),
    ('{"text": "hi"}\n{"text": "ho", "label": 1}\n', [], "line 1.*label"),
    ('{"text": "a", "label": 0.5}\n{"text": "b", "label": 1}\n', [], "label"),
    ('{"text": "a", "label": 0}\n', ["--text-field", "body"], "body"),
    ('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n', ["--task", "poetry"], "--task"),
    ('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n', ["--mode", "bitfit"], "--mode"),
])
def test_bad_data_and_options_give_one_clear_line(tune_model, tmp_path, content, args, message):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    # no server is needed: the data is checked before connecting (and nothing listens on this port)
    result = run_swarm("tune", str(tune_model), "--dataset", str(data), *args, "--initial-peers",
                       "tcp://127.0.0.1:9", "--output", str(tmp_path / "out"), env=swarm_env(tmp_path), timeout=60)
    assert result.returncode in (1, 2)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()

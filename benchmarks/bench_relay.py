"""Relay gain: inference steps/s with and without server-to-server relay, at 0, 20 and 100 ms of added round trip.

A local swarm of 3 `swarm serve` subprocesses on 127.0.0.1 (`--model`: by default a random Llama, hidden 256, 6
blocks, 2 blocks each; `smollm2` for SmolLM2-135M-Instruct, 30 blocks, 10 each; or a model directory, its blocks
split evenly) serves one client, which decodes greedily from fixed ids (random model) or a chat-templated question.
The added round trip is simulated, half of it each way, in two settings: on the client's links only
(`ClientConfig.link_delay`: a client far from servers that sit close to each other), and on every link (also the
servers' links to each other, `swarm serve --simulate-rtt-ms`, as in the Petals paper's settings). Without relay a
step crosses 2 links per hop (a round trip from the client to each server); with relay it crosses each link of the
chain once: client -> first server -> ... -> last server -> client, hops + 1 one-way trips (every server also
answers the client with its output, off the critical path, for the history). With 3 hops the expected gain is
6/4 = 1.5 when every link is slow and 6/2 = 3 when only the client's links are. Tokens are checked against the run
without relay.

    .venv/bin/python benchmarks/bench_relay.py [--model random|smollm2|PATH] [--rtts 0,20,100] [--steps 16]
                                               [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from model_choice import add_model_option, resolve_model
from rich.console import Console
from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("SWARM_MDNS", "0")

from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.core.client.config import ClientConfig  # noqa: E402
from swarm.core.local_swarm import ServeProcess, even_spans  # noqa: E402

SERVERS = 3
QUESTION = "What is the capital of France?"
ARGS = ["--host", "127.0.0.1", "--no-mdns", "--gossip-period", "0.2", "--log-level", "warning"]


def measure(model_dir: Path, prompt: torch.Tensor, peer: str, rtt_ms: float, relay: bool,
            steps: int) -> tuple[float, list[int]]:
    config = ClientConfig(gossip_period=0.2, relay=relay, link_delay=rtt_ms / 2000)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(model_dir), initial_peers=[peer], config=config)
    with model:
        model.blocks.discovery.wait(lambda _: len(model.blocks.servers()) == SERVERS, 15)
        times = []
        with model.inference_session(max_length=prompt.shape[1] + steps + 1) as session:
            ids = prompt
            for _ in range(steps + 1):
                started = time.perf_counter()
                logits = model(ids).logits[:, -1]
                times.append(time.perf_counter() - started)
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            assert len(session.route) == SERVERS
    return 1.0 / statistics.median(times[1:]), ids[0].tolist()


def build_model(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4,
                                 vocab_size=1024, initializer_range=0.1)).save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtts", default="0,20,100", help="added client round trips, ms")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--json", type=Path)
    add_model_option(parser, "hidden 256, 6 blocks")
    args = parser.parse_args()
    rtts = [float(x) for x in args.rtts.split(",")]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="swarm-bench-relay-") as tmp:
        chosen = resolve_model(args.model, lambda: build_model(Path(tmp) / "model"), "random Llama")
        if chosen.blocks < SERVERS:
            raise SystemExit(f"{chosen.label} has {chosen.blocks} blocks: {SERVERS} servers need {SERVERS} or more")
        model_dir, prompt = chosen.path, chosen.prompt(QUESTION)
        spans = [f"{start}:{end}" for start, end in even_spans(chosen.blocks, SERVERS)]
        for rtt, where in [(r, w) for w in ("client", "all") for r in rtts]:
            link = ["--simulate-rtt-ms", str(rtt if where == "all" else 0)]
            first = ServeProcess([str(model_dir), "--blocks", spans[0], *ARGS, *link], Path(tmp) / "a.log", env)
            others = [ServeProcess([str(model_dir), "--blocks", span, *ARGS, *link, "--initial-peers",
                                    first.endpoint], Path(tmp) / f"{span}.log", env) for span in spans[1:]]
            try:
                time.sleep(1.0)  # a few gossip periods: servers must know each other to relay
                plain, plain_ids = measure(model_dir, prompt, first.endpoint, rtt, False, args.steps)
                relayed, relay_ids = measure(model_dir, prompt, first.endpoint, rtt, True, args.steps)
                rows.append({"links": where, "rtt_ms": rtt, "steps_per_s": plain, "relay_steps_per_s": relayed,
                             "gain": relayed / plain, "tokens_equal": plain_ids == relay_ids})
                text = chosen.decode(relay_ids[prompt.shape[1]:])
                if text is not None and len(rows) == 1:
                    Console(stderr=True).print(f"{QUESTION!r} ({prompt.shape[1]} prompt tokens) -> {text!r}")
            finally:
                for server in [first, *others]:
                    server.stop()
    table = Table(title=f"inference steps/s through {SERVERS} servers ({chosen.label}: {', '.join(spans)}), with "
                        "and without relay")
    for column in ("delayed links", "added RTT ms", "hop by hop", "relay", "relay / hop by hop", "tokens equal"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["links"], f"{r['rtt_ms']:g}", f"{r['steps_per_s']:.1f}", f"{r['relay_steps_per_s']:.1f}",
                      f"{r['gain']:.2f}", "yes" if r["tokens_equal"] else "NO")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps([{"model": chosen.label, **r} for r in rows], indent=2))


if __name__ == "__main__":
    main()

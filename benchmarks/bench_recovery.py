"""Recovery stall: how long a generation step takes when the server it runs on is SIGKILLed during it.

A local swarm of `swarm serve` subprocesses on 127.0.0.1 serves a model of N blocks (`--model`: by default a random
Llama checkpoint, hidden 256, 4 blocks; `smollm2` for SmolLM2-135M-Instruct, 30 blocks; or a model directory): one
server of blocks 0:N/2 and two of blocks N/2:N. Each trial generates `--tokens` tokens greedily in one inference
session (from fixed ids for the random model, a chat-templated question for a real one, with EOS suppressed so every
trial makes all its steps) and kills the server of blocks N/2:N in the route during step `--kill-at`; the client bans
it, opens a session on the other server, replays the history and goes on. The stall is the failing step's time minus
the median step time of that trial; the table shows each trial, and the summary the median over trials (at least 5
by default). A fresh server of blocks N/2:N replaces the killed one before the next trial. The tokens are checked
against a run without failure.

    .venv/bin/python benchmarks/bench_recovery.py [--model random|smollm2|PATH] [--trials 5] [--tokens 32]
                                                  [--kill-at 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
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
from swarm.core.local_swarm import ServeProcess  # noqa: E402

QUESTION = "Explain why the sky is blue."
ARGS = ["--host", "127.0.0.1", "--no-mdns", "--gossip-period", "0.2", "--record-ttl", "3", "--log-level", "warning"]


def build_model(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=1024, initializer_range=0.1)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def timed_generation(model, prompt: torch.Tensor, tokens: int, kill_at: int | None, servers: dict[str, ServeProcess],
                     split: int):
    """Generate with per-step timing; kill the route's server of block `split` during step `kill_at`."""
    times: list[float] = []
    killed: list[str] = []
    with model.inference_session(max_length=prompt.shape[1] + tokens) as session:
        real_step, real_step_hop = session.step, session._step_hop

        def step(hidden, mask=None, *args):
            started = time.perf_counter()
            try:
                return real_step(hidden, mask, *args)
            finally:
                times.append(time.perf_counter() - started)

        def step_hop(hop_session, hidden, mask, **kwargs):
            hop = hop_session.hop
            if kill_at is not None and len(times) == kill_at and not killed and hop.start <= split < hop.end:
                servers[hop.peer].stop(signal.SIGKILL)
                killed.append(hop.peer)
            return real_step_hop(hop_session, hidden, mask, **kwargs)

        session.step, session._step_hop = step, step_hop
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, pad_token_id=model.config.eos_token_id)
        replayed = kill_at if killed else 0
        return out, times, killed, session.recoveries, replayed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--kill-at", type=int, default=16)
    parser.add_argument("--json", type=Path)
    add_model_option(parser, "hidden 256, 4 blocks")
    args = parser.parse_args()
    if not 0 <= args.kill_at < args.tokens:
        parser.error("--kill-at must be a step of the generation: 0 to --tokens - 1")
    console = Console(stderr=True)
    torch.set_num_threads(1)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="swarm-bench-recovery-") as tmp:
        tmp_path = Path(tmp)
        chosen = resolve_model(args.model, lambda: build_model(tmp_path / "model"), "tiny random Llama")
        model_dir, split = chosen.path, chosen.blocks // 2
        if split < 1:
            raise SystemExit(f"{chosen.label} has {chosen.blocks} block: two spans need 2 or more")
        logs = iter(tmp_path / f"server-{i}.log" for i in range(10_000))
        first = ServeProcess([str(model_dir), "--blocks", f"0:{split}", *ARGS], next(logs), env)
        second = f"{split}:{chosen.blocks}"
        spares = [ServeProcess([str(model_dir), "--blocks", second, *ARGS, "--initial-peers", first.endpoint],
                               next(logs), env) for _ in range(2)]
        everyone = [first, *spares]
        config = ClientConfig(gossip_period=0.2, ban_time=60.0)
        model = AutoDistributedModelForCausalLM.from_pretrained(str(model_dir), initial_peers=[first.endpoint],
                                                                config=config)
        try:
            model.blocks.discovery.wait(lambda _: len(model.blocks.servers()) == 3, 15)
            prompt = chosen.prompt(QUESTION)
            reference, _, _, _, _ = timed_generation(model, prompt, args.tokens, None, {}, split)
            text = chosen.decode(reference[0, prompt.shape[1]:].tolist())
            if text is not None:
                console.print(f"{QUESTION!r} ({prompt.shape[1]} prompt tokens) -> {text!r}")
            for trial in range(args.trials):
                servers = {s.endpoint: s for s in spares}
                out, times, killed, recoveries, replayed = timed_generation(model, prompt, args.tokens, args.kill_at,
                                                                           servers, split)
                normal = statistics.median(t for i, t in enumerate(times) if i != args.kill_at)
                stall = times[args.kill_at] - normal
                rows.append({"trial": trial + 1, "stall_ms": stall * 1e3, "failing_step_ms": times[args.kill_at] * 1e3,
                             "median_step_ms": normal * 1e3, "replayed_steps": replayed, "recoveries": recoveries,
                             "tokens_equal": out.tolist() == reference.tolist()})
                console.print(f"trial {trial + 1}: stall {stall * 1e3:.1f} ms")
                spares = [s for s in spares if s.endpoint not in killed]
                fresh = ServeProcess([str(model_dir), "--blocks", second, *ARGS, "--initial-peers", first.endpoint],
                                     next(logs), env)
                spares.append(fresh)
                everyone.append(fresh)
                model.blocks.discovery.wait(lambda _, e=fresh.endpoint: e in {r.addresses[0] for r in
                                                                               model.blocks.servers()}, 15)
        finally:
            model.close()
            for server in everyone:
                server.stop(signal.SIGKILL)
    table = Table(title=f"recovery stall: SIGKILL during step {args.kill_at} of {args.tokens}, {chosen.label} "
                        f"(servers 0:{split}, 2 x {second}), 1 torch thread per process")
    for column in ("trial", "failing step ms", "median step ms", "stall ms", "replayed steps", "tokens equal"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["trial"]), f"{r['failing_step_ms']:.1f}", f"{r['median_step_ms']:.2f}",
                      f"{r['stall_ms']:.1f}", str(r["replayed_steps"]), "yes" if r["tokens_equal"] else "NO")
    Console().print(table)
    median = statistics.median(r["stall_ms"] for r in rows)
    Console().print(f"median stall over {len(rows)} trials: {median:.1f} ms")
    if args.json:
        args.json.write_text(json.dumps({"model": chosen.label, "blocks": chosen.blocks, "trials": rows,
                                           "median_stall_ms": median}, indent=2))
    if not all(r["tokens_equal"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()

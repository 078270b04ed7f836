"""What checking servers costs (`--verify FRACTION`): generation tokens/s and training steps/s at several fractions.

A local swarm of `swarm serve` subprocesses on 127.0.0.1 serves a model of N blocks (`--model`: by default a random
Llama checkpoint, hidden 256, 4 blocks; `smollm2` for SmolLM2-135M-Instruct, 30 blocks; or a model directory) with
two servers of blocks 0:N/2 and two of N/2:N, so every hop of a chain has a second server to be checked on. One client
runs, for each fraction of `--fractions` (default 0, 0.01, 0.05, 0.2) in turn, `--repeats` rounds of:
- generation: `--tokens` greedy tokens in one inference session (a check of a step is a forward of the hop's whole
  history on the other server, waited for before the step's output is used);
- training: `--steps` forward+backward passes of a batch of `--batch` x `--length` tokens (a checked forward request
  is sent to the other server at the same time as to its own).
The fractions are interleaved round by round (in a rotating order) so that drift in the machine's load hits them
alike; each figure is the median over rounds, and the ratio is against verify=0 in the same run. The tokens of every
generation are checked against the first verify=0 run (honest servers: a check must never change them), and no server
may be banned.

    .venv/bin/python benchmarks/bench_verify.py [--model random|smollm2|PATH] [--fractions 0,0.01,0.05,0.2]
                                                [--tokens 128] [--steps 8] [--repeats 5] [--json out.json]
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
from bench_inference import build_checkpoint
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
ARGS = ["--host", "127.0.0.1", "--no-mdns", "--gossip-period", "0.2", "--log-level", "warning"]


def generation(model, prompt: torch.Tensor, tokens: int) -> tuple[float, list[int]]:
    """Tokens/s of `tokens` greedy decode steps (the prefill not counted), and the tokens."""
    times: list[float] = []
    with model.inference_session(max_length=prompt.shape[1] + tokens) as session:
        real_step = session.step

        def step(hidden, mask=None, *args):
            started = time.perf_counter()
            try:
                return real_step(hidden, mask, *args)
            finally:
                times.append(time.perf_counter() - started)

        session.step = step
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, pad_token_id=model.config.eos_token_id)
    decode = times[1:]  # the first step is the prompt's prefill
    return len(decode) / sum(decode), out[0].tolist()


def training(model, ids: torch.Tensor, steps: int) -> float:
    """Forward+backward passes per second through the swarm (gradients of the client's embeddings and head)."""
    started = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
    return steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fractions", default="0,0.01,0.05,0.2")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    add_model_option(parser, "hidden 256, 4 blocks")
    args = parser.parse_args()
    try:
        fractions = [float(f) for f in args.fractions.split(",")]
    except ValueError:
        parser.error("--fractions must be numbers separated by commas, e.g. 0,0.01,0.05")
    if not fractions or fractions[0] != 0 or not all(0 <= f <= 1 for f in fractions):
        parser.error("--fractions must start with 0 (the baseline) and lie in [0, 1]")
    console = Console(stderr=True)
    torch.set_num_threads(1)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    gen: dict[float, list[float]] = {f: [] for f in fractions}
    train: dict[float, list[float]] = {f: [] for f in fractions}
    checks: dict[float, dict[str, int]] = {}
    all_equal = True
    with tempfile.TemporaryDirectory(prefix="swarm-bench-verify-") as tmp:
        tmp_path = Path(tmp)
        chosen = resolve_model(args.model, lambda: build_checkpoint(tmp_path / "tiny", "tiny"), "tiny random Llama")
        split = chosen.blocks // 2
        if split < 1:
            raise SystemExit(f"{chosen.label} has {chosen.blocks} block: two spans need 2 or more")
        spans = [f"0:{split}", f"0:{split}", f"{split}:{chosen.blocks}", f"{split}:{chosen.blocks}"]
        servers: list[ServeProcess] = []
        model = None
        try:
            for n, span in enumerate(spans):
                peers = ["--initial-peers", servers[0].endpoint] if servers else []
                servers.append(ServeProcess([str(chosen.path), "--blocks", span, *ARGS, *peers],
                                            tmp_path / f"server-{n}.log", env))
            model = AutoDistributedModelForCausalLM.from_pretrained(
                str(chosen.path), initial_peers=[servers[0].endpoint], config=ClientConfig(gossip_period=0.2))
            model.blocks.discovery.wait(lambda _: len(model.blocks.servers()) == len(spans), 30)
            prompt = chosen.prompt(QUESTION)
            vocab = int(model.config.vocab_size)
            ids = torch.randint(0, vocab, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
            verifier = model.blocks.verifier
            generation(model, prompt, 8)  # warm-up
            training(model, ids, 1)
            _, reference = generation(model, prompt, args.tokens)
            for round_ in range(args.repeats):
                shift = round_ % len(fractions)  # each fraction goes first in some round: order effects average out
                for fraction in fractions[shift:] + fractions[:shift]:
                    verifier.fraction = fraction
                    before = verifier.stats.as_dict()
                    speed, tokens = generation(model, prompt, args.tokens)
                    all_equal &= tokens == reference
                    gen[fraction].append(speed)
                    train[fraction].append(training(model, ids, args.steps))
                    after = verifier.stats.as_dict()
                    total = checks.setdefault(fraction, {k: 0 for k in after})
                    for k in after:
                        total[k] += after[k] - before[k]
                console.print(f"round {round_ + 1}/{args.repeats} done")
        finally:
            if model is not None:
                model.close()
            for server in servers:
                server.stop(signal.SIGKILL)
    base_gen, base_train = statistics.median(gen[0.0]), statistics.median(train[0.0])
    rows = []
    for f in fractions:
        g, t = statistics.median(gen[f]), statistics.median(train[f])
        rows.append({"verify": f, "gen_tokens_per_s": g, "gen_ratio": g / base_gen, "train_steps_per_s": t,
                     "train_ratio": t / base_train, **{k: v for k, v in checks[f].items()}})
    table = Table(title=f"cost of --verify: {chosen.label}, servers 2 x 0:{split} + 2 x {split}:{chosen.blocks}, "
                        f"{args.tokens} tokens / {args.steps} steps of {args.batch}x{args.length}, median of "
                        f"{args.repeats} rounds, 1 torch thread per process")
    for column in ("verify", "gen tokens/s", "gen ratio", "train steps/s", "train ratio", "checks", "mismatches",
                   "bans"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r['verify']:g}", f"{r['gen_tokens_per_s']:.1f}", f"{r['gen_ratio']:.3f}",
                      f"{r['train_steps_per_s']:.2f}", f"{r['train_ratio']:.3f}", str(r["checks"]),
                      str(r["mismatches"]), str(r["bans"]))
    Console().print(table)
    Console().print(f"tokens equal to the verify=0 run in every generation: {'yes' if all_equal else 'NO'}; "
                    f"load average {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"model": chosen.label, "blocks": chosen.blocks, "tokens": args.tokens,
                                           "steps": args.steps, "batch": args.batch, "length": args.length,
                                           "repeats": args.repeats, "rows": rows, "tokens_equal": all_equal,
                                           "generation_runs": {str(f): gen[f] for f in fractions},
                                           "training_runs": {str(f): train[f] for f in fractions}}, indent=2))
    if not all_equal or any(r["bans"] or r["mismatches"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Single-sequence decode speed: plain transformers on one process vs the same model split over a local swarm.

What it measures, for two random Llama checkpoints ("tiny": hidden 256, 4 blocks; "mid": hidden 1024, 16 blocks,
GQA 16/8 heads), built here in a temporary directory (float32, fixed seed, weights drawn with std 0.1 so that greedy
decoding does not collapse into repeating one token), and for the real demo model ("smollm2": SmolLM2-135M-Instruct,
30 blocks, hidden 576, GQA 9/3 heads, float32; prepared once into swarm's cache), whose prompt is a chat-templated
question instead of random tokens:

* local -- the checkpoint run by plain transformers (`AutoModelForCausalLM`, float32, `torch.inference_mode`,
  `use_cache=True`): one prefill of a fixed 16-token prompt, a few warm-up decode steps, then N timed greedy
  decode steps, each a model call on the one new token with `past_key_values`.
* swarm -- for 1, 2 and 4 servers (1, 2 and 3 for smollm2; counts up to the number of blocks): a `LocalSwarm` of
  `swarm serve` subprocesses on 127.0.0.1 holding `even_spans` of the blocks, and `AutoDistributedModelForCausalLM` on
  those peers. Inside `model.inference_session(max_length=...)` the same prefill, warm-up and N timed steps are done by
  calling
  `model(input_ids=all_ids_so_far)`; the session sends only the new token's hidden state through the chain of
  servers, whose attention caches hold the rest. The greedy tokens are checked against the local ones (a warning
  in the table when they differ), and the largest logit difference to the local run is reported.
* ping -- the bare transport round trip: the median of 200 `ping` requests to the swarm's first server.

Each configuration decodes --repeats (default 3) timed sequences, each from a fresh cache (a fresh session), and
reports the one with the lowest median step: on a small shared machine other work skews single runs by tens of
percent. Figures: tokens/s over the timed steps, the median step latency, ratio = swarm tokens/s / local tokens/s,
and the added latency per hop = (swarm median step - local median step) / number of servers. A step's time covers
everything a caller waits for: embedding, the blocks (local or remote), final norm, LM head and the argmax.

Threads: the machine may have few cores, so every process computing gets the same torch thread count (--threads,
default 1): this process via `torch.set_num_threads`, each server via OMP_NUM_THREADS / MKL_NUM_THREADS in its
environment. Local and swarm runs thus use the same compute per block; the servers of a chain run one after the other
for a single sequence, so at most one of them computes at a time.

Run (from the repository root, no network needed; the default run takes a few minutes on 2 cores):

    .venv/bin/python benchmarks/bench_inference.py
    .venv/bin/python benchmarks/bench_inference.py --models tiny --servers 1,2 --steps 32 --repeats 5 --json out.json
    .venv/bin/python benchmarks/bench_inference.py --models smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from model_choice import question_ids  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from swarm.core.chat_demo import num_blocks  # noqa: E402

PROMPT_LENGTH = 16
WARMUP_STEPS = 4
PING_CALLS = 200
SEED = 0

MODELS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=688, vocab_size=1024),
    "mid": dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
                intermediate_size=2816, vocab_size=4096),
}
REAL = "smollm2"  # the demo chat model (swarm.core.chat_demo)
REAL_QUESTION = "What is the capital of France? Answer in one long sentence."
DEFAULT_STEPS = {"tiny": 64, "mid": 32, REAL: 32}
DEFAULT_SERVERS = {"tiny": [1, 2, 4], "mid": [1, 2, 4], REAL: [1, 2, 3]}

console = Console()
if not console.is_terminal:  # keep the table readable when the output goes to a file or a pipe
    console = Console(width=140)


@dataclass
class Run:
    model: str
    servers: int  # 0 = local transformers
    steps: int
    tokens_per_s: float
    median_step_ms: float
    mean_step_ms: float
    min_step_ms: float
    max_step_ms: float
    prefill_ms: float
    tokens: list[int] = field(default_factory=list)  # warm-up + timed greedy tokens
    prompt_length: int = PROMPT_LENGTH
    tokens_equal: bool | None = None
    max_abs_logit_diff: float | None = None  # vs local, over the prefill's last position and every step
    ratio_vs_local: float | None = None
    added_ms_per_hop: float | None = None
    ping_median_ms: float | None = None
    spans: list[list[int]] = field(default_factory=list)
    startup_s: float | None = None  # servers up and the client loaded
    repeats: int = 1  # timed sequences run; the figures above are those of the one with the lowest median step
    repeat_median_step_ms: list[float] = field(default_factory=list)
    repeats_consistent: bool = True  # every repeat generated the same tokens
    logits: torch.Tensor | None = field(default=None, repr=False)  # [steps + 1, vocab], not written to JSON


# --- checkpoints ---------------------------------------------------------------------------------------------------

def build_checkpoint(path: Path, name: str) -> Path:
    """Save a random float32 Llama checkpoint (fixed seed) described by MODELS[name] to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    # initializer_range 0.1 instead of transformers' 0.02: with the default, greedy decoding of a random model
    # repeats one token, which would make the token comparison meaningless
    config = LlamaConfig(**MODELS[name], max_position_embeddings=2048, tie_word_embeddings=False,
                         initializer_range=0.1)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(path)
    return path


def checkpoint(tmp: Path, name: str) -> Path:
    """The model directory of `name`: the demo chat model from the cache, or a random checkpoint built in `tmp`."""
    if name == REAL:
        from swarm.core.chat_demo import ensure_chat_model

        return ensure_chat_model(on_status=lambda message: console.print(f"[dim]{message}[/]", highlight=False))
    return build_checkpoint(tmp / name, name)


def prompt_ids(path: Path, vocab: int) -> torch.Tensor:
    """A chat-templated question for a model with a tokenizer (the real one), else PROMPT_LENGTH random tokens."""
    if (path / "tokenizer_config.json").is_file():
        return question_ids(path, REAL_QUESTION)
    gen = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(0, vocab, (1, PROMPT_LENGTH), generator=gen)


# --- timing --------------------------------------------------------------------------------------------------------

def decode_loop(prefill: Callable[[torch.Tensor], torch.Tensor], step: Callable[[torch.Tensor], torch.Tensor],
                prompt: torch.Tensor, steps: int) -> tuple[float, list[float], list[int], torch.Tensor]:
    """Prefill, WARMUP_STEPS untimed and `steps` timed greedy decode steps.

    `prefill(prompt)` and `step(ids_so_far)` return the logits of the last position. Returns the prefill time,
    the timed steps' durations (seconds), every generated token (warm-up and timed) and the logits behind them.
    """
    t0 = time.perf_counter()
    logits = prefill(prompt)
    prefill_s = time.perf_counter() - t0
    ids = torch.cat([prompt, logits.argmax(-1).view(1, 1)], dim=1)
    durations, all_logits = [], [logits]
    for i in range(WARMUP_STEPS + steps):
        t0 = time.perf_counter()
        logits = step(ids)
        ids = torch.cat([ids, logits.argmax(-1).view(1, 1)], dim=1)
        if i >= WARMUP_STEPS:
            durations.append(time.perf_counter() - t0)
        all_logits.append(logits)
    return prefill_s, durations, ids[0, prompt.shape[1]:].tolist(), torch.cat(all_logits).float()


def make_run(model: str, servers: int, prefill_s: float, durations: list[float], tokens: list[int],
             logits: torch.Tensor) -> Run:
    ms = [d * 1000 for d in durations]
    return Run(model=model, servers=servers, steps=len(durations), tokens_per_s=len(durations) / sum(durations),
               median_step_ms=statistics.median(ms), mean_step_ms=statistics.fmean(ms), min_step_ms=min(ms),
               max_step_ms=max(ms), prefill_ms=prefill_s * 1000, tokens=tokens, logits=logits)


def best_of(runs: list[Run]) -> Run:
    """The repeat with the lowest median step (the least disturbed by other work on the machine)."""
    best = min(runs, key=lambda r: r.median_step_ms)
    best.repeats = len(runs)
    best.repeat_median_step_ms = [r.median_step_ms for r in runs]
    best.repeats_consistent = all(r.tokens == best.tokens for r in runs)
    return best


def local_decoder(model: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """`prefill(ids)` and `step(ids)` of plain transformers with its own cache: each gives the last position's logits
    (step feeds only the last of `ids`), as `decode_loop` wants them."""
    state: dict[str, object] = {}

    def prefill(ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids, use_cache=True)
        state["past"] = out.past_key_values
        return out.logits[:, -1]

    def step(ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids[:, -1:], past_key_values=state["past"], use_cache=True)
        state["past"] = out.past_key_values
        return out.logits[:, -1]

    return prefill, step


def bench_local(name: str, path: Path, steps: int, repeats: int) -> Run:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = prompt_ids(path, model.config.vocab_size)
    prefill, step = local_decoder(model)

    with torch.inference_mode():
        decode_loop(prefill, step, prompt, 2)  # warm the allocator and kernels on a throwaway sequence
        run = best_of([make_run(name, 0, *decode_loop(prefill, step, prompt, steps)) for _ in range(repeats)])
    run.prompt_length = prompt.shape[1]
    return run  # the model is freed with this frame, before the servers load their copies


def bench_swarm(name: str, path: Path, servers: int, steps: int, threads: int, repeats: int) -> Run:
    from swarm.core.client.model import AutoDistributedModelForCausalLM
    from swarm.core.local_swarm import LocalSwarm, even_spans
    from swarm.transport.rpc import RpcClient

    spans = even_spans(num_blocks(path), servers)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
               SWARM_CACHE_DIR=str(path.parent / "swarm-cache"))
    t0 = time.perf_counter()
    with LocalSwarm(path, spans, extra_args=["--dtype", "float32"], env=env) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.endpoints,
                                                                torch_dtype="float32")
        startup_s = time.perf_counter() - t0
        prompt = prompt_ids(path, model.config.vocab_size)
        max_length = prompt.shape[1] + 1 + WARMUP_STEPS + steps

        def prefill(ids: torch.Tensor) -> torch.Tensor:
            return model(input_ids=ids).logits[:, -1]

        def step(ids: torch.Tensor) -> torch.Tensor:
            return model(input_ids=ids).logits[:, -1]

        try:
            with torch.inference_mode():
                with model.inference_session(max_length=prompt.shape[1] + 3 + WARMUP_STEPS):
                    decode_loop(prefill, step, prompt, 2)  # throwaway session: connections, server-side warm-up
                runs = []
                for _ in range(repeats):  # a fresh session each time, as the local runs start a fresh cache
                    with model.inference_session(max_length=max_length):
                        runs.append(make_run(name, servers, *decode_loop(prefill, step, prompt, steps)))
                run = best_of(runs)
            with RpcClient(swarm.endpoints[0]) as client:
                for _ in range(10):
                    client.call("ping")
                pings = []
                for _ in range(PING_CALLS):
                    t1 = time.perf_counter()
                    client.call("ping")
                    pings.append(time.perf_counter() - t1)
        finally:
            model.blocks.close()
    run.ping_median_ms = statistics.median(pings) * 1000
    run.prompt_length = prompt.shape[1]
    run.spans = [list(s) for s in spans]
    run.startup_s = startup_s
    return run


# --- reporting -----------------------------------------------------------------------------------------------------

def derive(local: Run, run: Run) -> None:
    run.tokens_equal = run.tokens == local.tokens and run.repeats_consistent and local.repeats_consistent
    if run.logits is not None and local.logits is not None and run.logits.shape == local.logits.shape:
        run.max_abs_logit_diff = (run.logits - local.logits).abs().max().item()
    run.ratio_vs_local = run.tokens_per_s / local.tokens_per_s
    run.added_ms_per_hop = (run.median_step_ms - local.median_step_ms) / run.servers


def print_table(runs: list[Run], threads: int) -> None:
    repeats = runs[0].repeats if runs else 1
    table = Table(title=f"decode, batch 1, float32, {threads} torch thread(s) "
                        f"per process, best of {repeats} sequence(s)")
    for col in ("model", "servers", "steps", "tokens/s", "median step ms", "prompt", "prefill ms", "ratio vs local",
                "added ms/hop", "tokens equal", "max |Δlogit|"):
        table.add_column(col, justify="left" if col in ("model", "servers") else "right")
    for run in runs:
        local = run.servers == 0
        equal = "" if local else ("yes" if run.tokens_equal else "[bold red]NO (warning)[/]")
        table.add_row(run.model, "local" if local else str(run.servers), str(run.steps), f"{run.tokens_per_s:.1f}",
                      f"{run.median_step_ms:.2f}", str(run.prompt_length), f"{run.prefill_ms:.1f}",
                      "" if local else f"{run.ratio_vs_local:.2f}",
                      "" if local else f"{run.added_ms_per_hop:+.2f}", equal,
                      "" if run.max_abs_logit_diff is None else f"{run.max_abs_logit_diff:.1e}")
    console.print(table)
    pinged = [r for r in runs if r.ping_median_ms is not None]
    parts = []
    for model in dict.fromkeys(r.model for r in pinged):
        mine = [r for r in pinged if r.model == model]
        parts.append(f"{model} with {'/'.join(str(r.servers) for r in mine)} servers: "
                     f"{'/'.join(f'{r.ping_median_ms:.3f}' for r in mine)} ms")
    if parts:
        console.print(f"ping round trip (median of {PING_CALLS} calls to the first server): " + "; ".join(parts),
                      highlight=False)


def parse_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", default=f"tiny,mid,{REAL}",
                        help=f"comma-separated: tiny, mid (random), {REAL} (the real demo model) (default: all)")
    parser.add_argument("--servers", default=None,
                        help="comma-separated server counts (default: 1,2,4; 1,2,3 for smollm2)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed decode steps (default: 64 for tiny, 32 for mid)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed sequences per configuration; the one with the lowest median step is reported, "
                             "which damps noise from other work on the machine (default: 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for this process and for each server (default: 1)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    args = parser.parse_args(argv)

    models = parse_list(args.models)
    unknown = [m for m in models if m not in DEFAULT_STEPS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(DEFAULT_STEPS)}")
    try:
        counts = [int(s) for s in parse_list(args.servers)] if args.servers is not None else None
    except ValueError:
        parser.error("--servers takes comma-separated integers")
    if counts is not None and any(c < 1 for c in counts):
        parser.error("--servers counts must be 1 or more")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be 1 or more")
    if args.repeats < 1:
        parser.error("--repeats must be 1 or more")
    if args.threads < 1:
        parser.error("--threads must be 1 or more")

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    runs: list[Run] = []
    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as tmp:
        for name in models:
            steps = args.steps or DEFAULT_STEPS[name]
            console.print(f"[bold]{name}[/]: preparing the checkpoint", highlight=False)
            path = checkpoint(Path(tmp), name)
            console.print(f"[bold]{name}[/]: local transformers, {steps} steps", highlight=False)
            local = bench_local(name, path, steps, args.repeats)
            runs.append(local)
            for count in counts or DEFAULT_SERVERS[name]:
                if count > num_blocks(path):
                    console.print(f"[bold]{name}[/]: skipping {count} servers (more than its blocks)")
                    continue
                console.print(f"[bold]{name}[/]: swarm of {count} server(s), {steps} steps", highlight=False)
                run = bench_swarm(name, path, count, steps, args.threads, args.repeats)
                derive(local, run)
                runs.append(run)
    elapsed = time.perf_counter() - started
    print_table(runs, args.threads)
    load_after = os.getloadavg()
    console.print(f"total {elapsed:.0f} s; 1-minute load average {load_before[0]:.2f} before, "
                  f"{load_after[0]:.2f} after on {os.cpu_count()} CPUs (other work on the machine skews the figures)")
    if args.json is not None:
        report = {
            "random_prompt_length": PROMPT_LENGTH, "warmup_steps": WARMUP_STEPS, "threads": args.threads,
            "repeats": args.repeats,
            "ping_calls": PING_CALLS, "seed": SEED, "models": {m: MODELS.get(m, REAL) for m in models},
            "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "elapsed_s": elapsed,
            "load_average_before": list(load_before), "load_average_after": list(load_after),
            "runs": [{f.name: getattr(r, f.name) for f in fields(r) if f.name != "logits"} for r in runs],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    if any(r.tokens_equal is False for r in runs):
        console.print("[bold red]warning:[/] the swarm's greedy tokens differ from local transformers' in some runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

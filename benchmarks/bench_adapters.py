"""LoRA adapters served together: many clients, each with a LoRA of its own, through 2 local servers; and what one
more adapter costs a server in memory.

What it measures, for the random Llama checkpoints of bench_inference.py (default "mid": hidden 1024, 16 blocks, GQA
16/8 heads; "tiny": hidden 256, 4 blocks), float32:

* adapters: one LoRA per client (`--clients`, 8), made with PEFT on the checkpoint (`peft.LoraConfig`, ranks
  `--ranks` (8, 16) alternating, lora_alpha twice the rank, on all 7 projections of every block: q, k, v, o, gate, up,
  down), A and B drawn at random with a fixed seed per adapter (B is not zero, so each one changes the model's
  output), saved with `save_pretrained` into a temporary directory (DIR/lora0, DIR/lora1, ...);
* three local swarms of 2 `swarm serve` subprocesses each on 127.0.0.1, the blocks split in halves, all up for the
  whole run (each under its own model directory name, so that no client strays into another swarm):
  - mixed: `--adapters` with every adapter; requests of different adapters share one pass (the shared layers run once
    for the pass, each request's LoRA on its own tokens: PetS's shared and task operators);
  - one at a time: the same servers with `--no-mix-adapters`: a pass holds the requests of one adapter only (batching
    within one adapter still happens), the baseline of serving one adapter after another;
  - base: servers without adapters, clients with none;
* the clients: bench_batching.py's client processes, client i with adapter lora<i> (none on base), each decoding
  greedily `--new-tokens` (64) tokens inside an inference session from its own random prompt (8 + i tokens), all
  started together. The configurations alternate in `--repeats` (5) rounds (mixed, one at a time, base, mixed, ...),
  after one untimed warm-up round, so that drift of other work on the machine hits all three alike; each one's best
  round (the highest tokens/s) is reported, with the median of its rounds beside it, and the ratios between
  configurations are the median over rounds of the ratio within a round (runs a few seconds apart: other work, which
  comes and goes over tens of seconds, weighs on both sides of a ratio more evenly than on two best rounds);
* memory: one more server, holding every block, with `--adapter-dir` on the adapters' directory. A client in this
  process runs a short forward (`--memory-tokens` tokens) without adapter twice (warm-up), then one with each adapter
  in turn, which makes the server load it; after each, the server's resident memory (VmRSS from /proc/PID/status) is
  read, beside the adapter's own bytes as the server reports them (`info` -> adapter_memory: the A and B tensors of
  its blocks). A copy of any base weight would show as growth well beyond the adapter's bytes (one k_proj of mid is 2
  MiB, 32 MiB over its 16 blocks, against 9.1 MiB for a whole adapter of rank 8). RSS also counts memory the C
  allocator keeps free: glibc raises its mmap threshold (up to 32 MiB) once a large block is freed (the model's load
  frees many), after which the transient buffers of an adapter's load stay in the loading thread's arena. So the same
  is measured again with a server whose threshold is fixed (`MALLOC_MMAP_THRESHOLD_=131072`, glibc's default), and
  what the server's adapter store itself holds is measured in this process: an `AdapterStore` on every block loads
  each adapter on its loading thread, as a server does, then glibc's `malloc_trim(0)` hands back the free memory and
  the process's RSS growth is read.

Figures per configuration: aggregate tokens/s (all clients' new tokens / the time from the start to the last client's
end), its ratios to one at a time and to base (paired by round, as above), per-client tokens/s, p50/p95 step latency
as a client sees it, sessions per pass (the step requests sent, clients x new tokens x 2 servers, over the passes the
servers ran: how many sessions share a pass), server CPU (the servers' CPU seconds / (wall time x 2)) and other CPU
(cores other work on the machine took meanwhile), as in bench_batching.py.

Checks: every client's tokens are the same in every round of a configuration, equal between mixed and one at a time
(same adapter, other pass-mates), and differ from its tokens on base (its adapter is applied); and the first two
clients' tokens (one adapter of each rank) equal PEFT's own greedy decoding of the local checkpoint with their adapter.

The issue's aims: mixed at least 3x one at a time and within 25% of base (mixed / base at least 0.75); a server's
memory per added adapter equal to the adapter's own bytes (no copy of any weight), judged here as growth of at most
1.25x the own bytes, for the server's RSS (with glibc's defaults, and with the fixed threshold) and for what the store
holds. For context: PetS (Zhou et al., USENIX ATC 2022) reports 1.53x (desktop GPU) and 1.63x (server GPU) the serving
throughput of its baseline without batching across tasks, S-LoRA (Sheng et al., MLSys 2024) up to 4x the throughput
of vLLM with naive LoRA support (and up to 30x that of HuggingFace PEFT).

Threads: every server and every client gets `--threads` (1) torch threads (OMP_NUM_THREADS / MKL_NUM_THREADS), as in
bench_batching.py.

Run (from the repository root, no network needed; the default run takes 5 to 6 minutes on 2 cores, --quick about
1):

    .venv/bin/python benchmarks/bench_adapters.py
    .venv/bin/python benchmarks/bench_adapters.py --repeats 3 --no-memory --json out.json
    .venv/bin/python benchmarks/bench_adapters.py --quick
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["SWARM_MDNS"] = "0"  # only the benchmark's own servers, found through the initial peers
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from bench_batching import (  # noqa: E402
    HOPS,
    SEED,
    SERVER_ARGS,
    Clients,
    Info,
    busy_seconds,
    cpu_seconds,
    link_copy,
    parse_list,
    percentile,
    prompts_for,
    quiet_threads,
    worker_loop,
)
from bench_inference import MODELS, build_checkpoint  # noqa: E402
from rich.console import Console  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
B_STD = 0.05  # LoRA B drawn with this std (A with 1/sqrt(fan_in)): each adapter changes the greedy tokens
CONFIGS = ("mixed", "one", "base")  # the order of each round
TITLES = {"mixed": "mixed", "one": "one at a time", "base": "base (no adapter)"}
REFERENCE_CLIENTS = 2  # clients whose tokens are checked against PEFT's own decoding (one adapter of each rank)
LOAD_TIMEOUT = 300.0  # seconds for the clients to load a model (and an adapter) and warm up
WARMUP_TOKENS = 4  # new tokens per client in the untimed first round
MIX_AIM, BASE_AIM, MEMORY_AIM = 3.0, 0.75, 1.25
# glibc raises its mmap threshold (up to 32 MiB) after a large block is freed, so the transient buffers of an adapter's
# load stay in the loading thread's arena as free memory: this environment fixes the threshold at glibc's default
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}

console = Console(stderr=True)  # progress on stderr; the markdown tables go to stdout


@dataclass
class Run:
    config: str  # mixed | one | base
    clients: int
    new_tokens: int
    aggregate_tokens_per_s: float
    client_tokens_per_s: float  # mean over clients
    p50_step_ms: float
    p95_step_ms: float
    sessions_per_pass: float  # step requests / passes, over both servers
    server_cpu: float  # CPU seconds of the servers / (wall time x servers): 1.0 = always busy
    other_cpu: float  # cores the machine spent on anything but this benchmark's processes
    wall_s: float
    tokens: dict[int, list[int]] = field(default_factory=dict)  # client -> its new tokens


@dataclass
class Result:
    """One configuration over its rounds: the best round's figures, every round's tokens/s."""

    model: str
    config: str
    best: Run
    rounds_tokens_per_s: list[float]
    rounds_other_cpu: list[float]
    median_tokens_per_s: float
    tokens_consistent: bool  # every client's tokens equal in every round
    rounds: list[Run] = field(default_factory=list)  # every round, in order


@dataclass
class MemoryStep:
    adapter: str
    rank: int
    own_bytes: int  # the adapter's bytes on the server (info -> adapter_memory)
    rss_growth: int  # the server's VmRSS after the adapter's first request - before it (glibc's defaults)
    anon_growth: int  # its RssAnon growth
    file_growth: int  # its RssFile growth
    fixed_growth: int  # VmRSS growth of a server with a fixed mmap threshold (FIXED_MALLOC)
    held_growth: int | None  # RSS growth of the adapter store in this process, after malloc_trim (None: no glibc)


# --- the adapters ----------------------------------------------------------------------------------------------------

def build_adapters(checkpoint: Path, out: Path, count: int, ranks: list[int], prompts: dict[int, list[int]],
                   new_tokens: int) -> tuple[dict[str, int], dict[int, list[int]]]:
    """`count` PEFT LoRAs lora0, lora1, ... on `checkpoint` saved under `out`; returns their ranks by name and the
    greedy tokens of PEFT's own model for the first REFERENCE_CLIENTS clients' prompts, each with its adapter."""
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    names = {f"lora{i}": ranks[i % len(ranks)] for i in range(count)}
    model: Any = None
    for name, rank in names.items():
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0,
                                 bias="none", task_type="CAUSAL_LM")
        if model is None:
            model = peft.get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        gen = torch.Generator().manual_seed(SEED + 100 + int(name.removeprefix("lora")))
        with torch.no_grad():
            for key, param in sorted(model.named_parameters()):
                if f".lora_A.{name}." in key:
                    param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
                elif f".lora_B.{name}." in key:
                    param.copy_(torch.randn(param.shape, generator=gen) * B_STD)
    model.save_pretrained(str(out))  # adapters not named "default" go to out/NAME
    reference: dict[int, list[int]] = {}
    for wid in range(min(REFERENCE_CLIENTS, count)):
        model.set_adapter(f"lora{wid}")
        reference[wid] = greedy(model, prompts[wid], new_tokens)
    del model, base
    return names, reference


def greedy(model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """`new_tokens` greedy tokens of a local transformers (or PEFT) model from `prompt`, with its KV cache."""
    ids, past, tokens = torch.tensor([prompt]), None, []
    with torch.inference_mode():
        for _ in range(new_tokens):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            ids = out.logits[:, -1].argmax(-1).view(1, 1)
            tokens.append(int(ids))
    return tokens


# --- the clients -----------------------------------------------------------------------------------------------------

def _adapter_worker(wid: int, inbox: Any, outbox: Any, go: Any, threads: int, parent: int) -> None:
    """bench_batching's client loop, whose "load" command carries a fifth item: the adapter (a name, or None) the
    loaded model runs with. The model is loaded and warmed up as bench_batching does, then warmed up again with its
    adapter."""
    import bench_batching

    chosen: list[str | None] = [None]
    plain_load = bench_batching.load_model

    def load_model(path: str, endpoints: list[str]) -> Any:
        model = plain_load(path, endpoints)
        if chosen[0] is not None:
            try:
                model.set_adapter(chosen[0])
                with torch.inference_mode(), model.inference_session(max_length=3):
                    model(input_ids=torch.tensor([[1, 2]]))
            except BaseException:
                model.close()
                raise
        return model

    class Inbox:
        def get(self, timeout: float) -> Any:
            command = inbox.get(timeout=timeout)
            if command[0] == "load":
                chosen[0], command = command[4], command[:4]
            return command

    bench_batching.load_model = load_model  # this process's own copy of the module: the client's loop looks it up
    worker_loop(wid, Inbox(), outbox, go, threads, parent)


class AdapterClients(Clients):
    """bench_batching's client processes, each of which loads its models with an adapter of its own."""

    def __init__(self, count: int, threads: int):
        super().__init__(count, "processes", threads)

    def _start(self, count: int, mode: str, threads: int) -> None:
        ctx = mp.get_context("spawn")
        self.outbox, self.go = ctx.Queue(), ctx.Event()
        for wid in range(count):
            inbox = ctx.Queue()
            proc = ctx.Process(target=_adapter_worker, args=(wid, inbox, self.outbox, self.go, threads, os.getpid()),
                               name=f"bench-client-{wid}", daemon=True)
            proc.start()
            self.workers.append(proc)
            self.inboxes.append(inbox)

    def load_with(self, label: str, path: Path, endpoints: list[str], adapters: dict[int, str | None]) -> None:
        """Every client loads model `label` from `path` on `endpoints`, client i with adapter `adapters.get(i)`."""
        for wid, inbox in enumerate(self.inboxes):
            inbox.put(("load", label, str(path), endpoints, adapters.get(wid)))
        self._collect(list(range(self.count)), "ok", LOAD_TIMEOUT)


# --- measuring -------------------------------------------------------------------------------------------------------

def measure(clients: AdapterClients, info: Info, config: str, prompts: dict[int, list[int]], new_tokens: int,
            ours_pids: list[int]) -> Run:
    """The clients decode together through the swarm `info` reads; `ours_pids`: every server's PID."""
    before: list[int] = []
    cpu: dict[str, float] = {}
    ours = sorted({*clients.pids(list(range(clients.count))), *ours_pids, os.getpid()})

    def mark() -> None:
        before.extend(info.passes())
        cpu["servers"], cpu["ours"], cpu["busy"] = cpu_seconds(info.pids), cpu_seconds(ours), busy_seconds()

    start, results = clients.run(config, prompts, new_tokens, mark)
    wall = max(r["end"] for r in results.values()) - start
    server_cpu = cpu_seconds(info.pids) - cpu["servers"]
    other_cpu = (busy_seconds() - cpu["busy"]) - (cpu_seconds(ours) - cpu["ours"])
    passes = sum(info.passes()) - sum(before)
    steps = [s for r in results.values() for s in r["step_s"]]
    return Run(config=config, clients=len(prompts), new_tokens=new_tokens,
               aggregate_tokens_per_s=len(prompts) * new_tokens / wall,
               client_tokens_per_s=statistics.fmean(new_tokens / (r["end"] - r["start"]) for r in results.values()),
               p50_step_ms=percentile(steps, 0.5) * 1000, p95_step_ms=percentile(steps, 0.95) * 1000,
               sessions_per_pass=len(prompts) * new_tokens * HOPS / passes if passes else float("nan"),
               server_cpu=server_cpu / (wall * HOPS), other_cpu=max(0.0, other_cpu / wall), wall_s=wall,
               tokens={w: r["tokens"] for w, r in sorted(results.items())})


def summarize(model: str, config: str, runs: list[Run]) -> Result:
    """A configuration's rounds: the best (highest tokens/s), the median, whether the tokens agree."""
    best = max(runs, key=lambda r: r.aggregate_tokens_per_s)
    rates = [r.aggregate_tokens_per_s for r in runs]
    return Result(model=model, config=config, best=best, rounds_tokens_per_s=rates,
                  rounds_other_cpu=[r.other_cpu for r in runs], rounds=runs,
                  median_tokens_per_s=statistics.median(rates),
                  tokens_consistent=all(r.tokens == runs[0].tokens for r in runs))


def bench_throughput(name: str, tmp: Path, checkpoint: Path, adapters_dir: Path, names: list[str],
                     clients: AdapterClients, prompts: dict[int, list[int]], new_tokens: int, repeats: int,
                     env: dict[str, str]) -> tuple[list[Result], dict[str, Any]]:
    from swarm.core.chat_demo import num_blocks
    from swarm.core.local_swarm import LocalSwarm, even_spans

    spans = even_spans(num_blocks(checkpoint), HOPS)
    paths = {"mixed": link_copy(checkpoint, tmp / f"{name}-mixed"), "one": link_copy(checkpoint, tmp / f"{name}-one"),
             "base": link_copy(checkpoint, tmp / f"{name}-base")}
    adapter_args = ["--adapters", *(str(adapters_dir / n) for n in names)]
    extra = {"mixed": adapter_args, "one": [*adapter_args, "--no-mix-adapters"], "base": []}
    swarms = {c: LocalSwarm(paths[c], spans, extra_args=[*SERVER_ARGS, *extra[c]], env=env) for c in CONFIGS}
    infos: dict[str, Info] = {}
    try:
        for config, swarm in swarms.items():
            console.print(f"[bold]{name}[/]: starting 2 servers ({', '.join(f'{a}:{b}' for a, b in spans)}), "
                          f"{TITLES[config]}", highlight=False)
            swarm.start()
            infos[config] = Info(swarm.endpoints, [s.proc.pid for s in swarm.servers])
        server_pids = [pid for info in infos.values() for pid in info.pids]
        for config in CONFIGS:
            console.print(f"[bold]{name}[/]: {len(prompts)} clients load the model ({TITLES[config]})",
                          highlight=False)
            chosen = {} if config == "base" else {w: names[w] for w in prompts}
            clients.load_with(config, paths[config], swarms[config].endpoints, chosen)
        for config in CONFIGS:
            clients.run(config, prompts, WARMUP_TOKENS)
        runs: dict[str, list[Run]] = {c: [] for c in CONFIGS}
        for round_ in range(repeats):
            for config in CONFIGS:  # alternating: drift from other work hits every configuration alike
                run = measure(clients, infos[config], config, prompts, new_tokens, server_pids)
                runs[config].append(run)
                console.print(f"[bold]{name}[/]: round {round_ + 1}/{repeats}, {TITLES[config]}: "
                              f"{run.aggregate_tokens_per_s:.1f} tokens/s, {run.sessions_per_pass:.2f} sessions/pass, "
                              f"other CPU {run.other_cpu:.2f}", highlight=False)
        served = {c: [i.get("adapter_memory") for i in infos[c].read()] for c in ("mixed", "one")}
        clients.unload()
        return [summarize(name, c, runs[c]) for c in CONFIGS], served
    finally:
        for info in infos.values():
            info.close()
        for swarm in swarms.values():
            swarm.stop()  # SIGTERM to each server's PID, SIGKILL after a grace period


def rss(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of process `pid`, in bytes (Linux /proc; empty elsewhere)."""
    found: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                found[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return found


def server_memory(name: str, tmp: Path, checkpoint: Path, adapters_dir: Path, ranks: dict[str, int], length: int,
                  env: dict[str, str], label: str) -> list[dict[str, Any]]:
    """One server of every block with `--adapter-dir` (environment `env`): its RSS before and after each adapter's
    first request, and the adapter's own bytes there."""
    from swarm import AutoDistributedModelForCausalLM
    from swarm.core.chat_demo import num_blocks
    from swarm.core.local_swarm import LocalSwarm

    path = link_copy(checkpoint, tmp / f"{name}-memory-{label}")
    swarm = LocalSwarm(path, [(0, num_blocks(checkpoint))], env=env,
                       extra_args=[*SERVER_ARGS, "--adapter-dir", str(adapters_dir),
                                   "--max-adapters", str(len(ranks))])
    console.print(f"[bold]{name}[/]: memory (malloc {label}): one server of every block, --adapter-dir with "
                  f"{len(ranks)} adapters", highlight=False)
    swarm.start()
    info: Info | None = None
    model: Any = None
    try:
        pid = swarm.servers[0].proc.pid
        info = Info(swarm.endpoints, [pid])
        model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.endpoints,
                                                                torch_dtype="float32")
        ids = torch.randint(0, MODELS[name]["vocab_size"], (1, length), generator=torch.Generator().manual_seed(SEED))
        steps: list[dict[str, Any]] = []
        stats: dict[str, Any] = {}
        with torch.inference_mode():
            for _ in range(2):  # warm-up without adapter: the server's buffers for a pass of this size
                model(input_ids=ids)
            for adapter in ranks:
                before = rss(pid)
                model.set_adapter(adapter)
                model(input_ids=ids)  # the server loads the adapter, then runs the forward with it
                after = rss(pid)
                stats = info.read()[0]["adapter_memory"]
                own = next(a["bytes"] for a in stats["loaded"] if a["name"] == adapter)
                steps.append({"own": own, "rss": after["VmRSS"] - before["VmRSS"],
                              "anon": after.get("RssAnon", 0) - before.get("RssAnon", 0),
                              "file": after.get("RssFile", 0) - before.get("RssFile", 0)})
        if stats.get("loads") != len(ranks) or stats.get("evictions"):
            raise RuntimeError(f"the server loaded {stats.get('loads')} adapters and dropped {stats.get('evictions')};"
                               f" expected {len(ranks)} and 0")
        return steps
    finally:
        if model is not None:
            model.close()
        if info is not None:
            info.close()
        swarm.stop()


def held_in_process(checkpoint: Path, adapters_dir: Path, names: list[str]) -> list[int] | None:
    """What an adapter store holds per adapter, without the allocator's free memory: the server's AdapterStore in
    this process, on every block of the checkpoint, loads each adapter (on its loading thread, as in a server), then
    glibc's malloc_trim(0) gives back what is free and this process's RSS growth is read. None without glibc."""
    import ctypes

    from swarm.core.chat_demo import num_blocks
    from swarm.core.server.adapters import AdapterConfig, AdapterStore
    from swarm.core.server.backend import BlockSpan
    from swarm.core.weights import ModelSource

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    span = BlockSpan.load(ModelSource(str(checkpoint)), 0, num_blocks(checkpoint), torch.float32)
    store = AdapterStore(span, AdapterConfig(directory=str(adapters_dir), max_adapters=len(names)))
    try:
        trim(0)
        growth: list[int] = []
        answers: queue.Queue[Exception | None] = queue.Queue()
        for name in names:
            before = rss(os.getpid())["VmRSS"]
            store.get(name, lambda task, error: answers.put(error))
            try:
                error = answers.get(timeout=120.0)
            except queue.Empty:
                raise TimeoutError(f"adapter {name} did not load within 120 s") from None
            if error is not None:
                raise error
            trim(0)
            growth.append(rss(os.getpid())["VmRSS"] - before)
        return growth
    finally:
        store.close()


def bench_memory(name: str, tmp: Path, checkpoint: Path, adapters_dir: Path, ranks: dict[str, int], length: int,
                 env: dict[str, str]) -> list[MemoryStep]:
    """A server's memory per added adapter: with glibc's defaults, with a fixed mmap threshold, and what the adapter
    store holds (in this process, after malloc_trim)."""
    plain = server_memory(name, tmp, checkpoint, adapters_dir, ranks, length, env, "defaults")
    fixed = server_memory(name, tmp, checkpoint, adapters_dir, ranks, length, dict(env, **FIXED_MALLOC),
                          "fixed-threshold")
    console.print(f"[bold]{name}[/]: memory: the adapter store in this process, after malloc_trim", highlight=False)
    held = held_in_process(checkpoint, adapters_dir, list(ranks))
    steps = [MemoryStep(adapter=adapter, rank=rank, own_bytes=p["own"], rss_growth=p["rss"], anon_growth=p["anon"],
                        file_growth=p["file"], fixed_growth=f["rss"], held_growth=None if held is None else held[i])
             for i, ((adapter, rank), p, f) in enumerate(zip(ranks.items(), plain, fixed, strict=True))]
    for s in steps:
        console.print(f"[bold]{name}[/]: {s.adapter} (rank {s.rank}): own {s.own_bytes / 2**20:.2f} MiB, RSS "
                      f"+{s.rss_growth / 2**20:.2f} MiB (fixed threshold +{s.fixed_growth / 2**20:.2f}, held "
                      f"{'?' if s.held_growth is None else f'{s.held_growth / 2**20:.2f}'})", highlight=False)
    return steps


# --- reporting -------------------------------------------------------------------------------------------------------

def paired(results: list[Result], model: str, config: str, other: str) -> list[float]:
    """`config`'s tokens/s over `other`'s, round by round (the two ran one after the other in each round)."""
    found = {r.config: r for r in results if r.model == model}
    return [a / b for a, b in zip(found[config].rounds_tokens_per_s, found[other].rounds_tokens_per_s, strict=True)]


def throughput_table(results: list[Result]) -> str:
    head = ["model", "configuration", "clients", "tokens/s (best)", "tokens/s (median)", "every round (other CPU)",
            "x one at a time", "x base", "per-client tokens/s", "p50 step ms", "p95 step ms", "sessions/pass",
            "server CPU", "other CPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 2 else "--:" for i in range(len(head))) + "|"]
    for r in results:
        b = r.best
        one = statistics.median(paired(results, r.model, r.config, "one"))
        base = statistics.median(paired(results, r.model, r.config, "base"))
        lines.append("| " + " | ".join([
            r.model, TITLES[r.config], str(b.clients), f"{b.aggregate_tokens_per_s:.1f}",
            f"{r.median_tokens_per_s:.1f}",
            ", ".join(f"{x:.1f} ({o:.2f})" for x, o in zip(r.rounds_tokens_per_s, r.rounds_other_cpu, strict=True)),
            f"{one:.2f}", f"{base:.2f}",
            f"{b.client_tokens_per_s:.1f}", f"{b.p50_step_ms:.1f}", f"{b.p95_step_ms:.1f}",
            f"{b.sessions_per_pass:.2f}", f"{b.server_cpu:.2f}", f"{b.other_cpu:.2f}"]) + " |")
    return "\n".join(lines)


def memory_table(model: str, steps: list[MemoryStep]) -> str:
    def mib(value: int | None) -> str:
        return "" if value is None else f"{value / 2**20:.2f}"

    def ratio(value: int | None, own: int) -> str:
        return "" if value is None else f"{value / own:.2f}"

    lines = ["| model | adapter | rank | own MiB | server RSS growth MiB | / own | with fixed mmap threshold MiB "
             "| / own | held (in process, trimmed) MiB | / own |", "|---|---|" + "--:|" * 8]
    for s in steps:
        lines.append(f"| {model} | {s.adapter} | {s.rank} | {mib(s.own_bytes)} | {mib(s.rss_growth)} | "
                     f"{ratio(s.rss_growth, s.own_bytes)} | {mib(s.fixed_growth)} | "
                     f"{ratio(s.fixed_growth, s.own_bytes)} | {mib(s.held_growth)} | "
                     f"{ratio(s.held_growth, s.own_bytes)} |")
    own = sum(s.own_bytes for s in steps)
    totals = [sum(s.rss_growth for s in steps), sum(s.fixed_growth for s in steps),
              None if any(s.held_growth is None for s in steps) else sum(s.held_growth or 0 for s in steps)]
    lines.append(f"| {model} | all {len(steps)} | | {mib(own)} | "
                 + " | ".join(f"{mib(t)} | {ratio(t, own)}" for t in totals) + " |")
    return "\n".join(lines)


def checks(model: str, results: list[Result], reference: dict[int, list[int]]) -> tuple[list[str], bool]:
    """Token checks and the throughput aims, as lines; whether every token check passed."""
    found = {r.config: r for r in results if r.model == model}
    mixed, one, base = found["mixed"].best, found["one"].best, found["base"].best
    consistent = all(r.tokens_consistent for r in found.values())
    same = mixed.tokens == one.tokens
    changed = sum(mixed.tokens[w] != base.tokens[w] for w in mixed.tokens)
    peft_equal = all(mixed.tokens[w] == tokens for w, tokens in reference.items())
    ok = consistent and same and changed == len(mixed.tokens) and peft_equal
    mix_rounds, base_rounds = paired(results, model, "mixed", "one"), paired(results, model, "mixed", "base")
    mix_ratio, base_ratio = statistics.median(mix_rounds), statistics.median(base_rounds)
    mix_best = mixed.aggregate_tokens_per_s / one.aggregate_tokens_per_s
    base_best = mixed.aggregate_tokens_per_s / base.aggregate_tokens_per_s
    lines = [
        f"- {model}: every client's tokens equal in every round: {'yes' if consistent else 'NO'}; mixed = one at a "
        f"time: {'yes' if same else 'NO'}; differ from base: {changed} of {len(mixed.tokens)} clients; equal to "
        f"PEFT's own decoding (clients {', '.join(map(str, reference))}): {'yes' if peft_equal else 'NO'}",
        f"- {model}: mixed / one at a time {mix_ratio:.2f}x (median of the rounds' ratios "
        f"{', '.join(f'{x:.2f}' for x in mix_rounds)}; best / best {mix_best:.2f}x; aim: at least {MIX_AIM:.0f}x) "
        f"{'met' if mix_ratio >= MIX_AIM else 'MISSED'}; for context, on GPUs PetS reports 1.53x / 1.63x (desktop / "
        "server) over its baseline without batching across tasks, S-LoRA up to 4x over vLLM's naive LoRA",
        f"- {model}: mixed / base {base_ratio:.2f} (median of the rounds' ratios "
        f"{', '.join(f'{x:.2f}' for x in base_rounds)}; best / best {base_best:.2f}; aim: at least {BASE_AIM:.2f}, "
        f"within 25%) {'met' if base_ratio >= BASE_AIM else 'MISSED'}",
    ]
    return lines, ok


def memory_lines(model: str, steps: list[MemoryStep]) -> list[str]:
    own = sum(s.own_bytes for s in steps)
    grown, fixed = sum(s.rss_growth for s in steps), sum(s.fixed_growth for s in steps)
    ratios = sorted(s.rss_growth / s.own_bytes for s in steps)
    lines = [f"- {model}: a server's RSS grew {grown / 2**20:.2f} MiB for {len(steps)} adapters of {own / 2**20:.2f} "
             f"MiB own bytes: {grown / own:.2f}x (per adapter {ratios[0]:.2f} to {ratios[-1]:.2f}, median "
             f"{statistics.median(ratios):.2f}; aim: equal to the own bytes, here at most {MEMORY_AIM}x) "
             f"{'met' if grown / own <= MEMORY_AIM else 'MISSED'}; with a fixed mmap threshold {fixed / own:.2f}x "
             f"{'met' if fixed / own <= MEMORY_AIM else 'MISSED'}"]
    if all(s.held_growth is not None for s in steps):
        held = sum(s.held_growth or 0 for s in steps)
        lines.append(f"- {model}: held by the adapter store (in process, after malloc_trim) {held / 2**20:.2f} MiB: "
                     f"{held / own:.2f}x the own bytes (aim: no copy of any weight, at most {MEMORY_AIM}x) "
                     f"{'met' if held / own <= MEMORY_AIM else 'MISSED'}")
    return lines


def bench_model(name: str, tmp: Path, clients: AdapterClients, count: int, ranks: list[int], new_tokens: int,
                repeats: int, threads: int, memory: bool, memory_tokens: int
                ) -> tuple[list[Result], list[MemoryStep], dict[int, list[int]], dict[str, Any]]:
    console.print(f"[bold]{name}[/]: building the checkpoint and {count} LoRAs with PEFT", highlight=False)
    checkpoint = build_checkpoint(tmp / name, name)
    prompts = prompts_for(count, MODELS[name]["vocab_size"])
    adapters_dir = tmp / f"{name}-adapters"
    named, reference = build_adapters(checkpoint, adapters_dir, count, ranks, prompts, new_tokens)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               SWARM_MDNS="0", SWARM_CACHE_DIR=str(tmp / "swarm-cache"))
    results, served = bench_throughput(name, tmp, checkpoint, adapters_dir, list(named), clients, prompts, new_tokens,
                                       repeats, env)
    steps = bench_memory(name, tmp, checkpoint, adapters_dir, named, memory_tokens, env) if memory else []
    return results, steps, reference, served


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", default="mid", help="comma-separated: tiny, mid (default: mid)")
    parser.add_argument("--clients", type=int, default=8,
                        help="concurrent clients, each with its own LoRA (default: 8)")
    parser.add_argument("--ranks", default="8,16", help="LoRA ranks, alternating over the clients (default: 8,16)")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per client (default: 64)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds of the three configurations, alternating; each one's best is reported "
                             "(default: 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server and per client (default: 1)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="measure a server's memory per added adapter (default: on)")
    parser.add_argument("--memory-tokens", type=int, default=8,
                        help="tokens of the forward that loads each adapter in the memory measure (default: 8)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: tiny, 4 clients, 16 new tokens, 1 round (unless given)")
    args = parser.parse_args(argv)
    if args.quick:
        given = set(argv if argv is not None else sys.argv[1:])
        for option, value in (("models", "tiny"), ("clients", 4), ("new_tokens", 16), ("repeats", 1)):
            if f"--{option.replace('_', '-')}" not in given:
                setattr(args, option, value)
    models = parse_list(args.models)
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    try:
        ranks = [int(r) for r in parse_list(args.ranks)]
    except ValueError:
        parser.error("--ranks takes comma-separated integers")
    if not ranks or min(ranks) < 1:
        parser.error("--ranks must be 1 or more")
    for option in ("clients", "new_tokens", "repeats", "threads", "memory_tokens"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be 1 or more")

    quiet_threads(args.threads)
    header = (f"adapters: {args.clients} clients, LoRA ranks {'/'.join(map(str, ranks))} alternating on "
              f"{', '.join(TARGETS)}; {HOPS} servers (blocks split in halves), greedy float32, {args.new_tokens} new "
              f"tokens per client, {args.threads} torch thread(s) per server and per client, on {os.cpu_count()} CPUs")
    console.print(header, highlight=False)
    results: list[Result] = []
    memory: dict[str, list[MemoryStep]] = {}
    references: dict[str, dict[int, list[int]]] = {}
    served: dict[str, Any] = {}
    load_before = os.getloadavg()
    started = time.perf_counter()
    clients: AdapterClients | None = None
    try:
        clients = AdapterClients(args.clients, args.threads)
        with tempfile.TemporaryDirectory(prefix="swarm-bench-adapters-") as tmp:
            for name in models:
                got, steps, references[name], served[name] = bench_model(
                    name, Path(tmp), clients, args.clients, ranks, args.new_tokens, args.repeats, args.threads,
                    args.memory, args.memory_tokens)
                results += got
                memory[name] = steps
    finally:
        if clients is not None:
            clients.close()
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()
    print(f"{header}; best of {args.repeats} round(s) (mixed, one at a time, base, alternating); ratios: the median "
          "over rounds of the ratio within a round\n")
    print(throughput_table(results))
    lines: list[str] = []
    ok = True
    for name in models:
        got, passed = checks(name, results, references[name])
        lines += got
        ok = ok and passed
    if any(memory.values()):
        print()
        print("\n\n".join(memory_table(name, steps) for name, steps in memory.items() if steps))
        for name, steps in memory.items():
            if steps:
                lines += memory_lines(name, steps)
    print()
    for line in lines:
        print(line)
    print(f"\ntotal {elapsed:.0f} s; 1-minute load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    if args.json is not None:
        report = {
            "header": header, "clients": args.clients, "ranks": ranks, "targets": TARGETS,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": args.threads, "hops": HOPS,
            "seed": SEED, "models": {m: MODELS[m] for m in models}, "python": sys.version.split()[0],
            "torch": torch.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "elapsed_s": elapsed, "load_average_before": list(load_before), "load_average_after": list(load_after),
            "throughput": [asdict(r) for r in results], "served_adapter_memory": served,
            "memory": {m: [asdict(s) for s in steps] for m, steps in memory.items()},
            "peft_reference_tokens": references, "summary": lines,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    if not ok:
        console.print("[bold red]warning:[/] some token checks failed (see above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

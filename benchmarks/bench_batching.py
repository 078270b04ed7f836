"""Continuous batching: many clients decoding at once through 2 local servers, with batching on and off.

What it measures, for the random Llama checkpoints of bench_inference.py ("tiny": hidden 256, 4 blocks; "mid":
hidden 1024, 16 blocks), float32:

* two local swarms of 2 `swarm serve` subprocesses each on 127.0.0.1, the blocks split in two halves: one with
  batching (the default engine: the steps of many sessions share one pass through the blocks) and one with
  `--no-batching` (one request at a time, whole: the old engine). Both run for the whole of a model's turn, idle
  when not measured, so their runs can be interleaved (other work on a small machine drifts over minutes);
* N concurrent clients (1, 2, 4, 8, 16), each its own `AutoDistributedModelForCausalLM` (its own connections, so
  its own client for the servers' fairness) in its own process (or thread, `--client-mode threads`), each decoding
  greedily `--new-tokens` (64) new tokens inside an inference session from a random prompt of its own length
  (8 + its index tokens): the prefill makes the first token, each decoding step one more. The clients load and warm
  up first, then start together.

Per configuration: aggregate tokens/s (all clients' new tokens / the time from the start to the last client's end;
"x 1 client" and, with batching, "x off" divide it by the same swarm's single client and by the no-batching swarm
with as many clients), per-client tokens/s (its new tokens / its own time, mean over clients), p50/p95 step latency
(one decoding step as the client sees it: embedding, the remote blocks, final norm, LM head, argmax; every client's
steps pooled, the prefill left out), client ms (the median of a step less its inference session `step`: the
client's own work, GIL waits included when clients are threads), sessions per pass (exactly: the step requests the
clients sent, clients x new tokens x 2 servers, over the passes the servers ran meanwhile, from `passes` in their
`info` replies read before and after; 1.00 without batching), server CPU (the servers' CPU seconds / (wall time x 2):
1.00 is a server computing all the time), client CPU (the clients' CPU seconds / wall time, in cores), other CPU (what
the machine spent on processes not of this benchmark, in cores, from /proc/stat: other work on a small machine
skews every figure), and whether every client's tokens equal its solo run (the client's prompt decoded alone through
the no-batching swarm before anything else). A single client runs `--repeats` (3) times per swarm, alternating, and
the run with the lowest median step is reported (as in bench_inference.py); its per-hop latency is the median time of
the inference session's `step` (both hops, serialization included) / 2.

Clients: processes by default. Measured on tiny (where the client's share of a step is the largest), 16 clients as
threads spent 0.4 to 0.6 ms of client time per step, as processes did: the GIL did not distort the figures, but
processes are how real clients run, and keep the benchmark's own threads out of the clients' way.

Threads: the servers and the clients share the machine's cores, so each server gets `--threads` (1) torch threads
(OMP_NUM_THREADS / MKL_NUM_THREADS), and so does each client. A single client keeps one core busy at a time (its two
servers work one after the other); batched sessions can keep both servers busy at once.

Run (from the repository root, no network needed; the default run takes 6 to 8 minutes on 2 cores, --quick about 1):

    .venv/bin/python benchmarks/bench_batching.py
    .venv/bin/python benchmarks/bench_batching.py --models mid --clients 1,8 --json out.json
    .venv/bin/python benchmarks/bench_batching.py --quick
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["SWARM_MDNS"] = "0"  # only the benchmark's own servers, found through the initial peers
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from bench_inference import MODELS, build_checkpoint  # noqa: E402
from rich.console import Console  # noqa: E402

SEED = 0
HOPS = 2  # servers in each swarm: the blocks split in two halves
BASE_PROMPT = 8  # client i's prompt has BASE_PROMPT + i random tokens
SERVER_ARGS = ["--dtype", "float32", "--no-mdns", "--log-level", "warning"]
LOAD_TIMEOUT = 300.0  # seconds for the clients to load a model and warm up
GO_TIMEOUT = 120.0  # seconds a ready client waits for the start
RUN_TIMEOUT = 900.0  # seconds for one configuration to finish
LABELS = {True: "on", False: "off"}  # batching

console = Console(stderr=True)  # progress on stderr; the markdown table goes to stdout


@dataclass
class Config:
    model: str
    batching: bool
    clients: int
    new_tokens: int
    aggregate_tokens_per_s: float
    client_tokens_per_s: float  # mean over clients
    p50_step_ms: float
    p95_step_ms: float
    sessions_per_pass: float  # step requests / passes, over both servers
    passes: int  # passes run by both servers during the run
    step_requests: int  # step requests sent to both servers during the run
    tokens_equal: bool  # every client's tokens equal its solo run
    server_cpu: float  # CPU seconds of the servers during the run / (wall time x servers): 1.0 = always busy
    client_cpu: float  # CPU seconds of the clients' processes during the run / wall time (in cores)
    other_cpu: float  # CPU seconds the machine spent on anything but this benchmark's processes / wall time (cores)
    wall_s: float
    median_hop_ms: float  # median session step / HOPS (meaningful for one client)
    median_client_ms: float  # median of (step - session step): the client's own part of a step, GIL waits included
    mean_prefill_ms: float
    server_batch: list[dict[str, Any]] = field(default_factory=list)  # each server's `batch` stats after the run
    repeats: int = 1
    repeat_median_step_ms: list[float] = field(default_factory=list)


# --- the clients -----------------------------------------------------------------------------------------------------

def load_model(path: str, endpoints: list[str]) -> Any:
    """A client model on `endpoints`, warmed up: connections open, a throwaway session of two tokens run."""
    from swarm import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=endpoints, torch_dtype="float32")
    try:
        with torch.inference_mode(), model.inference_session(max_length=4):
            ids = torch.tensor([[1, 2]])
            model(input_ids=ids)
            model(input_ids=torch.cat([ids, torch.tensor([[3]])], dim=1))
    except BaseException:
        model.close()
        raise
    return model


def generate(model: Any, prompt: list[int], new_tokens: int, go: Any) -> dict[str, Any]:
    """Greedy decoding of `new_tokens` tokens from `prompt` in a fresh session, started when `go` is set."""
    ids = torch.tensor([prompt])
    steps: list[float] = []
    remote: list[float] = []
    with torch.inference_mode(), model.inference_session(max_length=len(prompt) + new_tokens) as session:
        inner = session.step

        def timed_step(*args: Any, **kwargs: Any) -> torch.Tensor:
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                remote.append(time.perf_counter() - started)

        session.step = timed_step  # the remote part of a step: every hop, serialization included
        if not go.wait(GO_TIMEOUT):
            raise TimeoutError(f"no start within {GO_TIMEOUT:.0f} s")
        start = time.monotonic()  # CLOCK_MONOTONIC: comparable between processes
        for _ in range(new_tokens):
            started = time.perf_counter()
            logits = model(input_ids=ids).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1).view(1, 1)], dim=1)
            steps.append(time.perf_counter() - started)
        end = time.monotonic()
    return {"tokens": ids[0, len(prompt):].tolist(), "start": start, "end": end, "prefill_s": steps[0],
            "step_s": steps[1:], "remote_s": remote[1:]}


def worker_loop(wid: int, inbox: Any, outbox: Any, go: Any, threads: int | None, parent: int | None) -> None:
    """A client: loads models and runs generations on command; answers (kind, wid, payload) on `outbox`.

    Commands: ("load", label, path, endpoints), ("run", label, prompt, new_tokens), ("close",). In a process of its
    own (`threads` set) it also stops when its parent is gone."""
    if threads is not None:
        torch.set_num_threads(threads)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    models: dict[str, Any] = {}
    try:
        while True:
            try:
                command = inbox.get(timeout=1.0)
            except queue.Empty:
                if parent is not None and os.getppid() != parent:
                    return
                continue
            try:
                if command[0] == "load":
                    _, label, path, endpoints = command
                    if label in models:
                        models.pop(label).close()
                    models[label] = load_model(path, endpoints)
                    outbox.put(("ok", wid, None))
                elif command[0] == "run":
                    _, label, prompt, new_tokens = command
                    outbox.put(("ready", wid, None))
                    outbox.put(("ok", wid, generate(models[label], prompt, new_tokens, go)))
                elif command[0] == "unload":
                    for model in models.values():
                        model.close()
                    models.clear()
                    outbox.put(("ok", wid, None))
                else:
                    outbox.put(("ok", wid, None))
                    return
            except Exception:
                outbox.put(("error", wid, traceback.format_exc()))
    finally:
        for model in models.values():
            model.close()


def _process_worker(wid: int, inbox: Any, outbox: Any, go: Any, threads: int, parent: int) -> None:
    worker_loop(wid, inbox, outbox, go, threads, parent)


class Clients:
    """`count` client workers (processes or threads) that stay up across configurations."""

    def __init__(self, count: int, mode: str, threads: int):
        self.mode, self.count = mode, count
        self.workers: list[Any] = []
        self.inboxes: list[Any] = []
        try:
            self._start(count, mode, threads)
        except BaseException:
            self.close()
            raise

    def _start(self, count: int, mode: str, threads: int) -> None:
        if mode == "processes":
            ctx = mp.get_context("spawn")
            self.outbox, self.go = ctx.Queue(), ctx.Event()
            for wid in range(count):
                inbox = ctx.Queue()
                proc = ctx.Process(target=_process_worker, args=(wid, inbox, self.outbox, self.go, threads,
                                                                 os.getpid()), name=f"bench-client-{wid}",
                                   daemon=True)
                proc.start()
                self.workers.append(proc)
                self.inboxes.append(inbox)
        else:
            self.outbox, self.go = queue.Queue(), threading.Event()
            for wid in range(count):
                inbox = queue.Queue()
                thread = threading.Thread(target=worker_loop, args=(wid, inbox, self.outbox, self.go, None, None),
                                          name=f"bench-client-{wid}", daemon=True)
                thread.start()
                self.workers.append(thread)
                self.inboxes.append(inbox)

    def _collect(self, wids: list[int], kind: str, timeout: float) -> dict[int, Any]:
        """Wait (bounded) for a `kind` answer from each of `wids`; raise on an error answer or the timeout."""
        deadline = time.monotonic() + timeout
        got: dict[int, Any] = {}
        while len(got) < len(wids):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"clients {sorted(set(wids) - set(got))} did not answer within {timeout:.0f} s")
            try:
                answer, wid, payload = self.outbox.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [w for w in wids if w not in got and not self.workers[w].is_alive()]
                if dead:
                    raise RuntimeError(f"clients {dead} died") from None
                continue
            if answer == "error":
                raise RuntimeError(f"client {wid} failed:\n{payload}")
            if answer == kind and wid in wids:
                got[wid] = payload
        return got

    def pids(self, wids: list[int]) -> list[int]:
        """The PIDs of clients `wids` (this process's for threads)."""
        return [self.workers[w].pid for w in wids] if self.mode == "processes" else [os.getpid()]

    def load(self, label: str, path: Path, endpoints: list[str]) -> None:
        for inbox in self.inboxes:
            inbox.put(("load", label, str(path), endpoints))
        self._collect(list(range(self.count)), "ok", LOAD_TIMEOUT)

    def unload(self) -> None:
        for inbox in self.inboxes:
            inbox.put(("unload",))
        self._collect(list(range(self.count)), "ok", 60.0)

    def run(self, label: str, prompts: dict[int, list[int]], new_tokens: int,
            before: Any = None) -> tuple[float, dict[int, dict[str, Any]]]:
        """Clients `prompts` keys decode together; `before()` runs once all are ready. Returns the start time
        (monotonic) and each client's result."""
        self.go.clear()
        wids = sorted(prompts)
        for wid in wids:
            self.inboxes[wid].put(("run", label, prompts[wid], new_tokens))
        self._collect(wids, "ready", GO_TIMEOUT)
        if before is not None:
            before()
        start = time.monotonic()
        self.go.set()
        try:
            return start, self._collect(wids, "ok", RUN_TIMEOUT)
        finally:
            self.go.clear()

    def close(self) -> None:
        """Stop every worker: ask, wait (bounded), then terminate and kill processes by PID."""
        for inbox in self.inboxes:
            try:
                inbox.put(("close",), timeout=1.0)
            except (OSError, ValueError, queue.Full):
                pass
        deadline = time.monotonic() + 20.0
        for worker in self.workers:
            worker.join(max(0.1, deadline - time.monotonic()))
        if self.mode == "processes":
            for proc in self.workers:
                if proc.is_alive():
                    proc.terminate()  # SIGTERM to its PID
                    proc.join(5.0)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5.0)
            for q in [*self.inboxes, *([self.outbox] if hasattr(self, "outbox") else [])]:
                q.close()
                q.cancel_join_thread()


# --- the servers -----------------------------------------------------------------------------------------------------

def link_copy(src: Path, dst: Path) -> Path:
    """`src` under another directory name (so its servers announce another model id): hard links, else copies."""
    dst.mkdir()
    for item in src.iterdir():
        try:
            os.link(item, dst / item.name)
        except OSError:
            shutil.copy2(item, dst / item.name)
    return dst


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of processes `pids` so far (every thread; Linux /proc, else 0)."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.0


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (not idle, not waiting for I/O) since boot (Linux /proc/stat)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # up to steal, less idle, iowait


class Info:
    """`info` of each server of a swarm: passes run and batch stats; and the servers' PIDs."""

    def __init__(self, endpoints: list[str], pids: list[int]):
        from swarm.transport.rpc import RpcClient

        self.clients = [RpcClient(e) for e in endpoints]
        self.pids = pids

    def read(self) -> list[dict[str, Any]]:
        return [dict(c.call("info", timeout=10.0).fields) for c in self.clients]

    def passes(self) -> list[int]:
        return [int(i["passes"]) for i in self.read()]

    def close(self) -> None:
        for c in self.clients:
            c.close()


# --- measuring -------------------------------------------------------------------------------------------------------

def prompts_for(count: int, vocab: int) -> dict[int, list[int]]:
    """Client i's prompt: BASE_PROMPT + i random tokens (a generator seeded per client)."""
    return {i: torch.randint(0, vocab, (BASE_PROMPT + i,), generator=torch.Generator().manual_seed(SEED + 1 + i))
            .tolist() for i in range(count)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def measure(clients: Clients, info: Info, model: str, batching: bool, prompts: dict[int, list[int]],
            new_tokens: int, solo: dict[int, list[int]], ours_pids: list[int]) -> Config:
    """Clients `prompts` decode together through the swarm `info` reads; `ours_pids`: every server's PID (the
    benchmark's processes are not counted as other work)."""
    before: list[int] = []
    cpu: dict[str, float] = {}
    client_pids = clients.pids(list(prompts))
    ours = sorted({*clients.pids(list(range(clients.count))), *ours_pids, os.getpid()})

    def mark() -> None:
        before.extend(info.passes())
        cpu["servers"], cpu["clients"] = cpu_seconds(info.pids), cpu_seconds(client_pids)
        cpu["ours"], cpu["busy"] = cpu_seconds(ours), busy_seconds()

    start, results = clients.run(LABELS[batching], prompts, new_tokens, mark)
    server_cpu, client_cpu = cpu_seconds(info.pids) - cpu["servers"], cpu_seconds(client_pids) - cpu["clients"]
    other_cpu = (busy_seconds() - cpu["busy"]) - (cpu_seconds(ours) - cpu["ours"])
    after = info.read()
    passes = sum(int(a["passes"]) for a in after) - sum(before)
    requests = len(prompts) * new_tokens * HOPS
    ends = [r["end"] for r in results.values()]
    steps = [s for r in results.values() for s in r["step_s"]]
    remote = [s for r in results.values() for s in r["remote_s"]]
    local = [s - t for r in results.values() for s, t in zip(r["step_s"], r["remote_s"], strict=True)]
    return Config(
        model=model, batching=batching, clients=len(prompts), new_tokens=new_tokens,
        aggregate_tokens_per_s=len(prompts) * new_tokens / (max(ends) - start),
        client_tokens_per_s=statistics.fmean(new_tokens / (r["end"] - r["start"]) for r in results.values()),
        p50_step_ms=percentile(steps, 0.5) * 1000, p95_step_ms=percentile(steps, 0.95) * 1000,
        sessions_per_pass=requests / passes if passes else float("nan"), passes=passes, step_requests=requests,
        tokens_equal=all(results[w]["tokens"] == solo.get(w) for w in results),
        server_cpu=server_cpu / ((max(ends) - start) * HOPS), client_cpu=client_cpu / (max(ends) - start),
        other_cpu=max(0.0, other_cpu / (max(ends) - start)),
        wall_s=max(ends) - start,
        median_hop_ms=statistics.median(remote) * 1000 / HOPS, median_client_ms=statistics.median(local) * 1000,
        mean_prefill_ms=statistics.fmean(r["prefill_s"] for r in results.values()) * 1000,
        server_batch=[a.get("batch", {}) for a in after])


def best_of(runs: list[Config]) -> Config:
    """The repeat with the lowest median step (the least disturbed by other work on the machine)."""
    best = min(runs, key=lambda r: r.p50_step_ms)
    best.repeats = len(runs)
    best.repeat_median_step_ms = [round(r.p50_step_ms, 3) for r in runs]
    best.tokens_equal = all(r.tokens_equal for r in runs)
    return best


def bench_model(name: str, tmp: Path, clients: Clients, counts: list[int], new_tokens: int, repeats: int,
                threads: int, pass_tokens: int | None) -> list[Config]:
    from swarm.core.chat_demo import num_blocks
    from swarm.core.local_swarm import LocalSwarm, even_spans

    console.print(f"[bold]{name}[/]: building the checkpoint", highlight=False)
    paths = {True: build_checkpoint(tmp / f"{name}-batching", name)}
    paths[False] = link_copy(paths[True], tmp / f"{name}-no-batching")
    spans = even_spans(num_blocks(paths[True]), HOPS)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               SWARM_MDNS="0", SWARM_CACHE_DIR=str(tmp / "swarm-cache"))
    extra = [*SERVER_ARGS, *(["--pass-tokens", str(pass_tokens)] if pass_tokens else [])]
    swarms = {b: LocalSwarm(paths[b], spans, extra_args=extra + ([] if b else ["--no-batching"]), env=env)
              for b in (True, False)}
    infos: dict[bool, Info] = {}
    try:
        for batching, swarm in swarms.items():
            console.print(f"[bold]{name}[/]: starting 2 servers ({', '.join(f'{a}:{b}' for a, b in spans)}), "
                          f"batching {LABELS[batching]}", highlight=False)
            swarm.start()
            infos[batching] = Info(swarm.endpoints, [s.proc.pid for s in swarm.servers])
            console.print(f"  server PIDs {[s.proc.pid for s in swarm.servers]}", highlight=False)
        for batching, swarm in swarms.items():
            clients.load(LABELS[batching], paths[batching], swarm.endpoints)
        server_pids = [pid for info in infos.values() for pid in info.pids]
        vocab = MODELS[name]["vocab_size"]
        prompts = prompts_for(max(counts), vocab)
        console.print(f"[bold]{name}[/]: solo runs of {len(prompts)} prompts (no batching)", highlight=False)
        solo: dict[int, list[int]] = {}
        for wid, prompt in prompts.items():
            _, results = clients.run(LABELS[False], {wid: prompt}, new_tokens)
            solo[wid] = results[wid]["tokens"]
        configs: list[Config] = []
        for count in counts:
            subset = {w: prompts[w] for w in range(count)}
            runs: dict[bool, list[Config]] = {True: [], False: []}
            for _ in range(repeats if count == 1 else 1):
                for batching in (False, True):  # alternating: drift from other work hits both alike
                    console.print(f"[bold]{name}[/]: {count} client(s), batching {LABELS[batching]}",
                                  highlight=False)
                    runs[batching].append(measure(clients, infos[batching], name, batching, subset, new_tokens,
                                                  solo, server_pids))
            configs += [best_of(runs[False]), best_of(runs[True])]
        clients.unload()
        return configs
    finally:
        for info in infos.values():
            info.close()
        for swarm in swarms.values():
            swarm.stop()  # SIGTERM to each server's PID, SIGKILL after a grace period


# --- reporting -------------------------------------------------------------------------------------------------------

def markdown(configs: list[Config]) -> str:
    head = ["model", "batching", "clients", "tokens/s", "x 1 client", "x off", "per-client tokens/s", "p50 step ms",
            "p95 step ms", "client ms", "sessions/pass", "server CPU", "client CPU", "other CPU", "tokens equal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 2 else "--:" for i in range(len(head))) + "|"]
    found = {(c.model, c.batching, c.clients): c for c in configs}
    for c in configs:
        one, off = found.get((c.model, c.batching, 1)), found.get((c.model, False, c.clients))
        lines.append("| " + " | ".join([
            c.model, LABELS[c.batching], str(c.clients), f"{c.aggregate_tokens_per_s:.1f}",
            f"{c.aggregate_tokens_per_s / one.aggregate_tokens_per_s:.2f}" if one else "",
            f"{c.aggregate_tokens_per_s / off.aggregate_tokens_per_s:.2f}" if c.batching and off else "",
            f"{c.client_tokens_per_s:.1f}", f"{c.p50_step_ms:.1f}", f"{c.p95_step_ms:.1f}",
            f"{c.median_client_ms:.2f}", f"{c.sessions_per_pass:.2f}", f"{c.server_cpu:.2f}", f"{c.client_cpu:.2f}",
            f"{c.other_cpu:.2f}", "yes" if c.tokens_equal else "**NO**"]) + " |")
    return "\n".join(lines)


def summary(configs: list[Config]) -> list[str]:
    """Single-client per-hop latency on/off and the issue's two aims, per model."""
    lines = []
    for model in dict.fromkeys(c.model for c in configs):
        mine = {(c.batching, c.clients): c for c in configs if c.model == model}
        on, off = mine.get((True, 1)), mine.get((False, 1))
        if on and off:
            ratio = on.aggregate_tokens_per_s / off.aggregate_tokens_per_s
            lines.append(f"- {model}, 1 client: per-hop latency {on.median_hop_ms:.2f} ms with batching, "
                         f"{off.median_hop_ms:.2f} ms without; median step {on.p50_step_ms:.2f} / "
                         f"{off.p50_step_ms:.2f} ms; tokens/s {on.aggregate_tokens_per_s:.1f} / "
                         f"{off.aggregate_tokens_per_s:.1f} = {ratio:.3f} (aim: at least 0.95) "
                         f"{'met' if ratio >= 0.95 else 'MISSED'}")
        eight = mine.get((True, 8))
        if on and eight:
            ratio = eight.aggregate_tokens_per_s / on.aggregate_tokens_per_s
            aim = " (aim on mid: at least 4x) " + ("met" if ratio >= 4 else "MISSED") if model == "mid" else ""
            lines.append(f"- {model}, with batching: 8 clients give {ratio:.2f}x the tokens/s of 1{aim}")
    return lines


def parse_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def quiet_threads(threads: int) -> None:
    """No progress bars from transformers; `threads` torch threads here and in the processes started from here."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", default="tiny,mid", help="comma-separated: tiny, mid (default: both)")
    parser.add_argument("--clients", default="1,2,4,8,16", help="comma-separated client counts (default: 1,2,4,8,16)")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per client (default: 64)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of the single client per swarm, alternating; the one with the lowest median step "
                             "is reported (default: 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server and per client (default: 1)")
    parser.add_argument("--client-mode", choices=("processes", "threads"), default="processes",
                        help="each client in a process of its own (default) or a thread of this one")
    parser.add_argument("--pass-tokens", type=int, default=None, help="`swarm serve --pass-tokens` (default: its own)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: tiny, 1,2,4 clients, 16 new tokens, 1 repeat (unless given)")
    args = parser.parse_args(argv)
    if args.quick:
        given = set(argv if argv is not None else sys.argv[1:])
        if "--models" not in given:
            args.models = "tiny"
        if "--clients" not in given:
            args.clients = "1,2,4"
        if "--new-tokens" not in given:
            args.new_tokens = 16
        if "--repeats" not in given:
            args.repeats = 1
    models = parse_list(args.models)
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    try:
        counts = sorted({int(c) for c in parse_list(args.clients)})
    except ValueError:
        parser.error("--clients takes comma-separated integers")
    if not counts or counts[0] < 1:
        parser.error("--clients counts must be 1 or more")
    for option in ("new_tokens", "repeats", "threads"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be 1 or more")
    if args.pass_tokens is not None and args.pass_tokens < 1:
        parser.error("--pass-tokens must be 1 or more")

    quiet_threads(args.threads)
    header = (f"continuous batching: {HOPS} servers (blocks split in halves), greedy float32, {args.new_tokens} new "
              f"tokens per client, {args.threads} torch thread(s) per server and per client, clients as "
              f"{args.client_mode}, on {os.cpu_count()} CPUs")
    console.print(header, highlight=False)
    configs: list[Config] = []
    load_before = os.getloadavg()
    started = time.perf_counter()
    clients: Clients | None = None
    try:
        clients = Clients(max(counts), args.client_mode, args.threads)
        with tempfile.TemporaryDirectory(prefix="swarm-bench-batching-") as tmp:
            for name in models:
                configs += bench_model(name, Path(tmp), clients, counts, args.new_tokens, args.repeats, args.threads,
                                       args.pass_tokens)
    finally:
        if clients is not None:
            clients.close()
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()
    print(f"{header}; single client: best of {args.repeats} run(s)\n")
    print(markdown(configs))
    print()
    for line in summary(configs):
        print(line)
    print(f"\ntotal {elapsed:.0f} s; 1-minute load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    if args.json is not None:
        report = {
            "header": header, "new_tokens": args.new_tokens, "clients": counts, "threads": args.threads,
            "client_mode": args.client_mode, "repeats": args.repeats, "pass_tokens": args.pass_tokens,
            "hops": HOPS, "seed": SEED, "models": {m: MODELS[m] for m in models},
            "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "elapsed_s": elapsed,
            "load_average_before": list(load_before), "load_average_after": list(load_after),
            "configs": [asdict(c) for c in configs],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    if not all(c.tokens_equal for c in configs):
        console.print("[bold red]warning:[/] some clients' tokens differ from their solo runs")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a private swarm costs: CurveZMQ encryption against an open swarm, on the same servers' work.

Three measurements, each alternating open and private in `--repeats` rounds (after one untimed warm-up of each), so
that drift of other work on the machine hits both alike; the ratio reported is the median over rounds of private /
open within a round:

* wire: bare request/reply throughput between two sockets in this process (an `RpcServer` that answers each request
  with the tensor it received, and an `RpcClient`), for messages of 4 KiB (a decode step of a small model) to 16 MiB
  (a long prompt's hidden states): round trips per second and MB/s each way. This is the encryption's own cost, with
  no compute to hide it.
* generation: greedy decoding of `--steps` tokens at batch 1 inside an inference session, through 2 `swarm serve`
  subprocesses on 127.0.0.1 holding the halves of a random Llama checkpoint ("mid" of bench_inference.py: hidden 1024,
  16 blocks; `--model tiny` for hidden 256, 4 blocks), tokens/s; the tokens must be equal in both swarms.
* forward and backward: one training step's remote part (forward with the graph kept, backward) of a batch of
  `--batch` x `--length` tokens through the same servers, tokens/s.

Both swarms are up for the whole run (one started with `--swarm-key`), each server with `--threads` torch threads.

Run (from the repository root, no network; about 2 minutes on 2 cores):

    .venv/bin/python benchmarks/bench_private.py
    .venv/bin/python benchmarks/bench_private.py --model tiny --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import build_checkpoint, prompt_ids  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

console = Console(stderr=True, width=max(120, Console(stderr=True).width))
WIRE_SIZES = (4 << 10, 256 << 10, 4 << 20, 16 << 20)


@dataclass
class Figure:
    what: str
    unit: str
    open: list[float] = field(default_factory=list)
    private: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return statistics.median(p / o for p, o in zip(self.private, self.open, strict=True))


def wire_round(key, size: int, seconds: float = 1.0) -> tuple[float, float]:
    """Round trips/s and the same in MB/s each way, for messages of `size` bytes, open (key None) or private."""
    from swarm.transport.rpc import CurveClient, CurveServer, RpcClient, RpcClientConfig, RpcServer, RpcServerConfig

    def echo(request) -> None:
        request.reply({}, request.message.tensors[:1])

    curve = None if key is None else CurveServer(key.public, key.secret, lambda k: k == key.swarm)
    payload = torch.randn(size // 4)
    with RpcServer(echo, RpcServerConfig(host="127.0.0.1", curve=curve)) as server:
        config = RpcClientConfig(timeout=30, curve=None if key is None else CurveClient.of(key))
        with RpcClient(server.endpoint, config) as client:
            for _ in range(3):
                client.call("echo", {}, [payload])
            calls, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds or calls < 3:
                client.call("echo", {}, [payload])
                calls += 1
            elapsed = time.perf_counter() - started
    return calls / elapsed, calls * size / elapsed / 1e6


def start_swarms(path: Path, key_path: str, threads: int):
    from swarm.core.chat_demo import num_blocks
    from swarm.core.local_swarm import LocalSwarm, even_spans

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    spans = even_spans(num_blocks(path), 2)
    common = ["--dtype", "float32", "--no-mdns", "--log-level", "warning"]
    return (LocalSwarm(path, spans, extra_args=common, env=env).start(),
            LocalSwarm(path, spans, extra_args=[*common, "--swarm-key", key_path], env=env).start())


def connect(path: Path, endpoints: list[str], key):
    from swarm.core.client.config import ClientConfig
    from swarm.core.client.model import AutoDistributedModelForCausalLM

    return AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=endpoints, torch_dtype="float32",
                                                           config=ClientConfig(swarm_key=key, connect_timeout=30))


def generation(model, prompt: torch.Tensor, steps: int) -> tuple[float, list[int]]:
    with torch.inference_mode():
        started = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=steps, do_sample=False)
        elapsed = time.perf_counter() - started
    return steps / elapsed, out[0, prompt.shape[1]:].tolist()


def training(model, batch: int, length: int, vocab: int) -> float:
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    started = time.perf_counter()
    hidden = model.blocks(embeds)
    hidden.float().pow(2).mean().backward()
    return batch * length / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "mid"), default="mid")
    parser.add_argument("--steps", type=int, default=32, help="tokens generated per round")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from swarm.transport.keys import SwarmKey

    key = SwarmKey.generate()
    figures: list[Figure] = []
    wire = {size: (Figure(f"wire {size >> 10} KiB", "round trips/s"), Figure(f"wire {size >> 10} KiB", "MB/s"))
            for size in WIRE_SIZES}
    for _ in range(args.repeats):
        for size, (rate, mbs) in wire.items():
            for label, k in (("open", None), ("private", key)):
                calls, mb = wire_round(k, size)
                getattr(rate, label).append(calls)
                getattr(mbs, label).append(mb)
    figures += [f for pair in wire.values() for f in pair]
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(Path(tmp) / args.model, args.model)
        key_path = str(Path(tmp) / "swarm.key")
        key.write(key_path)
        open_swarm, private_swarm = start_swarms(path, key_path, args.threads)
        try:
            models = {"open": connect(path, open_swarm.endpoints, None),
                      "private": connect(path, private_swarm.endpoints, key)}
            vocab = models["open"].config.vocab_size
            prompt = prompt_ids(path, vocab)
            gen = Figure(f"generation, {args.steps} tokens", "tokens/s")
            train = Figure(f"forward+backward {args.batch}x{args.length}", "tokens/s")
            tokens: dict[str, list[int]] = {}
            for model in models.values():  # warm-up: connections, server-side caches
                generation(model, prompt, 4)
                training(model, args.batch, args.length, vocab)
            for _ in range(args.repeats):
                for label, model in models.items():
                    rate, tokens[label] = generation(model, prompt, args.steps)
                    getattr(gen, label).append(rate)
                    getattr(train, label).append(training(model, args.batch, args.length, vocab))
            figures += [gen, train]
            equal = tokens["open"] == tokens["private"]
            for model in models.values():
                model.blocks.close()
        finally:
            open_swarm.stop()
            private_swarm.stop()
    table = Table(title=f"private (CurveZMQ) vs open swarm, model {args.model}, {args.repeats} rounds",
                  title_justify="left")
    for column in ("what", "unit", "open (best)", "private (best)", "private / open (median of rounds)"):
        table.add_column(column, justify="left" if column in ("what", "unit") else "right")
    for f in figures:
        table.add_row(f.what, f.unit, f"{max(f.open):,.1f}", f"{max(f.private):,.1f}", f"{f.ratio:.3f}")
    console.print(table)
    console.print(f"generated tokens equal in both swarms: {equal}; load average {os.getloadavg()[0]:.2f}")
    if args.json is not None:
        report = {"model": args.model, "repeats": args.repeats, "tokens_equal": equal,
                  "figures": [{**asdict(f), "ratio": f.ratio} for f in figures]}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())

"""The OpenAI-compatible API's cost: N concurrent streaming clients through `swarm api` against the same load through
the Python API.

Setup: a random Llama with swarm's byte-level tokenizer (hidden 256, 4 blocks, float32; `--hidden`, `--layers`) on a
local swarm of 2 `swarm serve` subprocesses (blocks split in halves), and one `swarm api` subprocess in front of it.
For N in `--clients` (1, 4, 16), N threads start together, each asking greedily for `--new-tokens` (32) tokens
after a prompt of its own ("client I: tell me a story"):

* api: each thread is an `openai` client streaming `/v1/completions` (include_usage);
* python: each thread generates through a `shared_view()` of one `AutoDistributedModelForCausalLM` in this process,
  with a streamer (what `swarm api` does for each request, without HTTP).

Both get the same tokens (greedy, same prompts), so the work on the servers is the same. Per configuration: time to
first token (median and worst over clients: from the request's start to its first text), aggregate tokens/s (every
client's tokens / the time until the last one finished), and the HTTP layer's overhead (api time to first token less
python's, and the relative loss of tokens/s). One warm-up round runs first on each side; each configuration runs
`--repeats` (2) times per side, alternating, and the best (highest tokens/s) is kept. Both client sides (this
process and `swarm api`) run torch with one thread.

Run (from the repository root, no network needed; about 1-2 minutes on 2 cores):

    .venv/bin/python benchmarks/bench_api.py
    .venv/bin/python benchmarks/bench_api.py --clients 1,4,16 --new-tokens 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["SWARM_MDNS"] = "0"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

console = Console(stderr=True)
SERVER_ARGS = ["--dtype", "float32", "--no-mdns", "--log-level", "warning"]


@dataclass
class Run:
    side: str  # api or python
    clients: int
    ttft_ms: float  # median time to first token
    ttft_max_ms: float
    tokens: int  # all clients' new tokens
    seconds: float  # start to the last client's end
    tokens_per_s: float


def build_model(path: Path, hidden: int, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from swarm.core.demo import build_demo_tokenizer

    tokenizer = build_demo_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tokenizer),
                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         initializer_range=0.1)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def prompts(n: int) -> list[str]:
    return [f"client {i}: tell me a story" for i in range(n)]


def together(n: int, work: Callable[[int], tuple[float, int]]) -> tuple[list[float], int, float]:
    """Run `work(i)` for i < n on n threads started at once; each returns (seconds to its first token, tokens)."""
    results: list[tuple[float, int] | BaseException] = [(0.0, 0)] * n
    go = threading.Barrier(n + 1)

    def run(i: int) -> None:
        go.wait()
        try:
            results[i] = work(i)
        except BaseException as e:  # reported below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    go.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [r[0] for r in results], sum(r[1] for r in results), seconds  # type: ignore[index]


def api_work(url: str, model: str, new_tokens: int) -> Callable[[int], tuple[float, int]]:
    import openai

    def work(i: int) -> tuple[float, int]:
        with openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600) as client:
            start, first, tokens = time.perf_counter(), None, 0
            stream = client.completions.create(model=model, prompt=prompts(i + 1)[i], max_tokens=new_tokens,
                                               temperature=0, stream=True, stream_options={"include_usage": True})
            for part in stream:
                if first is None and part.choices and part.choices[0].text:
                    first = time.perf_counter() - start
                if part.usage is not None:
                    tokens = part.usage.completion_tokens
            return first if first is not None else time.perf_counter() - start, tokens

    return work


def python_work(model: object, tokenizer: object, new_tokens: int) -> Callable[[int], tuple[float, int]]:
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls, self.at = 0, None

        def put(self, value: torch.Tensor) -> None:
            self.calls += 1
            if self.calls == 2:  # the first call is the prompt
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    def work(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        ids = torch.tensor([tokenizer(prompts(i + 1)[i])["input_ids"]])  # type: ignore[operator]
        streamer = FirstToken()
        out = model.shared_view().generate(ids, attention_mask=torch.ones_like(ids),  # type: ignore[attr-defined]
                                           max_new_tokens=new_tokens, do_sample=False, streamer=streamer,
                                           pad_token_id=tokenizer.pad_token_id)  # type: ignore[attr-defined]
        return (streamer.at or time.perf_counter()) - start, out.shape[1] - ids.shape[1]

    return work


def measure(side: str, n: int, work: Callable[[int], tuple[float, int]]) -> Run:
    firsts, tokens, seconds = together(n, work)
    return Run(side, n, 1000 * statistics.median(firsts), 1000 * max(firsts), tokens, seconds, tokens / seconds)


def start_api(path: Path, peers: list[str], log: Path) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # as this process (the python side)
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "swarm", "api", "--port", "0", "--model", str(path),
                                 "--initial-peers", *peers, "--log-level", "warning"], stdout=subprocess.PIPE,
                                stderr=err, stdin=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        proc.kill()
        raise SystemExit(f"swarm api did not start: {log.read_text()[-2000:]}")
    return proc, url


def print_table(runs: list[Run]) -> None:
    by = {(r.side, r.clients): r for r in runs}
    print("| clients | TTFT api (ms) | TTFT python (ms) | HTTP TTFT overhead (ms) | worst TTFT api / python (ms) "
          "| tokens/s api | tokens/s python | tokens/s lost to HTTP |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sorted({r.clients for r in runs}):
        a, p = by[("api", n)], by[("python", n)]
        print(f"| {n} | {a.ttft_ms:.1f} | {p.ttft_ms:.1f} | {a.ttft_ms - p.ttft_ms:+.1f} | "
              f"{a.ttft_max_ms:.0f} / {p.ttft_max_ms:.0f} | {a.tokens_per_s:.1f} | {p.tokens_per_s:.1f} | "
              f"{100 * (1 - a.tokens_per_s / p.tokens_per_s):+.1f}% |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--json", dest="json_", help="also write the figures to this file")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from swarm import AutoDistributedModelForCausalLM
    from swarm.core.local_swarm import LocalSwarm, even_spans

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        path = build_model(Path(tmp) / "bench-api-model", args.hidden, args.layers)
        console.print(f"model: hidden {args.hidden}, {args.layers} blocks; starting 2 servers and swarm api")
        with LocalSwarm(path, even_spans(args.layers, 2), extra_args=SERVER_ARGS) as swarm:
            api, url = start_api(path, swarm.endpoints, Path(tmp) / "api.log")
            model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.endpoints)
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
                sides = {"api": api_work(url, path.name, args.new_tokens),
                         "python": python_work(model, tokenizer, args.new_tokens)}
                for side, work in sides.items():  # warm-up: loads, connections, kernels
                    measure(side, 2, work)
                for n in counts:
                    best: dict[str, Run] = {}
                    for _ in range(args.repeats):
                        for side, work in sides.items():
                            run = measure(side, n, work)
                            if side not in best or run.tokens_per_s > best[side].tokens_per_s:
                                best[side] = run
                    if best["api"].tokens != best["python"].tokens:
                        raise SystemExit(f"{n} clients: the API generated {best['api'].tokens} tokens, the Python "
                                         f"API {best['python'].tokens}: they should be the same")
                    runs += best.values()
                    console.print(f"{n} clients: api {best['api'].tokens_per_s:.1f} tok/s, python "
                                  f"{best['python'].tokens_per_s:.1f} tok/s")
            finally:
                model.close()
                api.terminate()
                api.wait(30)
    print_table(runs)
    if args.json_:
        machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
        Path(args.json_).write_text(json.dumps({"machine": machine, "new_tokens": args.new_tokens,
                                                "runs": [asdict(r) for r in runs]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

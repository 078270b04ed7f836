"""Prompt-tuning throughput: forward+backward tokens/s through a local swarm against local training with transformers.

A random Llama (hidden 256, intermediate 688, 8 blocks, 4 heads, vocab 1024; `--hidden`, `--layers` change it) is saved
in a temporary directory, or `--model smollm2` trains SmolLM2-135M-Instruct (30 blocks, hidden 576, vocab 49152) and
`--model PATH` a local model directory (a Llama-like one, with `model.embed_tokens` and `model.layers`), whose blocks
are split evenly over the servers the same way; the batch's ids are random below the model's vocabulary size (no
text is generated). For each tuning mode, ptune and deep_ptune (16 soft prompts), a training step on a batch of
`--batch` x `--length` tokens (8 x 128, random ids, all-ones mask, 2 labels) is timed in two settings:

* local -- the checkpoint loaded by plain transformers (`AutoModelForSequenceClassification`, float32) and frozen,
  with the prompt tuning done by hand: trainable prompts [16, hidden] prepended to the token embeddings
  (`inputs_embeds`, the mask extended with ones) and, for deep_ptune, trainable deep prompts [layers, 16, hidden]
  added to the first 16 positions before each decoder layer (a forward pre-hook); the `score` head is trainable too.
* swarm -- `AutoDistributedModelForSequenceClassification` with `tuning_mode` and `pre_seq_len=16` on `--servers`
  (2) `swarm serve` subprocesses on 127.0.0.1 holding the blocks split evenly; its `trainable_parameters()` are the
  prompts and the head, the blocks run (forward and backward) on the servers.

A step is zero_grad, forward with labels, `loss.backward()` and an AdamW step over the trainable parameters. After 2
untimed warm-up steps, `--steps` steps are timed; tokens/s = batch * length / median step time. Every process (this
one and each server) uses 1 torch thread, so local and swarm runs use the same compute per block.

    .venv/bin/python benchmarks/bench_tune.py [--model random|smollm2|PATH] [--batch 8] [--length 128] [--steps 5]
                                              [--hidden 256] [--layers 8] [--servers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from model_choice import RANDOM, add_model_option, resolve_model
from rich.console import Console
from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("SWARM_MDNS", "0")

from swarm import AutoDistributedModelForSequenceClassification  # noqa: E402
from swarm.core.client.config import ClientConfig  # noqa: E402
from swarm.core.local_swarm import ServeProcess, even_spans  # noqa: E402

ARGS = ["--host", "127.0.0.1", "--no-mdns", "--gossip-period", "0.2", "--log-level", "warning", "--dtype", "float32"]
MODES = ("ptune", "deep_ptune")
PRE_SEQ_LEN = 16
WARMUP_STEPS = 2
LR = 1e-3


def batch_of(vocab: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ids in [1, vocab) (0 is the pad token of the local model), an all-ones mask and random labels."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (batch, length), generator=gen)
    labels = torch.randint(0, 2, (batch,), generator=gen)
    return ids, torch.ones_like(ids), labels


def time_steps(step: Callable[[], None], steps: int) -> float:
    """WARMUP_STEPS untimed steps, then the median time of `steps` timed ones (seconds)."""
    for _ in range(WARMUP_STEPS):
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_local(model_dir: Path, mode: str, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                  steps: int) -> float:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, dtype=torch.float32)
    model.config.pad_token_id = 0  # transformers wants one for batches > 1; no input id is 0, the last token is scored
    model.requires_grad_(False)
    model.score.requires_grad_(True)
    embed, layers = model.model.embed_tokens, model.model.layers
    hidden = embed.weight.shape[1]
    prompts = torch.nn.Parameter(embed.weight.detach()[torch.randint(embed.weight.shape[0], (PRE_SEQ_LEN,))].clone())
    params = [prompts, model.score.weight]
    hooks = []
    if mode == "deep_ptune":
        deep = torch.nn.Parameter(torch.zeros(len(layers), PRE_SEQ_LEN, hidden))
        params.append(deep)
        for i, layer in enumerate(layers):
            def add(module, args, kwargs, i=i):
                states = args[0]
                states = torch.cat([states[:, :PRE_SEQ_LEN] + deep[i][None], states[:, PRE_SEQ_LEN:]], dim=1)
                return (states, *args[1:]), kwargs
            hooks.append(layer.register_forward_pre_hook(add, with_kwargs=True))
    optimizer = torch.optim.AdamW(params, lr=LR)
    batch = ids.shape[0]
    full_mask = torch.cat([torch.ones(batch, PRE_SEQ_LEN, dtype=mask.dtype), mask], dim=1)

    def step() -> None:
        optimizer.zero_grad()
        embeds = torch.cat([prompts[None].expand(batch, -1, -1), embed(ids)], dim=1)
        out = model(inputs_embeds=embeds, attention_mask=full_mask, labels=labels)
        out.loss.backward()
        optimizer.step()

    try:
        return time_steps(step, steps)
    finally:
        for hook in hooks:
            hook.remove()


def measure_swarm(model_dir: Path, peer: str, servers: int, mode: str, ids: torch.Tensor, mask: torch.Tensor,
                  labels: torch.Tensor, steps: int) -> float:
    torch.manual_seed(0)
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        str(model_dir), num_labels=2, tuning_mode=mode, pre_seq_len=PRE_SEQ_LEN, initial_peers=[peer],
        config=ClientConfig(gossip_period=0.2))
    with model:
        if not model.blocks.discovery.wait(lambda _: len(model.blocks.servers()) == servers, 15):
            raise RuntimeError(f"the client found {len(model.blocks.servers())} of the {servers} servers in 15 s")
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=LR)

        def step() -> None:
            optimizer.zero_grad()
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            optimizer.step()

        return time_steps(step, steps)


def build_model(path: Path, hidden: int, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    intermediate = -(-hidden * 8 // 3 // 16) * 16  # 688 for hidden 256
    LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                 num_attention_heads=hidden // 64, vocab_size=1024,
                                 initializer_range=0.1)).save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence (the prompts come on top)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--hidden", type=int, help="hidden size of the random model, a multiple of 64 (64 per head; "
                                                   "default 256)")
    parser.add_argument("--layers", type=int, help="blocks of the random model (default 8)")
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--json", type=Path)
    add_model_option(parser, "hidden 256, 8 blocks, vocab 1024")
    args = parser.parse_args()
    if args.model != RANDOM and (args.hidden is not None or args.layers is not None):
        parser.error("--hidden and --layers shape the random model: not with --model " + args.model)
    args.hidden = 256 if args.hidden is None else args.hidden
    args.layers = 8 if args.layers is None else args.layers
    if args.hidden < 64 or args.hidden % 64:
        parser.error("--hidden must be a multiple of 64")
    if min(args.batch, args.length, args.steps, args.layers, args.servers) < 1:
        parser.error("--batch, --length, --steps, --layers and --servers must be 1 or more")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    torch.set_num_threads(1)
    tokens = args.batch * args.length
    rows = []
    with tempfile.TemporaryDirectory(prefix="swarm-bench-tune-") as tmp:
        from transformers import AutoConfig
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        chosen = resolve_model(args.model, lambda: build_model(Path(tmp) / "model", args.hidden, args.layers),
                               "random Llama")
        if args.servers > chosen.blocks:
            parser.error(f"--servers must not exceed the model's {chosen.blocks} blocks")
        model_dir, config = chosen.path, AutoConfig.from_pretrained(chosen.path)
        hidden, layers = config.hidden_size, chosen.blocks
        ids, mask, labels = batch_of(config.vocab_size, args.batch, args.length)
        local = {mode: measure_local(model_dir, mode, ids, mask, labels, args.steps) for mode in MODES}
        spans = [f"{start}:{end}" for start, end in even_spans(layers, args.servers)]
        procs: list[ServeProcess] = []
        try:
            procs.append(ServeProcess([str(model_dir), "--blocks", spans[0], *ARGS], Path(tmp) / "0.log", env))
            for i, span in enumerate(spans[1:], 1):
                procs.append(ServeProcess([str(model_dir), "--blocks", span, *ARGS, "--initial-peers",
                                           procs[0].endpoint], Path(tmp) / f"{i}.log", env))
            swarm = {mode: measure_swarm(model_dir, procs[0].endpoint, args.servers, mode, ids, mask, labels,
                                         args.steps) for mode in MODES}
        finally:
            for proc in procs:
                proc.stop()
    for mode in MODES:
        rows.append({"mode": mode, "local_tokens_per_s": tokens / local[mode],
                     "swarm_tokens_per_s": tokens / swarm[mode], "ratio": local[mode] / swarm[mode],
                     "local_step_ms": local[mode] * 1000, "swarm_step_ms": swarm[mode] * 1000,
                     "model": chosen.label, "hidden": hidden, "layers": layers, "batch": args.batch,
                     "length": args.length, "servers": args.servers})
    table = Table(title=f"prompt tuning, forward+backward of {args.batch} x {args.length} tokens (+{PRE_SEQ_LEN} "
                        f"prompts), {chosen.label}, hidden {hidden}, {layers} blocks, {args.servers} servers "
                        f"({', '.join(spans)}), median of {args.steps} steps")
    for column in ("mode", "local tokens/s", "swarm tokens/s", "swarm / local"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for r in rows:
        table.add_row(r["mode"], f"{r['local_tokens_per_s']:.0f}", f"{r['swarm_tokens_per_s']:.0f}",
                      f"{r['ratio']:.2f}")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

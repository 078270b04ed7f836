"""`swarm tune MODEL --dataset DATA`: prompt-tune a model served by the swarm, from this machine.

The client trains soft prompts (`--mode ptune`, or `deep_ptune` with a prompt per block) or a LoRA of the blocks'
linear layers (`--mode lora`, `--lora-rank`, `--lora-alpha`, `--lora-targets`: the client holds it and sends each
server its blocks' part) and, for classification, a head, while the servers run the frozen blocks forward and
backward. The result (prompts, head, config; ptune also in PEFT's layout; a LoRA as a PEFT LoRA adapter that
`swarm serve --adapters` serves) goes to `--output`; Ctrl-C stops after the current step and saves what was trained.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..core.aliases import resolve_alias
from ..transport.errors import ConfigError
from .common import (
    CompressionOption,
    DeviceOption,
    InitialPeersOption,
    LogLevelOption,
    MdnsInterfaceOption,
    MdnsOption,
    ServerQuantOption,
    SwarmKeyOption,
    UsageError,
    VerifyOption,
    check_compression,
    check_verify,
    collect_peers,
    err_console,
    load_swarm_key,
    parse_server_quant,
    setup_logging,
    verify_summary,
)

log = logging.getLogger("swarm.cli.tune")


def tune(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model id or directory served by the swarm.")],
    dataset: Annotated[str, typer.Option(help="A Hugging Face dataset id or alias (sst2, imdb, wikitext2), a saved "
                                         "dataset directory, or a .jsonl/.json/.csv/.tsv file.")],
    task: Annotated[str, typer.Option(help="classification or lm (causal language modelling).")] = "classification",
    mode: Annotated[str, typer.Option(help="ptune (prompts before the input), deep_ptune (and one per block), or "
                                      "lora (low-rank updates of the blocks' linear layers).")] = "ptune",
    prompt_length: Annotated[int, typer.Option(help="Soft prompt tokens (ptune, deep_ptune).")] = 16,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank (--mode lora).")] = 8,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha: updates are scaled by alpha / rank.")] = 16.0,
    lora_targets: Annotated[list[str] | None, typer.Option(
        "--lora-targets", help="Linear layers the LoRA adapts (default PEFT's for the model: q_proj v_proj, "
                               "query_key_value for BLOOM and Falcon; all-linear for every attention and MLP "
                               "projection).")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the training data.")] = 1,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps (wins over --epochs).")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 8,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate (default 1e-2 for prompts, 1e-3 for lora).")
                  ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the split, the shuffling and the initial prompts.")] = 0,
    max_length: Annotated[int, typer.Option(help="Tokens per example (longer: truncated, or chunked for lm).")
                          ] = 256,
    text_field: Annotated[str | None, typer.Option(help="Field holding the text (default text, or sentence).")
                          ] = None,
    label_field: Annotated[str | None, typer.Option(help="Field holding the label (default label).")] = None,
    validation_file: Annotated[Path | None, typer.Option(help="Validation examples (for a local --dataset file).")
                               ] = None,
    validation_split: Annotated[float, typer.Option(help="Share of the training rows held out when the data has "
                                                    "no validation split.")] = 0.1,
    max_examples: Annotated[int | None, typer.Option(help="Use at most this many training examples.")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate every N steps (and always at the end).")] = None,
    prompts: Annotated[Path | None, typer.Option(help="Start from a saved result (continue training).")] = None,
    output: Annotated[Path, typer.Option(help="Directory for the trained prompts and head.")] = Path("swarm-prompts"),
    json_lines: Annotated[bool, typer.Option("--json", help="Print one JSON object per step and evaluation on "
                                             "stdout instead of a progress bar.")] = False,
    initial_peers: InitialPeersOption = None,
    mdns: MdnsOption = None,
    mdns_interface: MdnsInterfaceOption = None,
    swarm_key: SwarmKeyOption = None,
    verify: VerifyOption = 0.0,
    device: DeviceOption = "auto",
    server_quant: ServerQuantOption = None,
    compression: CompressionOption = "auto",
    log_level: LogLevelOption = None,
) -> None:
    """Prompt-tune a model through the swarm (the servers' weights never change)."""
    setup_logging(log_level, default="WARNING")
    check_verify(verify)
    allowed = parse_server_quant(server_quant)
    check_compression(compression)
    peers = collect_peers(initial_peers, list(ctx.args))
    from ..core.tune import Trainer, TuneConfig, load_data
    from ..core.tune.train import DEFAULT_LR

    if lr is None:
        lr = DEFAULT_LR.get(mode, 1e-2)
    config = TuneConfig(task=task, mode=mode, prompt_length=prompt_length, epochs=epochs, max_steps=max_steps,
                        batch_size=batch_size, lr=lr, seed=seed, max_length=max_length, eval_every=eval_every)
    try:
        config.check()
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} exists and is not a directory")
    key = load_swarm_key(swarm_key)  # a bad key file fails before the dataset is read
    with err_console.status(f"reading {dataset}..."):
        data = load_data(dataset, task=task, text_field=text_field, label_field=label_field,
                         validation_split=validation_split, seed=seed, max_examples=max_examples,
                         validation_file=str(validation_file) if validation_file is not None else None)
    from ..core.weights import ModelSource

    tokenizer = ModelSource(resolve_alias(model)).tokenizer()
    with err_console.status("connecting to the swarm..."):
        lora = dict(lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets) if mode == "lora" else {}
        net = _connect(model, task, mode, prompt_length, data, prompts, peers, mdns, mdns_interface, seed, lora,
                       key, verify, device, allowed, compression)
    stop = threading.Event()
    with net, _stop_on_ctrl_c(stop):
        trainer = Trainer(net, tokenizer, data, config, stop=stop)
        if json_lines:
            trainer.on_event = _print_json
            final = trainer.run()
        else:
            final = _with_progress(trainer)
        info = {"dataset": dataset, "metrics": final, "max_length": max_length}
        net.save_tuned(str(output), **info)
        if verify > 0:
            err_console.print(f"[dim]{verify_summary(net.blocks.verifier.stats.as_dict())}[/]", highlight=False)
    summary = ", ".join(f"{k} {v}" for k, v in final.items() if k.startswith("val_"))
    stopped = " (stopped early)" if final.get("stopped") else ""
    err_console.print(f"saved to {output}{stopped}: {final['step']} steps" + (f", {summary}" if summary else ""),
                      highlight=False)


def _connect(model: str, task: str, mode: str, prompt_length: int, data: Any, prompts: Path | None,
             peers: list[str], mdns: bool | None, mdns_interface: str | None, seed: int,
             lora: dict[str, Any] | None = None, swarm_key: Any = None, verify: float = 0.0,
             device: str = "cpu", server_quant: frozenset[str] | None = None,
             compression: str = "auto") -> Any:
    import torch

    from ..core.client.config import ClientConfig
    from ..core.client.model import AutoDistributedModelForCausalLM, AutoDistributedModelForSequenceClassification

    torch.manual_seed(seed)  # the initial prompts (or LoRA) and head
    common: dict[str, Any] = dict(initial_peers=peers, mdns=mdns, mdns_interface=mdns_interface,
                                  config=ClientConfig(swarm_key=swarm_key, verify=verify,
                                                      server_quant=server_quant, compression=compression),
                                  device=device)
    if prompts is not None:
        common["prompts"] = str(prompts)
    elif mode == "lora":
        common.update(tuning_mode="lora", **(lora or {}))
    else:
        common.update(tuning_mode=mode, pre_seq_len=prompt_length)
    if task == "classification":
        net = AutoDistributedModelForSequenceClassification.from_pretrained(model, num_labels=data.num_labels,
                                                                            **common)
        net.config.id2label = dict(enumerate(data.labels))
        return net
    return AutoDistributedModelForCausalLM.from_pretrained(model, **common)


def _print_json(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _with_progress(trainer: Any) -> dict[str, Any]:
    columns = [TextColumn("[bold]tuning[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[status]}")]
    with Progress(*columns, console=err_console, transient=False) as progress:
        bar = progress.add_task("tune", total=trainer.total_steps, status="")
        shown: dict[str, Any] = {}

        def on_event(event: dict[str, Any]) -> None:
            if event["event"] == "step":
                shown["loss"] = event["loss"]
                if "accuracy" in event:
                    shown["acc"] = event["accuracy"]
                progress.update(bar, completed=event["step"])
            elif event["event"] == "eval":
                shown.update({k.replace("val_", "val "): v for k, v in event.items() if k.startswith("val_")})
            progress.update(bar, status="  ".join(f"{k} {v:.4g}" for k, v in shown.items()))

        trainer.on_event = on_event
        return trainer.run()


class _stop_on_ctrl_c:
    """The first Ctrl-C asks the trainer to stop after the current step (and save); a second one interrupts."""

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()
        err_console.print("[yellow]stopping after this step and saving (Ctrl-C again to quit now)[/]")

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


__all__ = ["tune"]

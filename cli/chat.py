"""`swarm chat [MODEL] --initial-peers ...`: talk to a model served by the swarm, streaming tokens as they come.

With no model and no peers it runs on the built-in default: a local swarm of two servers of the demo chat model
(SmolLM2-135M-Instruct, prepared once into the cache; `--demo random` for the random test model) on 127.0.0.1,
started and stopped by this command.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..core.client.config import ClientConfig
from ..core.coverage import models_served
from ..transport.errors import ConfigError
from ..transport.mdns import MdnsSettings
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
    err_console,
    load_swarm_key,
    model_and_peers,
    parse_server_quant,
    setup_logging,
    verify_summary,
)

if TYPE_CHECKING:  # torch and transformers are imported by the command, not by `swarm --help`
    from ..core.chat import ChatSession
    from ..transport.discovery import Discovery

log = logging.getLogger("swarm.cli.chat")


DEMOS = ("smollm2", "random")


@contextlib.contextmanager
def _demo_swarm(kind: str, swarm_key: str | None = None) -> Iterator[tuple[str, list[str]]]:
    """The built-in demo: a local swarm of 2 servers of the demo model `kind` on 127.0.0.1 (private with
    `swarm_key`), stopped on exit."""
    from ..core.local_swarm import LocalSwarm, even_spans

    with err_console.status("preparing the demo model...") as spinner:
        def on_status(message: str) -> None:
            err_console.print(f"[dim]{message}[/]", highlight=False)
            spinner.update(message + "...")

        if kind == "random":
            from ..core.demo import NUM_HIDDEN_LAYERS, ensure_demo_model

            path, blocks = ensure_demo_model(), NUM_HIDDEN_LAYERS
        else:
            from ..core.chat_demo import ensure_chat_model, num_blocks

            path = ensure_chat_model(on_status=on_status)
            blocks = num_blocks(path)
        spinner.update("starting a local swarm of 2 servers...")
        private = [] if swarm_key is None else ["--swarm-key", swarm_key]
        swarm = LocalSwarm(path, even_spans(blocks, 2),
                           extra_args=["--log-level", "warning", "--no-mdns", *private]).start()
    spans = ", ".join(f"blocks {a}:{b} at {e}" for (a, b), e in zip(swarm.spans, swarm.endpoints, strict=True))
    if kind == "random":
        err_console.print("[yellow]This is swarm's random demo model: its weights are random, so its answers are "
                          "gibberish.[/]", highlight=False)
    else:
        err_console.print(f"[dim]Demo: {path.name} (Apache-2.0, 135M parameters), from {path}.[/]", highlight=False)
    err_console.print(
        f"[dim]It runs on a local swarm of 2 servers ({spans}). To serve a bigger model yourself:\n"
        "  swarm serve MODEL --blocks 0:16 --port 31330\n"
        "  swarm serve MODEL --blocks 16:32 --port 31331\n"
        "  swarm chat MODEL --initial-peers tcp://127.0.0.1:31330 tcp://127.0.0.1:31331[/]", highlight=False)
    try:
        yield str(path), swarm.endpoints
    finally:
        swarm.stop()


def chat(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Argument(
        help="Model id or directory (omit it, with no peers, for the built-in demo).")] = None,
    initial_peers: InitialPeersOption = None,
    prompt: Annotated[str | None, typer.Option(help="Answer this one message and exit.")] = None,
    system: Annotated[str | None, typer.Option(help="System message at the start of the conversation.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per answer.")] = 128,
    temperature: Annotated[float | None, typer.Option(
        help="Sampling temperature; 0 is greedy. Default: 0.7 in a chat, 0 (greedy, the same answer every time) "
             "with --prompt.")] = None,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: smallest set of tokens with this mass.")] = 0.9,
    max_length: Annotated[int, typer.Option(help="Tokens the conversation may hold on the servers.")] = 2048,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    mdns: MdnsOption = None,
    mdns_interface: MdnsInterfaceOption = None,
    swarm_key: SwarmKeyOption = None,
    show_route: Annotated[bool, typer.Option(help="Print which servers run which blocks after each answer.")] = False,
    relay: Annotated[bool, typer.Option(help="Servers pass each step along the chain themselves (one round trip "
                                        "from here per step instead of one per server).")] = False,
    prompts: Annotated[str | None, typer.Option(help="Generate with soft prompts trained by `swarm tune --task lm "
                                                "--output DIR`.")] = None,
    adapter: Annotated[str | None, typer.Option(help="Chat with this adapter the servers serve (`swarm serve "
                                                "--adapters`): its directory's name or hub id.")] = None,
    demo: Annotated[str, typer.Option(help="The built-in demo run when there is no model and no server: smollm2 "
                                      "(a real chat model) or random (random weights, for tests).")] = "smollm2",
    verify: VerifyOption = 0.0,
    device: DeviceOption = "auto",
    server_quant: ServerQuantOption = None,
    compression: CompressionOption = "auto",
    log_level: LogLevelOption = None,
) -> None:
    """Chat with a model served by the swarm."""
    from ..core.chat import ChatSession
    from ..transport.discovery import Discovery, DiscoveryConfig

    setup_logging(log_level, default="WARNING")
    check_verify(verify)
    allowed = parse_server_quant(server_quant)
    check_compression(compression)
    model, peers = model_and_peers(model, initial_peers, list(ctx.args))
    if demo not in DEMOS:
        raise UsageError(f"--demo must be one of {', '.join(DEMOS)}; got {demo!r}")
    if max_new_tokens < 1 or max_length < 2:
        raise ConfigError("--max-new-tokens must be at least 1 and --max-length at least 2")
    if temperature is None:
        temperature = 0.0 if prompt is not None else 0.7
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError("--temperature must be >= 0 and --top-p in (0, 1]")
    key = load_swarm_key(swarm_key)
    options = dict(system=system, max_length=max_length, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_p=top_p, seed=seed, config=ClientConfig(relay=relay, swarm_key=key, verify=verify,
                                                                    server_quant=allowed, compression=compression),
                   prompts=prompts, adapter=adapter, device=device)
    settings = MdnsSettings.from_options(mdns, mdns_interface)
    discovery: Discovery | None = None
    try:
        if model is None and (peers or settings.enabled):
            discovery = Discovery(peers, DiscoveryConfig(mdns=settings, swarm_key=key)).start()
            model = _pick_model(discovery, wait=5.0 if peers else 2.0)
            if model is None and peers:
                raise ConfigError(f"found no server through {', '.join(peers)}")
        if model is None:  # nothing given, nothing found: the built-in demo
            if discovery is not None:
                discovery.stop()
                discovery = None
            with _demo_swarm(demo, swarm_key) as (demo_path, endpoints):
                _run(ChatSession.connect(demo_path, endpoints, mdns=False, **options), prompt, show_route)
            return
        if discovery is None:
            discovery = Discovery(peers, DiscoveryConfig(mdns=settings, swarm_key=key)).start()
        with err_console.status("connecting to the swarm..."):
            session = ChatSession.connect(model, peers, discovery=discovery, **options)
        _run(session, prompt, show_route)
    finally:
        if discovery is not None:
            discovery.stop()


def _run(session: ChatSession, prompt: str | None, show_route: bool) -> None:
    try:
        _talk(session, prompt, show_route)
    finally:
        if session.model.blocks.config.verify > 0:
            err_console.print(f"[dim]{verify_summary(session.model.blocks.verifier.stats.as_dict())}[/]",
                              highlight=False)


def _talk(session: ChatSession, prompt: str | None, show_route: bool) -> None:
    with session:
        if prompt is not None:
            _answer(session, prompt, show_route)
            return
        err_console.print("[dim]Type a message and press Enter; Ctrl-C stops an answer; Ctrl-D (or Ctrl-C here) "
                          "quits.[/]")
        while True:
            try:
                text = err_console.input("[bold cyan]you>[/] ")
            except (EOFError, KeyboardInterrupt):  # leaving is not an error
                err_console.print()
                return
            if not text.strip():
                continue
            try:
                _answer(session, text, show_route)
            except KeyboardInterrupt:  # the session dropped the unfinished turn: the conversation goes on
                sys.stdout.write("\n")
                sys.stdout.flush()
                err_console.print("[dim](stopped; that message and its answer are left out of the conversation)[/]")


def _pick_model(discovery: Discovery, wait: float) -> str | None:
    """The one model the swarm serves; None when none is found; a usage error listing them when several are.

    A model served from a local directory is announced by the directory's name: when its servers also announce the
    directory's path and this machine has that directory with the same model, the path is returned; otherwise an
    error says to pass the path."""
    from ..core.weights import is_local_copy

    discovery.wait(lambda records: bool(models_served(records)), wait)
    records = discovery.records()
    models = models_served(records)
    if len(models) > 1:
        listing = "; ".join(models)
        raise UsageError(f"several models are served ({listing}); name one: swarm chat MODEL")
    if not models:
        return None
    served = [r for r in records if r.model == models[0] and r.path]
    if not served:
        return models[0]
    for record in served:
        if is_local_copy(record):
            return record.path
    raise ConfigError(f"the swarm serves {models[0]!r} from a local directory ({served[0].path} on the servers' "
                      "machine), which this machine does not have; pass the model's path here: swarm chat PATH")


def _answer(session: ChatSession, text: str, show_route: bool = False) -> None:
    from ..core.chat import printable

    def write(piece: str) -> None:
        sys.stdout.write(printable(piece))  # a model's output never drives the terminal
        sys.stdout.flush()

    answer = session.send(text, on_text=write)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not answer:  # e.g. a random model that greedily repeats a role token
        err_console.print("[dim](no text: the model answered with special tokens only, which are not shown)[/]")
    elif not printable(answer):
        err_console.print("[dim](no text: the model answered with control characters only, which are not "
                          "shown)[/]")
    active = session.model.active_session
    if show_route and active is not None:
        route = " -> ".join(f"{hop.peer}[{hop.start}:{hop.end}]" for hop in active.route)
        err_console.print(f"[dim]route: {route}[/]", highlight=False, soft_wrap=True)


__all__: list[Any] = ["chat"]

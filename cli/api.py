"""`swarm api`: an OpenAI-compatible HTTP API over the swarm, at http://HOST:PORT/v1.

It offers every model the swarm serves (and their adapters, as `MODEL:ADAPTER`), or only the `--model`s named. With no
model named, no peers and nothing found by mDNS, it starts the built-in demo swarm first, as `swarm chat` does.
It prints its URL on stdout once it listens (after the URL of its metrics, with `--metrics-port`).
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Annotated

import typer

from ..transport.errors import ConfigError
from ..transport.mdns import MdnsSettings
from .chat import DEMOS, _demo_swarm
from .common import (
    CompressionOption,
    DeviceOption,
    InitialPeersOption,
    LogLevelOption,
    MdnsInterfaceOption,
    MdnsOption,
    SwarmKeyOption,
    UsageError,
    check_compression,
    collect_peers,
    err_console,
    load_swarm_key,
    setup_logging,
)

if TYPE_CHECKING:  # torch and starlette are imported by the command, not by `swarm --help`
    from ..core.api.app import Api
    from ..core.api.config import ApiConfig
    from ..core.api.metrics import ApiMetrics
    from ..core.metrics import MetricsEndpoint
    from ..transport.keys import SwarmKey

log = logging.getLogger("swarm.cli.api")


def api(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    initial_peers: InitialPeersOption = None,
    model: Annotated[list[str] | None, typer.Option(
        "--model", help="Offer only this model (repeatable): an id, alias or directory, or NAME=MODEL to offer it "
                        "under NAME. Default: every model the swarm serves.")] = None,
    api_key: Annotated[str | None, typer.Option(
        help="Every request needs `Authorization: Bearer KEY` ($SWARM_API_KEY).", envvar="SWARM_API_KEY")] = None,
    api_key_file: Annotated[str | None, typer.Option(help="Read the API key from this file.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens one answer may ask for (and get, when it asks none).")
                          ] = 4096,
    mdns: MdnsOption = None,
    mdns_interface: MdnsInterfaceOption = None,
    swarm_key: SwarmKeyOption = None,
    demo: Annotated[str, typer.Option(help="The built-in demo run when there is no model and no server: smollm2 "
                                      "(a real chat model) or random (random weights, for tests).")] = "smollm2",
    metrics_port: Annotated[int | None, typer.Option(
        help="Serve Prometheus metrics of the API (requests, time to first token, tokens/s) at "
             "http://HOST:PORT/metrics (0: any free port).")] = None,
    relay: Annotated[bool, typer.Option(help="Servers pass each step along the chain themselves.")] = False,
    device: DeviceOption = "cpu",
    compression: CompressionOption = "auto",
    log_level: LogLevelOption = None,
) -> None:
    """Serve the swarm's models through an OpenAI-compatible HTTP API."""
    from ..core.api.config import ApiConfig
    from ..core.client.config import ClientConfig

    setup_logging(log_level, default="WARNING")
    check_compression(compression)
    if demo not in DEMOS:
        raise UsageError(f"--demo must be one of {', '.join(DEMOS)}; got {demo!r}")
    peers = collect_peers(initial_peers, list(ctx.args))
    key = load_swarm_key(swarm_key)
    client = ClientConfig(relay=relay, swarm_key=key, compression=compression)
    config = ApiConfig(host=host, port=port, api_key=_api_key(api_key, api_key_file), models=_models(model or []),
                       max_tokens=max_tokens, device=device, client=client)
    settings = MdnsSettings.from_options(mdns, mdns_interface)
    from ..core.api.app import bind

    if config.models and not peers and not settings.enabled:
        raise UsageError("--model needs servers to find: give --initial-peers or turn mDNS on")
    sock = bind(host, port)  # before anything slow: a taken port is said at once
    try:
        if config.models or _anything_served(peers, settings, key):
            _run(config, sock, peers, settings, metrics_port)
            return
        with _demo_swarm(demo, swarm_key) as (_, endpoints):  # nothing named, nothing found: the built-in demo
            _run(config, sock, endpoints, MdnsSettings(enabled=False), metrics_port)
    finally:
        sock.close()


def _api_key(value: str | None, path: str | None) -> str | None:
    if value is not None and path is not None:
        raise UsageError("give --api-key or --api-key-file, not both")
    if path is None:
        return value
    try:
        text = open(path, encoding="utf-8").read().strip()
    except OSError as e:
        raise ConfigError(f"cannot read the API key file {path}: {e.strerror or e}") from None
    if not text:
        raise ConfigError(f"the API key file {path} is empty")
    return text


def _models(values: list[str]) -> dict[str, str]:
    """`--model` values as public name -> model (NAME=MODEL, or MODEL under its announced id)."""
    from ..core.aliases import announced_id

    out: dict[str, str] = {}
    for value in values:
        name, _, source = value.partition("=") if "=" in value else ("", "", value)
        if not source or (("=" in value) and not name):
            raise UsageError(f"--model must be MODEL or NAME=MODEL, got {value!r}")
        out[name or announced_id(source)] = source
    return out


def _anything_served(peers: list[str], settings: MdnsSettings, key: SwarmKey | None) -> bool:
    """Whether the peers (or mDNS) lead to any served model, as `swarm chat` looks (5 s with peers, 2 s by mDNS alone);
    False with neither. Peers that serve nothing are an error (rather than an API that offers nothing)."""
    if not peers and not settings.enabled:
        return False
    from ..core.coverage import models_served
    from ..transport.discovery import Discovery, DiscoveryConfig

    with Discovery(peers, DiscoveryConfig(mdns=settings, swarm_key=key)).start() as discovery:
        if discovery.wait(lambda records: bool(models_served(records)), 5.0 if peers else 2.0):
            return True
    if peers:
        raise ConfigError(f"found no server through {', '.join(peers)}")
    return False


def _run(config: ApiConfig, sock: socket.socket, peers: list[str], settings: MdnsSettings,
         metrics_port: int | None) -> None:
    from ..core.api.app import Api, serve
    from ..core.api.models import ModelRegistry
    from ..transport.discovery import Discovery, DiscoveryConfig

    discovery = Discovery(peers, DiscoveryConfig(mdns=settings, swarm_key=config.client.swarm_key)).start()
    try:
        api = Api(ModelRegistry(discovery, config), config)
        metrics, metrics_server = _metrics(api, config.host, metrics_port)
        address, port = sock.getsockname()[:2]
        url = f"http://{'[' + address + ']' if ':' in address else address}:{port}/v1"
        print(url, flush=True)
        err_console.print(f"[dim]OpenAI-compatible API at {url} (Ctrl-C stops it)[/]", highlight=False)
        try:
            serve(api, sock, metrics)
        finally:
            if metrics_server is not None:
                metrics_server.stop()
    finally:
        discovery.stop()


def _metrics(api: Api, host: str, port: int | None) -> tuple[ApiMetrics | None, MetricsEndpoint | None]:
    """The API's metrics and their HTTP endpoint on `port` (None, None without one); their URL goes to stdout first."""
    if port is None:
        return None, None
    from ..core.api.metrics import ApiMetrics
    from ..core.metrics import MetricsEndpoint

    endpoint = MetricsEndpoint()
    metrics = ApiMetrics(endpoint.registry)
    api.observers.append(metrics.observe)
    endpoint.start(host, port)
    print(endpoint.url, flush=True)
    return metrics, endpoint

"""What every command shares: the stderr console, logging setup, error lines and exit codes.

The cli modules import nothing heavy at import time (no torch, transformers or ZeroMQ), so `--help`, completions and
usage errors come back at once: each command imports what it needs inside its function.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from ..transport.errors import ConfigError

if TYPE_CHECKING:
    from ..transport.discovery import Discovery
    from ..transport.keys import SwarmKey

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# options every command that talks to the swarm takes
InitialPeersOption = Annotated[list[str] | None, typer.Option(
    "--initial-peers", help="Addresses of servers already in the swarm, tcp://HOST:PORT (needed across networks).")]
MdnsOption = Annotated[bool | None, typer.Option(
    "--mdns/--no-mdns", help="Find (and, for servers, announce) servers on the LAN by mDNS (default on; $SWARM_MDNS).")]
MdnsInterfaceOption = Annotated[str | None, typer.Option(
    help="Bind mDNS to this interface's IPv4 address ($SWARM_MDNS_INTERFACE).")]
LogLevelOption = Annotated[str | None, typer.Option(help="debug, info, warning or error.")]
SwarmKeyOption = Annotated[str | None, typer.Option(
    help="Join a private swarm with this key file (`swarm keygen`): every connection is encrypted and only holders "
         "of the swarm's keys get in.")]
DeviceOption = Annotated[str, typer.Option(
    help="Where the client's embeddings and head run: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda, "
         "cuda:N or mps.")]

err_console = Console(stderr=True)


class UsageError(ConfigError):
    """A command-line argument is wrong (exit code 2)."""


def setup_logging(level: str | None, default: str = "INFO") -> None:
    """Rich logs on stderr; `level` (or $SWARM_LOG_LEVEL) for swarm's own loggers, warnings for libraries."""
    name = (level or os.environ.get("SWARM_LOG_LEVEL") or default).upper()
    if name not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise UsageError(f"--log-level must be one of debug, info, warning, error; got {level!r}")
    from rich.logging import RichHandler

    handler = RichHandler(console=err_console, show_path=False, rich_tracebacks=False, log_time_format="[%X]")
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("swarm").setLevel(name)
    for noisy in ("huggingface_hub", "httpx", "httpcore", "filelock"):  # their retries and cache notes: errors only
        logging.getLogger(noisy).setLevel(logging.DEBUG if name == "DEBUG" else logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is first imported
    if "transformers" in sys.modules:  # already imported (commands run in-process): switch them off directly
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def collect_peers(values: list[str] | None, extra: list[str]) -> list[str]:
    """Peers from `--initial-peers A B, C` forms: repeated options, extra words after it, commas.

    Click options take one value each, so `--initial-peers A B` leaves B as an extra argument; such extras are
    accepted when they look like addresses. Anything else left over is a usage error.
    """
    out: list[str] = []
    for value in [*(values or []), *extra]:
        for word in value.replace(",", " ").split():
            if not (word.startswith("tcp://") or ":" in word):
                raise UsageError(f"unexpected argument {word!r}")
            out.append(word)
    return out


def model_and_peers(model: str | None, values: list[str] | None, extra: list[str]) -> tuple[str | None, list[str]]:
    """Like `collect_peers`, for commands whose MODEL argument is optional: in `--initial-peers A B` Click takes B
    for MODEL, so a MODEL that looks like an address is a peer."""
    if model is not None and model.startswith("tcp://"):
        return None, collect_peers(values, [model, *extra])
    return model, collect_peers(values, extra)


def load_swarm_key(path: str | None) -> SwarmKey | None:
    """The key of `--swarm-key PATH` (None without it); a bad file is a ConfigError that names it."""
    if path is None:
        return None
    from ..transport.keys import SwarmKey

    return SwarmKey.load(path)


def listener(peers: list[str], mdns: bool | None, mdns_interface: str | None,
             swarm_key: SwarmKey | None = None) -> Discovery:
    """A discovery that only listens (for `status` and `bench`), gossiping every half second; not started."""
    from ..transport.discovery import Discovery, DiscoveryConfig
    from ..transport.gossip import GossipConfig
    from ..transport.mdns import MdnsSettings

    settings = DiscoveryConfig(mdns=MdnsSettings.from_options(mdns, mdns_interface), gossip=GossipConfig(period=0.5),
                               swarm_key=swarm_key)
    return Discovery(peers, settings)


def searched(peers: list[str], mdns: bool | None, mdns_interface: str | None, wait: float,
             discovery: Discovery | None = None) -> str:
    """Where a command looked for servers, for its 'found no server' line (or which server refused us and why)."""
    from ..transport.mdns import MdnsSettings

    for address, why in (discovery.denied() if discovery is not None else {}).items():
        return f"{address} refused us: {why}"
    places = []
    if MdnsSettings.from_options(mdns, mdns_interface).enabled:
        places.append("mDNS on the local network")
    if peers:
        places.append(", ".join(peers))
    if not places:
        return "mDNS is off and no --initial-peers were given; try --initial-peers tcp://HOST:PORT or --mdns"
    return f"searched {' and '.join(places)} for {wait:g} s; try --initial-peers tcp://HOST:PORT or a longer --wait"


VerifyOption = Annotated[float, typer.Option(
    help="Check this fraction (0 to 1, e.g. 0.05) of the servers' computations on a second server of the same "
         "blocks, and ban a server whose outputs do not match.")]


ServerQuantOption = Annotated[str | None, typer.Option(
    help="Use only servers whose weights are quantized so: a comma-separated list of none, int8 and nf4 (e.g. none "
         "to avoid quantized servers; default: any).")]


def parse_server_quant(text: str | None) -> frozenset[str] | None:
    """`--server-quant none,int8` -> {"none", "int8"} (None without the option); a usage error on anything else."""
    if text is None:
        return None
    from ..core.client.config import check_server_quant

    try:
        return check_server_quant(p.strip().lower() for p in text.split(",") if p.strip())
    except ConfigError as e:
        raise UsageError(str(e).replace("server_quant", "--server-quant")) from None


CompressionOption = Annotated[str, typer.Option(
    help="Hidden states and gradients on the wire: none, float16, bfloat16, int8 (blockwise 8-bit, ~1% error), or "
         "auto (each server's own dtype when it computes in 16 bits, which changes no value; float32 servers get "
         "none). Servers relay with what the request asked; a server that does not announce a codec gets none.")]


def check_compression(value: str) -> str:
    """`--compression`'s value; anything but a known setting is a usage error."""
    from ..quant.codecs import SETTINGS

    if value not in SETTINGS:
        raise UsageError(f"--compression must be one of {', '.join(SETTINGS)}, got {value!r}")
    return value


def check_verify(value: float) -> float:
    """`--verify`'s value, a fraction in [0, 1]; anything else is a usage error."""
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise UsageError(f"--verify must be a fraction in [0, 1] of the computations to check (e.g. 0.05), got {value}")
    return value


def verify_summary(stats: dict[str, int]) -> str:
    """One line of what `--verify` did: 'verify: 12 checks, 1 mismatch, 1 server banned'."""
    def plural(n: int, word: str, words: str) -> str:
        return f"{n} {word if n == 1 else words}"

    parts = [plural(stats["checks"], "check", "checks"), plural(stats["mismatches"], "mismatch", "mismatches"),
             plural(stats["bans"], "server banned", "servers banned")]
    if stats["skipped"]:
        parts.append(f"{stats['skipped']} not checked (no second server)")
    if stats["failed"]:
        parts.append(f"{stats['failed']} unanswered by the checker")
    return "verify: " + ", ".join(parts)

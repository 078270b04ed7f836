"""Client settings, one dataclass (checked when built: a bad value is a ConfigError, not a surprise later)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ...quant.codecs import SETTINGS
from ...transport.errors import ConfigError
from ...transport.keys import SwarmKey


@dataclass(frozen=True)
class ClientConfig:
    request_timeout: float = 60.0  # seconds to wait for a forward/backward/step reply
    connect_timeout: float = 5.0  # seconds to wait for servers covering the model when joining
    gossip_period: float = 1.0  # seconds between the client's refreshes of what it knows of the swarm
    ban_time: float = 2.0  # seconds a failing server is avoided after its first failure; doubles with each failure
    max_ban_time: float = 120.0  # cap of that backoff
    max_retries: int = 16  # replacement routes tried for one step or request before giving up
    ping_period: float = 10.0  # seconds between background round-trip measurements of the known servers
    wait_for_blocks: float = 60.0  # seconds to wait for a server of blocks no live server covers, before failing
    max_request_tokens: int = 8192  # batch x length of one forward/backward request; larger batches are split
    relay: bool = False  # servers pass a step's output straight to the next server (one client round trip a step)
    link_delay: float = 0.0  # simulated one-way latency on every link to a server, seconds (benchmarks and tests)
    link_bandwidth: float | None = None  # simulated link speed to servers, bytes/s (None: unlimited)
    swarm_key: SwarmKey | None = None  # a private swarm's key (SwarmKey.load(FILE)): every connection CurveZMQ
    verify: float = 0.0  # fraction of remote forwards and session steps checked on a second server (verify.py)
    verify_ban_time: float = 86400.0  # seconds a server caught answering wrong outputs is avoided (not forgiven)
    server_quant: frozenset[str] | None = None  # weight quantizations of the servers to use, of none, int8, nf4
    #                                             (any iterable; e.g. {"none"}: avoid quantized servers); None: any
    # hidden states and gradients on the wire (each way, and pushed between servers): none | float16 | bfloat16 |
    # int8 | auto (each server's own dtype when it computes in 16 bits: no value changes; float32 servers: none)
    compression: str = "auto"

    def __post_init__(self) -> None:
        if self.server_quant is not None:
            object.__setattr__(self, "server_quant", check_server_quant(self.server_quant))
        if self.compression not in SETTINGS:
            raise ConfigError(f"compression must be one of {', '.join(SETTINGS)}, got {self.compression!r}")
        verify = self.verify
        if isinstance(verify, bool) or not isinstance(verify, (int, float)) or not math.isfinite(verify) \
                or not 0.0 <= verify <= 1.0:
            raise ConfigError(f"verify must be a fraction in [0, 1] of the remote calls to check, got {verify!r}")
        if isinstance(self.verify_ban_time, bool) or not isinstance(self.verify_ban_time, (int, float)) \
                or not self.verify_ban_time > 0:
            raise ConfigError(f"verify_ban_time must be a positive number of seconds, got {self.verify_ban_time!r}")


def check_server_quant(values: Iterable[str]) -> frozenset[str]:
    """The set of weight quantizations a client accepts from servers (`ClientConfig.server_quant`): a non-empty set of
    MODES (none, int8, nf4); ConfigError otherwise."""
    from ...quant.weights import MODES  # here: the CLI imports this module before torch, which quant.weights needs

    if isinstance(values, str) or not isinstance(values, Iterable):
        raise ConfigError(f"server_quant must be a set of weight quantizations ({', '.join(MODES)}), got {values!r}")
    chosen = frozenset(values)
    unknown = sorted(str(v) for v in chosen if v not in MODES)
    if unknown or not chosen:
        what = f"unknown {', '.join(map(repr, unknown))}" if unknown else "nothing"
        raise ConfigError(f"server_quant must name one or more weight quantizations of {', '.join(MODES)}; got {what}")
    return chosen

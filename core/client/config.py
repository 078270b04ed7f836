"""Client settings, one dataclass (checked when built: a bad value is a ConfigError, not a surprise later)."""

from __future__ import annotations

import math
from dataclasses import dataclass

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

    def __post_init__(self) -> None:
        verify = self.verify
        if isinstance(verify, bool) or not isinstance(verify, (int, float)) or not math.isfinite(verify) \
                or not 0.0 <= verify <= 1.0:
            raise ConfigError(f"verify must be a fraction in [0, 1] of the remote calls to check, got {verify!r}")
        if isinstance(self.verify_ban_time, bool) or not isinstance(self.verify_ban_time, (int, float)) \
                or not self.verify_ban_time > 0:
            raise ConfigError(f"verify_ban_time must be a positive number of seconds, got {self.verify_ban_time!r}")

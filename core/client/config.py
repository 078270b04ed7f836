"""Client settings, one dataclass."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClientConfig:
    request_timeout: float = 60.0  # seconds to wait for a forward/backward/step reply
    connect_timeout: float = 5.0  # seconds to wait for servers covering the model when joining
    gossip_period: float = 1.0  # seconds between the client's refreshes of what it knows of the swarm
    max_length: int | None = None  # default session length when generate() opens one itself (None: from the call)

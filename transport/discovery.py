"""What a node knows of the swarm: server records learned by mDNS on the LAN and by gossip across networks.

`Discovery` combines an mDNS browser (servers on the local network announce themselves) with a gossip node (push-pull
exchanges of records with a few peers every period, seeded by `initial_peers` and by whatever mDNS finds). A server
gives it its own record (refreshed every round: that is its heartbeat) and an mDNS announcement; a client or
`swarm status` only listens. Records expire unless refreshed, and a server that stops says so first (state offline).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .gossip import GossipConfig, GossipNode, Membership
from .keys import SwarmKey
from .mdns import MdnsAnnouncer, MdnsBrowser, MdnsSettings
from .records import ServerRecord
from .rpc import CurveClient, RpcClientConfig, normalize_endpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiscoveryConfig:
    mdns: MdnsSettings = field(default_factory=lambda: MdnsSettings.from_options(None, None))  # $SWARM_MDNS...
    gossip: GossipConfig = field(default_factory=GossipConfig)  # gossip period, fanout, expiry
    record_ttl: float = 15.0  # seconds others believe a server's record without hearing a newer one
    swarm_key: SwarmKey | None = None  # a private swarm: gossip over CurveZMQ, mDNS shows only the swarm's tag


@dataclass(frozen=True)
class Announcement:
    """How a server announces itself on mDNS."""

    peer_id: str
    port: int
    model: str
    host: str = "0.0.0.0"


class Discovery:
    def __init__(self, initial_peers: Sequence[str] = (), config: DiscoveryConfig | None = None,
                 own_record: Callable[[], ServerRecord | None] | None = None,
                 announce: Announcement | None = None):
        self.config = config or DiscoveryConfig()
        self.initial_peers = [normalize_endpoint(p) for p in initial_peers]
        self.membership = Membership(self.config.gossip)
        key = self.config.swarm_key
        rpc = RpcClientConfig(curve=None if key is None else CurveClient.of(key))
        self._node = GossipNode(self.membership, self.config.gossip, seeds=self.initial_peers,
                                refresh_own=own_record, rpc=rpc)
        tag = None if key is None else key.mdns_tag
        self._browser = (MdnsBrowser(self.config.mdns, on_change=self._on_mdns, tag=tag)
                         if self.config.mdns.enabled else None)
        self._announcer = (MdnsAnnouncer(announce.peer_id, announce.port, announce.model, self.config.mdns,
                                         host=announce.host, tag=tag)
                           if announce is not None and self.config.mdns.enabled else None)
        self._started = False

    def start(self) -> Discovery:
        if self._browser is not None:
            self._browser.start()
        if self._announcer is not None:  # zeroconf probes for about a second: gossip need not wait for it
            self._announcer.start_in_background()
        self._node.start()
        self._started = True
        return self

    def _on_mdns(self) -> None:
        if self._browser is None:
            return
        self._node.add_seeds([e for peer in self._browser.peers() for e in peer.endpoints[:1]])

    def handle_gossip(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Answer a peer's gossip request (servers call this from their request handler)."""
        return self._node.handle(fields)

    def records(self, predicate: Callable[[ServerRecord], bool] | None = None,
                include_offline: bool = False) -> list[ServerRecord]:
        self.membership.expire()
        found = self.membership.records(include_offline=include_offline)
        return [r for r in found if predicate is None or predicate(r)]

    def denied(self) -> dict[str, str]:
        """Addresses whose servers refused us at the last try, and why (a private swarm's, without its key)."""
        return dict(self._node.denied)

    def refresh(self) -> None:
        """One gossip round now (a client that needs fresh records does not wait for the next period)."""
        self._on_mdns()
        self._node.round()

    def wait(self, predicate: Callable[[list[ServerRecord]], bool], timeout: float, poll: float = 0.05) -> bool:
        """Poll (bounded by `timeout`) until `predicate(records)` holds; runs gossip rounds while waiting."""
        deadline = time.monotonic() + timeout
        next_round = 0.0
        while True:
            if predicate(self.records()):
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            if now >= next_round:
                self.refresh()
                next_round = time.monotonic() + max(poll, min(self.config.gossip.period, 0.5))
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))

    def listen(self, seconds: float) -> None:
        """Gather records for `seconds` (gossip rounds and mDNS), for commands that show what they learned."""
        self.wait(lambda records: False, seconds)

    def stop(self, offline: ServerRecord | None = None) -> None:
        """Stop; a server passes its record with state offline so peers learn at once that it left."""
        if self._announcer is not None:
            self._announcer.close()
        self._node.stop(announce_offline=offline)
        if self._browser is not None:
            self._browser.close()

    def __enter__(self) -> Discovery:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def local_endpoints(host: str, port: int) -> tuple[str, ...]:
    """Endpoints a server bound to `host` can be reached at: the host itself, or (for 0.0.0.0) this machine's
    IPv4 addresses with loopback last."""
    if host not in ("0.0.0.0", "*", ""):
        return (f"tcp://{host}:{port}",)
    try:
        import ifaddr

        ips = [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if isinstance(ip.ip, str)]
    except Exception:  # no interface listing on this platform: loopback still works
        ips = []
    lan = [ip for ip in dict.fromkeys(ips) if not ip.startswith("127.")]
    return tuple(f"tcp://{ip}:{port}" for ip in [*lan, "127.0.0.1"])

"""Zero-configuration discovery on the local network through mDNS / DNS-SD (python-zeroconf).

What this module does:

- `MdnsSettings`: whether mDNS is on and which interface it binds to, from CLI options or the environment
  (`SWARM_MDNS`, `SWARM_MDNS_INTERFACE`); bad values raise ConfigError.
- `MdnsAnnouncer`: a server registers one `_swarm._tcp.local.` service whose TXT record carries its peer id, the
  protocol version and the model it serves, and whose addresses are the IPv4 addresses it can be reached at. A
  server of a private swarm announces only its address, a random name and the swarm's tag (`SwarmKey.mdns_tag`):
  no peer id, no model, nothing a stranger could use to get in (the connection itself needs the swarm's keys).
- `MdnsBrowser`: a client or server browses that service type and keeps a thread-safe table of the peers it sees
  (peer id, tcp://IP:PORT endpoints, model); services that go away leave the table; malformed ones are ignored, and
  so are those of another swarm (a browser with a tag sees only services with that tag, one without sees none).
- `open_zeroconf`: one Zeroconf instance for the settings, shared by an announcer and a browser in one process.

mDNS is best effort: when zeroconf cannot start (no multicast-capable interface, permission denied) one warning is
logged and the announcer and browser do nothing, so a swarm can still be joined through explicit addresses.
Nothing here runs at import time.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import queue
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

try:  # zeroconf is a dependency, but a missing one must only disable discovery, never break an import
    import zeroconf
except ImportError:  # pragma: no cover - exercised only on broken installs
    zeroconf = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

SERVICE_TYPE = "_swarm._tcp.local."
PROTOCOL = "1"  # value of the `proto` TXT entry
MAX_TXT_ENTRY = 255  # bytes in one TXT entry (key=value), a DNS character-string limit
RESOLVE_TIMEOUT_MS = 2000  # how long the browser waits for a service's SRV/TXT/A records
UNREGISTER_TIMEOUT = 3.0  # seconds close() waits for the goodbye packets

_PEER_ID = re.compile(r"[0-9a-f]{8,64}")  # as in records: lowercase hex, 8 to 64 characters
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class MdnsSettings:
    enabled: bool = True  # announce and browse on the local network
    interfaces: tuple[str, ...] | None = None  # IPv4 addresses mDNS binds to; None = every interface (zeroconf's)

    @classmethod
    def from_options(cls, enabled: bool | None, interface: str | None,
                     env: Mapping[str, str] = os.environ) -> MdnsSettings:
        """Settings from CLI options, falling back to `SWARM_MDNS` and `SWARM_MDNS_INTERFACE`.

        `interface` is the IPv4 address of one local interface: mDNS then binds to that interface only (announces
        there, listens there) instead of every interface. Explicit options win over the environment.
        """
        if enabled is None:
            enabled = _parse_bool(env.get("SWARM_MDNS"), "SWARM_MDNS")
        if interface is None:
            interface = env.get("SWARM_MDNS_INTERFACE") or None
            source = "SWARM_MDNS_INTERFACE"
        else:
            source = "interface"
        interfaces = (_parse_ipv4(interface, source),) if interface is not None else None
        return cls(enabled=enabled, interfaces=interfaces)


@dataclass(frozen=True)
class MdnsPeer:
    peer_id: str  # the server's hex peer id (from TXT `id`)
    endpoints: tuple[str, ...]  # tcp://IP:PORT addresses it announced
    model: str  # model it serves (from TXT `model`, possibly truncated)


def _parse_bool(value: str | None, name: str) -> bool:
    if value is None or value.strip() == "":
        return True
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{name}={value!r} is not understood: use 1/true/yes/on to enable mDNS or 0/false/no/off "
                      "to disable it")


def _parse_ipv4(value: str, source: str) -> str:
    try:
        address = ipaddress.IPv4Address(value.strip())
    except ValueError:
        raise ConfigError(f"{source}={value!r} is not an IPv4 address: give the address of the network interface "
                          "mDNS should use, e.g. 192.168.1.20") from None
    if address.is_unspecified or address.is_multicast:
        raise ConfigError(f"{source}={value!r} is not the address of one interface: give e.g. 192.168.1.20")
    return str(address)


def open_zeroconf(settings: MdnsSettings) -> zeroconf.Zeroconf | None:
    """A Zeroconf bound to the settings' interfaces (IPv4), or None when disabled or it cannot start (one warning)."""
    if not settings.enabled:
        return None
    if zeroconf is None:
        log.warning("mDNS discovery is off: the zeroconf package is not installed")
        return None
    interfaces: Any = list(settings.interfaces) if settings.interfaces else zeroconf.InterfaceChoice.All
    try:
        return zeroconf.Zeroconf(interfaces=interfaces, ip_version=zeroconf.IPVersion.V4Only)
    except Exception as exc:  # OSError, NotRunningException, ...: discovery is optional
        where = ", ".join(settings.interfaces) if settings.interfaces else "all interfaces"
        log.warning("mDNS discovery is off: zeroconf could not start on %s (%s)", where, exc)
        return None


def _close_zeroconf(zc: zeroconf.Zeroconf) -> None:
    try:
        zc.close()
    except Exception as exc:
        log.debug("closing zeroconf failed: %s", exc)


def _local_ipv4_addresses() -> list[str]:
    """The machine's non-loopback IPv4 addresses (via ifaddr, a zeroconf dependency); 127.0.0.1 when none."""
    found: list[str] = []
    try:
        import ifaddr

        for adapter in ifaddr.get_adapters():
            for ip in adapter.ips:
                if not ip.is_IPv4:
                    continue
                address = ipaddress.IPv4Address(ip.ip)
                if not (address.is_loopback or address.is_link_local) and str(address) not in found:
                    found.append(str(address))
    except Exception as exc:
        log.debug("listing network interfaces failed: %s", exc)
    return found or ["127.0.0.1"]


def _announce_addresses(settings: MdnsSettings, host: str) -> list[str]:
    if settings.interfaces:
        return list(settings.interfaces)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a host name: announce what it resolves to
        try:
            address = ipaddress.ip_address(socket.gethostbyname(host))
        except OSError:
            return _local_ipv4_addresses()
    if address.version == 4 and not address.is_unspecified:
        return [str(address)]
    return _local_ipv4_addresses()


def _truncate_utf8(text: str, max_bytes: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes].decode("utf-8", errors="ignore")


class MdnsAnnouncer:
    """Registers this server as one `_swarm._tcp.local.` service; `close()` withdraws it.

    With `zc` the announcer uses that (shared) Zeroconf and leaves it open; otherwise it opens its own from
    `settings` and closes it. Disabled settings, or a Zeroconf that cannot start, make it a no-op.
    """

    def __init__(self, peer_id: str, port: int, model: str, settings: MdnsSettings, host: str = "0.0.0.0",
                 zc: zeroconf.Zeroconf | None = None, tag: str | None = None):
        if not 0 < port < 65536:
            raise ConfigError(f"cannot announce port {port}: it must be between 1 and 65535")
        # a private swarm's server: a random name in place of its id, no model, the swarm's tag
        self.peer_id = peer_id if tag is None else secrets.token_hex(8)
        self.port = port
        self.model = model if tag is None else ""
        self.tag = tag
        self.settings = settings
        self.host = host
        self._zc = zc
        self._own_zc = zc is None
        self._info: Any = None
        self._endpoints: tuple[str, ...] = ()
        self._lock = threading.Lock()
        self._wanted = False  # cleared by close(): a background start that runs late then does nothing

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The tcp://IP:PORT endpoints announced (empty until started, or when mDNS is off)."""
        return self._endpoints

    def start(self) -> MdnsAnnouncer:
        """Register the service (blocks for zeroconf's probing, about a second). Idempotent; never raises."""
        self._wanted = True
        return self._register()

    def start_in_background(self) -> threading.Thread:
        """`start` on a thread of its own, so that a server is not held up by zeroconf's probing."""
        self._wanted = True
        thread = threading.Thread(target=self._register, name="swarm-mdns-announce", daemon=True)
        thread.start()
        return thread

    def _register(self) -> MdnsAnnouncer:
        with self._lock:
            if self._info is not None or not self._wanted or not self.settings.enabled or zeroconf is None:
                return self
            if self._zc is None:
                self._zc = open_zeroconf(self.settings)
                if self._zc is None:
                    return self
            addresses = _announce_addresses(self.settings, self.host)
            model = _truncate_utf8(self.model, MAX_TXT_ENTRY - len("model="))
            properties = {"id": self.peer_id, "proto": PROTOCOL}
            properties.update({"model": model} if self.tag is None else {"swarm": self.tag})
            info = zeroconf.ServiceInfo(
                SERVICE_TYPE, f"{self.peer_id[:63]}.{SERVICE_TYPE}", port=self.port, properties=properties,
                server=f"swarm-{self.peer_id[:12]}.local.", parsed_addresses=addresses)
            try:
                # a stale record of a previous run may still be cached; the TXT id, not the name, identifies us
                self._zc.register_service(info, allow_name_change=True)
            except Exception as exc:
                log.warning("mDNS announcement failed, this server is reachable only by its address: %s", exc)
                self._release_zc()
                return self
            self._info = info
            self._endpoints = tuple(f"tcp://{a}:{self.port}" for a in addresses)
            log.debug("announced %s as %s at %s", self.peer_id, info.name, ", ".join(self._endpoints))
            return self

    def close(self) -> None:
        """Withdraw the service (goodbye packets, bounded wait) and close our own Zeroconf. Idempotent."""
        self._wanted = False
        with self._lock:
            if self._info is not None and self._zc is not None:
                self._unregister(self._zc, self._info)
            self._info = None
            self._endpoints = ()
            self._release_zc()

    def _unregister(self, zc: zeroconf.Zeroconf, info: Any) -> None:
        done = threading.Event()

        def run() -> None:
            try:
                zc.unregister_service(info)
            except Exception as exc:
                log.debug("mDNS unregister of %s failed: %s", info.name, exc)
            finally:
                done.set()

        # zeroconf bounds this itself; the thread bounds it even if the event loop is stuck
        threading.Thread(target=run, name="swarm-mdns-unregister", daemon=True).start()
        if not done.wait(UNREGISTER_TIMEOUT):
            log.debug("mDNS unregister of %s did not finish in %.1fs", info.name, UNREGISTER_TIMEOUT)

    def _release_zc(self) -> None:
        if self._own_zc and self._zc is not None:
            _close_zeroconf(self._zc)
            self._zc = None

    def __enter__(self) -> MdnsAnnouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


_STOP = object()


class MdnsBrowser:
    """Browses `_swarm._tcp.local.` and keeps a table peer_id -> MdnsPeer of the servers seen.

    Zeroconf's browser thread only queues events; one worker thread resolves services (blocking lookups never run
    on zeroconf's event loop) and updates the table. `on_change` is called from that worker after every change.
    With `zc` the browser uses that (shared) Zeroconf and leaves it open; otherwise it opens its own and closes it.
    """

    def __init__(self, settings: MdnsSettings, on_change: Callable[[], None] | None = None,
                 zc: zeroconf.Zeroconf | None = None, tag: str | None = None):
        self.settings = settings
        self.on_change = on_change
        self.tag = tag  # a private swarm's: only its services count
        self._zc = zc
        self._own_zc = zc is None
        self._browser: Any = None
        self._worker: threading.Thread | None = None
        self._events: queue.Queue[Any] = queue.Queue()
        self._peers: dict[str, MdnsPeer] = {}  # peer_id -> peer
        self._names: dict[str, str] = {}  # service name (lowercase) -> peer_id
        self._logged_bad: set[str] = set()  # service names whose malformed TXT was logged once
        self._lock = threading.Lock()  # guards _peers and _names
        self._state_lock = threading.Lock()  # guards start/close

    def start(self) -> MdnsBrowser:
        """Begin browsing. Idempotent; never raises (a Zeroconf that cannot start leaves the table empty)."""
        with self._state_lock:
            if self._browser is not None or not self.settings.enabled or zeroconf is None:
                return self
            if self._zc is None:
                self._zc = open_zeroconf(self.settings)
                if self._zc is None:
                    return self
            self._worker = threading.Thread(target=self._run, name="swarm-mdns-resolve", daemon=True)
            self._worker.start()
            try:
                self._browser = zeroconf.ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_event])
            except Exception as exc:
                log.warning("mDNS browsing failed to start: %s", exc)
                self._stop_worker()
                self._release_zc()
            return self

    def peers(self) -> list[MdnsPeer]:
        """The peers seen now (a copy, sorted by peer id)."""
        with self._lock:
            return sorted(self._peers.values(), key=lambda p: p.peer_id)

    def wait_for(self, predicate: Callable[[list[MdnsPeer]], bool], timeout: float) -> bool:
        """Poll until `predicate(peers())` holds or `timeout` seconds pass; returns whether it held."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self.peers()):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(0.05, remaining))

    def close(self) -> None:
        """Stop browsing, stop the resolver thread (bounded) and close our own Zeroconf. Idempotent."""
        with self._state_lock:
            if self._browser is not None:
                try:
                    self._browser.cancel()
                except Exception as exc:
                    log.debug("cancelling the mDNS browser failed: %s", exc)
                self._browser = None
            self._stop_worker()
            self._release_zc()

    def _on_event(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        # called on zeroconf's browser thread: only queue, never block
        self._events.put((name, state_change))

    def _run(self) -> None:
        while True:
            event = self._events.get()
            if event is _STOP:
                return
            name, state_change = event
            try:
                changed = self._handle(name, state_change)
            except Exception as exc:  # a bad packet must never kill the worker
                log.debug("mDNS event for %s failed: %s", name, exc)
                continue
            if changed and self.on_change is not None:
                try:
                    self.on_change()
                except Exception:
                    log.exception("mDNS on_change callback failed")

    def _handle(self, name: str, state_change: Any) -> bool:
        key = name.lower()
        if state_change is zeroconf.ServiceStateChange.Removed:
            return self._forget(key)
        zc = self._zc
        if zc is None:
            return False
        info = zc.get_service_info(SERVICE_TYPE, name, timeout=RESOLVE_TIMEOUT_MS)
        peer = _peer_from_info(info, self.tag) if info is not None else None
        if peer is None:
            if key not in self._logged_bad:
                self._logged_bad.add(key)
                log.debug("ignoring mDNS service %s: %s", name,
                          "it did not resolve" if info is None else "malformed TXT record or no IPv4 address")
            return self._forget(key)
        with self._lock:
            old_id = self._names.get(key)
            if old_id is not None and old_id != peer.peer_id:
                self._peers.pop(old_id, None)
            self._names[key] = peer.peer_id
            changed = self._peers.get(peer.peer_id) != peer
            self._peers[peer.peer_id] = peer
        return changed or old_id != peer.peer_id

    def _forget(self, key: str) -> bool:
        with self._lock:
            peer_id = self._names.pop(key, None)
            if peer_id is None:
                return False
            if peer_id in self._names.values():  # still announced under another name
                return False
            return self._peers.pop(peer_id, None) is not None

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._events.put(_STOP)
            self._worker.join(timeout=RESOLVE_TIMEOUT_MS / 1000 + 1.0)
            self._worker = None

    def _release_zc(self) -> None:
        if self._own_zc and self._zc is not None:
            _close_zeroconf(self._zc)
            self._zc = None

    def __enter__(self) -> MdnsBrowser:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _peer_from_info(info: Any, tag: str | None = None) -> MdnsPeer | None:
    """The peer a resolved service describes, or None when its TXT or addresses are malformed or it belongs to
    another swarm than the one `tag` names (None: the open swarm)."""
    props = info.properties or {}
    raw_tag = props.get(b"swarm")
    if (raw_tag is None) != (tag is None) or (tag is not None and raw_tag != tag.encode()):
        return None
    raw_id = props.get(b"id")
    if not isinstance(raw_id, bytes):
        return None
    peer_id = raw_id.decode("utf-8", errors="replace")
    if not _PEER_ID.fullmatch(peer_id):
        return None
    port = info.port
    if not isinstance(port, int) or not 0 < port < 65536:
        return None
    addresses = info.parsed_addresses(zeroconf.IPVersion.V4Only)
    if not addresses:
        return None
    raw_model = props.get(b"model")
    model = raw_model.decode("utf-8", errors="replace") if isinstance(raw_model, bytes) else ""
    return MdnsPeer(peer_id=peer_id, endpoints=tuple(f"tcp://{a}:{port}" for a in addresses), model=model)

"""Server records: what a server says about itself to the swarm, small, versioned and validated on receipt.

A record is plain data (it travels as a msgpack map inside gossip messages). `seq` grows every time the owner
republishes, so newer records win when two disagree; `ttl` is how many seconds a receiver believes a record without
hearing a newer one (measured on the receiver's own clock, so clock skew between machines does not matter).
`record_from_wire` checks every field and its size and raises ProtocolError on anything malformed or oversized, so
a bad record from a peer is dropped without touching what we know. An address must be an endpoint ZeroMQ can connect
to, in the form `normalize_endpoint` writes (defined here, free of ZeroMQ and torch, and used by `rpc` as well).

`capabilities` names the optional features a server has (e.g. "batching"): a peer adds a name when it gains a feature,
and others use it when they know the name and ignore it otherwise, so no feature needs every peer to upgrade at once.
Unknown names are kept, never refused.

`moves` (how many times the server moved to other blocks, for `swarm status`) is optional and on the wire only when
it is not 0: an older peer checks a signature over the fields it knows, so it reads the records of servers that never
moved, and drops (as unverifiable) those of servers that did, until it upgrades.

A server's record is signed (`sign_record`) by its identity (keys.py), whose public key is its peer id: a record whose
peer id is a key (64 hex digits) is believed only with that key's signature over all its fields (`record_from_wire`
refuses it otherwise), so no one but the server can change its address, span, throughput, ttl or sequence number.
Peer ids of 32 hex digits are older servers' random ids: their records are not signed, and a membership table prefers
signed records to them. `PROTOCOL_VERSION`, the version of the wire protocol, is stated here, once:
this module stays free of torch so that the command line can read records without it, and `codec` re-exports it.
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import msgpack

from .errors import PeerUnreachable, ProtocolError
from .keys import KEY_ID, SIGNATURE_CHARS, Identity, verify

PROTOCOL_VERSION = 1  # of the wire protocol (codec.PROTOCOL_VERSION); a record says which one its server speaks
RECORD_VERSION = 1
MAX_RECORD_BYTES = 4096  # one encoded record
MAX_PATH_CHARS = 1024  # a record's model directory path
MAX_CAPABILITIES = 32  # names in a record's capabilities
STATES = ("joining", "online", "draining", "offline")
_PEER_ID = re.compile(r"[0-9a-f]{8,64}")
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # one label of a DNS name
_IPV4 = re.compile(r"[0-9.]+")
_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # an IPv6 zone: an interface name or number
_PORT = re.compile(r"[0-9]{1,5}")
_CAPABILITY = re.compile(r"[a-z0-9_.-]{1,32}")


def _host_ok(host: str) -> bool:
    """Whether ZeroMQ can connect to `host`: an IPv4 literal, an [IPv6] literal (zone allowed), or a DNS name made
    of letters, digits and '-' with no empty label. No wildcard, whitespace or other characters."""
    if host.startswith("[") and host.endswith("]"):
        address, percent, zone = host[1:-1].partition("%")
        if percent and not _ZONE.fullmatch(zone):
            return False
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            return False
        return True
    if _IPV4.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return len(host) <= 253 and all(_LABEL.fullmatch(label) for label in host.split("."))


def normalize_endpoint(address: str) -> str:
    """`tcp://host:port` from `tcp://host:port` or `host:port`; raises PeerUnreachable when malformed, or when the
    host is not one ZeroMQ can connect to (an IPv4 literal, an [IPv6] literal, or a DNS name)."""
    text = address.strip() if isinstance(address, str) else ""
    if "://" not in text:
        text = "tcp://" + text
    scheme, _, rest = text.partition("://")
    host, sep, port = rest.rpartition(":")
    if scheme != "tcp" or not sep or not _PORT.fullmatch(port) or not 0 < int(port) < 65536 or not _host_ok(host):
        raise PeerUnreachable(f"bad peer address {address!r}: expected tcp://HOST:PORT with HOST an IPv4 address, "
                              f"an [IPv6] address or a host name")
    return f"tcp://{host}:{int(port)}"


def _endpoint_ok(address: str) -> bool:
    """Whether `address` is an endpoint ZeroMQ can connect to, written as `normalize_endpoint` writes it."""
    try:
        return normalize_endpoint(address) == address
    except PeerUnreachable:
        return False


@dataclass(frozen=True)
class ServerRecord:
    peer_id: str  # stable random hex id of the server (kept across restarts when it has a state directory)
    model: str  # model id the server announces
    start: int  # first block served
    end: int  # one past the last block served
    num_blocks: int  # blocks in the whole model
    hidden_size: int
    addresses: tuple[str, ...]  # tcp://HOST:PORT endpoints it can be reached at
    state: str = "online"  # joining | online | draining | offline
    throughput: float = 0.0  # tokens/s a request gets through the server's span (core/server/throughput.py)
    cache_tokens_free: int = 0
    cache_tokens_total: int = 0
    queue: int = 0  # requests waiting for the server's engine when it published
    batch_sessions: float = 0.0  # sessions per pass, mean over its recent passes (how much batching it does)
    batch_tokens: float = 0.0  # new tokens per pass, mean over its recent passes
    dtype: str = "float32"
    quant: str = "none"  # weight quantization
    device: str = "cpu"  # the kind of device its blocks run on: cpu, cuda, mps (optional; on the wire when not cpu)
    adapters: tuple[str, ...] = ()
    capabilities: tuple[str, ...] = ()  # optional features the server has; names others do not know are ignored
    protocol: int = PROTOCOL_VERSION  # wire protocol version the server speaks
    version: str = ""  # swarm package version
    path: str = ""  # for a model served from a local directory: its absolute path on the server's machine
    moves: int = 0  # times the server moved to other blocks since it started (optional; on the wire only when > 0)
    seq: int = 0  # grows with every republish by the owner
    updated_at: float = field(default_factory=time.time)  # owner's wall-clock time of publishing (informative)
    ttl: float = 15.0  # seconds a receiver believes this record without hearing a newer one
    record_version: int = RECORD_VERSION
    signature: str = ""  # the owner's signature over every other field (hex); "" for an unsigned record

    @property
    def signed(self) -> bool:
        """Whether it carries its owner's signature (records from the wire are checked when parsed)."""
        return bool(self.signature)

    def newer_than(self, other: ServerRecord | None) -> bool:
        return other is None or self.seq > other.seq

    def bump(self, **changes: Any) -> ServerRecord:
        """The next version of this record (higher seq, published now), with `changes` applied."""
        return replace(self, **changes, seq=self.seq + 1, updated_at=time.time())


def signed_bytes(record: ServerRecord) -> bytes:
    """What a record's signature covers: every field but the signature, in one canonical encoding."""
    data = record_to_wire(record)
    data.pop("signature", None)
    return msgpack.packb(dict(sorted(data.items())), use_bin_type=True)


def sign_record(record: ServerRecord, identity: Identity) -> ServerRecord:
    """`record` signed by `identity` (whose peer id it must carry), as a receiver will read it."""
    if record.peer_id != identity.peer_id:
        raise ValueError("a record is signed by its own peer's identity only")
    normal = record_from_wire({**record_to_wire(record), "signature": ""}, check_signature=False)  # as read there
    return replace(normal, signature=identity.sign(signed_bytes(normal)))


def record_to_wire(record: ServerRecord) -> dict[str, Any]:
    data = asdict(record)
    data["addresses"] = list(record.addresses)
    data["adapters"] = list(record.adapters)
    data["capabilities"] = list(record.capabilities)
    if not record.moves:
        # optional and left out when 0: a record without it is the record an older server signs and an older peer
        # checks, so servers that never moved stay readable by peers that do not know the field
        del data["moves"]
    if record.device == "cpu":  # optional in the same way: a CPU server's record is what older peers know
        del data["device"]
    return data


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ProtocolError(f"bad record: {message}")


def _str(data: dict[str, Any], key: str, limit: int, default: str | None = None) -> str:
    value = data.get(key, default)
    _check(isinstance(value, str) and len(value) <= limit, f"{key} must be a string of at most {limit} chars")
    return value


def _int(data: dict[str, Any], key: str, low: int = 0, high: int = 1 << 62, default: int | None = None) -> int:
    value = data.get(key, default)
    _check(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
           f"{key} must be an integer in [{low}, {high}]")
    return value


def _float(data: dict[str, Any], key: str, default: float | None = None) -> float:
    value = data.get(key, default)
    _check(isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
           and abs(value) < 1e18, f"{key} must be a finite number")
    return float(value)


def _load(data: dict[str, Any], key: str) -> float:
    value = _float(data, key, 0.0)  # optional: older peers send none
    _check(value >= 0, f"{key} must not be negative")
    return value


def _positive(data: dict[str, Any], key: str) -> float:
    value = _float(data, key)
    _check(0 < value <= 86400, f"{key} must be in (0, 86400]")
    return value


def _strs(data: dict[str, Any], key: str, count: int, limit: int) -> tuple[str, ...]:
    value = data.get(key, [])
    _check(isinstance(value, (list, tuple)) and len(value) <= count
           and all(isinstance(v, str) and len(v) <= limit for v in value),
           f"{key} must be a list of at most {count} strings")
    return tuple(value)


def _capabilities(data: dict[str, Any]) -> tuple[str, ...]:
    value = data.get("capabilities", [])  # optional: older peers send none
    _check(isinstance(value, (list, tuple)) and len(value) <= MAX_CAPABILITIES
           and all(isinstance(v, str) and _CAPABILITY.fullmatch(v) for v in value),
           f"capabilities must be a list of at most {MAX_CAPABILITIES} names of 1 to 32 characters from a-z, 0-9, "
           f"'_', '.' and '-'")
    return tuple(value)


def record_from_wire(data: Any, check_signature: bool = True) -> ServerRecord:
    """A validated ServerRecord from a decoded map; raises ProtocolError when anything is off (a record of a key's
    peer id without that key's signature over its fields included, unless `check_signature` is False)."""
    _check(isinstance(data, dict), "a record must be a map")
    size = len(msgpack.packb(data, use_bin_type=True))
    _check(size <= MAX_RECORD_BYTES, f"{size} bytes is more than {MAX_RECORD_BYTES}")
    peer_id = _str(data, "peer_id", 64)
    _check(bool(_PEER_ID.fullmatch(peer_id)), "peer_id must be 8 to 64 lowercase hex digits")
    num_blocks = _int(data, "num_blocks", 1, 1 << 20)
    start = _int(data, "start", 0, num_blocks - 1)
    end = _int(data, "end", start + 1, num_blocks)
    state = _str(data, "state", 16)
    _check(state in STATES, f"state must be one of {', '.join(STATES)}")
    addresses = _strs(data, "addresses", 8, 200)
    path = _str(data, "path", MAX_PATH_CHARS, "")  # optional: older peers send none
    _check(path.isprintable(), "path must be printable")
    _check(bool(addresses) and all(map(_endpoint_ok, addresses)),
           "addresses must be tcp://HOST:PORT endpoints, HOST an IPv4 address, an [IPv6] address or a host name")
    signature = _str(data, "signature", SIGNATURE_CHARS, "")  # optional: unsigned records have none
    if not KEY_ID.fullmatch(peer_id):
        signature = ""  # only a key can sign: an older server's random id has no signature to speak of
    record = ServerRecord(
        peer_id=peer_id, model=_str(data, "model", 300), start=start, end=end, num_blocks=num_blocks,
        hidden_size=_int(data, "hidden_size", 1, 1 << 20), addresses=addresses, state=state,
        throughput=_float(data, "throughput", 0.0), cache_tokens_free=_int(data, "cache_tokens_free", default=0),
        cache_tokens_total=_int(data, "cache_tokens_total", default=0), queue=_int(data, "queue", default=0),
        batch_sessions=_load(data, "batch_sessions"), batch_tokens=_load(data, "batch_tokens"),
        dtype=_str(data, "dtype", 32, "float32"), device=_str(data, "device", 16, "cpu"),
        quant=_str(data, "quant", 32, "none"), adapters=_strs(data, "adapters", 64, 200),
        capabilities=_capabilities(data), protocol=_int(data, "protocol", 0, 1 << 16, PROTOCOL_VERSION),
        version=_str(data, "version", 64, ""), path=path, moves=_int(data, "moves", 0, 1 << 31, default=0),
        seq=_int(data, "seq"), updated_at=_float(data, "updated_at"), ttl=_positive(data, "ttl"),
        record_version=_int(data, "record_version", 0, 1 << 16, RECORD_VERSION), signature=signature,
    )
    if not check_signature:
        return record
    if KEY_ID.fullmatch(peer_id) and signature != "":
        _check(verify(peer_id, signed_bytes(record), signature),
               f"the signature of {peer_id[:16]}'s record does not match its fields (forged or altered)")
    elif KEY_ID.fullmatch(peer_id):
        _check(False, f"the record of {peer_id[:16]} is not signed by its key (only its owner may publish it)")
    return record

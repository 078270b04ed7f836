"""Keys: server identities (Ed25519, they sign records) and the keys of private swarms (CurveZMQ).

A server's peer id is its public key, in hex (64 characters), so no one else can claim it: a record is believed only
when it carries the signature of that key over every field (address, span, throughput, ttl, seq, ...). `Identity`
keeps the key pair, read from a file (created on first use, readable by its owner only) or made for one run.
`sign`/`verify` work on bytes; records.py decides which bytes a record's signature covers.

A private swarm has a swarm key: a CURVE key pair (Curve25519, z85 text) made by `swarm keygen`. Every server of the
swarm holds its secret and presents it as the server key of its socket (ZeroMQ's ironhouse pattern: every
connection is encrypted and both ends are authenticated), so a peer must know the swarm's public key to talk to any
server at all, and must hold a client key the servers admit: the swarm key itself, or a member key of its own that
`swarm keygen --member` made from the swarm key and that the servers list in `--allowed-keys DIR`. A `SwarmKey` is
either: `secret` is the holder's own key pair's secret, `swarm` the swarm's public key (the server key), and a member
key cannot serve (it lacks the swarm's secret). Files are a few `name = value` lines; `allowed_keys` reads the public
keys of a directory (these files, their `.pub` halves, or ZeroMQ's certificate files).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

KEY_ID = re.compile(r"[0-9a-f]{64}")  # a peer id that is a public key
SIGNATURE_CHARS = 128  # an Ed25519 signature, in hex
_FILE_HEADER = "swarm-identity-v1"


class Identity:
    """An Ed25519 key pair; `peer_id` is the public key in hex."""

    def __init__(self, seed: bytes | None = None):
        from nacl.signing import SigningKey

        self._key = SigningKey(seed) if seed is not None else SigningKey.generate()
        self.peer_id = self._key.verify_key.encode().hex()

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """The identity kept in `path`, made (and written, owner-only) when the file does not exist yet."""
        path = Path(path).expanduser()
        if path.exists():
            try:
                header, _, seed = path.read_text().strip().partition(":")
                if header != _FILE_HEADER:
                    raise ValueError("not a swarm identity file")
                identity = cls(bytes.fromhex(seed))
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read the identity in {path}: {e} (a file written by `swarm serve "
                                  "--identity`; move it away to make a new one)") from None
            if path.stat().st_mode & 0o077:
                log.warning("identity file %s can be read by others; chmod 600 it", path)
            return identity
        identity = cls()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{_FILE_HEADER}:{bytes(identity._key).hex()}\n")
        except OSError as e:
            raise ConfigError(f"cannot write a new identity to {path}: {e}") from None
        log.info("made a new identity in %s (peer id %s)", path, identity.peer_id[:16])
        return identity

    def sign(self, data: bytes) -> str:
        """The signature of `data`, in hex."""
        return self._key.sign(data).signature.hex()


def verify(peer_id: str, data: bytes, signature: str) -> bool:
    """Whether `signature` (hex) is the signature of `data` by the key whose hex is `peer_id`."""
    if not KEY_ID.fullmatch(peer_id) or not isinstance(signature, str) or len(signature) != SIGNATURE_CHARS:
        return False
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    try:
        VerifyKey(bytes.fromhex(peer_id)).verify(data, bytes.fromhex(signature))
    except (BadSignatureError, ValueError):
        return False
    return True


Z85_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")  # a Curve25519 key in z85 (ZeroMQ's text form)
_SWARM_HEADER = "swarm-key-v1"
_MAX_KEY_FILE = 64 << 10  # bytes read of a key file (a key file is a few hundred)
_MAX_ALLOWED = 10_000  # keys read from an --allowed-keys directory


@dataclass(frozen=True)
class SwarmKey:
    """The key of a private swarm as one member holds it: its own CURVE key pair and the swarm's public key.

    For the swarm key itself (what servers hold) `public` is `swarm`; for a member key they differ.
    """

    public: bytes  # this holder's public key, z85 (the client key it presents)
    secret: bytes  # its secret key, z85
    swarm: bytes  # the swarm's public key, z85: every server presents it

    @property
    def can_serve(self) -> bool:
        """Only the swarm key itself can serve: servers present the swarm's key pair."""
        return self.public == self.swarm

    @property
    def mdns_tag(self) -> str:
        """What the swarm's mDNS announcements carry instead of ids and models: members know it, strangers cannot
        tell it from noise or use it (a hash of the swarm's public key, which never travels in the clear)."""
        return hashlib.blake2b(self.swarm, digest_size=12, person=b"swarm-mdns-v1").hexdigest()

    @classmethod
    def generate(cls) -> SwarmKey:
        """A new swarm key."""
        import zmq

        public, secret = zmq.curve_keypair()
        return cls(public, secret, public)

    def member(self) -> SwarmKey:
        """A new member key of this swarm (its own key pair; servers admit it when listed in --allowed-keys)."""
        import zmq

        public, secret = zmq.curve_keypair()
        return SwarmKey(public, secret, self.swarm)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SwarmKey:
        """The key in `path` (a file written by `swarm keygen`); ConfigError says what is wrong with it."""
        path = Path(path).expanduser()
        fields = _read_key_file(path, "swarm key")
        if fields.get("") != _SWARM_HEADER:
            raise ConfigError(f"{path} is not a swarm key (write one with `swarm keygen --out FILE`)")
        try:
            key = cls(*(_z85_field(fields, name) for name in ("public", "secret", "swarm")))
        except ValueError as e:
            raise ConfigError(f"cannot read the swarm key in {path}: {e}") from None
        import zmq

        try:
            derived = zmq.curve_public(key.secret)
        except (zmq.ZMQError, ValueError):
            derived = b""
        if derived != key.public:
            raise ConfigError(f"cannot read the swarm key in {path}: its public key is not that of its secret key")
        if path.stat().st_mode & 0o077:
            log.warning("swarm key file %s can be read by others; chmod 600 it", path)
        return key

    def write(self, path: str | os.PathLike[str]) -> Path | None:
        """Write the key to `path` (owner-only, never over an existing file); a member key's public half goes to
        `path.pub` (returned), for the servers' --allowed-keys directory."""
        path = Path(path).expanduser()
        kind = "swarm key" if self.can_serve else "member key"
        text = (f"{_SWARM_HEADER}\n# a {kind} of a private swarm: keep it secret (swarm keygen wrote it)\n"
                f"public = {self.public.decode()}\nsecret = {self.secret.decode()}\nswarm = {self.swarm.decode()}\n")
        pub = None if self.can_serve else path.with_name(path.name + ".pub")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            if pub is not None:
                pub.write_text(f"{_SWARM_HEADER}\n# the public half of {path.name}: in a server's --allowed-keys "
                               f"directory, it admits its holder\npublic = {self.public.decode()}\n")
        except FileExistsError:
            raise ConfigError(f"{path} exists already: swarm keygen never overwrites a key") from None
        except OSError as e:
            raise ConfigError(f"cannot write a key to {path}: {e}") from None
        return pub


class Admission:
    """Which client keys a server of a private swarm admits: the swarm key, and the keys in `allowed_dir`, read again
    when the directory changes (`refresh`, at most once per `every` seconds; a key taken out stops being served at
    its next request, not only at its next connection)."""

    def __init__(self, key: SwarmKey, allowed_dir: str | os.PathLike[str] | None = None, every: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.key, self.every, self._clock = key, every, clock
        self._dir = None if allowed_dir is None else Path(allowed_dir).expanduser()
        self._signature: tuple = ()
        self._checked = -float("inf")
        self._keys: frozenset[bytes] = frozenset()
        if self._dir is not None:
            self._signature = _dir_signature(self._dir)
            self._keys = frozenset(allowed_keys(self._dir))  # a missing directory fails the start

    @property
    def keys(self) -> frozenset[bytes]:
        """The member keys admitted besides the swarm key."""
        return self._keys

    def __call__(self, client_key: bytes) -> bool:
        return client_key == self.key.swarm or client_key in self._keys

    def refresh(self) -> bool:
        """Read the directory again when it changed; True when the admitted keys changed."""
        now = self._clock()
        if self._dir is None or now - self._checked < self.every:
            return False
        self._checked = now
        signature = _dir_signature(self._dir)
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            keys = frozenset(allowed_keys(self._dir))
        except ConfigError as e:  # the directory went away: admit no member until it is back
            log.warning("%s; admitting only the swarm key", e)
            keys = frozenset()
        changed, self._keys = keys != self._keys, keys
        if changed:
            log.info("allowed keys reloaded from %s: %d member keys", self._dir, len(keys))
        return changed


def _dir_signature(directory: Path) -> tuple:
    """What changes when a file of `directory` is added, removed or rewritten."""
    try:
        return tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in os.scandir(directory)
                            if e.is_file())[:_MAX_ALLOWED])
    except OSError:
        return ("missing",)


def allowed_keys(directory: str | os.PathLike[str]) -> set[bytes]:
    """The public keys (z85) in the files of `directory`: files written by `swarm keygen` (a key or its `.pub`
    half) or ZeroMQ certificates (`public-key = "..."`). Files without a key are skipped, each logged once."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise ConfigError(f"--allowed-keys {directory}: not a directory")
    keys: set[bytes] = set()
    for path in sorted(directory.iterdir())[:_MAX_ALLOWED]:
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            fields = _read_key_file(path, "key")
            keys.add(_z85_field(fields, "public" if "public" in fields else "public-key"))
        except (ConfigError, ValueError) as e:
            log.debug("skipping %s in the allowed keys: %s", path, e)
    return keys


def _read_key_file(path: Path, what: str) -> dict[str, str]:
    """`name = value` lines of a small text file; the first line that has no `=` is kept under the name ""."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_KEY_FILE + 1)
    except OSError as e:
        raise ConfigError(f"cannot read the {what} in {path}: {e.strerror or e}") from None
    if len(raw) > _MAX_KEY_FILE:
        raise ConfigError(f"{path} is not a {what}: it is larger than {_MAX_KEY_FILE} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a {what}: it is not text") from None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if sep:
            fields.setdefault(name.strip(), value.strip().strip('"'))
        else:
            fields.setdefault("", line)
    return fields


def _z85_field(fields: dict[str, str], name: str) -> bytes:
    value = fields.get(name)
    if value is None:
        raise ValueError(f"it has no {name} key")
    if not Z85_KEY.fullmatch(value):
        raise ValueError(f"its {name} key is not a 40-character z85 key")
    return value.encode()


__all__ = ["KEY_ID", "SIGNATURE_CHARS", "Admission", "Identity", "SwarmKey", "allowed_keys", "verify"]

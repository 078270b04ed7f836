"""Server identities: an Ed25519 key pair per server, whose public key is its peer id, and the signatures of records.

A server's peer id is its public key, in hex (64 characters), so no one else can claim it: a record is believed only
when it carries the signature of that key over every field (address, span, throughput, ttl, seq, ...). `Identity`
keeps the key pair, read from a file (created on first use, readable by its owner only) or made for one run.
`sign`/`verify` work on bytes; records.py decides which bytes a record's signature covers.
"""

from __future__ import annotations

import logging
import os
import re
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


__all__ = ["KEY_ID", "SIGNATURE_CHARS", "Identity", "verify"]

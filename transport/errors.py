"""The one exception tree of swarm.

Every error a user can act on is a `SwarmError`. Errors that cross the wire carry a stable `code` (a short
snake_case string) and a human message; `error_for_code` turns a code received from a peer back into the typed
exception on the caller's side. Only the CLI turns these into red lines and exit codes.
"""

from __future__ import annotations


class SwarmError(Exception):
    """Base class of every error swarm raises on purpose."""

    code = "error"


class ConfigError(SwarmError):
    """A setting, argument or model directory is wrong (the user can fix it)."""

    code = "config"


class ProtocolError(SwarmError):
    """A message could not be decoded or does not follow the protocol."""

    code = "bad_request"


class VersionMismatch(ProtocolError):
    """The peer speaks a protocol version we do not."""

    code = "protocol_version"


class UnknownMethod(ProtocolError):
    """The message type is not one this peer knows (it may be newer: check its capabilities first)."""

    code = "unknown_method"


class PeerTimeout(SwarmError):
    """A peer did not answer within the timeout (it may be gone or overloaded)."""

    code = "timeout"


class PeerUnreachable(SwarmError):
    """A peer address cannot be used (malformed, or nothing answers there)."""

    code = "unreachable"


class RemoteError(SwarmError):
    """A peer answered with an error. `code` is the peer's stable code, `peer` its address."""

    def __init__(self, message: str, *, code: str = "internal", peer: str | None = None):
        where = f" (from {peer})" if peer else ""
        super().__init__(f"{message}{where}")
        self.code = code
        self.peer = peer
        self.remote_message = message


class BadRequest(RemoteError):
    """The peer rejected our request as malformed or invalid."""


class WrongBlocks(RemoteError):
    """The peer does not serve the blocks asked for: its real span differs from what its record says (it restarted
    with other blocks, or its record is stale or false). Another server can run them."""


class UnknownSession(RemoteError):
    """The peer does not know the inference session (it expired, or the server restarted)."""


class CacheFull(RemoteError):
    """The peer has no attention-cache room for the session."""


class SessionOverflow(RemoteError):
    """A step would go past the session's max_length."""


class ServerBusy(RemoteError):
    """The peer is shutting down or overloaded and takes no new work."""


class UnknownAdapter(RemoteError):
    """The peer neither holds nor can load the adapter asked for (another server may)."""


class BadAdapter(RemoteError):
    """The peer has the adapter asked for, but its files are broken or do not fit its model (the message says how)."""


class RelayRefused(BadRequest):
    """The peer will not take part in a relayed step (it does not relay, or does not know the next server)."""


class RelayStopped(RemoteError):
    """A relayed step did not run: its input never came from the previous server, or the client cancelled it."""


class AccessDenied(RemoteError):
    """A server of a private swarm does not admit our key (or we hold none, or it speaks another mechanism)."""


# Stable error codes used on the wire and the exception each maps to on the caller's side.
REMOTE_ERRORS: dict[str, type[RemoteError]] = {
    "bad_request": BadRequest,
    "protocol_version": BadRequest,
    "unknown_method": BadRequest,
    "wrong_blocks": WrongBlocks,
    "unknown_session": UnknownSession,
    "cache_full": CacheFull,
    "session_overflow": SessionOverflow,
    "busy": ServerBusy,
    "unknown_adapter": UnknownAdapter,
    "bad_adapter": BadAdapter,
    "relay_refused": RelayRefused,
    "relay_timeout": RelayStopped,
    "cancelled": RelayStopped,
    "access_denied": AccessDenied,
    "internal": RemoteError,
}


def error_for_code(code: str, message: str, peer: str | None = None) -> RemoteError:
    """The typed exception for an error reply with `code` (unknown codes become a plain RemoteError)."""
    cls = REMOTE_ERRORS.get(code, RemoteError)
    return cls(message, code=code, peer=peer)

"""The API's settings, one dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...transport.errors import ConfigError
from ..client.config import ClientConfig


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"  # address the HTTP server listens on
    port: int = 8000  # its port (0: any free port, printed when listening)
    api_key: str | None = None  # when set, every /v1 request needs `Authorization: Bearer <api_key>`
    # the models the API offers, public name -> model id, alias or directory; empty: every model the swarm serves
    models: dict[str, str] = field(default_factory=dict)
    max_body_bytes: int = 1 << 20  # largest request body accepted
    max_tokens: int = 4096  # largest max_tokens a request may ask (and the most an answer gets when it asks none)
    max_n: int = 8  # most choices (`n`) per request
    max_stop: int = 4  # most stop strings per request
    max_stop_chars: int = 256  # longest stop string
    max_messages: int = 1024  # most messages per chat request
    workers: int = 64  # requests generating at once (more wait for a worker)
    model_wait: float = 5.0  # seconds a request waits for the swarm's servers when none has been seen yet
    device: str = "cpu"  # where the clients' embeddings and heads run
    client: ClientConfig = field(default_factory=ClientConfig)  # how the clients talk to the servers

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and (not self.api_key or not self.api_key.isprintable() or " " in self.api_key):
            raise ConfigError("the API key must be a non-empty printable word")
        for name in ("max_body_bytes", "max_tokens", "max_n", "max_stop", "max_stop_chars", "max_messages",
                     "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")

"""Prometheus metrics over HTTP, for any long-running swarm process (a server, the API).

`MetricsEndpoint` holds a `CollectorRegistry` of its own (never prometheus_client's global one, so several servers in
one process keep their figures apart) and serves it with prometheus_client's WSGI app on a threaded wsgiref server:
`MetricsEndpoint().start(host, port)` binds at once (port 0: any free port, read back from `port`), a port in use is a
ConfigError, and `stop()` closes the listener. Register metrics or collectors on `registry`; what the listener answers
(at `/metrics`, as at any path) is their text exposition.
"""

from __future__ import annotations

import logging
import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from ..transport.errors import ConfigError

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05  # how soon the listener sees stop()


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress never holds the process


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no line on stderr per scrape
        pass


class MetricsEndpoint:
    """A registry and, once started, the HTTP listener that serves it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._httpd: Any = None
        self._thread: threading.Thread | None = None

    def start(self, host: str = "127.0.0.1", port: int = 0) -> MetricsEndpoint:
        """Listen on `host`:`port` (0: any free port); raises ConfigError when it cannot."""
        if not 0 <= port < 65536:
            raise ConfigError(f"metrics port must be in 0..65535, got {port}")
        server_class = _Server6 if ":" in host else _Server
        try:
            self._httpd = make_server(host, port, make_wsgi_app(self.registry), server_class, _QuietHandler)
        except OSError as e:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from None
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(POLL_SECONDS,),
                                        name="swarm-metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics at %s", self.url)
        return self

    @property
    def port(self) -> int:
        """The port it listens on (the one picked, when started with 0)."""
        if self._httpd is None:
            raise RuntimeError("metrics endpoint is not started")
        return int(self._httpd.server_port)

    @property
    def url(self) -> str:
        """Where to scrape it (a wildcard host is given as 127.0.0.1)."""
        host = str(self._httpd.server_address[0]) if self._httpd is not None else ""
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/metrics"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def stop(self) -> None:
        """Close the listener (its port is free again when this returns)."""
        httpd, thread, self._httpd, self._thread = self._httpd, self._thread, None, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(5.0)

    def __enter__(self) -> MetricsEndpoint:
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["MetricsEndpoint"]

"""`swarm status --web`: the status view as a live web page.

Two parts, both read-only:

* `StatusFeed`: a thread that listens to the swarm through a discovery object and, every `refresh` seconds, takes the
  same snapshot `swarm status` shows (`status.watch` / `status.take_snapshot`) and keeps its JSON (`status.as_json`,
  plus the page's polling period) as bytes. HTTP requests only read the latest bytes: however many pages poll, the
  swarm is listened to by one thread at one pace.
* `WebServer`: a Starlette app under uvicorn (h11, asyncio) in a thread, on a socket bound before it starts (port 0
  picks a free port, and `url` tells which). It answers `GET /` (one HTML page, `web_page.html` beside this module: an
  inline script and style, no external resources) and `GET /api/status` (the JSON); anything else is a 404 (or 405),
  a query string a 400, a Host header naming another machine a 400 when bound to loopback (a web page elsewhere
  cannot read the status through DNS rebinding). Connections at once and header sizes are bounded.

Starlette and uvicorn are imported when a server starts, not with the command line.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..core.coverage import MoveLog
from ..transport.errors import SwarmError
from .status import MOVES_SHOWN, Snapshot, as_json, take_snapshot, watch

if TYPE_CHECKING:
    from ..transport.discovery import Discovery

log = logging.getLogger(__name__)

PAGE = "web_page.html"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class WebConfig:
    host: str = "127.0.0.1"  # address to bind; the loopback default keeps the page on this machine
    port: int = 8080  # TCP port; 0 picks a free one
    refresh: float = 1.0  # seconds between snapshots of the swarm
    poll: float = 2.0  # seconds between the page's requests for a new snapshot
    max_connections: int = 64  # connections served at once; more get a 503
    max_header_bytes: int = 16 * 1024  # longest request line and headers accepted (h11's limit)
    start_timeout: float = 10.0  # seconds to wait for the server to listen
    stop_timeout: float = 5.0  # seconds to wait for the server and the feed to stop


# -- the feed: one thread listening, the latest snapshot as JSON bytes ------------------------------------------------


def snapshot_json(snap: Snapshot, poll: float) -> bytes:
    """What `/api/status` answers: `swarm status --json`'s object plus the page's polling period and our version."""
    data: dict[str, Any] = as_json(snap)
    data["poll_s"] = poll
    data["swarm_version"] = __version__
    return json.dumps(data, separators=(",", ":")).encode()


class StatusFeed:
    """Snapshots of what `discovery` hears (records of `model` only, when given), one every `refresh` seconds, taken by
    a thread of its own; `latest()` is the newest as JSON. `discovery` must be started, and is used by this thread
    only while the feed runs."""

    def __init__(self, discovery: Discovery, model: str | None = None, refresh: float = 1.0, poll: float = 2.0,
                 moves: MoveLog | None = None):
        self.discovery = discovery
        self.model = model
        self.refresh = refresh
        self.poll = poll
        self.moves = MoveLog(MOVES_SHOWN) if moves is None else moves
        self._latest = snapshot_json(take_snapshot(discovery, model, self.moves), poll)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-feed", daemon=True)

    def latest(self) -> bytes:
        return self._latest

    def _publish(self, snap: Snapshot) -> None:
        self._latest = snapshot_json(snap, self.poll)  # one reference swapped: readers see the old or the new

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                watch(self.discovery, self.model, self._publish, period=self.refresh, refreshes=1, moves=self.moves)
            except Exception:  # a snapshot that failed is logged; the page keeps the last one and the feed goes on
                log.exception("status snapshot failed")
                self._stop.wait(self.refresh)

    def start(self) -> StatusFeed:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def __enter__(self) -> StatusFeed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the HTTP side --------------------------------------------------------------------------------------------------


def page_html() -> bytes:
    return resources.files(__package__).joinpath(PAGE).read_bytes()


HEADERS = {
    # nothing from elsewhere: no scripts, styles, fonts or images but the page's own inline ones; no framing
    "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str) -> list[str]:
    """Host header values accepted: on loopback, the loopback names (DNS rebinding gets a 400); elsewhere any."""
    if not is_loopback(host):
        return ["*"]
    names = {host, *LOOPBACK_NAMES}
    return sorted(names | {f"[{n}]" for n in names if ":" in n})


def make_app(latest: Callable[[], bytes], host: str = "127.0.0.1") -> Any:
    """The Starlette app: `GET /` the page, `GET /api/status` the bytes `latest()` returns; nothing else."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    page = page_html()

    def refuse_queries(request: Request) -> None:
        if request.url.query:
            raise HTTPException(400, "this page takes no query parameters")

    async def index(request: Request) -> Response:
        refuse_queries(request)
        return Response(page, media_type="text/html; charset=utf-8", headers=HEADERS)

    async def api_status(request: Request) -> Response:
        refuse_queries(request)
        return Response(latest(), media_type="application/json", headers=HEADERS)

    async def error(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", "error")
        return PlainTextResponse(f"{code} {detail}\n", status_code=code, headers=HEADERS)

    routes = [Route("/", index, methods=["GET"]), Route("/api/status", api_status, methods=["GET"])]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(host))]
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: error})


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host`:`port` (IPv4 or IPv6, as the host says), or a SwarmError saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise SwarmError(f"cannot bind the web view to {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise SwarmError(f"cannot serve the web view on {host}:{port}: {e.strerror} (pick another --port)") from None
    sock.setblocking(False)
    return sock


class WebServer:
    """The web view of `latest()` served by uvicorn in a thread; `url` once started. A context manager."""

    def __init__(self, latest: Callable[[], bytes], config: WebConfig | None = None):
        self.config = config or WebConfig()
        self.latest = latest
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.url = ""

    def start(self) -> WebServer:
        import uvicorn

        cfg = self.config
        self._socket = bind(cfg.host, cfg.port)
        host, port = self._socket.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
        app = make_app(self.latest, cfg.host)
        self._server = uvicorn.Server(uvicorn.Config(
            app, http="h11", loop="asyncio", lifespan="off", log_config=None, log_level="error", access_log=False,
            server_header=False, limit_concurrency=cfg.max_connections, timeout_keep_alive=5,
            h11_max_incomplete_event_size=cfg.max_header_bytes))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="status-web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + cfg.start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise SwarmError(f"the web view did not start on {cfg.host}:{port}")
            time.sleep(0.01)
        return self

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(self.config.stop_timeout)
        if self._socket is not None:
            self._socket.close()

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_status(discovery: Discovery, model: str | None, config: WebConfig, moves: MoveLog | None = None,
                 on_start: Callable[[str], None] | None = None) -> None:
    """Serve the web view of `discovery`'s swarm until interrupted (Ctrl-C raises KeyboardInterrupt here);
    `on_start(url)` is called once it listens."""
    with StatusFeed(discovery, model, config.refresh, config.poll, moves) as feed, \
            WebServer(feed.latest, config) as server:
        if on_start is not None:
            on_start(server.url)
        while server.alive():
            time.sleep(0.2)
    raise SwarmError("the web view stopped unexpectedly")

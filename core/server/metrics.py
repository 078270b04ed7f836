"""A server's Prometheus metrics (`ServerConfig.metrics_port`, `swarm serve --metrics-port`).

Every metric is named `swarm_...` and labelled with the server's `model` (the announced id) and `blocks` (its span,
`START:END`; after a move, new figures go to the new span's series). Counted as they happen, cheaply (one call per
answered request, one per engine pass):

- `swarm_requests_total{type}`: requests answered, by request type (step, forward, backward, open, close, info, ping,
  push, cancel, gossip; `other` for types this version does not know);
- `swarm_request_errors_total{type, code}`: of those, the ones answered with an error, by its code (bad_request,
  busy, cache_full, unknown_session, ...);
- `swarm_request_seconds{type}`: histogram of the time from a request's arrival to its answer (for a step: its wait
  in the queue and the passes that ran it);
- `swarm_pass_seconds{kind}`: histogram of engine passes through the blocks, by what they ran (step, forward, mixed
  for steps and forwards together, backward);
- `swarm_pass_requests`, `swarm_pass_tokens`: histograms of the requests and new tokens one pass held (batch sizes).

Read when scraped (the figures `info` reports):

- `swarm_server_info{peer_id, version, quant, dtype, device}` (1) and `swarm_server_state{state}` (1 for the state it
  is in: joining, online, draining), `swarm_moves_total`, `swarm_throughput_tokens_per_second` (announced);
- `swarm_sessions` (open inference sessions), `swarm_cache_tokens_total`, `_used`, `_free` (the attention-cache
  budget), `swarm_queue_requests`, `swarm_queue_bytes` (work waiting for the engine);
- `swarm_adapters_loaded`, `swarm_adapter_bytes` (adapters held in memory), `swarm_adapter_loads_total`;
- `swarm_received_bytes_total`, `swarm_sent_bytes_total` (messages on the server's socket), and
  `swarm_dropped_replies_total` (replies not sent to peers that left too many unread).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ...transport.messages import REQUESTS
from ..metrics import MetricsEndpoint

if TYPE_CHECKING:
    from ...transport.rpc import RpcServer
    from .server import Server

REQUEST_TYPES = frozenset({*REQUESTS, "gossip"})  # the `type` label's values (anything else: `other`)
STATES = ("joining", "online", "draining")
LABELS = ("model", "blocks")
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REQUESTS_PER_PASS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKENS_PER_PASS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def span_label(blocks: tuple[int, int] | None) -> str:
    """The `blocks` label of a span ("" before the server has one)."""
    return "" if blocks is None else f"{blocks[0]}:{blocks[1]}"


class ServerMetrics:
    """The metrics of one server, in a registry of their own (`endpoint`), served once `start` is called."""

    def __init__(self, server: Server, rpc: Callable[[], RpcServer | None]):
        self.server = server
        self.endpoint = MetricsEndpoint()
        registry = self.endpoint.registry
        self._requests = Counter("swarm_requests", "Requests answered, by request type.", (*LABELS, "type"),
                                 registry=registry)
        self._errors = Counter("swarm_request_errors", "Requests answered with an error, by request type and error "
                               "code.", (*LABELS, "type", "code"), registry=registry)
        self._latency = Histogram("swarm_request_seconds", "Seconds from a request's arrival to its answer.",
                                  (*LABELS, "type"), buckets=SECONDS, registry=registry)
        self._pass_seconds = Histogram("swarm_pass_seconds", "Seconds of one engine pass through the blocks, by what "
                                       "it ran (step, forward, mixed, backward).", (*LABELS, "kind"),
                                       buckets=SECONDS, registry=registry)
        self._pass_requests = Histogram("swarm_pass_requests", "Requests one engine pass held.", LABELS,
                                        buckets=REQUESTS_PER_PASS, registry=registry)
        self._pass_tokens = Histogram("swarm_pass_tokens", "New tokens one engine pass held.", LABELS,
                                      buckets=TOKENS_PER_PASS, registry=registry)
        registry.register(_ServerCollector(server, rpc))
        self._children: dict[tuple[Any, str], tuple[Any, Any]] = {}

    def start(self, host: str, port: int) -> ServerMetrics:
        self.endpoint.start(host, port)
        return self

    def stop(self) -> None:
        self.endpoint.stop()

    @property
    def port(self) -> int:
        return self.endpoint.port

    @property
    def url(self) -> str:
        return self.endpoint.url

    def answered(self, msg_type: str, code: str | None, seconds: float) -> None:
        """One request answered (RpcServer's `on_answer`): counted, with its error code, and its time."""
        kind = msg_type if msg_type in REQUEST_TYPES else "other"
        blocks = self.server.blocks
        children = self._children.get((blocks, kind))  # labels() looked up once per span and type (a few of them)
        labels = (self.server.model_id, span_label(blocks), kind)
        if children is None:
            children = self._children[blocks, kind] = (self._requests.labels(*labels), self._latency.labels(*labels))
        children[0].inc()
        children[1].observe(seconds)
        if code is not None:
            self._errors.labels(*labels, code).inc()

    def pass_observer(self, blocks: tuple[int, int]) -> Callable[[str, float, int, int], None]:
        """What the engine of span `blocks` calls after each pass (Engine's `observe`)."""
        labels = (self.server.model_id, span_label(blocks))
        requests, tokens = self._pass_requests.labels(*labels), self._pass_tokens.labels(*labels)
        seconds: dict[str, Any] = {}

        def observe(kind: str, duration: float, count: int, new_tokens: int) -> None:
            child = seconds.get(kind)
            if child is None:
                child = seconds[kind] = self._pass_seconds.labels(*labels, kind)
            child.observe(duration)
            requests.observe(count)
            tokens.observe(new_tokens)

        return observe


class _ServerCollector:
    """The figures `info` reports, read from the server when scraped."""

    def __init__(self, server: Server, rpc: Callable[[], RpcServer | None]):
        self.server = server
        self.rpc = rpc

    def describe(self) -> list[Metric]:
        return []  # the names change with what the server has (nothing to check against at registration)

    def collect(self) -> Iterator[Metric]:
        server = self.server
        labels = [server.model_id, span_label(server.blocks)]
        info = GaugeMetricFamily("swarm_server_info", "The server: its peer id, version, quantization, dtype and "
                                 "device (always 1).", labels=[*LABELS, "peer_id", "version", "quant", "device"])
        from ... import __version__

        info.add_metric([*labels, server.peer_id, __version__, server.quant, server.device.type], 1)
        yield info
        state = GaugeMetricFamily("swarm_server_state", "1 for the state the server is in.",
                                  labels=[*LABELS, "state"])
        for name in STATES:
            state.add_metric([*labels, name], float(server.state == name))
        yield state
        yield _one(CounterMetricFamily, "swarm_moves", "Moves to another span of blocks.", labels, server.moves)
        yield _one(GaugeMetricFamily, "swarm_throughput_tokens_per_second", "The throughput the server announces.",
                   labels, server.throughput)
        yield from self._load(labels)
        rpc = self.rpc()
        if rpc is not None:
            yield _one(CounterMetricFamily, "swarm_received_bytes", "Bytes of the messages received.", labels,
                       rpc.bytes_in)
            yield _one(CounterMetricFamily, "swarm_sent_bytes", "Bytes of the replies sent.", labels, rpc.bytes_out)
            yield _one(CounterMetricFamily, "swarm_dropped_replies", "Replies not sent to peers that left too many "
                       "unread.", labels, rpc.dropped_replies)

    def _load(self, labels: list[str]) -> Iterator[Metric]:
        """Sessions, cache, queue, adapters: of the span being served (none while the server loads one)."""
        handler, adapters = self.server.handler, self.server.adapters
        if handler is None:
            return
        total, free = handler.budget.total, handler.budget.free
        stats = handler.engine.stats()
        for name, text, value in (
                ("swarm_sessions", "Open inference sessions.", len(handler.sessions)),
                ("swarm_cache_tokens_total", "The attention-cache budget in tokens.", total),
                ("swarm_cache_tokens_used", "Cache tokens held by sessions (and long forwards).", total - free),
                ("swarm_cache_tokens_free", "Cache tokens free.", free),
                ("swarm_queue_requests", "Requests waiting for the engine.", stats["queue"]),
                ("swarm_queue_bytes", "Bytes of the tensors of the requests waiting.", stats["queued_bytes"])):
            yield _one(GaugeMetricFamily, name, text, labels, value)
        if adapters is not None:
            held = adapters.stats()
            yield _one(GaugeMetricFamily, "swarm_adapters_loaded", "Adapters held in memory.", labels,
                       len(held["loaded"]))
            yield _one(GaugeMetricFamily, "swarm_adapter_bytes", "Bytes of the adapters held.", labels, held["bytes"])
            yield _one(CounterMetricFamily, "swarm_adapter_loads", "Adapters loaded (by this span).", labels,
                       held["loads"])


def _one(cls: type, name: str, text: str, labels: list[str], value: float) -> Metric:
    family = cls(name, text, labels=list(LABELS))
    family.add_metric(labels, float(value))
    return family


__all__ = ["REQUEST_TYPES", "MetricsEndpoint", "ServerMetrics", "span_label"]

"""The API's own Prometheus metrics: requests by route and status, answers in progress, time to first token,
tokens/s per answer, and tokens generated and read.

`ApiMetrics(registry)` registers them on a registry of the caller's (never prometheus_client's global one);
`middleware(app)` wraps the ASGI application to count every request by route and status, and `observe` is an
`Api` observer that records each answer. `swarm api --metrics-port` serves them with `core.metrics.MetricsEndpoint`.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ROUTES = ("/health", "/v1/models", "/v1/chat/completions", "/v1/completions")
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("swarm_api_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=registry)
        self.in_progress = Gauge("swarm_api_requests_in_progress", "HTTP requests being answered",
                                 registry=registry)
        self.first_token = Histogram("swarm_api_time_to_first_token_seconds", "From a generation request's arrival to "
                                     "its first token", ["model"], buckets=TTFT_BUCKETS, registry=registry)
        self.rate = Histogram("swarm_api_tokens_per_second", "Tokens per second of each answer (all its choices), "
                              "from its arrival to its end", ["model"], buckets=RATE_BUCKETS, registry=registry)
        self.generated = Counter("swarm_api_generated_tokens", "Tokens generated", ["model"], registry=registry)
        self.prompt = Counter("swarm_api_prompt_tokens", "Prompt tokens read", ["model"], registry=registry)
        self.failed = Counter("swarm_api_generation_errors", "Answers that failed while generating", ["model"],
                              registry=registry)

    def observe(self, event: str, fields: dict[str, Any]) -> None:
        """Record an answer (`event` "answer": its model, tokens, seconds, first-token delay) or a failed one."""
        model = fields.get("model", "")
        if event == "error":
            self.failed.labels(model).inc()
            return
        if event != "answer":
            return
        self.generated.labels(model).inc(fields["completion_tokens"])
        self.prompt.labels(model).inc(fields["prompt_tokens"])
        if fields.get("first") is not None:
            self.first_token.labels(model).observe(fields["first"])
        if fields["seconds"] > 0:
            self.rate.labels(model).observe(fields["completion_tokens"] / fields["seconds"])

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """`app`, counting each HTTP request by route (other paths as "other") and status."""
        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            route = scope["path"] if scope["path"] in ROUTES else "other"
            status = {"code": 500}

            async def watch(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            self.in_progress.inc()
            try:
                await app(scope, receive, watch)
            finally:
                self.in_progress.dec()
                self.requests.labels(route, str(status["code"])).inc()

        return counted

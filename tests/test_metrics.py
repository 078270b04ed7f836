"""Prometheus metrics of servers (`--metrics-port`): real servers on 127.0.0.1, real requests, `/metrics` fetched over
HTTP and parsed with prometheus_client's own parser."""

from __future__ import annotations

import os
import re
import socket
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import client, fork_swarm, swarm_env
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from swarm.core.metrics import MetricsEndpoint
from swarm.core.server.metrics import REQUEST_TYPES
from swarm.transport.errors import BadRequest, ConfigError
from swarm.transport.rpc import RpcClient

HIDDEN = 64  # tiny_llama's hidden size


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """The samples `url` serves: (name, labels, value)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels` (0 when there are none)."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def names(samples: list[tuple[str, dict[str, str], float]]) -> set[str]:
    return {n for n, _, _ in samples}


def listening_ports() -> set[int]:
    """The TCP ports this process listens on (Linux: its sockets' inodes, looked up in /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_metrics_count_what_the_server_did(tiny_llama, tiny_llama_ref, start_server):
    """A generation, a forward, a session held then closed, and a bad request move the counters, gauges and
    histograms they should; the cache figures agree with `info`."""
    server = start_server(tiny_llama, (0, 6), metrics_port=0)
    assert server.metrics is not None and server.metrics.port > 0
    url = server.metrics.url
    assert url == f"http://127.0.0.1:{server.metrics.port}/metrics"
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    model = client(tiny_llama, [server.endpoint])
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, tiny_llama_ref.generate(ids, max_new_tokens=4, do_sample=False))  # served, and right
    rpc = RpcClient(server.endpoint)
    try:
        hidden = torch.randn(2, 5, HIDDEN)
        rpc.call("forward", {"names": ["hidden"]}, [hidden])
        with pytest.raises(BadRequest):
            rpc.call("forward", {"names": ["hidden"]}, [torch.zeros(1, 3, HIDDEN - 1)])
        session = rpc.call("open", {"batch_size": 2, "max_length": 10}).get("session")
        held = scrape(url)
        info = rpc.call("info").fields
        assert value(held, "swarm_sessions") == info["sessions"] == 1
        assert value(held, "swarm_cache_tokens_used") == 20
        assert value(held, "swarm_cache_tokens_free") == info["cache_tokens_free"] == info["cache_tokens_total"] - 20
        assert value(held, "swarm_cache_tokens_total") == info["cache_tokens_total"]
        rpc.call("close", {"session": session})
        info = rpc.call("info").fields
    finally:
        rpc.close()
    samples = scrape(url)
    labels = {"model": server.model_id, "blocks": "0:6"}
    assert info["sessions"] == 0 and value(samples, "swarm_sessions", **labels) == 0
    assert value(samples, "swarm_cache_tokens_used", **labels) == 0
    free = value(samples, "swarm_cache_tokens_free", **labels)
    assert free == info["cache_tokens_free"] == info["cache_tokens_total"]
    # requests by type: the generation opened a session and stepped it once per token (prefill, then 3 more)
    assert value(samples, "swarm_requests_total", type="open", **labels) >= 2  # the generation's, and ours
    assert value(samples, "swarm_requests_total", type="step", **labels) >= 4
    assert value(samples, "swarm_requests_total", type="forward", **labels) == 2
    assert value(samples, "swarm_requests_total", type="close", **labels) >= 1
    assert value(samples, "swarm_requests_total", type="info", **labels) >= 1
    # errors by type and code: the bad forward, and nothing else
    assert value(samples, "swarm_request_errors_total", type="forward", code="bad_request", **labels) == 1
    assert value(samples, "swarm_request_errors_total") == 1
    # latency and passes: every answered step timed; passes of steps and of the forward
    steps = value(samples, "swarm_requests_total", type="step")
    assert value(samples, "swarm_request_seconds_count", type="step", **labels) == steps
    assert value(samples, "swarm_request_seconds_bucket", type="step", le="+Inf") == steps
    assert value(samples, "swarm_pass_seconds_count", kind="step", **labels) >= 4
    assert value(samples, "swarm_pass_seconds_count", kind="forward", **labels) == 1
    passes = value(samples, "swarm_pass_seconds_count")
    assert passes > 0 and value(samples, "swarm_pass_requests_count", **labels) == passes
    assert value(samples, "swarm_pass_tokens_sum", **labels) >= ids.shape[1] + 3 + 2 * 5  # prompt, tokens, forward
    # bytes: at least the forward's hidden states each way
    assert value(samples, "swarm_received_bytes_total", **labels) > hidden.nbytes
    assert value(samples, "swarm_sent_bytes_total", **labels) > hidden.nbytes
    assert value(samples, "swarm_queue_requests", **labels) == 0
    assert value(samples, "swarm_server_state", state="online", **labels) == 1
    assert value(samples, "swarm_server_state", state="draining", **labels) == 0
    assert value(samples, "swarm_server_info", peer_id=server.peer_id, quant="none", **labels) == 1
    assert value(samples, "swarm_adapters_loaded", **labels) == 0
    assert value(samples, "swarm_moves_total", **labels) == 0


def test_unknown_types_and_garbage_are_counted_without_new_labels(tiny_llama, start_server):
    """A request type the server does not know counts as `other` (a peer cannot grow the label set), and a message
    that does not decode is counted with its error code."""
    server = start_server(tiny_llama, (0, 2), metrics_port=0)
    rpc = RpcClient(server.endpoint)
    try:
        for i in range(3):
            with pytest.raises(BadRequest):
                rpc.call(f"made-up-{i}")
        rpc.send_raw([b"\xc1 not msgpack"])
        assert rpc.recv_raw(timeout=10) is not None
    finally:
        rpc.close()
    samples = scrape(server.metrics.url)
    types = {lab["type"] for n, lab, _ in samples if n == "swarm_requests_total"}
    assert types <= REQUEST_TYPES | {"other"} and not any(t.startswith("made-up") for t in types)
    assert value(samples, "swarm_request_errors_total", type="other", code="unknown_method") == 3
    assert value(samples, "swarm_request_errors_total", type="other", code="bad_request") == 1
    assert value(samples, "swarm_requests_total", type="other") == 4


def test_metrics_are_off_by_default(tiny_llama, start_server):
    """Without a metrics port the server opens no port but its own, and registers nothing anywhere."""
    before = listening_ports()
    server = start_server(tiny_llama, (0, 2))
    rpc = RpcClient(server.endpoint)
    try:
        rpc.call("forward", {"names": ["hidden"]}, [torch.zeros(1, 2, HIDDEN)])
    finally:
        rpc.close()
    assert server.metrics is None
    assert listening_ports() - before == {int(server.endpoint.rsplit(":", 1)[1])}
    assert not any(name.startswith("swarm_") for name in REGISTRY._names_to_collectors)


def test_two_servers_in_one_process_keep_their_metrics_apart(tiny_llama, start_server):
    """Each server has its own registry and port; what one served shows on its own metrics only; a stopped server's
    port is closed."""
    first = start_server(tiny_llama, (0, 3), metrics_port=0)
    second = start_server(tiny_llama, (3, 6), metrics_port=0)
    assert first.metrics.port != second.metrics.port
    rpc = RpcClient(first.endpoint)
    try:
        for _ in range(3):
            rpc.call("forward", {"names": ["hidden"]}, [torch.zeros(1, 2, HIDDEN)])
    finally:
        rpc.close()
    one, two = scrape(first.metrics.url), scrape(second.metrics.url)
    assert value(one, "swarm_requests_total", type="forward", blocks="0:3") == 3
    assert value(two, "swarm_requests_total", type="forward") == 0
    assert value(two, "swarm_server_state", state="online", blocks="3:6") == 1
    assert value(one, "swarm_received_bytes_total") > value(two, "swarm_received_bytes_total")
    assert not any(name.startswith("swarm_") for name in REGISTRY._names_to_collectors)
    url = first.metrics.url
    first.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=5)
    assert value(scrape(second.metrics.url), "swarm_server_state", state="online") == 1


def test_a_move_counts_and_relabels(tiny_llama, start_server):
    """After a move, the new span's figures go under its own `blocks`, and what the old span served stays."""
    server = start_server(tiny_llama, (0, 3), metrics_port=0)
    rpc = RpcClient(server.endpoint)
    try:
        rpc.call("forward", {"names": ["hidden"]}, [torch.zeros(1, 2, HIDDEN)])
        server.move(3, 6, "test")
        rpc.call("forward", {"names": ["hidden"]}, [torch.zeros(1, 2, HIDDEN)])
    finally:
        rpc.close()
    samples = scrape(server.metrics.url)
    assert value(samples, "swarm_moves_total", blocks="3:6") == 1
    assert value(samples, "swarm_requests_total", type="forward", blocks="0:3") == 1
    assert value(samples, "swarm_requests_total", type="forward", blocks="3:6") == 1
    assert value(samples, "swarm_pass_seconds_count", blocks="3:6") == 1
    assert value(samples, "swarm_sessions", blocks="3:6") == 0


def test_a_metrics_port_in_use_is_refused(tiny_llama, start_server):
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            start_server(tiny_llama, (0, 2), metrics_port=port)
    finally:
        taken.close()


def test_endpoint_serves_its_own_registry():
    from prometheus_client import Counter

    with MetricsEndpoint().start("127.0.0.1", 0) as endpoint:
        Counter("swarm_test_things", "Things.", registry=endpoint.registry).inc(3)
        assert value(scrape(endpoint.url), "swarm_test_things_total") == 3
        url = endpoint.url
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=5)
    with pytest.raises(ConfigError, match="0..65535"):
        MetricsEndpoint().start("127.0.0.1", 70000)


@pytest.mark.slow
def test_swarm_serve_metrics_port(tiny_llama, fork_serve, tmp_path):
    """`swarm serve --metrics-port 0` shows where its metrics are, and they count what it answered."""
    server = fork_serve(str(tiny_llama), "--blocks", "0:6", "--host", "127.0.0.1", "--metrics-port", "0")
    deadline, url = time.monotonic() + 30, None
    while url is None and time.monotonic() < deadline:
        found = re.search(r"http://127\.0\.0\.1:\d+/metrics", server.log_path.read_text())
        url = found.group(0) if found else None
        time.sleep(0.02)
    assert url is not None, server.log_path.read_text()
    rpc = RpcClient(server.endpoint)
    try:
        for _ in range(2):
            rpc.call("ping")
    finally:
        rpc.close()
    samples = scrape(url)
    assert value(samples, "swarm_requests_total", type="ping", blocks="0:6", model="llama") == 2
    assert value(samples, "swarm_server_state", state="online") == 1
    assert server.stop() == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=5)
    refused = fork_swarm("serve", str(tiny_llama), "--blocks", "0:6", "--metrics-port", "70000",
                         env=swarm_env(tmp_path), timeout=60)
    assert refused.returncode == 2 and "--metrics-port" in refused.stderr

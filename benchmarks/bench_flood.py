"""What connection floods and slow readers cost a server: its memory (RSS) and a well-behaved client's wait.

What it does: saves a tiny random Llama (hidden 64, 4 blocks) in a temporary directory and starts a server of its
blocks in a child process (`Server`, as `swarm serve` runs it; --unread-mib sets how many reply bytes one peer may
leave unread). A well-behaved client then measures one step of its session (median of 5) in each phase:

- idle: nothing else;
- flood N: N DEALER sockets (one ZeroMQ context) each connect and send one small forward, and never read; measured
  with all N connected, then the server's RSS once they are closed and their work is done. Each N runs twice in a
  row, so what the first round allocated and keeps (allocator caches) shows apart from growth;
- slow reader: one DEALER that reads nothing (RCVHWM 1, a 64 KiB kernel buffer) sends --slow forwards whose replies
  are 1 MiB each (32 at a time, each batch answered before the next, so none is refused busy); the server's RSS
  and the reply bytes it holds unread once they are all answered, the replies it dropped, and the client's step.

The server's RSS is read from /proc (Linux). Compare `--unread-mib 64` (the default bound) with `--unread-mib 100000`
(no bound: what the server held before) to see what the bound saves.

Run (from the repository root; about a minute):

    .venv/bin/python benchmarks/bench_flood.py
    .venv/bin/python benchmarks/bench_flood.py --floods 100,300,500 --slow 300 --unread-mib 100000 --json flood.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import zmq
from rich.console import Console
from rich.table import Table

from swarm.transport.codec import encode
from swarm.transport.rpc import RpcClient, RpcClientConfig

HIDDEN = 64


def make_model(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


def serve(model: str, unread: int, endpoint: multiprocessing.connection.Connection) -> None:
    """The child: a server of all blocks on 127.0.0.1, until its parent closes the pipe."""
    from swarm.core.server import Server, ServerConfig

    with Server(ServerConfig(model, (0, 4), host="127.0.0.1", unread_bytes=unread)) as server:
        endpoint.send(server.endpoint)
        rpc = server._rpc
        while True:  # answers "stats" until the parent closes the pipe
            try:
                endpoint.recv()
            except EOFError:
                return
            endpoint.send({"unread_mib": rpc.unread_bytes / (1 << 20), "dropped": rpc.dropped_replies})


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) >> 10
    return -1


def step_ms(client: RpcClient, session: str) -> float:
    """Median of 5 one-token steps, in milliseconds."""
    times = []
    for _ in range(5):
        started = time.perf_counter()
        client.call("step", {"session": session, "names": ["hidden"], "start": 0}, [torch.zeros(1, 1, HIDDEN)])
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def settle(client: RpcClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while client.call("info").fields["queue"] and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--floods", default="100,300,500", help="connections per flood, comma-separated")
    parser.add_argument("--slow", type=int, default=200, help="forwards (1 MiB replies) the slow reader sends")
    parser.add_argument("--unread-mib", type=int, default=64, help="reply MiB one peer may leave unread")
    parser.add_argument("--json", dest="json_", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    floods = [int(n) for n in args.floods.split(",")]
    rows: list[dict] = []
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "llama")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=serve, args=(str(model), args.unread_mib << 20, child), daemon=True)
        proc.start()
        context = zmq.Context()
        try:
            if not parent.poll(120):
                raise RuntimeError("the server did not start within 120 s")
            endpoint = parent.recv()
            with RpcClient(endpoint, RpcClientConfig(timeout=120)) as client:
                session = client.call("open", {"batch_size": 1, "max_length": 8}).fields["session"]
                step_ms(client, session)
                rows.append({"phase": "idle", "step_ms": step_ms(client, session), "rss_mib": rss(proc.pid),
                             "after_mib": rss(proc.pid)})
                for n in floods:
                    for round_ in (1, 2):
                        socks = []
                        for i in range(n):
                            sock = context.socket(zmq.DEALER)
                            sock.setsockopt(zmq.LINGER, 0)
                            sock.connect(endpoint)
                            sock.send_multipart(encode("forward", i + 1, {"names": ["hidden"]},
                                                       [torch.zeros(1, 16, HIDDEN)]))
                            socks.append(sock)
                        during = step_ms(client, session)
                        peak = rss(proc.pid)
                        for sock in socks:
                            sock.close(linger=0)
                        settle(client)
                        rows.append({"phase": f"flood {n} ({round_})", "step_ms": during, "rss_mib": peak,
                                     "after_mib": rss(proc.pid)})
                slow = context.socket(zmq.DEALER)
                slow.setsockopt(zmq.LINGER, 0)
                slow.setsockopt(zmq.RCVHWM, 1)
                slow.setsockopt(zmq.RCVBUF, 64 << 10)
                slow.connect(endpoint)
                for i in range(args.slow):
                    slow.send_multipart(encode("forward", i + 1, {"names": ["hidden"]}, [torch.zeros(64, 64, HIDDEN)]))
                    if i % 32 == 31:
                        settle(client)
                settle(client)
                during, peak = step_ms(client, session), rss(proc.pid)
                parent.send("stats")
                held = parent.recv()
                slow.close(linger=0)
                settle(client)
                rows.append({"phase": f"slow reader ({args.slow} MiB of replies)", "step_ms": during,
                             "rss_mib": peak, "after_mib": rss(proc.pid), **held})
        finally:
            context.term()
            parent.close()
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    table = Table(title=f"server memory and a client's step under floods (unread bound {args.unread_mib} MiB)")
    for head in ("phase", "client step ms (median)", "server RSS MiB", "RSS after, MiB"):
        table.add_column(head, justify="left" if head == "phase" else "right")
    table.add_column("unread MiB held", justify="right")
    table.add_column("replies dropped", justify="right")
    for row in rows:
        table.add_row(row["phase"], f"{row['step_ms']:.1f}", str(row["rss_mib"]), str(row["after_mib"]),
                      f"{row['unread_mib']:.0f}" if "unread_mib" in row else "", str(row.get("dropped", "")))
    Console().print(table)
    if args.json_:
        args.json_.write_text(json.dumps({"unread_mib": args.unread_mib, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

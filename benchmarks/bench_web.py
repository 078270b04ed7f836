"""What `swarm status --web` costs on a big swarm: the JSON the page polls, and the page drawing it, for 10 to 1000
servers.

What it does: makes N signed server records of one model (bench_status's: 80 blocks, random spans and throughputs),
builds their snapshot once, serves its JSON with the web view's server (`cli/web.py`, on 127.0.0.1, any free port),
and measures:

- json: the size of `/api/status`;
- get: the median time of `--requests` GETs of it over HTTP/1.1 from this process (a fresh connection each);
- redraw: the page's own `render()` of that JSON in a headless Chromium (Debian's, through Playwright), the mean of 5
  (building the DOM; the browser lays it out afterwards).

No swarm and no gossip: the records are made in memory, so this measures the web view itself.

Run (from the repository root; about half a minute):

    .venv/bin/python benchmarks/bench_web.py
    .venv/bin/python benchmarks/bench_web.py --servers 10,100,1000 --json web.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_status import records  # noqa: E402

from swarm.cli.status import build_snapshot  # noqa: E402
from swarm.cli.web import WebConfig, WebServer, snapshot_json  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
REDRAW = """async () => {
  const data = await (await fetch("api/status")).json();
  const started = performance.now();
  for (let i = 0; i < 5; i++) render(data);
  return (performance.now() - started) / 5;
}"""


def measure(count: int, num_blocks: int, seed: int, requests: int, browser) -> dict[str, float]:
    made = records(count, num_blocks, random.Random(seed))
    payload = snapshot_json(build_snapshot(made, lambda peer: None, 5.0, time.time()), poll=2.0)
    with WebServer(lambda: payload, WebConfig(port=0)) as web:
        times = []
        for _ in range(requests):
            started = time.perf_counter()
            with urllib.request.urlopen(web.url + "api/status", timeout=30) as response:
                response.read()
            times.append(time.perf_counter() - started)
        page = browser.new_page()
        page.goto(web.url)
        page.wait_for_function("document.body.dataset.polls >= 1", timeout=60_000)
        redraw = page.evaluate(REDRAW)
        page.close()
    return {"servers": count, "blocks": num_blocks, "json_kib": len(payload) / 1024,
            "get_median_ms": statistics.median(times) * 1e3, "redraw_ms": redraw}


def main(argv: list[str] | None = None) -> int:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--servers", default="10,100,1000", help="swarm sizes, comma-separated")
    parser.add_argument("--blocks", type=int, default=80, help="blocks of the model")
    parser.add_argument("--requests", type=int, default=50, help="GETs timed per size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            rows = [measure(int(n), args.blocks, args.seed, args.requests, browser) for n in args.servers.split(",")]
        finally:
            browser.close()
    table = Table(title=f"swarm status --web, {args.blocks} blocks")
    for column in ("servers", "JSON (KiB)", "GET median (ms)", "page redraw (ms)"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r['servers']}", f"{r['json_kib']:,.1f}", f"{r['get_median_ms']:,.1f}",
                      f"{r['redraw_ms']:,.1f}")
    Console().print(table)
    if args.json_ is not None:
        args.json_.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

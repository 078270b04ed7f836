"""`swarm status --web`: the JSON endpoint against a running local swarm of a tiny model (in-process servers on
127.0.0.1, discovery through initial peers, gossip shrunk to a tenth of a second), bad requests refused without
harm, the command itself, and the page in a real headless Chromium (Playwright): the swarm's servers and strip, and a
server that joins appearing without a reload. Screenshots go under $SWARM_TEST_ARTIFACTS (else the test's tmp_path)."""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import make_tiny_model, swarm_env

from swarm.cli.app import run
from swarm.cli.status import build_snapshot
from swarm.cli.web import StatusFeed, WebConfig, WebServer, snapshot_json
from swarm.core.coverage import MoveLog
from swarm.transport.discovery import Discovery, DiscoveryConfig
from swarm.transport.gossip import GossipConfig, Heard
from swarm.transport.keys import Identity
from swarm.transport.mdns import MdnsSettings
from swarm.transport.records import ServerRecord, sign_record

FAST = GossipConfig(period=0.1, suspect_after=2.0, request_timeout=0.5)
SERVER_DISCOVERY = DiscoveryConfig(mdns=MdnsSettings(enabled=False), gossip=FAST, record_ttl=5.0)
WEB = WebConfig(port=0, refresh=0.2, poll=0.3)
SPANS = ((0, 2), (2, 4), (4, 6))


@pytest.fixture(scope="module")
def model6(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("web") / "tiny-web-llama", layers=6)


def wait_until(check: Callable[[], bool], timeout: float, poll: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(poll)
    return check()


def serve(start_server, model, span, *peers):
    return start_server(model, span, discovery=SERVER_DISCOVERY, initial_peers=list(peers))


def listening(*peers: str) -> Discovery:
    return Discovery(list(peers), DiscoveryConfig(mdns=MdnsSettings(enabled=False), gossip=FAST)).start()


def get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def status_json(url: str) -> dict:
    code, headers, body = get(url + "api/status")
    assert code == 200 and headers["content-type"] == "application/json"
    return json.loads(body)


def heard_all(data: dict, count: int) -> bool:
    return len(data["servers"]) == count and all(s["age_source"] == "heard" for s in data["servers"])


# -- the JSON endpoint ------------------------------------------------------------------------------------------------


def test_api_status_serves_the_status_json_of_a_running_swarm(model6, start_server):
    servers = [serve(start_server, model6, SPANS[0])]
    servers += [serve(start_server, model6, span, servers[0].endpoint) for span in SPANS[1:]]
    with listening(servers[0].endpoint) as discovery, StatusFeed(discovery, None, WEB.refresh, WEB.poll) as feed, \
            WebServer(feed.latest, WEB) as web:
        assert web.url.startswith("http://127.0.0.1:") and not web.url.endswith(":0/")
        assert wait_until(lambda: heard_all(status_json(web.url), 3), timeout=15)
        data = status_json(web.url)
    assert set(data) == {"servers", "models", "moves", "at", "poll_s", "swarm_version"} and data["poll_s"] == 0.3
    assert abs(data["at"] - time.time()) < 5
    spans = {s["peer_id"]: (s["start"], s["end"]) for s in data["servers"]}
    assert spans == {s.peer_id: span for s, span in zip(servers, SPANS, strict=True)}
    speed = {s["peer_id"]: s["throughput"] for s in data["servers"]}
    expected = [speed[servers[b // 2].peer_id] for b in range(6)]  # one server per block: its own throughput
    (model,) = data["models"]
    assert model["model"] == model6.name and model["num_blocks"] == 6 and model["complete"]
    assert model["servers_per_block"] == [1] * 6
    assert model["throughput_per_block"] == pytest.approx(expected, rel=1e-3)
    assert model["bottleneck_tokens_per_s"] == pytest.approx(min(expected), rel=1e-3)
    assert 0 < model["balance_quality"] <= 1
    for s in data["servers"]:
        assert s["shown_state"] == "online" and not s["suspected"] and s["cache_tokens_total"] > 0
        assert s["version"] and s["dtype"] == "float32" and s["addresses"][0].startswith("tcp://127.0.0.1:")


# -- bad requests ---------------------------------------------------------------------------------------------------


def raw(url: str, data: bytes) -> bytes:
    """Send `data` on a fresh connection and return the head of the answer (up to its blank line)."""
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    return answer


def test_bad_requests_get_404_or_400_and_the_server_goes_on():
    payload = json.dumps({"servers": [], "models": [], "moves": [], "at": 0.0, "poll_s": 2.0}).encode()
    with WebServer(lambda: payload, WebConfig(port=0)) as web:
        url = web.url
        code, headers, body = get(url + "api/status")
        assert code == 200 and body == payload and headers["cache-control"] == "no-store"
        code, headers, body = get(url)
        assert code == 200 and headers["content-type"].startswith("text/html") and b"api/status" in body
        assert "default-src 'none'" in headers["content-security-policy"]
        assert b"http://" not in body and b"https://" not in body  # nothing loaded from elsewhere
        assert get(url + "nope")[0] == 404
        assert get(url + "api/status/../../etc/passwd")[0] == 404
        assert get(url + "api/status", method="POST")[0] == 405
        assert get(url + "api/status?model=x")[0] == 400
        assert get(url + "api/status?" + "a" * 4000)[0] == 400
        # over the header limit (16 KiB): refused by the parser, not served (sent whole, so that the server reads it
        # all before it closes: closing on unread bytes would reset the connection and lose the answer)
        huge = raw(url, b"GET /api/status?" + b"a" * 40_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert huge.startswith(b"HTTP/1.1 400")
        assert raw(url, b"\x00\x01garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
        # a page elsewhere that rebinds its DNS name to 127.0.0.1 cannot read the status
        assert get(url + "api/status", headers={"Host": "evil.example:80"})[0] == 400
        assert web.alive()
        code, _, body = get(url + "api/status")
        assert code == 200 and body == payload


def test_connections_beyond_the_limit_get_503_until_some_close():
    with WebServer(lambda: b"{}", WebConfig(port=0, max_connections=3)) as web:
        host, port = web.url.removeprefix("http://").rstrip("/").rsplit(":", 1)
        idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(3)]
        try:
            assert wait_until(lambda: get(web.url + "api/status")[0] == 503, timeout=5)
        finally:
            for sock in idle:
                sock.close()
        assert wait_until(lambda: get(web.url + "api/status")[0] == 200, timeout=5)


# -- the command ------------------------------------------------------------------------------------------------------


def read_url(proc: subprocess.Popen, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if sel.select(timeout=0.2):
            line = proc.stdout.readline()
            if line.startswith("http://"):
                return line.strip()
    raise AssertionError(f"no URL from `swarm status --web` within {timeout:.0f} s (exit code {proc.poll()})")


@pytest.mark.slow
def test_status_web_command_serves_the_swarm_until_ctrl_c(model6, start_server, tmp_path):
    a = serve(start_server, model6, (0, 6))
    proc = subprocess.Popen([sys.executable, "-m", "swarm", "status", "--web", "--port", "0", "--no-mdns",
                             "--initial-peers", a.endpoint], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, env=swarm_env(tmp_path))
    try:
        url = read_url(proc, timeout=60)
        assert url.startswith("http://127.0.0.1:")
        assert wait_until(lambda: [s["peer_id"] for s in status_json(url)["servers"]] == [a.peer_id], timeout=15)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 130 and "web view" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


@pytest.mark.parametrize("args, message", [
    (["--port", "9000"], "--port and --host are for --web"),
    (["--web", "--json"], "drop --json and --watch"),
    (["--web", "--port", "70000"], "--port must be between 0 and 65535"),
])
def test_web_options_that_do_not_mix_are_usage_errors(args, message, capsys):
    assert run(["status", "--no-mdns", "--wait", "0", *args]) == 2
    assert message in capsys.readouterr().err


def test_a_port_in_use_is_a_clear_error(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert run(["status", "--web", "--port", str(port), "--no-mdns"]) == 1
    assert f"cannot serve the web view on 127.0.0.1:{port}" in capsys.readouterr().err


# -- the page in a browser --------------------------------------------------------------------------------------------


def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("SWARM_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.mark.slow
@pytest.mark.browser
def test_page_in_chromium_shows_the_swarm_and_a_server_that_joins(model6, start_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    servers = [serve(start_server, model6, SPANS[0])]
    servers += [serve(start_server, model6, span, servers[0].endpoint) for span in SPANS[1:]]
    folder = artifacts(tmp_path)
    with listening(servers[0].endpoint) as discovery, StatusFeed(discovery, None, WEB.refresh, WEB.poll) as feed, \
            WebServer(feed.latest, WEB) as web, sync_playwright() as pw:
        assert wait_until(lambda: heard_all(status_json(web.url), 3), timeout=15)
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            outside: list[str] = []
            page.on("request", lambda r: None if r.url.startswith(web.url) else outside.append(r.url))
            navigations: list[str] = []
            page.on("framenavigated", lambda frame: navigations.append(frame.url))
            page.goto(web.url)

            section = page.locator(f'section.model[data-model="{model6.name}"]')
            rows = section.locator("tr[data-peer]")
            expect(rows).to_have_count(3, timeout=15_000)
            for server, span in zip(servers, SPANS, strict=True):
                row = section.locator(f'tr[data-peer="{server.peer_id}"]')
                expect(row.locator("td.span")).to_have_text(f"{span[0]}:{span[1]}")
                expect(row.locator("td.state")).to_have_text("online")
            cells = section.locator(".strip .cell")
            expect(cells).to_have_count(6)
            assert [cells.nth(b).get_attribute("data-servers") for b in range(6)] == ["1"] * 6
            expect(section.locator(".bottleneck")).to_contain_text("bottleneck")
            expect(section.locator(".quality")).to_contain_text("balance quality")
            expect(page.locator("#live")).to_have_class("ok")
            page.screenshot(path=folder / "web-view-3-servers.png", full_page=True)

            # a fourth server joins, holding every block: it appears, and every block has two servers, no reload
            polls = int(page.locator("body").get_attribute("data-polls"))
            joined = serve(start_server, model6, (0, 6), servers[0].endpoint)
            expect(section.locator(f'tr[data-peer="{joined.peer_id}"] td.span')).to_have_text("0:6",
                                                                                              timeout=15_000)
            expect(rows).to_have_count(4)
            expect(section.locator('.strip .cell[data-servers="2"]')).to_have_count(6, timeout=10_000)
            assert int(page.locator("body").get_attribute("data-polls")) > polls
            assert navigations == [web.url] and outside == []  # one load, nothing fetched from elsewhere
            shot = folder / "web-view.png"
            page.screenshot(path=shot, full_page=True)
            print(f"web view screenshot: {shot}")
            # the status server goes away: the page says so, and keeps the last view
            web.stop()
            expect(page.locator("#live")).to_have_class("stale", timeout=10_000)
            expect(rows).to_have_count(4)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000


HOSTILE = '<img src=x onerror="document.title=\'pwned\'">'


def signed(identity: Identity, start: int, end: int, throughput: float, **changes) -> ServerRecord:
    record = ServerRecord(identity.peer_id, HOSTILE, start, end, 10, 64, (f"tcp://10.0.0.{start + 1}:31337",),
                          throughput=throughput, version="<b>0.1</b>", cache_tokens_free=1024,
                          cache_tokens_total=4096, **changes)
    return sign_record(record, identity)


@pytest.mark.browser
def test_page_draws_a_snapshot_with_a_gap_a_suspect_and_a_move_as_text_never_html(tmp_path):
    """A snapshot made of records (a model whose name is markup, a gap, a suspected server, a move), drawn by the
    page: every value shows as the text it is, nothing of it runs or loads."""
    from playwright.sync_api import expect, sync_playwright

    a, b, c = Identity(), Identity(), Identity()
    moves = MoveLog()
    now = time.time()
    heard = {a.peer_id: Heard(0.2, 10.0, 3, False), b.peer_id: Heard(0.4, 10.0, 3, False),
             c.peer_id: Heard(9.0, 10.0, 3, True)}
    before = [signed(a, 0, 4, 500.0), signed(b, 2, 6, 300.0), signed(c, 8, 10, 200.0)]
    build_snapshot(before, heard.get, 5.0, now - 1, moves)
    after = [signed(a, 0, 4, 500.0), signed(b, 4, 7, 300.0, queue=3, quant="nf4"), signed(c, 8, 10, 200.0)]
    payload = snapshot_json(build_snapshot(after, heard.get, 5.0, now, moves), poll=0.5)
    with WebServer(lambda: payload, WebConfig(port=0)) as web, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            page = browser.new_page()
            outside: list[str] = []
            page.on("request", lambda r: None if r.url.startswith(web.url) else outside.append(r.url))
            page.goto(web.url)
            section = page.locator("section.model")
            expect(section.locator("h2")).to_have_text(HOSTILE)
            expect(section.locator("tr[data-peer]")).to_have_count(3)
            expect(section.locator(f'tr[data-peer="{b.peer_id}"] td.span')).to_have_text("4:7")
            expect(section.locator(f'tr[data-peer="{b.peer_id}"] td.dtype')).to_have_text("float32+nf4")
            expect(section.locator(f'tr[data-peer="{b.peer_id}"] td.queue')).to_have_text("3")
            expect(section.locator(f'tr[data-peer="{c.peer_id}"] td.state')).to_have_text("suspected")
            expect(section.locator(f'tr[data-peer="{a.peer_id}"] td.version')).to_have_text("<b>0.1</b>")
            cells = section.locator(".strip .cell")
            expect(cells).to_have_count(10)
            # the suspected server is left out of the figures: blocks 7:10 have none, 4:7 are the weakest held
            assert [cells.nth(i).get_attribute("data-servers") for i in range(10)] == list("1111111000")
            expect(section.locator(".strip .cell.none")).to_have_count(3)
            expect(section.locator(".facts")).to_contain_text("no server for blocks 7:10")
            expect(section.locator(".facts")).to_contain_text("1 suspected server not counted")
            expect(section.locator(".moves li")).to_have_text(f"{b.peer_id[:8]} 2:6 → 4:7  now")
            assert page.title() == "swarm status" and page.locator("main img, td b, h2 img").count() == 0
            assert outside == []
        finally:
            browser.close()

"""Private swarms (issue 12, part 2): CurveZMQ on every connection, admission by the swarm key or an allow-list.

Servers and clients here are real: ZeroMQ sockets on 127.0.0.1 with CURVE, pyzmq's authenticator, real key files.
What a stranger sees is checked on the bytes themselves, through a recording TCP proxy between a client and a server.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from swarm.cli.app import run
from swarm.core.client.config import ClientConfig
from swarm.transport.errors import AccessDenied, ConfigError
from swarm.transport.keys import SwarmKey, allowed_keys
from swarm.transport.mdns import MdnsAnnouncer, MdnsBrowser, MdnsSettings
from swarm.transport.messages import Forward
from swarm.transport.rpc import CurveClient, RpcClient, RpcClientConfig

LOOPBACK = MdnsSettings(enabled=True, interfaces=("127.0.0.1",))


@pytest.fixture
def swarm_key(tmp_path) -> tuple[SwarmKey, str]:
    key = SwarmKey.generate()
    path = tmp_path / "swarm.key"
    key.write(path)
    return key, str(path)


def client_with(key: SwarmKey | None, endpoint: str, timeout: float = 5.0) -> RpcClient:
    return RpcClient(endpoint, RpcClientConfig(timeout=timeout, curve=None if key is None else CurveClient.of(key)))


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --- keys ----------------------------------------------------------------------------------------------------------


def test_keygen_writes_owner_only_keys_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "keys" / "swarm.key"
    assert run(["keygen", "--out", str(out)]) == 0
    key = SwarmKey.load(out)
    assert key.can_serve and out.stat().st_mode & 0o777 == 0o600
    assert capsys.readouterr().out.strip() == key.public.decode()
    assert run(["keygen", "--out", str(out)]) == 1  # never over an existing key
    assert SwarmKey.load(out) == key
    member = tmp_path / "alice.key"
    assert run(["keygen", "--member-of", str(out), "--out", str(member)]) == 0
    alice = SwarmKey.load(member)
    assert not alice.can_serve and alice.swarm == key.swarm and alice.public != key.public
    assert allowed_keys(tmp_path) == {alice.public}  # alice.key and alice.key.pub: the same public key
    assert run(["keygen", "--member-of", str(member), "--out", str(tmp_path / "bob.key")]) == 1  # not from a member


@pytest.mark.parametrize("text, match", [
    ("not a key\n", "is not a swarm key"),
    ("swarm-key-v1\npublic = short\n", "not a 40-character z85 key"),
    ("\x00\xff" * 10, "not text"),
])
def test_a_bad_key_file_is_a_clear_error(tmp_path, text, match):
    path = tmp_path / "bad.key"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError, match=match):
        SwarmKey.load(path)


def test_a_key_whose_halves_do_not_match_is_refused(tmp_path):
    one, two = SwarmKey.generate(), SwarmKey.generate()
    SwarmKey(one.public, two.secret, one.swarm).write(tmp_path / "mixed.key")
    with pytest.raises(ConfigError, match="not that of its secret key"):
        SwarmKey.load(tmp_path / "mixed.key")


def test_a_member_key_cannot_serve_and_allowed_keys_need_a_swarm_key(tiny_llama, start_server, swarm_key, tmp_path):
    key, _ = swarm_key
    key.member().write(tmp_path / "member.key")
    with pytest.raises(ConfigError, match="member key"):
        start_server(tiny_llama, (0, 3), swarm_key=str(tmp_path / "member.key"))
    with pytest.raises(ConfigError, match="needs --swarm-key"):
        start_server(tiny_llama, (0, 3), allowed_keys=str(tmp_path))


# --- a private swarm -----------------------------------------------------------------------------------------------


def test_a_private_swarm_generates_exact_tokens_and_keeps_strangers_out(tiny_llama, tiny_llama_ref, start_server,
                                                                        swarm_key):
    """Two servers that find each other by gossip over CURVE; a client with the key generates the tokens of plain
    transformers (also with relayed steps: server to server over CURVE); a client without it, or with another
    swarm's key, is refused at once with an error that says why."""
    from swarm import AutoDistributedModelForCausalLM

    key, path = swarm_key
    first = start_server(tiny_llama, (0, 3), swarm_key=path)
    second = start_server(tiny_llama, (3, 6), swarm_key=path, initial_peers=[first.endpoint])
    assert wait_until(lambda: first.discovery.membership.get(second.peer_id) is not None)
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    expected = tiny_llama_ref.generate(ids, max_new_tokens=6, do_sample=False).tolist()
    for relay in (False, True):
        config = ClientConfig(connect_timeout=10, swarm_key=key, relay=relay)
        with AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama), initial_peers=[first.endpoint],
                                                             config=config) as model:
            assert model.generate(ids, max_new_tokens=6, do_sample=False).tolist() == expected
    for stranger, why in ((None, "belongs to a private swarm"), (SwarmKey.generate(), "another private swarm")):
        started = time.monotonic()
        with pytest.raises(AccessDenied, match=why):
            AutoDistributedModelForCausalLM.from_pretrained(
                str(tiny_llama), initial_peers=[first.endpoint],
                config=ClientConfig(connect_timeout=3, swarm_key=stranger))
        assert time.monotonic() - started < 10
        with client_with(stranger, first.endpoint) as client, pytest.raises(AccessDenied, match=why):
            client.call("gossip", {"records": []})
    with client_with(key, first.endpoint) as client:  # the servers served on, unharmed
        assert client.call("info", {}).fields["peer_id"] == first.peer_id


def test_an_open_client_cannot_reach_a_private_server_nor_a_private_client_an_open_one(tiny_llama, start_server,
                                                                                       swarm_key):
    key, path = swarm_key
    private = start_server(tiny_llama, (0, 3), swarm_key=path)
    public = start_server(tiny_llama, (3, 6))
    with client_with(None, private.endpoint) as client, pytest.raises(AccessDenied, match="--swarm-key"):
        client.call("info", {})
    with client_with(key, public.endpoint) as client, pytest.raises(AccessDenied, match="open swarm"):
        client.call("info", {})


class RecordingProxy:
    """A TCP proxy on 127.0.0.1 that forwards to `target` and keeps every byte in both directions."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.seen = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                inbound, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            outbound = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            for a, b in ((inbound, outbound), (outbound, inbound)):
                thread = threading.Thread(target=self._pipe, args=(a, b), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data = source.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            with self._lock:
                self.seen += data
            try:
                sink.sendall(data)
            except OSError:
                break
        for s in (source, sink):
            s.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for thread in self._threads:
            thread.join(2)


@pytest.fixture
def proxy() -> Iterator:
    made: list[RecordingProxy] = []

    def make(port: int) -> RecordingProxy:
        made.append(RecordingProxy(port))
        return made[-1]

    try:
        yield make
    finally:
        for p in made:
            p.close()


def test_what_travels_in_a_private_swarm_cannot_be_read(tiny_llama, start_server, swarm_key, proxy):
    """The same forward through a recording proxy: in an open swarm the hidden states' bytes, the request's type and
    the server's peer id are on the wire (so the check below can fail); in a private swarm none of them is."""
    key, path = swarm_key
    hidden = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(1))
    secret = hidden.numpy().tobytes()
    for private in (False, True):
        server = start_server(tiny_llama, (0, 3), swarm_key=path if private else None)
        tap = proxy(int(server.endpoint.rsplit(":", 1)[1]))
        with client_with(key if private else None, f"tcp://127.0.0.1:{tap.port}") as client:
            reply = client.call(*Forward(hidden).to_wire())
            info = client.call("info", {})
        assert reply.tensors[0].shape == hidden.shape and info.fields["peer_id"] == server.peer_id
        seen = bytes(tap.seen)
        assert len(seen) > len(secret)
        found = [secret[:64] in seen, b"forward" in seen, server.peer_id.encode() in seen,
                 reply.tensors[0].numpy().tobytes()[:64] in seen]
        assert found == ([False] * 4 if private else [True] * 4), (private, found)
        server.stop()


def test_allowed_keys_admit_members_and_a_removed_key_is_refused_at_its_next_request(tiny_llama, start_server,
                                                                                     swarm_key, tmp_path):
    key, path = swarm_key
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    alice = key.member()
    pub = alice.write(tmp_path / "alice.key")
    server = start_server(tiny_llama, (0, 3), swarm_key=path, allowed_keys=str(allowed))
    with client_with(alice, server.endpoint) as client, pytest.raises(AccessDenied, match="does not admit our key"):
        client.call("info", {})
    shutil.copy(pub, allowed / "alice.key.pub")
    with client_with(alice, server.endpoint, timeout=2.0) as client:

        def admitted() -> bool:
            try:
                return client.call("info", {}).fields["peer_id"] == server.peer_id
            except AccessDenied:
                return False

        assert wait_until(admitted)  # the directory is read again within about a second
        (allowed / "alice.key.pub").unlink()
        # the live connection passed its handshake already: its next requests are refused all the same
        assert wait_until(lambda: not admitted())
        with pytest.raises(AccessDenied, match="any more"):
            client.call("info", {})
    with client_with(key, server.endpoint) as client:  # the swarm key is always admitted
        assert client.call("info", {}).fields["peer_id"] == server.peer_id


def test_a_private_swarms_mdns_announcement_carries_no_id_and_no_model(swarm_key):
    """Members find the server on the LAN by the swarm's tag; its announcement holds a random name, the protocol and
    the tag, nothing else; browsers of the open swarm or of another private swarm do not see it at all."""
    from zeroconf import IPVersion, Zeroconf

    from swarm.transport.mdns import SERVICE_TYPE

    key, _ = swarm_key
    peer_id = secrets.token_hex(32)
    member, open_browser = MdnsBrowser(LOOPBACK, tag=key.mdns_tag), MdnsBrowser(LOOPBACK)
    other = MdnsBrowser(LOOPBACK, tag=SwarmKey.generate().mdns_tag)
    announcer = MdnsAnnouncer(peer_id, 41234, "secret-model", LOOPBACK, tag=key.mdns_tag)
    zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    try:
        for browser in (member, open_browser, other):
            browser.start()
        announcer.start()
        assert member.wait_for(lambda peers: any("tcp://127.0.0.1:41234" in p.endpoints for p in peers), 8.0)
        info = zc.get_service_info(SERVICE_TYPE, f"{announcer.peer_id}.{SERVICE_TYPE}", timeout=3000)
        assert info is not None
        assert set(info.properties) == {b"id", b"proto", b"swarm"}
        text = b" ".join([info.name.encode(), *info.properties.values()])
        assert peer_id.encode() not in text and peer_id[:12].encode() not in text and b"secret-model" not in text
        time.sleep(1.0)  # what the others could have seen by now
        assert not open_browser.peers() and not other.peers()
    finally:
        announcer.close()
        for browser in (member, open_browser, other):
            browser.close()
        zc.close()


def test_swarm_status_with_and_without_the_key(tiny_llama, start_server, swarm_key, capsys):
    key, path = swarm_key
    server = start_server(tiny_llama, (0, 3), swarm_key=path)
    assert run(["status", "--initial-peers", server.endpoint, "--no-mdns", "--wait", "1", "--json",
                "--swarm-key", path]) == 0
    assert server.peer_id in capsys.readouterr().out
    assert run(["status", "--initial-peers", server.endpoint, "--no-mdns", "--wait", "1"]) == 1
    assert "found no server" in (err := capsys.readouterr().err) and "--swarm-key" in err


@pytest.mark.slow
def test_serve_and_chat_in_a_private_swarm_from_the_command_line(serve_process, tmp_path):
    """`swarm keygen`, `swarm serve --swarm-key --allowed-keys`, then `swarm chat --prompt` with a member key answers
    what plain transformers answers, and without a key says it is a private swarm (exit code 1)."""
    import subprocess
    import sys

    from conftest import make_tokenized_model, reference_answer, swarm_env

    model = make_tokenized_model(tmp_path / "llama", layers=4, seed=5)
    key_path, alice_path, allowed = tmp_path / "swarm.key", tmp_path / "alice.key", tmp_path / "allowed"
    allowed.mkdir()
    assert run(["keygen", "--out", str(key_path)]) == 0
    assert run(["keygen", "--member-of", str(key_path), "--out", str(alice_path)]) == 0
    shutil.copy(tmp_path / "alice.key.pub", allowed)
    server = serve_process(str(model), "--blocks", "0:4", "--host", "127.0.0.1", "--swarm-key", str(key_path),
                           "--allowed-keys", str(allowed))
    env = swarm_env(tmp_path)

    def chat(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "swarm", "chat", str(model), "--initial-peers", server.endpoint,
                               "--prompt", "Hello, swarm!", "--temperature", "0", "--max-new-tokens", "8", *extra],
                              capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)

    result = chat("--swarm-key", str(alice_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference_answer(model, "Hello, swarm!", 8) + "\n"
    refused = chat()
    assert refused.returncode == 1 and "private swarm" in refused.stderr and "--swarm-key" in refused.stderr

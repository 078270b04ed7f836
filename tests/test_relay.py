"""Server-to-server relay: exact tokens, each hop sent once, the last server answering the client directly,
recovery when a relayed hop dies, and the protocol of waiting, pushed and cancelled steps."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import torch
from conftest import load_reference, make_tiny_model
from test_recovery import FAST, PROMPT, start_all

from swarm import AutoDistributedModelForCausalLM
from swarm.core.client.config import ClientConfig
from swarm.core.client.session import RELAY_ATTEMPTS
from swarm.transport.errors import BadRequest, RelayStopped, UnknownSession
from swarm.transport.rpc import RpcClient


@pytest.fixture
def model_dir(tmp_path):
    return make_tiny_model(tmp_path / f"relay-{tmp_path.name[-10:]}", layers=6, seed=41)


def connect(model_dir, first, expected, **config):
    config = ClientConfig(gossip_period=0.2, wait_for_blocks=30.0, relay=True, **config)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(model_dir), initial_peers=[first.endpoint],
                                                            config=config)
    assert model.blocks.discovery.wait(lambda _: len(model.blocks.servers()) == expected, 15)
    # a server relays only to servers it knows: wait until each knows the others (it learns them by gossip, maybe
    # after this client did)
    endpoints = {r.addresses[0] for r in model.blocks.servers()}
    deadline = time.monotonic() + 15
    for endpoint in endpoints:
        with RpcClient(endpoint) as client:
            while time.monotonic() < deadline:
                known = {a for r in client.call("gossip", {"records": []}, timeout=5).fields["records"]
                         for a in r["addresses"]}
                if endpoints <= known:
                    break
                time.sleep(0.05)
    return model


def count_calls(model):
    calls = []
    real = model.blocks.call

    def call(hop, msg_type, fields, tensors, *args, **kwargs):
        calls.append((msg_type, hop.peer, fields.get("names"), "ticket" in fields, "push" in fields))
        return real(hop, msg_type, fields, tensors, *args, **kwargs)

    model.blocks.call = call
    return calls


@pytest.mark.slow
def test_relayed_generation_is_exact_and_sends_each_hop_its_input_once(model_dir, fork_serve):
    ref = load_reference(model_dir)
    first = fork_serve(str(model_dir), "--blocks", "0:2", *FAST)
    others = start_all(fork_serve, model_dir, [(2, 4), (4, 6)], [first.endpoint])
    # the servers must know each other to relay: wait until the first knows all three
    model = connect(model_dir, first, 3)
    calls = count_calls(model)
    with model, model.inference_session(max_length=32) as session:
        expected = ref.generate(PROMPT, max_new_tokens=8, do_sample=False)
        got = model.generate(PROMPT, max_new_tokens=8, do_sample=False)
        assert got.tolist() == expected.tolist()
        assert not session._no_relay and session.recoveries == 0
    steps = [c for c in calls if c[0] == "step"]
    assert len(steps) == 8 * 3  # one request per hop and step, no step sent twice
    route = [first.endpoint, *(o.endpoint for o in others)]
    for i in range(8):
        # the three requests of a step go out at once (in any order); sort them along the route
        (_, p0, names0, ticket0, push0), *waiting = sorted(steps[3 * i:3 * i + 3], key=lambda c: route.index(c[1]))
        assert p0 == route[0] and "hidden" in names0 and not ticket0 and push0  # the client sends hidden once
        # the others get no hidden states from the client: their input comes from the server before them
        assert [c[1] for c in waiting] == route[1:]
        assert all("hidden" not in c[2] and c[3] for c in waiting)
        assert [c[4] for c in waiting] == [True, False]  # the last server pushes nowhere: it answers the client


@pytest.mark.slow
@pytest.mark.parametrize("block", [2, 4], ids=["middle", "last"])
def test_relay_recovers_a_dead_downstream_server(model_dir, fork_serve, block):
    ref = load_reference(model_dir)
    first = fork_serve(str(model_dir), "--blocks", "0:2", *FAST)
    spares = start_all(fork_serve, model_dir, [(2, 4), (2, 4), (4, 6), (4, 6)], [first.endpoint])
    model = connect(model_dir, first, 5)
    expected = ref.generate(PROMPT, max_new_tokens=10, do_sample=False)
    with model, model.inference_session(max_length=32) as session:
        # kill a server of the route right before step 4, while its relayed request waits for its input
        state = {"steps": 0}
        real_step = session.step

        def step(hidden, mask=None, *args):
            if state["steps"] == 4:
                victim = next(h for h in session.route if h.start == block)
                next(s for s in spares if s.endpoint == victim.peer).stop(signal.SIGKILL)
                time.sleep(0.05)
            state["steps"] += 1
            return real_step(hidden, mask, *args)

        session.step = step
        got = model.generate(PROMPT, max_new_tokens=10, do_sample=False)
        assert session.recoveries == 1 and not session._no_relay  # the replacement relays too
    assert got.tolist() == expected.tolist()


def test_relay_refused_by_strangers_falls_back_to_hop_by_hop(tiny_llama, tiny_llama_ref, start_server):
    # in-process servers started without peers do not know each other, so they refuse to relay
    servers = [start_server(tiny_llama, span) for span in ((0, 3), (3, 6))]
    config = ClientConfig(relay=True)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama), initial_peers=[s.endpoint for s in
                                                                                            servers], config=config)
    with model:
        expected = tiny_llama_ref.generate(PROMPT, max_new_tokens=6, do_sample=False)
        assert model.generate(PROMPT, max_new_tokens=6, do_sample=False).tolist() == expected.tolist()
        # a refusal (say, from a server whose view just dropped a dead next hop) costs one step its relay; only
        # RELAY_ATTEMPTS refused steps in a row make the session give relaying up
        for server in servers:  # whatever gossip taught them since: they know no one to relay to
            server.handler.relay_allowed = lambda peer: False
        with model.inference_session(max_length=16) as session:
            calls = count_calls(model)
            hidden = torch.randn(1, 1, 64)

            def attempts():  # relayed steps tried: requests that ask a server to push on
                return len([c for c in calls if c[0] == "step" and c[4]])

            for n in range(1, RELAY_ATTEMPTS + 1):
                assert not session._no_relay
                session.step(hidden)
                assert attempts() == n  # tried once, then this step went on hop by hop
            assert session._no_relay
            session.step(hidden)
            assert attempts() == RELAY_ATTEMPTS and session.position == RELAY_ATTEMPTS + 1




# --- the protocol of relayed steps, on one in-process server --------------------------------------------------


@pytest.fixture
def relaying(tiny_llama, start_server):
    server = start_server(tiny_llama, (0, 3))
    with RpcClient(server.endpoint) as client:
        yield server, client


def open_session(client, max_length=16):
    return client.call("open", {"batch_size": 1, "max_length": max_length}).get("session")


def step(client, session, hidden):
    return client.call("step", {"session": session, "names": ["hidden"]}, [hidden]).tensors[0]


def wait_in_background(endpoint, fields):
    result = {}

    def run():
        with RpcClient(endpoint) as other:
            try:
                result["reply"] = other.call("step", fields, [], timeout=10)
            except Exception as e:
                result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


@pytest.mark.parametrize("push_first", [True, False], ids=["push-first", "request-first"])
def test_a_waiting_step_runs_on_its_pushed_input(relaying, push_first):
    server, client = relaying
    hidden = torch.randn(1, 4, 64)
    plain, relayed = open_session(client), open_session(client)
    expected = step(client, plain, hidden)
    fields = {"session": relayed, "ticket": "t.1", "wait": 5.0, "names": []}
    if push_first:
        client.call("push", {"session": relayed, "ticket": "t.1", "names": ["hidden"]}, [hidden])
        thread, result = wait_in_background(server.endpoint, fields)
    else:
        thread, result = wait_in_background(server.endpoint, fields)
        deadline = time.monotonic() + 5
        while len(server.handler.mailbox) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        client.call("push", {"session": relayed, "ticket": "t.1", "names": ["hidden"]}, [hidden])
    thread.join(10)
    assert "error" not in result
    assert torch.equal(result["reply"].tensors[0], expected) and result["reply"].get("position") == 4
    assert len(server.handler.mailbox) == 0


def test_a_cancelled_or_starved_step_leaves_the_session_as_it_was(relaying):
    server, client = relaying
    hidden = torch.randn(1, 4, 64)
    session = open_session(client)
    thread, result = wait_in_background(server.endpoint, {"session": session, "ticket": "a", "names": []})
    deadline = time.monotonic() + 5
    while len(server.handler.mailbox) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.call("cancel", {"session": session, "ticket": "a"}).get("cancelled") is True
    thread.join(10)
    assert isinstance(result["error"], RelayStopped) and "cancelled" in str(result["error"])
    assert client.call("cancel", {"session": session, "ticket": "a"}).get("cancelled") is False
    # no input within `wait`: the server answers relay_timeout itself
    with pytest.raises(RelayStopped, match="never came"):
        client.call("step", {"session": session, "ticket": "b", "wait": 0.3, "names": []}, [], timeout=5)
    # nothing of either ran: the first real step starts at position 0
    assert client.call("step", {"session": session, "names": ["hidden"]}, [hidden]).get("position") == 4
    assert len(server.handler.mailbox) == 0


@pytest.mark.parametrize("kind,fields,tensors,error,match", [
    ("push", {"session": "nope", "ticket": "t", "names": ["hidden"]}, True, UnknownSession, "unknown session"),
    ("push", {"ticket": "t", "names": ["hidden"]}, True, BadRequest, "session"),
    ("push", {"session": "S", "ticket": 5, "names": ["hidden"]}, True, BadRequest, "ticket"),
    ("push", {"session": "S", "ticket": "t", "names": []}, False, BadRequest, "expected tensors"),
    ("step", {"session": "nope", "ticket": "t", "names": []}, False, UnknownSession, "unknown session"),
    ("step", {"session": "S", "ticket": "", "names": []}, False, BadRequest, "ticket"),
    ("step", {"session": "S", "ticket": "t", "wait": -1, "names": []}, False, BadRequest, "wait"),
    ("step", {"session": "S", "ticket": "t", "wait": True, "names": []}, False, BadRequest, "wait"),
    ("step", {"session": "S", "names": ["hidden"], "push": "tcp://127.0.0.1:1"}, True, BadRequest, "relay push"),
    ("step", {"session": "S", "names": ["hidden"], "push": {"peer": "tcp://127.0.0.1:1", "session": "x",
                                                            "ticket": "t"}}, True, BadRequest, "will not relay"),
    ("cancel", {"session": "S"}, False, BadRequest, "ticket"),
])
def test_bad_relay_messages_are_refused_and_change_nothing(relaying, kind, fields, tensors, error, match):
    server, client = relaying
    session = open_session(client)
    fields = {k: session if v == "S" else v for k, v in fields.items()}
    with pytest.raises(error, match=match):
        client.call(kind, fields, [torch.randn(1, 2, 64)] if tensors else [], timeout=5)
    assert len(server.handler.mailbox) == 0
    assert client.call("step", {"session": session, "names": ["hidden"]}, [torch.randn(1, 2, 64)]).get("position") == 2


def test_a_second_push_or_wait_with_one_ticket_is_refused(relaying):
    server, client = relaying
    session = open_session(client)
    push = {"session": session, "ticket": "dup", "names": ["hidden"]}
    client.call("push", push, [torch.randn(1, 2, 64)])
    with pytest.raises(BadRequest, match="already pushed"):
        client.call("push", push, [torch.randn(1, 2, 64)])
    client.call("close", {"session": session})
    assert len(server.handler.mailbox) == 0  # closing the session drops what waited for it

"""Server identities (issue 12, part 1, as far as it goes): a key pair on disk whose public key is the peer id, records
signed by their server and checked on receipt, so that a forger can neither change a server's record nor shut it out
with a huge sequence number, and junk records cannot keep signed servers out of a full table."""

from __future__ import annotations

import os
import time
from dataclasses import replace

import pytest

from swarm.transport.errors import ConfigError, ProtocolError
from swarm.transport.gossip import GossipConfig, Membership
from swarm.transport.keys import Identity, verify
from swarm.transport.records import ServerRecord, record_from_wire, record_to_wire, sign_record
from swarm.transport.rpc import RpcClient


def record(identity: Identity | None = None, peer_id: str = "ab" * 16, **changes) -> ServerRecord:
    base = ServerRecord(identity.peer_id if identity else peer_id, "m", 0, 2, 4, 8, ("tcp://127.0.0.1:5000",),
                        throughput=10.0, seq=5)
    base = replace(base, **changes)
    return sign_record(base, identity) if identity else base


def test_an_identity_is_kept_on_disk_and_its_key_is_the_peer_id(tmp_path):
    path = tmp_path / "keys" / "server.key"
    made = Identity.load_or_create(path)
    assert len(made.peer_id) == 64 and os.stat(path).st_mode & 0o777 == 0o600
    again = Identity.load_or_create(path)
    assert again.peer_id == made.peer_id
    assert verify(made.peer_id, b"data", again.sign(b"data")) and not verify(made.peer_id, b"other", made.sign(b"data"))
    assert Identity().peer_id != made.peer_id
    path.write_text("not a key\n")
    with pytest.raises(ConfigError, match="cannot read the identity"):
        Identity.load_or_create(path)


def test_a_record_is_believed_only_with_its_owners_signature_over_every_field():
    owner, forger = Identity(), Identity()
    signed = record(owner)
    assert record_from_wire(record_to_wire(signed)) == signed and signed.signed
    for field, value in (("addresses", ["tcp://10.0.0.9:1"]), ("start", 1), ("throughput", 1e17), ("ttl", 86400.0),
                         ("seq", 1 << 40), ("state", "offline"), ("adapters", ["evil"])):
        altered = {**record_to_wire(signed), field: value}
        with pytest.raises(ProtocolError, match="does not match"):
            record_from_wire(altered)
    with pytest.raises(ProtocolError, match="not signed"):  # the owner's id, no signature
        record_from_wire({**record_to_wire(signed), "signature": ""})
    forged = sign_record(replace(record(forger), peer_id=forger.peer_id), forger)
    with pytest.raises(ProtocolError, match="does not match"):  # another key's signature under the owner's id
        record_from_wire({**record_to_wire(forged), "peer_id": owner.peer_id})
    with pytest.raises(ValueError):
        sign_record(record(peer_id=owner.peer_id), forger)
    legacy = record()  # an older server's random id: unsigned, still read
    assert record_from_wire(record_to_wire(legacy)) == legacy and not legacy.signed


def test_a_forger_cannot_shut_out_a_live_server(tiny_llama, start_server):
    """One gossip message that reuses a live server's peer id with a huge sequence number and ttl, or moves it, used
    to hide that server for days; now it is dropped and the server's own record stays."""
    first = start_server(tiny_llama, (0, 3))
    second = start_server(tiny_llama, (3, 6), initial_peers=[first.endpoint],
                          discovery=first.config.discovery)
    deadline = time.monotonic() + 20
    while second.discovery.membership.get(first.peer_id) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    real = second.discovery.membership.get(first.peer_id)
    assert real is not None and real.signed
    attacks = [
        {**record_to_wire(real), "seq": 1 << 60, "ttl": 86400.0, "state": "offline"},  # its signature, other fields
        {**record_to_wire(real), "seq": 1 << 60, "signature": ""},  # no signature
        record_to_wire(replace(real, seq=1 << 60, addresses=("tcp://127.0.0.1:9",), signature="")),
    ]
    with RpcClient(second.endpoint) as attacker:
        for forged in attacks:
            attacker.call("gossip", {"records": [forged]}, timeout=5)
    held = second.discovery.membership.get(first.peer_id)
    assert held is not None and held.seq < 1 << 60 and held.addresses == real.addresses and held.state == "online"


def test_a_server_keeps_its_peer_id_across_restarts(tiny_llama, start_server, tmp_path):
    path = tmp_path / "server.key"
    before = start_server(tiny_llama, (0, 3), identity=str(path))
    old = before.record()
    before.stop()
    after = start_server(tiny_llama, (0, 3), identity=str(path))
    new = after.record()
    assert after.peer_id == before.peer_id == Identity.load_or_create(path).peer_id
    assert new.seq > old.seq  # its sequence numbers start from the clock: peers that knew it take the new record
    table = Membership()
    table.merge([old])
    assert table.merge([new]) == 1 and table.get(new.peer_id).addresses == new.addresses


def test_junk_cannot_keep_signed_servers_out_of_a_full_table():
    table = Membership(GossipConfig(max_records=8))
    junk = [record(peer_id=f"{i:032x}") for i in range(8)]
    assert table.merge(junk) == 8
    assert table.merge([record(peer_id=f"{99:032x}")]) == 0  # unsigned: the table is full
    signed = [record(Identity()) for _ in range(3)]
    assert table.merge(signed) == 3
    assert len(table) == 8 and all(table.get(r.peer_id) is not None for r in signed)


def test_a_signed_record_naming_another_servers_address_is_not_routed_to(tiny_llama, tiny_llama_ref, start_server):
    """A record signed by its own (attacker's) key can still name any address: the client routes to a signed record
    only once that address answered with the record's peer id, so a record claiming all blocks at an honest server's
    address (which used to end generations with bad_request) is left out."""
    import torch

    from swarm import AutoDistributedModelForCausalLM
    from swarm.core.client.config import ClientConfig

    first = start_server(tiny_llama, (0, 3))
    second = start_server(tiny_llama, (3, 6), initial_peers=[first.endpoint])
    attacker = Identity()
    lie = sign_record(ServerRecord(attacker.peer_id, first.record().model, 0, 6, 6, 64, (first.endpoint,),
                                   throughput=1e12, cache_tokens_free=1 << 30, cache_tokens_total=1 << 30,
                                   seq=1, ttl=600.0), attacker)
    with RpcClient(first.endpoint) as client:
        client.call("gossip", {"records": [record_to_wire(lie)]}, timeout=5)
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    expected = tiny_llama_ref.generate(ids, max_new_tokens=6, do_sample=False)
    with AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama), initial_peers=[first.endpoint],
                                                         config=ClientConfig(connect_timeout=10)) as model:
        peers = model.blocks
        assert peers.discovery.wait(lambda _: peers.discovery.membership.get(attacker.peer_id) is not None, 15)
        assert peers.discovery.wait(lambda _: first.endpoint in peers._owners, 15)  # the address was asked
        assert attacker.peer_id not in {r.peer_id for r in peers.servers()}
        assert {r.peer_id for r in peers.servers()} == {first.peer_id, second.peer_id}
        assert model.generate(ids, max_new_tokens=6, do_sample=False).tolist() == expected.tolist()


def test_a_server_claiming_a_huge_throughput_that_never_answers_steps_is_not_routed_to(tiny_llama, tiny_llama_ref,
                                                                                      start_server):
    """A record claiming 1e17 tokens/s used to pull every client's route to its server, which then never answered
    steps (a stall of the request timeout each). A client now times one step before it routes to a server and bounds
    the announced throughput by it: a server that does not answer is left out, and the claim is cut to what was
    measured."""
    import torch

    from swarm import AutoDistributedModelForCausalLM
    from swarm.core.client.config import ClientConfig
    from swarm.core.client.peers import PROBE_SLACK

    first = start_server(tiny_llama, (0, 3))
    second = start_server(tiny_llama, (3, 6), initial_peers=[first.endpoint])
    liar = start_server(tiny_llama, (0, 6), initial_peers=[first.endpoint])
    liar.handler._step = lambda request, message: None  # takes steps and never answers them
    liar._record = replace(liar.record(), throughput=1e17)  # its next record (newer, signed) claims 1e17 tokens/s
    assert liar.record().throughput == 1e17
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    expected = tiny_llama_ref.generate(ids, max_new_tokens=6, do_sample=False)
    config = ClientConfig(connect_timeout=1.0, request_timeout=60.0)
    with AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama), initial_peers=[first.endpoint],
                                                         config=config) as model:
        peers = model.blocks
        assert peers.discovery.wait(lambda _: (r := peers.discovery.membership.get(liar.peer_id)) is not None
                                    and r.throughput == 1e17, 15)
        assert peers.discovery.wait(lambda _: liar.endpoint in peers._owners and first.endpoint in peers._owners
                                    and second.endpoint in peers._owners, 15)
        assert liar.peer_id not in {r.peer_id for r in peers.servers()}
        started = time.monotonic()
        assert model.generate(ids, max_new_tokens=6, do_sample=False).tolist() == expected.tolist()
        assert time.monotonic() - started < 20  # no request-timeout stall
        # an honest server's claim stays within what its measured step allows
        span = next(s for s in peers.spans() if s.peer == first.endpoint)
        assert 0 < span.throughput <= PROBE_SLACK / (peers._step_times[first.endpoint] * 3)

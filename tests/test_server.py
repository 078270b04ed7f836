"""Server runtime: clients that vanish or misbehave never stall the others."""

from __future__ import annotations

import time

import torch
from conftest import load_reference

from swarm.transport.codec import encode
from swarm.transport.rpc import RpcClient


def test_vanished_clients_do_not_stall_others(tiny_llama, start_server):
    server = start_server(tiny_llama, (0, 6))
    ref = load_reference(tiny_llama)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        states = ref(ids, output_hidden_states=True).hidden_states
    hidden = states[0]
    # 20 clients send work and disappear before their replies come
    for _ in range(20):
        ghost = RpcClient(server.endpoint)
        ghost.send_raw(encode("forward", 1, {"names": ["hidden"]}, [hidden.repeat(8, 1, 1)]))
        ghost.close()
    good = RpcClient(server.endpoint)
    try:
        started = time.monotonic()
        reply = good.call("forward", {"names": ["hidden"]}, [hidden], timeout=30)
        assert time.monotonic() - started < 30
        out = reply.tensors[0]
        with torch.no_grad():
            full = ref.model(ids, output_hidden_states=True)
        # hidden_states[-1] is after the final norm; apply it to ours to compare
        torch.testing.assert_close(ref.model.norm(out), full.last_hidden_state, atol=1e-5, rtol=1e-5)
        assert good.call("info").fields["sessions"] == 0
    finally:
        good.close()

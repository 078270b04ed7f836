"""Server runtime: compute order by priority, and clients that vanish or misbehave never stall the others."""

from __future__ import annotations

import threading
import time

import torch
from conftest import load_reference

from swarm.core.server.worker import PRIORITY_BACKWARD, PRIORITY_FORWARD, PRIORITY_STEP, ComputeWorker
from swarm.transport.codec import Message, encode
from swarm.transport.rpc import RpcClient


class _Recorder:
    """Stands in for a transport Request: records how the worker answered."""

    def __init__(self, name: str, log: list):
        self.message = Message(type=name, id=0)
        self.log = log

    def reply(self, fields=None, tensors=()):
        self.log.append(("reply", self.message.type))

    def fail(self, code, message):
        self.log.append(("fail", self.message.type, code))


def test_worker_runs_steps_before_forward_before_backward():
    worker = ComputeWorker().start()
    order: list[str] = []
    answers: list = []
    gate, busy = threading.Event(), threading.Event()
    try:
        worker.submit(PRIORITY_BACKWARD, _Recorder("busy", answers),
                      lambda: (busy.set(), gate.wait(10), ({}, []))[2])
        assert busy.wait(10)  # the worker is now inside the first task; the rest queue up behind it
        for priority, name in [(PRIORITY_BACKWARD, "backward"), (PRIORITY_FORWARD, "forward"),
                               (PRIORITY_STEP, "step"), (PRIORITY_FORWARD, "forward2"), (PRIORITY_STEP, "step2")]:
            worker.submit(priority, _Recorder(name, answers), lambda n=name: (order.append(n), ({}, []))[1])
        gate.set()
    finally:
        worker.stop(10)
    assert order == ["step", "step2", "forward", "forward2", "backward"]
    assert len(answers) == 6


def test_worker_survives_a_failing_task():
    worker = ComputeWorker().start()
    answers: list = []
    try:
        worker.submit(PRIORITY_FORWARD, _Recorder("bad", answers), lambda: 1 / 0)
        worker.submit(PRIORITY_FORWARD, _Recorder("good", answers), lambda: ({}, []))
    finally:
        worker.stop(10)
    assert answers == [("fail", "bad", "internal"), ("reply", "good")]


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

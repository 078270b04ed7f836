"""Devices: `--device` and `--dtype auto` choices, and the one code path that puts blocks, caches, inputs and adapter
tensors on the span's device. No GPU runs here: the CUDA choices are checked against torch's CUDA queries replaced by
a machine with two GPUs, and the placement of every tensor against the `meta` device (which holds no memory)."""

from __future__ import annotations

import pytest
import torch

from swarm.core.adapters import IA3Op, LoraPool, Task
from swarm.core.device import CPU, auto_dtype, resolve_device, to_device
from swarm.core.server.backend import BlockSpan, Work
from swarm.core.weights import ModelSource, resolve_dtype
from swarm.transport.errors import ConfigError
from swarm.transport.rpc import RpcClient

META = torch.device("meta")


@pytest.fixture
def two_gpus(monkeypatch):
    """torch's CUDA queries answer as on a machine with two GPUs that compute bfloat16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@pytest.mark.parametrize("name,expected", [("auto", "cpu"), ("cpu", "cpu"), ("CPU", "cpu")])
def test_devices_on_a_machine_without_gpu(name, expected):
    assert resolve_device(name) == torch.device(expected)


@pytest.mark.parametrize("name,message", [
    ("cuda", "torch sees no CUDA GPU"), ("cuda:0", "torch sees no CUDA GPU"), ("cuda:x", "cuda or cuda:N"),
    ("tpu", "unknown device 'tpu'"), ("", "unknown device"),
])
def test_devices_this_machine_lacks_are_refused(name, message):
    with pytest.raises(ConfigError, match=message):
        resolve_device(name)


@pytest.mark.parametrize("name,expected", [("auto", "cuda:0"), ("cuda", "cuda:0"), ("cuda:1", "cuda:1"),
                                           ("cpu", "cpu")])
def test_devices_on_a_machine_with_two_gpus(two_gpus, name, expected):
    assert resolve_device(name) == torch.device(expected)


def test_a_gpu_past_the_last_is_refused(two_gpus):
    with pytest.raises(ConfigError, match="2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("device,bf16,stored,expected", [
    ("cpu", False, None, torch.float32),
    ("cpu", False, torch.float32, torch.float32),
    ("cpu", False, torch.bfloat16, torch.bfloat16),
    ("cpu", False, torch.float16, torch.float32),  # few float16 kernels on a CPU
    ("cuda", True, None, torch.bfloat16),
    ("cuda", True, torch.float32, torch.bfloat16),
    ("cuda", True, torch.float16, torch.float16),
    ("cuda", True, torch.bfloat16, torch.bfloat16),
    ("cuda", False, torch.float32, torch.float16),  # a GPU without bfloat16 (before Ampere)
    ("cuda", False, torch.bfloat16, torch.float16),
    ("mps", False, torch.float32, torch.float16),
])
def test_dtype_auto_per_device(monkeypatch, device, bf16, stored, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert auto_dtype(torch.device(device), stored) == expected


def test_a_named_dtype_is_kept_on_every_device(two_gpus):
    for device in ("cpu", "cuda:1"):
        assert resolve_dtype("float32", None, device) == torch.float32
        assert resolve_dtype("float16", None, device) == torch.float16


def test_blocks_their_cache_and_adapter_tensors_go_to_the_span_device(tiny_llama):
    """Loaded for the meta device, every weight, buffer and cache tensor is there (none is left on the CPU), and
    what a request brings (hidden states, mask, deep prompts, adapter tensors) is moved there at the span's edge."""
    source = ModelSource(str(tiny_llama))
    span = BlockSpan.load(source, 1, 3, torch.float32, META)
    assert span.device == META
    tensors = [*span.parameters(), *span.buffers()]
    assert tensors and all(t.device == META for t in tensors)
    cache = span.new_cache(2, 16)
    assert all(kv.key.device == META and kv.value.device == META for kv in cache.layers.values())
    assert cache.valid.device == META and cache.tokens_seen.device == META
    work = Work(torch.randn(2, 3, 64), torch.ones(2, 3, dtype=torch.long), None, torch.randn(2, 1, 1, 64))
    moved = work.to(span.device)
    assert moved.hidden.device == moved.mask.device == moved.prompts.device == META
    assert work.hidden.device == CPU  # the request's own tensors are untouched
    pool = span.lora_pool(1, "self_attn.q_proj")
    assert pool.a.device == META and pool.bt.device == META
    task = Task("ia3", {(1, "mlp.down_proj"): IA3Op(torch.ones(1, 128), feedforward=True)}).to(span.device)
    assert task.op(1, "mlp.down_proj").scale.device == META


def test_pooled_lora_rows_grow_on_the_pool_device():
    pool = LoraPool(8, 4, torch.float32, META)
    start = pool.put(torch.randn(2, 8), torch.randn(4, 2))
    assert start == 0 and pool.rows == 2 and pool.a.device == META and pool.bt.device == META


def test_tensors_stay_put_when_already_there():
    t = torch.randn(3)
    assert to_device(t, CPU) is t and to_device(None, CPU) is None


def test_a_server_reports_its_device_and_serves_exactly(tiny_llama, tiny_llama_ref, start_server):
    """`--device cpu` named explicitly: the same single code path, the same tokens as transformers."""
    from swarm.core.client.model import AutoDistributedModelForCausalLM

    servers = [start_server(tiny_llama, span, device="cpu") for span in ((0, 3), (3, 6))]
    assert all(RpcClient(s.endpoint).call("info").fields["device"] == "cpu" for s in servers)
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    with AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama), initial_peers=[s.endpoint for s in servers],
                                                         mdns=False, device="cpu") as model:
        assert model.device == CPU
        got = model.generate(ids, max_new_tokens=6, do_sample=False)
    want = tiny_llama_ref.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_the_record_announces_a_gpu_signed_and_a_cpu_as_older_peers_know_it():
    from swarm.cli.status import _dtype
    from swarm.transport.keys import Identity
    from swarm.transport.records import ServerRecord, record_from_wire, record_to_wire, sign_record

    identity = Identity(bytes([7]) * 32)
    base = ServerRecord(identity.peer_id, "m", 0, 4, 8, 16, ("tcp://127.0.0.1:1",), dtype="bfloat16")
    gpu = sign_record(ServerRecord(**{**base.__dict__, "device": "cuda"}), identity)
    wire = record_to_wire(gpu)
    assert wire["device"] == "cuda"
    read = record_from_wire(wire)  # the signature covers it
    assert read.device == "cuda" and _dtype(read) == "bfloat16 cuda"
    with pytest.raises(Exception, match="signature"):
        record_from_wire({**wire, "device": "cpu"})  # altered on the way
    cpu = sign_record(base, identity)
    assert "device" not in record_to_wire(cpu) and record_from_wire(record_to_wire(cpu)).device == "cpu"
    assert _dtype(cpu) == "bfloat16"

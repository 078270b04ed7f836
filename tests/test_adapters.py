"""PEFT adapters served by the swarm, against PEFT itself on the same weights (float32): every adapter type and target
set through real servers and the client; requests of different adapters mixed in one pass; adapters loaded on first
request and dropped least-recently-used while sessions hold theirs; unknown adapters, bad adapter files and hostile
client LoRAs refused with one clear error, the server serving on afterwards.

Adapters are made in fixtures by PEFT (`get_peft_model` on the tiny checkpoint, every adapter tensor set to random
non-zero values with a fixed seed, `save_pretrained`)."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from conftest import fork_swarm, load_reference, make_tiny_model, swarm_env
from safetensors.torch import load_file, save_file

from swarm import AutoDistributedModelForCausalLM
from swarm.core.adapters import read_peft
from swarm.core.client.config import ClientConfig
from swarm.core.client.routing import MissingAdapter
from swarm.core.server import Server, ServerConfig
from swarm.core.server.adapters import AdapterConfig
from swarm.core.server.backend import BlockSpan, Work
from swarm.core.server.scheduler import PassLimits
from swarm.core.weights import ModelSource
from swarm.transport.errors import BadAdapter, BadRequest, CacheFull, ConfigError, SwarmError, UnknownAdapter
from swarm.transport.messages import (
    Backward,
    BackwardReply,
    Close,
    Forward,
    ForwardReply,
    LoraWeights,
    Open,
    OpenReply,
    Step,
    StepReply,
)
from swarm.transport.rpc import RpcClient, RpcClientConfig

SPANS = ((0, 3), (3, 6))  # tiny_llama has 6 blocks
ATOL = RTOL = 1e-4  # float32 through the swarm against float32 PEFT
REPLY_TIMEOUT = 10.0  # seconds; every raw request here waits at most this long
NEW_TOKENS = 6


# --- adapters made by PEFT ----------------------------------------------------------------------------------------


def _lora(**options: Any) -> Callable[[], peft.PeftConfig]:
    return lambda: peft.LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **options)


# name -> PEFT config; each name is also the adapter's directory name, the name the servers announce
SERVED: dict[str, Callable[[], peft.PeftConfig]] = {
    "lora-qv": _lora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "lora-all": _lora(r=4, lora_alpha=16, target_modules="all-linear"),
    "lora-mlp": _lora(r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "lora-rslora": _lora(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "o_proj", "up_proj"],
                         rank_pattern={"o_proj": 2}),
    "lora-regex": _lora(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|down_proj)"),
    "lora-exclude": _lora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          exclude_modules=r"model\.layers\.[24]\.self_attn\.v_proj"),
    "lora-pattern": _lora(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          rank_pattern={"k_proj": 2, "model.layers.4.self_attn.q_proj": 6},
                          alpha_pattern={"v_proj": 32, "o_proj": 2}),
    "lora-layers": _lora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], layers_to_transform=[1, 4]),
    "ia3-mixed": lambda: peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                        feedforward_modules=["down_proj"]),
}
HALF = "lora-half"  # held by the first server only


@dataclass
class Made:
    path: Path
    model: Any  # the PeftModel, float32, eval


def make_adapter(model_path: Path, directory: Path, config: peft.PeftConfig, seed: int,
                 safe: bool = True) -> Made:
    """A PEFT adapter on `model_path` with every adapter tensor random and non-zero, saved to `directory`."""
    model = peft.get_peft_model(load_reference(model_path), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
            elif "lora_" in name or "hada_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(directory, safe_serialization=safe)
    return Made(directory, model.eval())


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, Made]:
    root = tmp_path_factory.mktemp("adapters")
    made = {name: make_adapter(tiny_llama, root / name, config(), seed=100 + i)
            for i, (name, config) in enumerate(SERVED.items())}
    made[HALF] = make_adapter(tiny_llama, root / HALF, _lora(r=2, lora_alpha=2, target_modules=["q_proj"])(), 99)
    return made


def _ids(seed: int, batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _reference(adapters: dict[str, Made], base, name: str | None):
    return base if name is None else adapters[name].model


@torch.no_grad()
def _peft_generate(model, ids: torch.Tensor, new: int) -> list[list[int]]:
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                          do_sample=False).tolist()


def _client(path: Path, endpoints: list[str], **kwargs: Any):
    return AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=endpoints, **kwargs)


def _rpc(endpoint: str) -> RpcClient:
    return RpcClient(endpoint, RpcClientConfig(timeout=REPLY_TIMEOUT))


def _loaded(server: Server) -> list[str]:
    return [entry["name"] for entry in server.adapters.stats()["loaded"]]


# --- one pair of servers holding every adapter, shared by the tests that only read -----------------------------------


@pytest.fixture(scope="module")
def adapter_swarm(tiny_llama, adapters) -> Iterator[list[Server]]:
    """Servers of blocks 0:3 and 3:6 preloading every SERVED adapter (and the first one HALF too)."""
    served = tuple(str(adapters[name].path) for name in SERVED)
    configs = [AdapterConfig(preload=(*served, str(adapters[HALF].path))), AdapterConfig(preload=served)]
    servers: list[Server] = []
    try:
        for span, config in zip(SPANS, configs, strict=True):
            servers.append(Server(ServerConfig(str(tiny_llama), span, host="127.0.0.1", poll_ms=20,
                                               adapters=config)).start())
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def net(tiny_llama, adapter_swarm):
    model = _client(tiny_llama, [s.endpoint for s in adapter_swarm],
                    config=ClientConfig(connect_timeout=5.0, wait_for_blocks=1.0))
    try:
        yield model
    finally:
        model.close()


# --- 1. every type and target set equals PEFT through the servers ------------------------------------------------


@pytest.mark.parametrize("name", [*SERVED, None])
def test_served_adapter_equals_peft(name, adapters, net, tiny_llama_ref):
    ref = _reference(adapters, tiny_llama_ref, name)
    ids = _ids(seed=list(SERVED).index(name) if name else 99)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        if name is not None:  # the adapter really changes the model, so equality below means something
            assert (expected - tiny_llama_ref(ids).logits).abs().max() > 1e-2
        with net.use_adapter(name):
            assert net.active_adapter == name
            logits = net(ids).logits
    assert net.active_adapter is None
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)

    out = net.generate(ids[:1], max_new_tokens=NEW_TOKENS, do_sample=False, adapter=name)
    assert out.tolist() == _peft_generate(ref, ids[:1], NEW_TOKENS)


def test_active_adapter_and_session_use_it(adapters, tiny_llama, adapter_swarm):
    """`from_pretrained(adapter=...)` and `set_adapter` pick the adapter for sessions, one prompt extended twice."""
    ref = adapters["ia3-mixed"].model
    ids = _ids(seed=3, batch=1, length=5)
    with _client(tiny_llama, [s.endpoint for s in adapter_swarm], adapter="lora-rslora") as model:
        assert model.active_adapter == "lora-rslora"
        model.set_adapter("ia3-mixed")
        with model.inference_session(max_length=5 + 2 * NEW_TOKENS):
            with pytest.raises(ConfigError, match="inside an inference session"):
                model.set_adapter("lora-qv")
            first = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            more = model.generate(first, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert more.tolist() == _peft_generate(ref, ids, 2 * NEW_TOKENS)


def test_records_announce_the_adapters(adapter_swarm):
    first, second = (server.record().adapters for server in adapter_swarm)
    assert set(first) == {*SERVED, HALF} and set(second) == set(SERVED)
    assert adapter_swarm[0].handler.info()["adapters"] == list(first)


# --- 2. requests of different adapters mixed in one pass ---------------------------------------------------------


def test_one_pass_of_mixed_adapters_equals_each_alone(tiny_llama, adapters):
    span = BlockSpan.load(ModelSource(str(tiny_llama)), 0, 6, torch.float32)
    names = ["lora-qv", "lora-all", "ia3-mixed", "lora-pattern"]
    tasks = {n: read_peft(str(adapters[n].path), span.family, span.config, 0, 6, span.linears, span.dtype)
             for n in names}
    assert {t.kind for t in tasks.values()} == {"lora", "ia3"}
    gen = torch.Generator().manual_seed(7)

    def hidden(rows: int, new: int) -> torch.Tensor:
        return torch.randn(rows, new, span.hidden_size, generator=gen)

    # (tasks, input, padding mask, cached tokens before it (None: no cache))
    plan = [((tasks["lora-qv"],), hidden(1, 5), None, None),
            ((tasks["lora-all"],), hidden(2, 3), torch.tensor([[0, 1, 1], [1, 1, 1]]), None),
            ((tasks["ia3-mixed"],), hidden(1, 1), None, hidden(1, 4)),
            ((tasks["lora-pattern"],), hidden(1, 6), None, hidden(1, 0)),
            ((), hidden(1, 2), None, hidden(1, 3))]

    def works() -> list[Work]:
        """The plan's works, each session's cache new and prefilled (alone, with its tasks) to the same state."""
        out = []
        for task, x, mask, before in plan:
            cache = None
            if before is not None:
                cache = span.new_cache(x.shape[0], 16)
                if before.shape[1]:
                    span.run([Work(before, cache=cache, tasks=task)])
            out.append(Work(x, mask, cache, tasks=task))
        return out

    with torch.inference_mode():
        together = works()
        mixed = span.run(together)
        alone_works = works()
        alone = [span.run([w])[0] for w in alone_works]
        for a, b in zip(mixed, alone, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        # the adapters changed their requests' outputs (else equality above proves little)
        plain = span.run([Work(plan[0][1])])[0]
        assert (plain - alone[0]).abs().max() > 1e-3
        # the caches written in the mixed pass hold what the solo runs wrote: the next step agrees
        nxt = hidden(1, 1)
        for i in (2, 3, 4):
            a = span.run([Work(nxt, cache=together[i].cache, tasks=plan[i][0])])[0]
            b = span.run([Work(nxt, cache=alone_works[i].cache, tasks=plan[i][0])])[0]
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# (adapter, prompt, new tokens): different adapters (and none), different lengths
MIXED_WORK = [("lora-qv", [5, 17, 99, 3], 8), ("lora-all", [1, 2, 3, 4, 5, 6, 7, 8, 9], 6),
              ("ia3-mixed", [42], 9), ("lora-pattern", [7, 7, 7, 7, 7, 7], 7), (None, [100, 3, 64, 12, 9], 8)]


def _generate_together(path: Path, endpoints: list[str], work) -> list[Any]:
    models = [_client(path, endpoints, adapter=name) for name, _, _ in work]
    results: list[Any] = [None] * len(work)
    barrier = threading.Barrier(len(work))

    def run(i: int) -> None:
        _, prompt, new = work[i]
        try:
            barrier.wait(30)
            results[i] = models[i].generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False).tolist()
        except Exception as e:  # reported with the others' results
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(work))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a client did not finish"
    finally:
        for model in models:
            model.close()
    return results


@pytest.mark.parametrize("mix", [True, False], ids=["mixed", "not-mixed"])
def test_concurrent_generations_of_different_adapters(mix, tiny_llama, tiny_llama_ref, adapters, start_server):
    preload = tuple(str(adapters[name].path) for name, _, _ in MIXED_WORK if name is not None)
    servers = [start_server(tiny_llama, span, adapters=AdapterConfig(preload=preload),
                            passes=PassLimits(mix_tasks=mix)) for span in SPANS]
    results = _generate_together(tiny_llama, [s.endpoint for s in servers], MIXED_WORK)
    expected = [_peft_generate(_reference(adapters, tiny_llama_ref, name), torch.tensor([prompt]), new)
                for name, prompt, new in MIXED_WORK]
    assert results == expected
    for server in servers:
        batch = server.handler.info()["batch"]
        if mix:  # every session has its own adapter: a pass of two sessions mixed two adapters
            assert batch["peak_sessions"] >= 2, batch
        else:
            assert batch["peak_sessions"] == 1, batch


# --- 3. loaded on first request, least recently used dropped, never while a session holds it -----------------------


def test_adapters_load_on_request_and_lru_spares_held_ones(tiny_llama, adapters, start_server, tmp_path):
    directory = tmp_path / "adapters"
    sources = {"task-a": "lora-qv", "task-b": "ia3-mixed", "task-c": "lora-mlp"}
    for name, source in sources.items():
        shutil.copytree(adapters[source].path, directory / name)
    shutil.copytree(adapters["lora-qv"].path, directory / "broken")
    config_path = directory / "broken" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_dora": True}))

    server = start_server(tiny_llama, (0, 6), adapters=AdapterConfig(directory=str(directory), max_adapters=2))
    assert set(server.record().adapters) == {"task-a", "task-b", "task-c", "broken"}
    assert server.adapters.stats()["loads"] == 0 and _loaded(server) == []

    def ref(name: str):
        return adapters[sources[name]].model

    ids = _ids(seed=11, batch=1, length=5)
    endpoints = [server.endpoint]
    with _client(tiny_llama, endpoints, adapter="task-a") as a_model, _client(tiny_llama, endpoints) as b_model, \
            _client(tiny_llama, endpoints) as c_model:
        with a_model.inference_session(max_length=5 + 2 * NEW_TOKENS):
            first = a_model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            (entry,) = server.adapters.stats()["loaded"]
            assert entry["name"] == "task-a" and entry["sessions"] == 1 and entry["bytes"] > 0, entry

            out = b_model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, adapter="task-b")
            assert out.tolist() == _peft_generate(ref("task-b"), ids, NEW_TOKENS)
            assert _loaded(server) == ["task-a", "task-b"]

            out = c_model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, adapter="task-c")
            assert out.tolist() == _peft_generate(ref("task-c"), ids, NEW_TOKENS)
            stats = server.adapters.stats()
            assert _loaded(server) == ["task-a", "task-c"], stats  # B went, A (held by the session) stayed
            assert stats["loads"] == 3 and stats["evictions"] == 1, stats

            more = a_model.generate(first, max_new_tokens=NEW_TOKENS, do_sample=False)  # the session goes on
            assert more.tolist() == _peft_generate(ref("task-a"), ids, 2 * NEW_TOKENS)
        assert server.handler.info()["sessions"] == 0
        assert all(entry["sessions"] == 0 for entry in server.adapters.stats()["loaded"])

        # A is no longer held and is the least recently used: B comes back in its place
        out = b_model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, adapter="task-b")
        assert out.tolist() == _peft_generate(ref("task-b"), ids, NEW_TOKENS)
        stats = server.adapters.stats()
        assert _loaded(server) == ["task-c", "task-b"] and stats["evictions"] == 2 and stats["loads"] == 4, stats

    with _rpc(server.endpoint) as rpc:
        with pytest.raises(BadAdapter) as error:  # a bad file in the directory: refused when it is asked for
            rpc.call(*Open(max_length=8, adapter="broken").to_wire())
        assert error.value.code == "bad_adapter" and "DoRA" in str(error.value)
        with pytest.raises(UnknownAdapter) as error:  # names lead nowhere outside the directory
            rpc.call(*Open(max_length=8, adapter="task-b/../task-a").to_wire())
        assert error.value.code == "unknown_adapter" and "task-c" in str(error.value)
        with pytest.raises(BadRequest):
            rpc.call(*Open(max_length=8, adapter="../adapters/task-a").to_wire())
        with pytest.raises(CacheFull):  # a session refused after its adapter was found does not keep holding it
            rpc.call(*Open(max_length=100_000, adapter="task-c").to_wire())
        hidden = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(0))
        assert rpc.call(*Forward(hidden, adapter="task-c").to_wire()).tensors[0].shape == hidden.shape
    stats = server.adapters.stats()
    assert stats["loads"] == 4 and all(entry["sessions"] == 0 for entry in stats["loaded"]), stats


def test_directory_adapters_within_the_memory_bound(tiny_llama, adapters, start_server, tmp_path):
    directory = tmp_path / "adapters"
    for name, source in (("qv-1", "lora-qv"), ("qv-2", "lora-qv"), ("big", "lora-all")):
        shutil.copytree(adapters[source].path, directory / name)
    # room for one lora-qv (21504 bytes over 6 blocks), not for two, nor for lora-all (98304 bytes)
    server = start_server(tiny_llama, (0, 6), adapters=AdapterConfig(directory=str(directory), max_bytes=30000))
    ids = _ids(seed=12, batch=1, length=5)
    with torch.no_grad():  # (the last of them is after the final norm: compare blocks 0:3)
        states = adapters["lora-qv"].model(input_ids=ids, output_hidden_states=True).hidden_states
    with _rpc(server.endpoint) as rpc:
        for _ in range(2):  # loaded by the first request, kept for the next
            out = rpc.call(*Forward(states[0], blocks=(0, 3), adapter="qv-1").to_wire()).tensors[0]
            torch.testing.assert_close(out, states[3], atol=ATOL, rtol=RTOL)
        assert server.adapters.stats()["loads"] == 1 and _loaded(server) == ["qv-1"]
        # the same weights under another name: no room for both
        out = rpc.call(*Forward(states[0], blocks=(0, 3), adapter="qv-2").to_wire()).tensors[0]
        torch.testing.assert_close(out, states[3], atol=ATOL, rtol=RTOL)
        stats = server.adapters.stats()
        assert _loaded(server) == ["qv-2"] and stats["evictions"] == 1 and stats["bytes"] <= 30000, stats
        with pytest.raises(BadAdapter) as error:
            rpc.call(*Forward(states[0], adapter="big").to_wire())
        assert error.value.code == "bad_adapter" and "30000 bytes" in str(error.value)
    assert _loaded(server) == ["qv-2"]


def test_a_request_arriving_while_its_adapter_loads_shares_the_load(tiny_llama, adapters, start_server, tmp_path):
    """Made deterministic by holding the loading thread until the second request has been handled (it found the
    adapter loading and waits for that load): exactly the interleaving two clients on a real server can hit."""
    directory = tmp_path / "adapters"
    shutil.copytree(adapters["lora-qv"].path, directory / "qv")
    server = start_server(tiny_llama, (0, 6), adapters=AdapterConfig(directory=str(directory)))
    store = server.adapters
    started, go = threading.Event(), threading.Event()
    read, get = store._read, store.get
    calls: list[str] = []

    def slow_read(path: str):
        started.set()
        go.wait(REPLY_TIMEOUT)
        return read(path)

    def watched_get(name: str, *args: Any, **kwargs: Any) -> None:
        get(name, *args, **kwargs)
        calls.append(name)
        if len(calls) == 2:  # the second request now waits for the load: let it finish
            go.set()

    store._read, store.get = slow_read, watched_get
    ids = _ids(seed=13, batch=1, length=4)
    with torch.no_grad():
        states = adapters["lora-qv"].model(input_ids=ids, output_hidden_states=True).hidden_states
    outs: list[Any] = [None, None]

    def run(i: int) -> None:
        try:
            with _rpc(server.endpoint) as rpc:
                outs[i] = rpc.call(*Forward(states[0], blocks=(0, 3), adapter="qv").to_wire()).tensors[0]
        except Exception as e:  # reported below
            outs[i] = e

    first = threading.Thread(target=run, args=(0,), daemon=True)
    first.start()
    assert started.wait(REPLY_TIMEOUT), "the first request did not start loading the adapter"
    second = threading.Thread(target=run, args=(1,), daemon=True)
    second.start()
    for t in (first, second):
        t.join(30)
    assert not first.is_alive() and not second.is_alive()
    for out in outs:
        assert isinstance(out, torch.Tensor), out
        torch.testing.assert_close(out, states[3], atol=ATOL, rtol=RTOL)
    stats = store.stats()
    assert stats["loads"] == 1 and stats["evictions"] == 0, stats


# --- 4. an unknown adapter is refused clearly ------------------------------------------------------------------


def test_unknown_adapter_is_refused_clearly(adapters, adapter_swarm, tiny_llama, tiny_llama_ref, net):
    server = adapter_swarm[0]
    hidden = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(1))
    with _rpc(server.endpoint) as rpc:
        for message in (Open(max_length=8, adapter="nope"), Forward(hidden, adapter="nope")):
            with pytest.raises(UnknownAdapter) as error:
                rpc.call(*message.to_wire())
            assert error.value.code == "unknown_adapter"
            assert "'nope'" in str(error.value) and "lora-qv" in str(error.value) and HALF in str(error.value)

    config = ClientConfig(connect_timeout=0.5, wait_for_blocks=0.5)
    endpoints = [s.endpoint for s in adapter_swarm]
    with pytest.raises(MissingAdapter) as error:
        _client(tiny_llama, endpoints, adapter="nope", config=config)
    assert error.value.missing == [(0, 6)] and "'nope'" in str(error.value) and "0:6" in str(error.value)
    with pytest.raises(MissingAdapter) as error:  # only the first server holds it: blocks 3:6 lack it
        _client(tiny_llama, endpoints, adapter=HALF, config=config)
    assert error.value.missing == [(3, 6)] and error.value.holding == [(0, 3)]
    assert f"{HALF!r} for blocks 3:6" in str(error.value)

    ids = _ids(seed=5, batch=1, length=4)
    with pytest.raises(MissingAdapter, match="'nope'"):
        net.generate(ids, max_new_tokens=2, do_sample=False, adapter="nope")
    assert net.active_adapter is None
    # the servers serve on, with and without adapters
    assert net.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False).tolist() == \
        _peft_generate(tiny_llama_ref, ids, NEW_TOKENS)
    ref = adapters["lora-qv"].model
    with torch.no_grad():
        states = ref(input_ids=ids, output_hidden_states=True).hidden_states
    with _rpc(server.endpoint) as rpc:
        out = rpc.call(*Forward(states[0], adapter="lora-qv").to_wire()).tensors[0]
    torch.testing.assert_close(out, states[3], atol=ATOL, rtol=RTOL)


# --- 5. bad adapter files: one clear ConfigError -----------------------------------------------------------------


def _bad_shapes(model: Path, root: Path) -> Path:
    other = make_tiny_model(root / "narrow", layers=6, hidden=32)
    return make_adapter(other, root / "bad", _lora(r=4, target_modules=["q_proj", "v_proj"])(), 1).path


def _ia3_bad_shapes(model: Path, root: Path) -> Path:
    other = make_tiny_model(root / "narrow", layers=6, hidden=32)
    return make_adapter(other, root / "bad", SERVED["ia3-mixed"](), 1).path


def _missing_tensor(model: Path, root: Path) -> Path:
    path = make_adapter(model, root / "bad", _lora(r=4, target_modules=["q_proj", "v_proj"])(), 1).path
    tensors = load_file(path / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def _missing_module(model: Path, root: Path) -> Path:
    """Both tensors of one targeted layer gone, in a block outside the span read (every block is checked)."""
    path = make_adapter(model, root / "bad", _lora(r=4, target_modules=["q_proj", "v_proj"])(), 1).path
    tensors = load_file(path / "adapter_model.safetensors")
    for part in ("A", "B"):
        del tensors[f"base_model.model.model.layers.5.self_attn.q_proj.lora_{part}.weight"]
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def _more_layers(model: Path, root: Path) -> Path:
    deeper = make_tiny_model(root / "deeper", layers=8)
    return make_adapter(deeper, root / "bad", _lora(r=4, target_modules=["q_proj"])(), 1).path


def _made(config: Callable[[], peft.PeftConfig], safe: bool = True) -> Callable[[Path, Path], Path]:
    return lambda model, root: make_adapter(model, root / "bad", config(), 1, safe=safe).path


BAD_ADAPTERS = {
    "wrong-shapes": (_bad_shapes, ["does not fit this model", "[4, 32]", "maps 64 to 64", "another base model"]),
    "ia3-wrong-shapes": (_ia3_bad_shapes, ["does not fit this model", "expected [", "another base model"]),
    "missing-tensor": (_missing_tensor, ["missing tensors", "self_attn.v_proj of block 1", "lora_B"]),
    "missing-module": (_missing_module, ["missing tensors", "self_attn.q_proj of block 5"]),
    "other-base-model": (_more_layers, ["block 6", "this model has 6 blocks", "another base model"]),
    "loha": (_made(lambda: peft.LoHaConfig(r=2, target_modules=["q_proj", "v_proj"])),
             ["'LOHA'", "LORA and IA3"]),
    "prefix-tuning": (_made(lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
                      ["'PREFIX_TUNING'", "LORA and IA3"]),
    "lm-head": (_made(_lora(r=2, target_modules=["q_proj", "lm_head"])), ["lm_head", "not in a block"]),
    "embed-tokens": (_made(_lora(r=2, target_modules=["embed_tokens"])), ["embed_tokens", "not in a block"]),
    "dora": (_made(_lora(r=2, target_modules=["q_proj"], use_dora=True)), ["DoRA (use_dora)"]),
    "bin-only": (_made(_lora(r=2, target_modules=["q_proj"]), safe=False),
                 ["has no adapter_model.safetensors", "adapter_model.bin", "pickle"]),
}


@pytest.fixture(scope="module")
def span(tiny_llama) -> BlockSpan:
    return BlockSpan.load(ModelSource(str(tiny_llama)), 0, 3, torch.float32)


@pytest.mark.parametrize("case", BAD_ADAPTERS)
def test_bad_adapter_files_give_one_clear_error(case, span, tiny_llama, tmp_path):
    build, fragments = BAD_ADAPTERS[case]
    path = build(tiny_llama, tmp_path)
    with pytest.raises(ConfigError) as error:
        read_peft(str(path), span.family, span.config, span.start, span.end, span.linears, span.dtype)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_server_with_a_bad_adapter_does_not_start(tiny_llama, adapters, tmp_path, start_server):
    bad = _missing_tensor(tiny_llama, tmp_path)
    with pytest.raises(ConfigError, match="missing tensors"):
        start_server(tiny_llama, (0, 3), adapters=AdapterConfig(preload=(str(adapters["lora-qv"].path), str(bad))))
    with pytest.raises(ConfigError, match="two adapters are named 'lora-qv'"):
        start_server(tiny_llama, (0, 3), adapters=AdapterConfig(
            preload=(str(adapters["lora-qv"].path), str(adapters["lora-qv"].path))))


@pytest.mark.slow
def test_serve_with_a_bad_adapter_exits_with_one_line(tiny_llama, tmp_path):
    bad = _made(_lora(r=2, target_modules=["q_proj"], use_dora=True))(tiny_llama, tmp_path)
    result = fork_swarm("serve", str(tiny_llama), "--blocks", "0:2", "--host", "127.0.0.1", "--adapters", str(bad),
                        env=swarm_env(tmp_path), timeout=60)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # one line, last (after the INFO log lines)
    assert "adapter bad uses DoRA (use_dora)" in errors[0], errors[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


# --- 6. hostile client LoRAs on the wire ---------------------------------------------------------------------------


def _wire_lora(made: Made, blocks: tuple[int, int], modules=("self_attn.q_proj", "self_attn.v_proj")) -> LoraWeights:
    """The adapter's LoRA for `blocks`, stacked as a client sends its own."""
    tensors = load_file(made.path / "adapter_model.safetensors")
    config = json.loads((made.path / "adapter_config.json").read_text())

    def stack(module: str, part: str) -> torch.Tensor:
        return torch.stack([tensors[f"base_model.model.model.layers.{i}.{module}.lora_{part}.weight"]
                            for i in range(*blocks)])

    return LoraWeights(config["lora_alpha"] / config["r"], {m: stack(m, "A") for m in modules},
                       {m: stack(m, "B") for m in modules})


def _hostile_cases(good: LoraWeights) -> dict[str, tuple[dict[str, Any], list[torch.Tensor]]]:
    """name -> extra fields and tensors of a forward of blocks 0:3 (after hidden)."""
    q, v = "self_attn.q_proj", "self_attn.v_proj"
    a, b = good.a[q], good.b[q]

    def lora(scaling: Any = 2.0, **tensors: torch.Tensor) -> tuple[dict[str, Any], list[torch.Tensor]]:
        return {"lora_scaling": scaling, "names": ["hidden", *tensors]}, list(tensors.values())

    nan = b.clone()
    nan[1, 3, 0] = float("nan")
    return {
        "ranks-disagree": lora(**{f"lora_a.{q}": a, f"lora_b.{q}": b[..., :2]}),
        "blocks-disagree": lora(**{f"lora_a.{q}": a[:2], f"lora_b.{q}": b[:2]}),
        "in-features": lora(**{f"lora_a.{q}": torch.zeros(3, 4, 32), f"lora_b.{q}": b}),
        "out-features": lora(**{f"lora_a.{v}": a, f"lora_b.{v}": torch.ones(3, 99, 4)}),
        "no-such-module": lora(**{"lora_a.self_attn.rotary": a, "lora_b.self_attn.rotary": b}),
        "a-without-b": lora(**{f"lora_a.{q}": a}),
        "two-dims": lora(**{f"lora_a.{q}": a[0], f"lora_b.{q}": b[0]}),
        "integers": lora(**{f"lora_a.{q}": a.long(), f"lora_b.{q}": b.long()}),
        "nan-values": lora(**{f"lora_a.{q}": a, f"lora_b.{q}": nan}),
        "nan-scaling": lora(float("nan"), **{f"lora_a.{q}": a, f"lora_b.{q}": b}),
        "text-scaling": lora("2", **{f"lora_a.{q}": a, f"lora_b.{q}": b}),
        "scaling-without-tensors": lora(),
    }


def test_hostile_client_loras_are_refused(adapters, adapter_swarm):
    server = adapter_swarm[0]  # blocks 0:3
    made = adapters["lora-qv"]
    good = _wire_lora(made, (0, 3))
    ids = _ids(seed=8, batch=1, length=5)
    with torch.no_grad():
        states = made.model(input_ids=ids, output_hidden_states=True).hidden_states
    hidden = states[0]
    with _rpc(server.endpoint) as rpc:
        for name, (fields, tensors) in _hostile_cases(good).items():
            with pytest.raises(BadRequest) as error:
                rpc.call("forward", {"blocks": [0, 3], **fields}, [hidden, *tensors])
            assert error.value.code == "bad_request", name
            assert "lora" in str(error.value).lower() or "linear layer" in str(error.value), (name, error.value)
        bad = LoraWeights(2.0, {"self_attn.o_proj": good.a["self_attn.q_proj"]},
                          {"self_attn.o_proj": torch.full_like(good.b["self_attn.q_proj"], float("inf"))})
        for message in (Open(max_length=8, blocks=(0, 3), lora=bad), Forward(hidden, blocks=(0, 3), lora=bad)):
            with pytest.raises(BadRequest):
                rpc.call(*message.to_wire())

        # the server serves on: the client's LoRA (PEFT's, as a client sends it) gives PEFT's hidden states
        out = rpc.call(*Forward(hidden, blocks=(0, 3), lora=good).to_wire()).tensors[0]
        torch.testing.assert_close(out, states[3], atol=ATOL, rtol=RTOL)
        out = rpc.call(*Forward(hidden, blocks=(0, 3), adapter="lora-qv").to_wire()).tensors[0]
        torch.testing.assert_close(out, states[3], atol=ATOL, rtol=RTOL)
        assert rpc.call("info").fields["sessions"] == 0


def test_backward_and_sessions_with_adapters_equal_peft(adapters, adapter_swarm):
    """Gradients through a named adapter and through a client's LoRA (with its own gradients), with and without a
    kept forward, and a session opened with a client's LoRA: all as PEFT computes them."""
    server = adapter_swarm[0]  # blocks 0:3
    made = adapters["lora-qv"]
    good = _wire_lora(made, (0, 3))
    ids = _ids(seed=9, batch=2, length=5)
    embeds = made.model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = made.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[3]
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    params = {f"lora_{p.lower()}.{m}": [made.model.get_parameter(f"base_model.model.model.layers.{i}.{m}.lora_{p}"
                                                                 ".default.weight") for i in range(3)]
              for m in good.a for p in "AB"}
    grads = torch.autograd.grad(out, [embeds, *(p for ps in params.values() for p in ps)], grad_output)
    grad_embeds, flat = grads[0], iter(grads[1:])
    expected_lora = {name: torch.stack([next(flat) for _ in ps]) for name, ps in params.items()}
    hidden = embeds.detach()

    with _rpc(server.endpoint) as rpc:
        for extra in ({"adapter": "lora-qv"}, {"lora": good}):
            reply = BackwardReply.from_wire(rpc.call(*Backward(hidden, grad_output, blocks=(0, 3), **extra).to_wire()))
            torch.testing.assert_close(reply.grad_input, grad_embeds, atol=ATOL, rtol=RTOL)
            forward = ForwardReply.from_wire(rpc.call(*Forward(hidden, blocks=(0, 3), keep=True, **extra).to_wire()))
            torch.testing.assert_close(forward.hidden, out.detach(), atol=ATOL, rtol=RTOL)
            assert forward.kept is not None
            kept = BackwardReply.from_wire(rpc.call(*Backward(hidden, grad_output, blocks=(0, 3), kept=forward.kept,
                                                              **extra).to_wire()))
            torch.testing.assert_close(kept.grad_input, grad_embeds, atol=ATOL, rtol=RTOL)
            if "lora" in extra:
                for r in (reply, kept):
                    assert r.grad_lora.keys() == expected_lora.keys()
                    for name, expected in expected_lora.items():
                        torch.testing.assert_close(r.grad_lora[name], expected, atol=ATOL, rtol=RTOL)

        session = OpenReply.from_wire(rpc.call(*Open(max_length=8, batch_size=2, blocks=(0, 3),
                                                     lora=good).to_wire())).session
        first = StepReply.from_wire(rpc.call(*Step(session, hidden[:, :3]).to_wire()))
        then = StepReply.from_wire(rpc.call(*Step(session, hidden[:, 3:]).to_wire()))
        assert then.position == 5
        torch.testing.assert_close(torch.cat([first.hidden, then.hidden], dim=1), out.detach(), atol=ATOL,
                                   rtol=RTOL)
        rpc.call(*Close(session).to_wire())


def test_client_lora_for_fewer_blocks_than_the_span_is_refused(adapters, adapter_swarm):
    server = adapter_swarm[0]  # blocks 0:3
    short = _wire_lora(adapters["lora-qv"], (0, 1))  # one block's LoRA
    hidden = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(2))
    with _rpc(server.endpoint) as rpc, pytest.raises(BadRequest):
        rpc.call(*Forward(hidden, lora=short).to_wire())  # no blocks: the whole span 0:3


@pytest.mark.parametrize("name,config", [
    # PEFT matches a string `feedforward_modules` against the module's full name (model.layers.N.mlp.down_proj)
    ("ia3-regex", peft.IA3Config(task_type="CAUSAL_LM", target_modules=r".*\.(k_proj|v_proj|down_proj)",
                                 feedforward_modules=r"model\.layers\.\d+\.mlp\.down_proj")),
    # and list entries naming layers by their full names (its way to adapt chosen layers only)
    ("lora-full-names", _lora(r=4, lora_alpha=8, target_modules=["model.layers.1.self_attn.q_proj",
                                                                 "model.layers.2.mlp.up_proj"])()),
])
def test_targets_named_by_full_module_names_equal_peft(tiny_llama, span, tmp_path, name, config):
    made = make_adapter(tiny_llama, tmp_path / name, config, 5)
    task = read_peft(str(made.path), span.family, span.config, 0, 3, span.linears, span.dtype)
    ids = _ids(seed=4, batch=1, length=5)
    with torch.no_grad():
        states = made.model(input_ids=ids, output_hidden_states=True).hidden_states
    with torch.inference_mode():
        out = span.run([Work(states[0], tasks=(task,))])[0]
    torch.testing.assert_close(out, states[3], atol=ATOL, rtol=RTOL)


def test_client_asking_for_a_bad_directory_adapter_learns_why(tiny_llama, start_server, tmp_path):
    bad = _made(_lora(r=2, target_modules=["q_proj"], use_dora=True))(tiny_llama, tmp_path / "adapters")
    server = start_server(tiny_llama, (0, 6), adapters=AdapterConfig(directory=str(bad.parent)))
    assert server.record().adapters == ("bad",)
    ids = _ids(seed=2, batch=1, length=3)
    config = ClientConfig(connect_timeout=2.0, wait_for_blocks=0.5)
    with _client(tiny_llama, [server.endpoint], config=config) as model:
        with pytest.raises(SwarmError) as error:
            model.generate(ids, max_new_tokens=2, do_sample=False, adapter="bad")
        assert "DoRA" in str(error.value), str(error.value)

"""Weight quantization (quant/weights.py, `--quant`): the linear layers really become bitsandbytes' int8 and packed
4-bit layers, a block's memory drops as planned, a quantized swarm stays within the error measured against float32
and equals the same quantized blocks run locally (forward, sessions, generation), backward and LoRA work on quantized
blocks (QLoRA), `--quant auto` chooses by memory, the record announces the quantization, a client that avoids
quantized servers never routes to one, and bad values are refused clearly.

Error bounds were measured on this file's model (a random Llama of hidden 128, 4 blocks, seed 7; logits of random
token ids against float32 transformers): relative logits error 0.021 for int8 and 0.23 for nf4 (0.017..0.024 and
0.18..0.23 over seeds 7..9), max |error| / σ(logits) 0.08 and 0.8; the bounds below give them about 2x room. A random
model's logits are small and nearly flat, so 4-bit weights move its greedy tokens: greedy agreement with float32 is
checked for int8 only, and every quantized path is checked exactly against the same quantized blocks run locally.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import load_reference, make_tiny_model

from swarm import AutoDistributedModelForCausalLM
from swarm.core.client.config import ClientConfig
from swarm.core.client.verify import QUANT_TOLERANCE, relative_difference
from swarm.core.server import Server, ServerConfig
from swarm.core.server.backend import BlockSpan
from swarm.core.server.placement import BlockCost, block_cost, blocks_for_memory, choose_quant, parse_quant
from swarm.core.server.throughput import cache_key, measure
from swarm.core.weights import ModelSource
from swarm.quant.weights import planned_bytes, quantize_block, quantized_mode, weight_bytes
from swarm.transport.errors import ConfigError, PeerUnreachable
from swarm.transport.rpc import RpcClient

MODES = ("int8", "nf4")
REL_ERROR = {"int8": 0.05, "nf4": 0.45}  # relative logits error against float32 (measured 0.021 and 0.23)
SIGMA_ERROR = {"int8": 0.2, "nf4": 1.6}  # max |logits error| / σ(float32 logits) (measured 0.08 and 0.8)
GRAD_ERROR = {"int8": 0.05, "nf4": 0.45}  # relative error of input and LoRA gradients against float32
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)
MASK[0, 9:] = 0  # row 0 padded after 9 tokens, row 1 whole
LINEARS = 7  # q, k, v, o, gate, up, down


def quantized_reference(path: Path, mode: str):
    """Plain transformers in float32 with every decoder layer's linear layers quantized in this process."""
    model = load_reference(path)
    for layer in model.model.layers:
        quantize_block(layer, mode, torch.float32, "cpu")
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def qmodel(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("quant") / "llama", layers=4, hidden=128, seed=7)


@pytest.fixture(scope="module")
def ref(qmodel):
    return load_reference(qmodel)


@pytest.fixture(scope="module")
def swarms(qmodel) -> Iterator[dict[str, list[Server]]]:
    """Two servers (blocks 0:2 and 2:4) per quantization, and one float32 server of the whole model."""
    started: dict[str, list[Server]] = {}
    try:
        for mode in MODES:
            started[mode] = []
            for span in ((0, 2), (2, 4)):
                started[mode].append(Server(ServerConfig(str(qmodel), span, host="127.0.0.1", quant=mode, poll_ms=20,
                                                         throughput=1000.0)).start())
        started["none"] = [Server(ServerConfig(str(qmodel), (0, 4), host="127.0.0.1", poll_ms=20,
                                               throughput=1000.0)).start()]
        yield started
    finally:
        for servers in started.values():
            for server in servers:
                server.stop()


def client(path: Path, servers: list[Server], **kwargs):
    return AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=[s.endpoint for s in servers],
                                                           **kwargs)


# --- the layers and their memory -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_layers_are_replaced_and_stored_in_8_and_4_bits(qmodel, dtype):
    import bitsandbytes as bnb

    source = ModelSource(qmodel)
    config = source.config(dtype)
    family = source.family()
    spans = {mode: BlockSpan.load(source, 1, 3, dtype, quant=mode) for mode in ("none", *MODES)}
    for mode, span in spans.items():
        assert span.quant == mode and quantized_mode(span.blocks) == mode
        linears = [m for m in span.blocks[0].modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == LINEARS  # the LoRA hooks (on nn.Linear) still find every layer
        for layer in linears:
            weight = layer.weight
            if mode == "int8":
                assert isinstance(layer, bnb.nn.Linear8bitLt) and weight.dtype == torch.int8
                assert weight.shape == (layer.out_features, layer.in_features)
            elif mode == "nf4":
                assert isinstance(layer, bnb.nn.Linear4bit) and weight.dtype == torch.uint8
                assert weight.numel() == layer.out_features * layer.in_features // 2  # two weights a byte
                assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested  # double quantization
                assert layer.compute_dtype == dtype
            else:
                assert type(layer) is torch.nn.Linear and weight.dtype == dtype
    # memory: planned (from a meta block) == held, and the linear part shrinks to ~1/4 and ~1/8 of float32
    with torch.device("meta"):
        meta = family.build_block(config, 1)
    linear_f32 = sum(m.weight.numel() * 4 for m in meta.modules() if isinstance(m, torch.nn.Linear))
    other = planned_bytes(meta, "none", dtype) - linear_f32 * torch.empty((), dtype=dtype).element_size() // 4
    for mode, span in spans.items():
        held = weight_bytes(span.blocks)
        assert held == 2 * planned_bytes(meta, mode, dtype)
        assert held == 2 * block_cost(family, config, dtype, mode).weights  # placement counts quantized bytes
        linear = held / 2 - other
        if mode == "int8":
            assert 0.25 <= linear / linear_f32 < 0.27  # 1 byte a weight, and a float32 scale per row
        elif mode == "nf4":
            # half a byte a weight, an 8-bit scale per 64 weights, and ~1 KiB of codes per layer (8% of these
            # tiny layers' 4-bit bytes; nothing on a real model's)
            assert 0.125 <= linear / linear_f32 < 0.15


def test_quantized_block_keeps_its_memory_and_refuses_bad_modes(qmodel):
    span = BlockSpan.load(ModelSource(qmodel), 0, 1, torch.float32, quant="nf4")
    before = weight_bytes(span.blocks)
    with torch.inference_mode():
        span(torch.randn(1, 5, 128))  # bitsandbytes keeps no float copy after a call either
    span.forward_graph(torch.randn(1, 5, 128))
    assert weight_bytes(span.blocks) == before
    with pytest.raises(ConfigError, match="none, int8, nf4"):
        BlockSpan.load(ModelSource(qmodel), 0, 1, torch.float32, quant="fp4")
    with pytest.raises(ValueError, match="none, int8, nf4"):
        quantize_block(torch.nn.Linear(4, 4), "int4", torch.float32)


# --- outputs through a quantized swarm ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_quantized_swarm_is_within_the_measured_error_and_equals_local_quantized_blocks(mode, qmodel, ref, swarms):
    local = quantized_reference(qmodel, mode)
    valid = MASK.bool()
    with torch.no_grad(), client(qmodel, swarms[mode]) as model:
        got = model(input_ids=IDS, attention_mask=MASK).logits
        want = ref(input_ids=IDS, attention_mask=MASK).logits
        same = local(input_ids=IDS, attention_mask=MASK).logits
        # the same quantized blocks in one process: equal up to float sums
        torch.testing.assert_close(got[valid], same[valid], atol=1e-4, rtol=1e-4)
        # against float32: within the measured error
        assert rel(got[valid], want[valid]) < REL_ERROR[mode]
        assert float((got[valid] - want[valid]).abs().max() / want[valid].std()) < SIGMA_ERROR[mode]
        assert rel(got[valid], want[valid]) > 1e-4  # the weights really are quantized
        # greedy generation, without and within a session: the local quantized model's tokens exactly
        ids = IDS[:1, :8]
        expected = local.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
        assert model.generate(ids, max_new_tokens=10, do_sample=False).tolist() == expected.tolist()
        with model.inference_session(max_length=20):
            first = model.generate(ids, max_new_tokens=4, do_sample=False)
            more = model.generate(first, max_new_tokens=6, do_sample=False)
        assert more.tolist() == expected.tolist()
        if mode == "int8":  # 8-bit weights keep float32's greedy tokens on this model
            exact = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
            assert expected.tolist() == exact.tolist()


@pytest.mark.parametrize("mode", MODES)
def test_verify_tolerances_cover_what_quantized_servers_differ_by(mode, qmodel):
    """core/client/verify.py's tolerances against measurement: two honest servers of one quantization (a session's
    steps against a forward of the same tokens) stay well within QUANT_TOLERANCE; a quantized and a float32 server of
    the same blocks differ by far more than float sums (0.21 for nf4 here, as much as a liar might perturb: checks are
    never made across quantizations, see test_checks_stay_within_one_quantization)."""
    source = ModelSource(qmodel)
    exact, span = BlockSpan.load(source, 0, 4, torch.float32), BlockSpan.load(source, 0, 4, torch.float32, quant=mode)
    hidden = load_reference(qmodel).model.embed_tokens(IDS).detach()
    with torch.inference_mode():
        forward, reference = span(hidden), exact(hidden)
        cache = span.new_cache(2, 12)
        steps = torch.cat([span.step(hidden[:, :7], cache), *(span.step(hidden[:, i:i + 1], cache)
                                                                for i in range(7, 12))], dim=1)
    same = relative_difference(steps, forward)
    mixed = relative_difference(forward, reference)
    assert same < QUANT_TOLERANCE[mode] / 10
    assert mixed > 1e-4


# --- backward and adapters --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_backward_through_quantized_blocks(mode, qmodel):
    source = ModelSource(qmodel)
    exact, span = BlockSpan.load(source, 0, 4, torch.float32), BlockSpan.load(source, 0, 4, torch.float32, quant=mode)
    generator = torch.Generator().manual_seed(1)
    hidden = load_reference(qmodel).model.embed_tokens(IDS).detach()
    grad_out = torch.randn(hidden.shape, generator=generator)
    prompts = 0.1 * torch.randn(4, 1, 3, 128, generator=generator)
    with torch.inference_mode():  # a no-grad pass first: the layers must not switch to a path without gradients
        span(hidden)
    got = span.backward(hidden, grad_out, MASK, prompts=prompts)
    want = exact.backward(hidden, grad_out, MASK, prompts=prompts)
    for g, w in ((got[0], want[0]), (got[1], want[1])):
        assert g is not None and torch.isfinite(g).all()
        assert 1e-6 < rel(g, w) < GRAD_ERROR[mode]


@pytest.mark.parametrize("mode", MODES)
def test_client_lora_on_quantized_servers_is_qlora(mode, qmodel, swarms):
    """A LoRA the client trains through quantized servers: logits and LoRA gradients equal PEFT's LoRA on the same
    quantized layers in one process (PEFT's bitsandbytes LoRA layers), within float sums."""
    import peft

    local = quantized_reference(qmodel, mode)
    labels = IDS.masked_fill(MASK == 0, -100)
    with client(qmodel, swarms[mode], tuning_mode="lora", lora_rank=4, lora_alpha=8,
                lora_targets=["all-linear"]) as model:
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for param in model.tuning.b.values():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        lora = model.tuning
        twin = peft.get_peft_model(local, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=sorted(
            {m.rsplit(".", 1)[-1] for m in lora.targets})))
        params = dict(twin.named_parameters())
        with torch.no_grad():
            for (block, module), (a, b) in lora.per_block().items():
                prefix = f"base_model.model.model.layers.{block}.{module}"
                params[f"{prefix}.lora_A.default.weight"].copy_(a)
                params[f"{prefix}.lora_B.default.weight"].copy_(b)
        out = model(input_ids=IDS, attention_mask=MASK, labels=labels)
        out.loss.backward()
        expected = twin.eval()(input_ids=IDS, attention_mask=MASK, labels=labels)
        expected.loss.backward()
        valid = MASK.bool()
        torch.testing.assert_close(out.logits[valid], expected.logits[valid], atol=2e-4, rtol=2e-4)
        stack = lora.b["self_attn__q_proj"].grad
        want = torch.stack([params[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.default.weight"].grad
                            for i in range(4)])
        assert stack is not None and torch.isfinite(stack).all()
        torch.testing.assert_close(stack, want, atol=1e-4, rtol=1e-3)


def test_served_lora_on_a_quantized_server(qmodel, ref, tmp_path):
    import peft

    base = load_reference(qmodel)
    adapter = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                                                        target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    adapter.save_pretrained(tmp_path / "lora-q")
    local = peft.PeftModel.from_pretrained(quantized_reference(qmodel, "int8"), tmp_path / "lora-q").eval()
    from swarm.core.server.adapters import AdapterConfig

    server = Server(ServerConfig(str(qmodel), (0, 4), host="127.0.0.1", quant="int8", poll_ms=20, throughput=1000.0,
                                 adapters=AdapterConfig(preload=(str(tmp_path / "lora-q"),)))).start()
    try:
        with torch.no_grad(), client(qmodel, [server]) as model:
            plain = model(IDS).logits
            with model.use_adapter("lora-q"):
                got = model(IDS).logits
            want = local(input_ids=IDS).logits
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            assert rel(got, plain) > 10 * REL_ERROR["int8"]  # the adapter matters more than the quantization
            assert rel(got, adapter.eval()(input_ids=IDS).logits) < REL_ERROR["int8"]
    finally:
        server.stop()


# --- auto, records, routing -----------------------------------------------------------------------------------------

MIB = 1 << 20
COSTS = {"none": BlockCost(400 * MIB, 1024), "int8": BlockCost(200 * MIB, 1024), "nf4": BlockCost(110 * MIB, 1024)}


@pytest.mark.parametrize("memory_mib,cache_tokens,wanted,expected", [
    (256 + 400 + 4 * 400 + 8, 0, 4, "none"),  # reserve + one spare block + 4 blocks fit in 16/32 bits
    (256 + 400 + 4 * 400 - 1, 0, 4, "int8"),  # one MiB short: 8 bits
    (256 + 200 + 4 * 200, 0, 4, "int8"),
    (256 + 200 + 4 * 200 - 1, 0, 4, "nf4"),
    (256 + 110 + 4 * 110, 0, 4, "nf4"),
    (100, 0, 4, "nf4"),  # nothing fits: the most blocks
    (256 + 400 + 4 * 400 + 8, 4096, 4, "int8"),  # the cache budget counts too (4 MiB a block)
    (256 + 400 + 1 * 400, 0, 1, "none"),
    (20_000, 0, 80, "int8"),  # 80 blocks of 400 MiB do not fit in ~20 GB; of 200 MiB they do
])
def test_auto_quant_chooses_the_least_compression_that_fits(memory_mib, cache_tokens, wanted, expected):
    assert choose_quant(memory_mib * MIB, COSTS, cache_tokens, wanted) == expected
    chosen = COSTS[expected]
    if memory_mib * MIB > 256 * MIB + chosen.weights + chosen.per_block(cache_tokens) and expected != "nf4":
        assert blocks_for_memory(memory_mib * MIB, chosen, cache_tokens, 10_000) >= wanted


def test_auto_quant_on_a_server_and_the_throughput_key(qmodel, start_server):
    source = ModelSource(qmodel)
    config = source.config(torch.float32)
    costs = {m: block_cost(source.family(), config, torch.float32, m) for m in ("none", "int8", "nf4")}
    # room for 4 blocks in 8 bits but not in 32: auto loads int8
    memory = 256 * MIB + 5 * costs["int8"].per_block(64) + 1
    assert 256 * MIB + 5 * costs["none"].per_block(64) > memory
    server = start_server(qmodel, (0, 4), quant="auto", max_memory=memory, cache_tokens=64, dtype="float32",
                          throughput=1000.0)
    assert server.quant == "int8" and server.span.quant == "int8" and server.record().quant == "int8"
    with RpcClient(server.endpoint) as rpc:
        info = rpc.call("info").fields
    assert info["quant"] == "int8" and info["quant_option"] == "auto"
    assert info["weight_bytes"] == 4 * costs["int8"].weights
    keys = {cache_key("m", torch.float32, quant=q) for q in ("none", "int8", "nf4")}  # measured apart
    measured = measure(source.family(), config, torch.float32, forward_tokens=8, repeats=1, steps=1, quant="nf4")
    assert measured.forward_tps > 0 and measured.inference_sps > 0
    assert len(keys) == 3 and cache_key("m", torch.float32) == cache_key("m", torch.float32, quant="none")


def test_clients_choose_servers_by_quantization(qmodel, ref, swarms):
    """A float32 server of every block and two nf4 servers, all announcing the same throughput: a client that takes
    any server draws the nf4 ones for about half of its forwards; one that avoids quantized servers never does."""
    none, nf4 = swarms["none"][0], swarms["nf4"]
    assert none.record().quant == "none" and {s.record().quant for s in nf4} == {"nf4"}
    everyone = [none, *nf4]
    with torch.no_grad():
        want = ref(IDS).logits
        with client(qmodel, everyone, config=ClientConfig(server_quant={"none"})) as model:
            assert model.blocks.quant_note() == "servers with nf4 weights are left out: server_quant " \
                                                "(--server-quant) allows none only"
            records = {r.addresses[0]: r for r in model.blocks.discovery.records()}
            assert {records[e].quant for e in records} == {"none", "nf4"}  # both are known to the client
            for _ in range(20):
                assert {h.peer for h in model.blocks.plan(kind="forward")} == {none.endpoint}
            assert {h.peer for h in model.blocks.plan()} == {none.endpoint}
            torch.testing.assert_close(model(IDS).logits, want, atol=1e-5, rtol=1e-5)  # exact: float32 blocks
        with client(qmodel, everyone, config=ClientConfig(server_quant={"nf4"})) as model:
            assert {h.peer for h in model.blocks.plan(kind="forward")} == {s.endpoint for s in nf4}
            assert rel(model(IDS).logits, want) > 1e-3
    # (the none server is known too: gossip from the nf4 one names it)
    with pytest.raises(PeerUnreachable, match=r"servers with nf4(, none)? weights are left out: server_quant "
                                              r"\(--server-quant\) allows int8 only"):
        client(qmodel, [nf4[0]], config=ClientConfig(server_quant={"int8"}, connect_timeout=1.0))


def test_checks_stay_within_one_quantization(qmodel, swarms):
    """--verify draws checkers among servers of the checked one's quantization only: here each span has one server
    of each quantization, so every check is skipped and no honest server is banned for its weights."""
    everyone = [swarms["none"][0], *swarms["nf4"]]
    with torch.no_grad(), client(qmodel, everyone, config=ClientConfig(verify=1.0)) as model:
        for _ in range(4):
            model(IDS)
        stats = model.blocks.verifier.stats
        assert stats.checks == 0 and stats.mismatches == 0 and stats.bans == 0 and stats.skipped >= 4
    with torch.no_grad(), client(qmodel, [*swarms["int8"], *swarms["nf4"]],
                                 config=ClientConfig(verify=1.0, server_quant={"int8"})) as model:
        model(IDS)
        assert model.blocks.verifier.stats.checks == 0  # the nf4 servers are not even candidates


# --- bad values ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["int4", "fp4", "", "8bit", "none,int8"])
def test_bad_quant_values_are_refused(text, qmodel):
    with pytest.raises(ConfigError, match="--quant must be one of none, int8, nf4, auto"):
        parse_quant(text)
    with pytest.raises(ConfigError, match="must be one of"):
        Server(ServerConfig(str(qmodel), (0, 1), host="127.0.0.1", quant=text or "x")).start()


@pytest.mark.parametrize("value", ["none", {"int4"}, set(), ["none", "fp8"], 8])
def test_bad_server_quant_values_are_refused(value):
    with pytest.raises(ConfigError, match="server_quant must"):
        ClientConfig(server_quant=value)
    assert ClientConfig(server_quant=["none", "int8"]).server_quant == frozenset({"none", "int8"})
    assert ClientConfig().server_quant is None


def test_cli_refuses_bad_quant_options(qmodel, capsys):
    from swarm.cli.app import run

    assert run(["serve", str(qmodel), "--blocks", "0:1", "--quant", "int4"]) == 2
    err = capsys.readouterr().err
    assert "--quant must be one of none, int8, nf4, auto" in err
    assert run(["chat", str(qmodel), "--server-quant", "none,int4", "--prompt", "hi"]) == 2
    assert "--server-quant must name one or more weight quantizations of none, int8, nf4; got unknown 'int4'" in \
        capsys.readouterr().err


def test_status_shows_the_weight_quantization(swarms):
    from swarm.cli.status import ServerView, _cells
    from swarm.core.coverage import Age

    cells = [_cells(ServerView(s.record(), Age(1.0, "clock"), False, None))["dtype"]
             for s in (swarms["none"][0], swarms["nf4"][0])]
    assert cells == ["float32", "float32+nf4"]


FAMILIES = {  # the other families' tiny models: (config class name, model class name, config)
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=64, n_head=4, n_layer=2)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                                         new_decoder_architecture=True, num_kv_heads=2)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                            num_attention_heads=4, num_key_value_heads=2,
                                                            num_local_experts=4)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_quantized(family, tmp_path, caplog):
    """Their linear layers are quantized too: a span's forward stays near float32, its session steps equal its
    forward, backward gives finite gradients; Mixtral's experts (fused 3-D tensors, not linear layers) stay in the
    dtype, which placement counts and the server says."""
    import transformers

    config_name, model_name, options = FAMILIES[family]
    torch.manual_seed(0)
    getattr(transformers, model_name)(getattr(transformers, config_name)(vocab_size=128, **options)).save_pretrained(
        tmp_path / family)
    source = ModelSource(tmp_path / family)
    hidden = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(0))
    exact = BlockSpan.load(source, 0, 2, torch.float32)
    for mode in MODES:
        span = BlockSpan.load(source, 0, 2, torch.float32, quant=mode)
        assert span.quant == mode
        with torch.inference_mode():
            out, want = span(hidden), exact(hidden)
            cache = span.new_cache(2, 6)
            steps = torch.cat([span.step(hidden[:, :3], cache), span.step(hidden[:, 3:], cache)], dim=1)
        assert 1e-5 < rel(out, want) < 0.02 and rel(steps, out) < 1e-5
        assert torch.isfinite(span.backward(hidden, torch.ones_like(hidden))[0]).all()
        cost = block_cost(source.family(), source.config(torch.float32), torch.float32, mode).weights
        assert weight_bytes(span.blocks) == 2 * cost
    full = block_cost(source.family(), source.config(torch.float32), torch.float32).weights
    assert (cost / full > 0.6) == (family == "mixtral")
    with caplog.at_level("WARNING", logger="swarm.core.server.server"):
        Server(ServerConfig(str(tmp_path / family), (0, 2), host="127.0.0.1", quant="nf4", throughput=1.0)
               )._resolve_quant(source.family(), source.config(torch.float32), 2)
    assert ("keeps" in caplog.text) == (family == "mixtral")

"""Prompt tuning through the swarm: logits, loss and gradients of ptune and deep_ptune parameters match the same model
run locally with plain transformers and the same prompts; servers never change; saved prompts load back."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import load_reference

from swarm import AutoDistributedModelForCausalLM, AutoDistributedModelForSequenceClassification
from swarm.core.client.config import ClientConfig
from swarm.transport.errors import ConfigError

IDS = torch.tensor([[5, 9, 17, 3, 44, 2], [7, 1, 8, 0, 0, 0], [99, 4, 4, 4, 12, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])  # right padding
PRE = 4


@pytest.fixture
def ref(tiny_llama_ref):
    """The shared reference model; the gradients the tests put into its weights are cleared afterwards."""
    yield tiny_llama_ref
    tiny_llama_ref.zero_grad(set_to_none=True)


@pytest.fixture
def two_servers(tiny_llama, start_server):
    return [start_server(tiny_llama, span) for span in ((0, 3), (3, 6))]


def peers(servers):
    return [s.endpoint for s in servers]


def local_hidden(ref, ids, mask, prompts, deep):
    """Plain transformers with the prompts in front and, for deep_ptune, each block's prompt added before it."""
    batch, pre = ids.shape[0], prompts.shape[0]
    embeds = ref.model.embed_tokens(ids)
    x = torch.cat([prompts[None].expand(batch, -1, -1), embeds], dim=1)
    full = torch.cat([torch.ones(batch, pre, dtype=mask.dtype), mask], dim=1)
    positions = (full.cumsum(-1) - 1).clamp(min=0)
    hooks = []
    if deep is not None:
        for i, layer in enumerate(ref.model.layers):
            def add(module, args, kwargs, i=i):
                hidden = args[0]
                hidden = torch.cat([hidden[:, :pre] + deep[i][None], hidden[:, pre:]], dim=1)
                return (hidden, *args[1:]), kwargs
            hooks.append(layer.register_forward_pre_hook(add, with_kwargs=True))
    try:
        out = ref.model(inputs_embeds=x, attention_mask=full, position_ids=positions).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()
    return out, full


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def randomize(model):
    """Non-zero deep prompts, so their effect and gradients are not trivial."""
    with torch.no_grad():
        if model.tuning.deep_prompts is not None:
            model.tuning.deep_prompts.normal_(0, 0.1)


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_classification_gradients_match_local_transformers(tiny_llama, ref, two_servers, mode):
    torch.manual_seed(0)
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        str(tiny_llama), num_labels=3, tuning_mode=mode, pre_seq_len=PRE, initial_peers=peers(two_servers))
    labels = torch.tensor([2, 0, 1])
    with model:
        randomize(model)
        assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.parameters() if p.requires_grad}
        out = model(input_ids=IDS, attention_mask=MASK, labels=labels)
        out.loss.backward()
        prompts, score = leaf(model.tuning.prompts), leaf(model.score.weight)
        deep = leaf(model.tuning.deep_prompts) if mode == "deep_ptune" else None
        hidden, full = local_hidden(ref, IDS, MASK, prompts, deep)
        last = PRE + MASK.sum(-1) - 1
        logits = hidden[torch.arange(3), last] @ score.T
        loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        torch.testing.assert_close(out.logits, logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(model.tuning.prompts.grad, prompts.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(model.score.weight.grad, score.grad, rtol=1e-4, atol=1e-6)
        if deep is not None:
            assert deep.grad.abs().sum() > 0
            torch.testing.assert_close(model.tuning.deep_prompts.grad, deep.grad, rtol=1e-4, atol=1e-6)
        assert model.embed_tokens.weight.grad is None  # frozen


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_lm_gradients_match_local_transformers(tiny_llama, ref, two_servers, mode):
    torch.manual_seed(1)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama), tuning_mode=mode, pre_seq_len=PRE,
                                                            initial_peers=peers(two_servers))
    labels = IDS.masked_fill(MASK == 0, -100)
    with model:
        randomize(model)
        out = model(input_ids=IDS, attention_mask=MASK, labels=labels)
        out.loss.backward()
        prompts = leaf(model.tuning.prompts)
        deep = leaf(model.tuning.deep_prompts) if mode == "deep_ptune" else None
        hidden, _ = local_hidden(ref, IDS, MASK, prompts, deep)
        logits = ref.lm_head(hidden[:, PRE:])
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        real = MASK.bool()
        torch.testing.assert_close(out.logits[real], logits[real], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(model.tuning.prompts.grad, prompts.grad, rtol=1e-4, atol=1e-6)
        if deep is not None:
            torch.testing.assert_close(model.tuning.deep_prompts.grad, deep.grad, rtol=1e-4, atol=1e-6)


def checksum(server):
    digest = hashlib.sha256()
    for name, tensor in sorted(server.span.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_training_changes_prompts_never_server_weights(tiny_llama, two_servers):
    before = [checksum(s) for s in two_servers]
    torch.manual_seed(2)
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        str(tiny_llama), num_labels=2, tuning_mode="deep_ptune", pre_seq_len=PRE, initial_peers=peers(two_servers))
    with model:
        start = [p.detach().clone() for p in model.trainable_parameters()]
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            model(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([0, 1, 1])).loss.backward()
            optimizer.step()
        assert all(not torch.equal(a, b) for a, b in zip(start, model.trainable_parameters(), strict=True))
    assert [checksum(s) for s in two_servers] == before


def test_large_batches_are_split_into_requests_the_servers_accept(tiny_llama, two_servers):
    torch.manual_seed(3)
    kwargs = dict(num_labels=2, tuning_mode="deep_ptune", pre_seq_len=PRE, initial_peers=peers(two_servers))
    whole = AutoDistributedModelForSequenceClassification.from_pretrained(str(tiny_llama), **kwargs)
    split = AutoDistributedModelForSequenceClassification.from_pretrained(
        str(tiny_llama), config=ClientConfig(max_request_tokens=20), **kwargs)  # 10 tokens a row: 2 rows a request
    labels = torch.tensor([0, 1, 1])
    with whole, split:
        randomize(whole)
        split.load_state_dict(whole.state_dict())
        calls = []
        real = split.blocks.call
        split.blocks.call = lambda hop, kind, fields, tensors, *a, **k: (calls.append(tensors[0].shape[0]),
                                                                         real(hop, kind, fields, tensors, *a, **k))[1]
        a = whole(input_ids=IDS, attention_mask=MASK, labels=labels)
        b = split(input_ids=IDS, attention_mask=MASK, labels=labels)
        a.loss.backward()
        b.loss.backward()
        assert sorted(set(calls)) == [1, 2]  # rows 0-1, then row 2, at each hop
        torch.testing.assert_close(a.logits, b.logits)
        for p, q in zip(whole.trainable_parameters(), split.trainable_parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad)
        too_long = ClientConfig(max_request_tokens=8)
        with AutoDistributedModelForSequenceClassification.from_pretrained(str(tiny_llama), config=too_long,
                                                                           **kwargs) as short:
            with pytest.raises(ConfigError, match="longer than one request may hold"):
                short(input_ids=IDS, attention_mask=MASK)


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_generation_with_prompts_matches_local(tiny_llama, ref, two_servers, tmp_path, mode):
    torch.manual_seed(4)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama), tuning_mode=mode, pre_seq_len=PRE,
                                                            initial_peers=peers(two_servers))
    with model:
        randomize(model)
        model.save_tuned(tmp_path / "prompts")
        prompts = model.tuning.prompts.detach()
        deep = None if model.tuning.deep_prompts is None else model.tuning.deep_prompts.detach()
    ids = IDS[:1]
    expected = []
    with torch.no_grad():  # greedy, recomputing the whole sequence locally each step
        seq = ids
        for _ in range(6):
            hidden, _ = local_hidden(ref, seq, torch.ones_like(seq), prompts, deep)
            seq = torch.cat([seq, ref.lm_head(hidden[:, -1:]).argmax(-1)], dim=1)
        expected = seq
    loaded = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama), prompts=str(tmp_path / "prompts"),
                                                             initial_peers=peers(two_servers))
    with loaded:
        assert loaded.tuning.mode == mode
        got = loaded.generate(ids, max_new_tokens=6, do_sample=False)
    assert got.tolist() == expected.tolist()


def test_saved_classifier_loads_back_with_the_same_predictions(tiny_llama, two_servers, tmp_path):
    torch.manual_seed(5)
    kwargs = dict(initial_peers=peers(two_servers))
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        str(tiny_llama), num_labels=2, tuning_mode="ptune", pre_seq_len=PRE, **kwargs)
    with model:
        expected = model(input_ids=IDS, attention_mask=MASK).logits
        model.save_tuned(tmp_path / "out", labels=["neg", "pos"])
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"prompts.safetensors", "tuning_config.json",
                                                              "adapter_config.json", "adapter_model.safetensors"}
    with AutoDistributedModelForSequenceClassification.from_pretrained(str(tiny_llama), prompts=str(tmp_path / "out"),
                                                                       **kwargs) as loaded:
        assert loaded.config.id2label == {0: "neg", 1: "pos"}
        torch.testing.assert_close(loaded(input_ids=IDS, attention_mask=MASK).logits, expected)
    with pytest.raises(ConfigError, match="tuned for a classifier"):
        AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama), prompts=str(tmp_path / "out"), **kwargs)
    with pytest.raises(ConfigError, match="not a swarm tuning result"):
        AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama), prompts=str(tmp_path), **kwargs)
    with pytest.raises(ConfigError, match="num_labels"):
        AutoDistributedModelForSequenceClassification.from_pretrained(str(tiny_llama), **kwargs)
    with pytest.raises(ConfigError, match="tuning_mode"):
        AutoDistributedModelForSequenceClassification.from_pretrained(str(tiny_llama), num_labels=2,
                                                                      tuning_mode="bitfit", **kwargs)


def test_peft_loads_ptune_prompts_onto_a_local_model(tiny_llama, two_servers, tmp_path):
    import peft
    torch.manual_seed(6)
    with AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama), tuning_mode="ptune", pre_seq_len=PRE,
                                                         initial_peers=peers(two_servers)) as model:
        expected = model(input_ids=IDS[:1]).logits
        model.save_tuned(tmp_path / "out")
    local = peft.PeftModel.from_pretrained(load_reference(tiny_llama), str(tmp_path / "out"))
    with torch.no_grad():
        got = local(input_ids=IDS[:1]).logits[:, PRE:]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_deep_prompt_gradients_survive_a_server_killed_between_forward_and_backward(fork_serve, tmp_path):
    import signal

    from conftest import make_tiny_model
    from test_recovery import FAST, start_all

    model_dir = make_tiny_model(tmp_path / f"ptune-ft-{tmp_path.name[-10:]}", layers=4, seed=31)
    ref = load_reference(model_dir)
    first = fork_serve(str(model_dir), "--blocks", "0:2", *FAST)
    others = {s.endpoint: s for s in start_all(fork_serve, model_dir, [(2, 4), (2, 4)], [first.endpoint])}
    torch.manual_seed(7)
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        str(model_dir), num_labels=2, tuning_mode="deep_ptune", pre_seq_len=PRE, initial_peers=[first.endpoint],
        config=ClientConfig(gossip_period=0.2, wait_for_blocks=30.0))
    labels = torch.tensor([1, 0, 1])
    with model:
        assert model.blocks.discovery.wait(lambda _: len(model.blocks.servers()) == 3, 15)
        randomize(model)
        killed = []
        real = model.blocks.hop_backward

        def hop_backward(hop, *args, **kwargs):
            if hop.start == 2 and not killed:  # its forward ran: it dies holding nothing the client needs
                others[hop.peer].stop(signal.SIGKILL)
                killed.append(hop.peer)
            return real(hop, *args, **kwargs)

        model.blocks.hop_backward = hop_backward
        out = model(input_ids=IDS, attention_mask=MASK, labels=labels)
        out.loss.backward()
        assert killed
        prompts, deep, score = leaf(model.tuning.prompts), leaf(model.tuning.deep_prompts), leaf(model.score.weight)
        hidden, _ = local_hidden(ref, IDS, MASK, prompts, deep)
        loss = torch.nn.functional.cross_entropy(hidden[torch.arange(3), PRE + MASK.sum(-1) - 1] @ score.T, labels)
        loss.backward()
        torch.testing.assert_close(model.tuning.deep_prompts.grad, deep.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(model.tuning.prompts.grad, prompts.grad, rtol=1e-4, atol=1e-6)


def test_a_kept_forward_graph_serves_its_backward_and_only_it(tiny_llama, start_server):
    from swarm.core.server.handler import HandlerLimits
    from swarm.transport.errors import BadRequest
    from swarm.transport.rpc import RpcClient

    server = start_server(tiny_llama, (0, 3), limits=HandlerLimits(max_kept=2))
    torch.manual_seed(8)
    hidden, grad = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    prompts = torch.randn(3, 1, 2, 64) * 0.1
    names = ["hidden", "prompts"]
    with RpcClient(server.endpoint) as client:
        def forward(x, keep=True):
            reply = client.call("forward", {"names": names, "keep": keep}, [x, prompts])
            return reply.tensors[0], reply.get("kept")

        def backward(x, kept=None):
            fields = {"names": ["hidden", "grad_output", "prompts"], **({"kept": kept} if kept else {})}
            return client.call("backward", fields, [x, grad, prompts]).tensors

        out, kept = forward(hidden)
        assert isinstance(kept, str) and server.handler.info()["kept_graphs"] == 1
        plain_out, none = forward(hidden, keep=False)
        assert none is None and torch.equal(out, plain_out)
        recomputed = backward(hidden)
        from_graph = backward(hidden, kept)
        assert all(torch.equal(a, b) for a, b in zip(recomputed, from_graph, strict=True))
        assert server.handler.info()["kept_graphs"] == 0  # used once
        # a graph of other inputs is not used: the server runs the blocks again
        _, kept = forward(hidden)
        other = hidden + 1
        assert all(torch.equal(a, b) for a, b in zip(backward(other), backward(other, kept), strict=True))
        # at most max_kept graphs wait; the oldest go first and their backward still works
        ids = [forward(hidden)[1] for _ in range(3)]
        assert server.handler.info()["kept_graphs"] == 2
        assert all(torch.equal(a, b) for a, b in zip(recomputed, backward(hidden, ids[0]), strict=True))
        with pytest.raises(BadRequest, match="kept"):
            client.call("backward", {"names": ["hidden", "grad_output"], "kept": 5}, [hidden, grad])
        with pytest.raises(BadRequest, match="keep"):
            client.call("forward", {"names": ["hidden"], "keep": "yes"}, [hidden])


def test_only_a_forward_that_needs_gradients_keeps_its_graph(tiny_llama, two_servers):
    with AutoDistributedModelForSequenceClassification.from_pretrained(
            str(tiny_llama), num_labels=2, tuning_mode="ptune", pre_seq_len=PRE,
            initial_peers=peers(two_servers)) as model:
        with torch.no_grad():
            model(input_ids=IDS, attention_mask=MASK)
        assert [s.handler.info()["kept_graphs"] for s in two_servers] == [0, 0]
        out = model(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([0, 1, 0]))
        assert [s.handler.info()["kept_graphs"] for s in two_servers] == [1, 1]
        out.loss.backward()
        assert [s.handler.info()["kept_graphs"] for s in two_servers] == [0, 0]

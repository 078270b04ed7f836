"""The distributed model against plain transformers on the same weights: tokens, logits, gradients."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch
from conftest import client, load_reference, make_tiny_model

from swarm.core.client.config import ClientConfig
from swarm.core.client.routing import MissingBlocks
from swarm.transport.errors import CacheFull, ConfigError

PROMPTS = [[5, 17, 99, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]


@pytest.fixture(scope="module")
def two_server_swarm(tiny_llama):
    from swarm.core.server import Server, ServerConfig

    servers = [Server(ServerConfig(str(tiny_llama), span, host="127.0.0.1")).start() for span in ((0, 3), (3, 6))]
    try:
        yield [s.endpoint for s in servers]
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(params=["two", "three"])
def swarm_peers(request, llama_swarm, two_server_swarm):
    return two_server_swarm if request.param == "two" else llama_swarm


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_transformers(tiny_llama, tiny_llama_ref, swarm_peers, prompt):
    model = client(tiny_llama, swarm_peers)
    ids = torch.tensor([prompt])
    expected = tiny_llama_ref.generate(ids, max_new_tokens=12, do_sample=False)
    outside = model.generate(ids, max_new_tokens=12, do_sample=False)
    with model.inference_session(max_length=64):
        inside = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert outside.tolist() == expected.tolist()
    assert inside.tolist() == expected.tolist()


def test_session_continues_across_generate_calls(tiny_llama, tiny_llama_ref, llama_swarm):
    model = client(tiny_llama, llama_swarm)
    ids = torch.tensor([PROMPTS[0]])
    with model.inference_session(max_length=64) as session:
        first = model.generate(ids, max_new_tokens=5, do_sample=False)
        held = session.position
        follow_up = torch.cat([first, torch.tensor([[7, 8, 9]])], dim=1)
        second = model.generate(follow_up, max_new_tokens=5, do_sample=False)
        # only the new tokens travelled: the servers held the first call's tokens
        assert held == first.shape[1] - 1
        assert session.position == second.shape[1] - 1
        with pytest.raises(ConfigError, match="must start with"):
            model.generate(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]),
                           max_new_tokens=1)
    expected = tiny_llama_ref.generate(follow_up, max_new_tokens=5, do_sample=False)
    assert second.tolist() == expected.tolist()


def test_sampling_with_seed_equals_transformers(tiny_llama, tiny_llama_ref, llama_swarm):
    model = client(tiny_llama, llama_swarm)
    ids = torch.tensor([PROMPTS[1]])
    torch.manual_seed(123)
    expected = tiny_llama_ref.generate(ids, max_new_tokens=10, do_sample=True, top_p=0.9, temperature=0.8)
    torch.manual_seed(123)
    got = model.generate(ids, max_new_tokens=10, do_sample=True, top_p=0.9, temperature=0.8)
    assert got.tolist() == expected.tolist()


def test_batched_left_padded_generation(tiny_llama, tiny_llama_ref, llama_swarm):
    model = client(tiny_llama, llama_swarm)
    ids = torch.tensor([[0, 0, 0, 5, 17, 99, 3], [1, 2, 3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = tiny_llama_ref.generate(ids, **kwargs)
    got = model.generate(ids, **kwargs)
    assert got.tolist() == expected.tolist()
    # the padded row generates what it generates alone
    alone = tiny_llama_ref.generate(ids[:1, 3:], max_new_tokens=8, do_sample=False)
    assert got[0, 3:].tolist() == alone[0].tolist()


def test_logits_allclose_with_padding(tiny_llama, tiny_llama_ref, llama_swarm):
    model = client(tiny_llama, llama_swarm)
    ids = torch.tensor([[3, 9, 27, 81, 1, 2], [0, 0, 4, 8, 16, 32]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        expected = tiny_llama_ref(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_input_gradients_match_local_autograd(tiny_llama, tiny_llama_ref, llama_swarm):
    model = client(tiny_llama, llama_swarm)
    ids = torch.tensor([[3, 9, 27, 81, 1, 2, 5, 7]])
    labels = ids.clone()

    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds, labels=labels).loss
    loss.backward()

    ref_embeds = tiny_llama_ref.get_input_embeddings()(ids).detach().requires_grad_(True)
    ref_loss = tiny_llama_ref(inputs_embeds=ref_embeds, labels=labels).loss
    ref_loss.backward()

    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeds.grad, ref_embeds.grad, atol=1e-6, rtol=1e-4)
    # client-side weights get their gradients too (LM head)
    torch.testing.assert_close(model.lm_head.weight.grad, tiny_llama_ref.lm_head.weight.grad, atol=1e-6, rtol=1e-4)


def test_two_clients_generate_at_once(tiny_llama, tiny_llama_ref, llama_swarm):
    prompts = [torch.tensor([PROMPTS[0]]), torch.tensor([PROMPTS[1]])]
    expected = [tiny_llama_ref.generate(p, max_new_tokens=16, do_sample=False).tolist() for p in prompts]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            model = client(tiny_llama, llama_swarm)
            for _ in range(3):
                results.setdefault(i, []).append(model.generate(prompts[i], max_new_tokens=16,
                                                                do_sample=False).tolist())
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert results[0] == [expected[0]] * 3
    assert results[1] == [expected[1]] * 3


@pytest.mark.parametrize("family,extra", [("mistral", {"sliding_window": 6}), ("qwen2", {}),
                                          ("llama", {"tie_word_embeddings": True})])
def test_other_families_through_two_servers(tmp_path, start_server, family, extra):
    path = make_tiny_model(tmp_path / family, family=family, layers=4, seed=3, **extra)
    ref = load_reference(path)
    servers = [start_server(path, (0, 2)), start_server(path, (2, 4))]
    model = client(path, [s.endpoint for s in servers])
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    expected = ref.generate(ids, max_new_tokens=10, do_sample=False)
    assert model.generate(ids, max_new_tokens=10, do_sample=False).tolist() == expected.tolist()


def test_bfloat16_server_is_close(tiny_llama, tiny_llama_ref, start_server):
    servers = [start_server(tiny_llama, (0, 6), dtype="bfloat16")]
    assert servers[0].span.dtype == torch.bfloat16
    model = client(tiny_llama, [servers[0].endpoint])
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        got = model(ids).logits
        expected = tiny_llama_ref(ids).logits
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)


def isolated_copy(path, tmp_path):
    """The same checkpoint under a name no other test's servers announce."""
    copy = tmp_path / f"isolated-{tmp_path.name}"
    shutil.copytree(path, copy)
    return copy


def test_missing_blocks_named(tiny_llama, start_server, tmp_path):
    path = isolated_copy(tiny_llama, tmp_path)
    server = start_server(path, (0, 2))
    other = start_server(path, (4, 6))
    config = ClientConfig(connect_timeout=1.0, wait_for_blocks=1.0)
    model = client(path, [server.endpoint, other.endpoint], config=config)
    with pytest.raises(MissingBlocks, match="blocks 2:4"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=2)


def test_session_that_does_not_fit_is_refused_at_open(tiny_llama, start_server, tmp_path):
    path = isolated_copy(tiny_llama, tmp_path)
    server = start_server(path, (0, 6), cache_tokens=32)
    model = client(path, [server.endpoint])
    with pytest.raises(CacheFull, match="cache full"):
        with model.inference_session(max_length=100):
            model(torch.tensor([[1, 2, 3]]))
    with model.inference_session(max_length=30):  # room is back once the refused session is gone
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 128)


def test_unknown_architecture_names_supported(tmp_path):
    from transformers import GPT2Config

    from swarm.core.models import family_for

    config = GPT2Config()
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ConfigError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        family_for(config)


def test_streamer_gets_every_new_token(tiny_llama, tiny_llama_ref, llama_swarm):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.chunks.append("end")

    model = client(tiny_llama, llama_swarm)
    ids = torch.tensor([PROMPTS[0]])
    streamer = Collect()
    out = model.generate(ids, max_new_tokens=6, do_sample=False, streamer=streamer)
    assert streamer.chunks[0] == PROMPTS[0]
    assert [c[0] for c in streamer.chunks[1:-1]] == out[0, len(PROMPTS[0]):].tolist()
    assert streamer.chunks[-1] == "end"

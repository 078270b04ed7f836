"""Packed passes: several requests' tokens through the blocks at once, each equal to its run alone."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from swarm.core.server.backend import BlockSpan, Work
from swarm.core.weights import ModelSource


@pytest.fixture(scope="module", params=["llama", "mistral"])
def span(request, tmp_path_factory) -> BlockSpan:
    overrides = {"sliding_window": 5} if request.param == "mistral" else {}
    path = make_tiny_model(tmp_path_factory.mktemp("pk") / request.param, family=request.param, layers=3,
                           **overrides)
    return BlockSpan.load(ModelSource(str(path)), 0, 3, torch.float32)


def _hidden(rows: int, new: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, new, 64, generator=torch.Generator().manual_seed(seed))


def test_steps_of_sessions_in_one_pass_equal_their_steps_alone(span):
    """Sessions with different cache lengths, batch sizes, paddings and a prefill next to decodes."""
    plans = [  # (rows, prompt tokens, padding of row 0 at the left)
        (1, 7, 0), (2, 3, 2), (1, 12, 0), (3, 1, 0),
    ]
    alone = [span.new_cache(rows, 32) for rows, _, _ in plans]
    packed = [span.new_cache(rows, 32) for rows, _, _ in plans]
    masks = []
    for rows, length, pad in plans:
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[0, :pad] = 0
        masks.append(mask)
    # prefill: the first two alone in the packed run too, the others packed with them
    firsts = [span.step(_hidden(r, n, i), alone[i], masks[i]) for i, (r, n, _) in enumerate(plans)]
    outs = span.run([Work(_hidden(r, n, i), masks[i], packed[i]) for i, (r, n, _) in enumerate(plans)])
    for a, b in zip(firsts, outs, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    for step in range(4):  # decodes of one token, and one session taking 3 at once
        news = [1, 3 if step == 1 else 1, 1, 1]
        hs = [_hidden(r, news[i], 100 * step + i) for i, (r, _, _) in enumerate(plans)]
        solo = [span.step(h, alone[i]) for i, h in enumerate(hs)]
        together = span.run([Work(h, None, packed[i]) for i, h in enumerate(hs)])
        for a, b in zip(solo, together, strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    for a, b in zip(alone, packed, strict=True):
        assert a.length == b.length and torch.equal(a.tokens_seen, b.tokens_seen)


def test_a_step_and_a_forward_share_a_pass(span):
    cache, solo_cache = span.new_cache(1, 16), span.new_cache(1, 16)
    span.step(_hidden(1, 4, 0), solo_cache)
    span.run([Work(_hidden(1, 4, 0), None, cache)])
    forward_alone = span.forward(_hidden(2, 6, 1))
    step_alone = span.step(_hidden(1, 1, 2), solo_cache)
    step_out, forward_out = span.run([Work(_hidden(1, 1, 2), None, cache), Work(_hidden(2, 6, 1))])
    torch.testing.assert_close(step_out, step_alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(forward_out, forward_alone, atol=1e-5, rtol=0)


def test_deep_prompts_in_chunks_equal_one_step(span):
    """A step split into chunks across passes (prompts cut at the chunk boundary) equals the step in one piece."""
    prompts = torch.randn(3, 1, 5, 64, generator=torch.Generator().manual_seed(9))
    hidden = _hidden(2, 9, 3)
    whole = span.step(hidden, span.new_cache(2, 16), None, prompts)
    cache = span.new_cache(2, 16)
    with torch.inference_mode():
        parts = [span.run([Work(hidden[:, a:b], None, cache, prompts, column=a)])[0]
                 for a, b in [(0, 3), (3, 7), (7, 9)]]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-5, rtol=0)

"""The task operators on their own: LoRA pools (rows given, reused, given back), the stacked LoRA of a mixed pass
equal to one LoRA at a time, the in-place and autograd paths equal, and `swarm status` showing adapters."""

from __future__ import annotations

import torch

from swarm.core.adapters import IA3Op, Lora, LoraOp, LoraPool, PromptOp, Task, apply_after, apply_before, lora_stacked

IN, OUT = 16, 24


def lora(rank: int, seed: int, pool: LoraPool | None = None, scaling: float = 0.5) -> LoraOp:
    g = torch.Generator().manual_seed(seed)
    return LoraOp(torch.randn(rank, IN, generator=g), torch.randn(OUT, rank, generator=g), scaling, pool)


def test_a_pool_holds_each_lora_in_its_own_rows_and_reuses_freed_ones():
    pool = LoraPool(IN, OUT, torch.float32)
    plain = [lora(r, seed) for seed, r in enumerate((2, 4, 3))]
    pooled = [lora(r, seed, pool) for seed, r in enumerate((2, 4, 3))]
    assert pool.rows == 9 and [op.start for op in pooled] == [0, 2, 6]
    for a, b in zip(plain, pooled, strict=True):
        assert torch.equal(a.a, b.a) and torch.equal(a.b, b.b) and a.nbytes == b.nbytes
    pooled[1].release()
    assert pool.holes == [(2, 4)] and pool.a[2:6].abs().sum() == 0  # zeroed: masked rows never carry NaN
    smaller = lora(3, 7, pool)  # reuses the hole's first rows
    assert smaller.start == 2 and pool.rows == 9 and pool.holes == [(5, 1)]
    assert torch.equal(smaller.a, lora(3, 7).a) and torch.equal(pooled[2].b, plain[2].b)
    pooled[2].release()  # the tail (and the hole before it) is given back
    assert pool.rows == 5 and pool.holes == []
    bigger = lora(5, 8, pool)  # no hole fits: the pool grows by exactly 5 rows
    assert bigger.start == 5 and pool.rows == 10
    assert torch.equal(pooled[0].a, plain[0].a) and torch.equal(smaller.b, lora(3, 7).b)


def test_a_mixed_pass_of_pooled_loras_equals_one_lora_at_a_time():
    pool = LoraPool(IN, OUT, torch.float32)
    ops = [lora(r, seed, pool, scaling=s) for seed, (r, s) in enumerate(((2, 0.5), (8, 2.0), (4, 1.0), (1, 3.0)))]
    x = torch.randn(1, 12, IN)
    y = torch.randn(1, 12, OUT)
    groups = [(0, 2, ops[0]), (3, 4, ops[1]), (4, 8, ops[2]), (9, 12, ops[3])]  # tokens 2 and 8: no LoRA
    expected = y.clone()
    for a, b, op in groups:
        expected[:, a:b] = op.after(x[:, a:b], expected[:, a:b])
    stacked, masks = y.clone(), {}
    lora_stacked(x, stacked, groups, masks)
    torch.testing.assert_close(stacked, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(stacked[:, 2], y[:, 2]) and torch.equal(stacked[:, 8], y[:, 8]) and len(masks) == 1
    again = y.clone()
    lora_stacked(x, again, groups, masks)  # the pass's second layer: the mask is reused
    assert torch.equal(again, stacked) and len(masks) == 1


def test_in_place_and_autograd_paths_give_the_same_outputs():
    pool = LoraPool(IN, OUT, torch.float32)
    g = torch.Generator().manual_seed(5)
    tasks = [Lora("a", {(0, "layer"): lora(3, 1, pool)}), Lora("b", {(0, "layer"): lora(2, 2, pool)}),
             Task("ia3", {(0, "layer"): IA3Op(torch.rand(OUT, 1, generator=g) + 0.5, feedforward=False)}),
             Task("ff", {(0, "layer"): IA3Op(torch.rand(1, IN, generator=g) + 0.5, feedforward=True)})]
    groups = [(0, 3, (tasks[0],)), (3, 5, (tasks[1], tasks[2])), (6, 9, (tasks[3],))]
    weight = torch.randn(OUT, IN, generator=g)
    x = torch.randn(1, 9, IN, generator=g)

    def layer() -> torch.Tensor:
        inp = apply_before(x, groups, 0, "layer")
        return apply_after(inp, torch.nn.functional.linear(inp, weight), groups, 0, "layer", {})

    with torch.inference_mode():
        fast = layer()
    with torch.enable_grad():
        slow = layer()
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    # each group equals its own operators on its own tokens; the token between groups is the bare layer
    base = torch.nn.functional.linear(x, weight)
    torch.testing.assert_close(slow[:, 5], base[:, 5])
    ff_in = x[:, 6:9] * tasks[3].ops[(0, "layer")].scale
    torch.testing.assert_close(slow[:, 6:9], torch.nn.functional.linear(ff_in, weight))
    both = tasks[2].ops[(0, "layer")].after(x[:, 3:5], tasks[1].ops[(0, "layer")].after(x[:, 3:5], base[:, 3:5]))
    torch.testing.assert_close(slow[:, 3:5], both, atol=1e-5, rtol=1e-5)


def test_a_deep_prompt_is_an_operator_on_the_block_input():
    prompt = torch.randn(1, 2, IN)
    x = torch.randn(1, 3 * 4, IN)  # 3 rows of 4 new tokens, packed
    out = PromptOp(prompt, rows=3, new=4).before(x)
    rows, added = x.view(3, 4, IN), out.view(3, 4, IN)
    torch.testing.assert_close(added[:, :2], rows[:, :2] + prompt)
    assert torch.equal(added[:, 2:], rows[:, 2:])


def test_status_lists_each_servers_adapters():
    from swarm.cli.status import _adapters
    from swarm.transport.records import ServerRecord

    record = ServerRecord("ab" * 8, "m", 0, 2, 4, 8, ("tcp://127.0.0.1:1",))
    assert _adapters(record) == "-"
    named = ServerRecord("ab" * 8, "m", 0, 2, 4, 8, ("tcp://127.0.0.1:1",), adapters=tuple(f"a{i}" for i in range(6)))
    assert _adapters(named) == "a0, a1, a2, a3 +2"

"""Padding and capacity in the MoE layer: nothing an expert computes reaches a token not routed to it.

The grouped path runs extra copies for speed: on the CPU it pads expert blocks with weight-zero copies, and on
the sync-free ``grouped_mm`` path it keeps the copies dropped for capacity at the end of the last expert's block
with weight zero. A weight-zero copy of a token ``t`` through an expert ``e`` not routed to it adds
``0 * e(x_t)`` to ``t``: ``nan`` where ``e`` overflows on ``x_t``. The reference is the loop oracle, which runs
each expert on its own live copies only.
"""

import pytest
import torch

from lightning_moe.nn import ExpertsConfig, MoEConfig, MoELayer, RouterConfig
from lightning_moe.nn.experts import padded_counts

DIM = 8


@pytest.fixture
def threads():
    """Set torch's intra-op thread count for one test (the CPU padding runs depend on it), then restore it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _one_hot_router_layer(num_experts: int, dispatch: str, overflowing: int, **moe: object) -> MoELayer:
    """A top-1 ReLU layer whose token with a 5 in coordinate ``e`` goes to expert ``e``; expert ``overflowing``
    overflows float16 on any such token (``5 * 60000`` per hidden unit), every other expert stays small."""
    experts = moe.pop("experts", ExpertsConfig(hidden_dim=DIM, gated=False, activation="relu"))
    cfg = MoEConfig(
        dim=DIM, router=RouterConfig(num_experts=num_experts, top_k=1), experts=experts, dispatch=dispatch, **moe
    )
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.gate.weight.copy_(50.0 * torch.eye(num_experts, DIM))
        w1 = torch.full((num_experts, DIM, DIM), 0.01)
        w1[overflowing] = 60000.0
        layer.experts.w1.copy_(w1)
        layer.experts.w2.copy_(torch.full((num_experts, DIM, DIM), 0.01))
    return layer


def _tokens_to(experts: list[int]) -> torch.Tensor:
    """``(T, DIM)`` tokens, token ``t`` routed to ``experts[t]`` by :func:`_one_hot_router_layer`."""
    x = torch.zeros(len(experts), DIM)
    x[torch.arange(len(experts)), torch.tensor(experts)] = 5.0
    return x


def test_padded_counts_leave_an_empty_expert_empty():
    # A run padded to one row count must not give an expert without copies a block: its padding copies would
    # repeat a token it was never routed to (there is no first token of its own to repeat).
    counts = [16, 0, 16, 16, 16, 16, 16, 16]
    assert padded_counts(counts, group=8) == counts
    assert padded_counts([2, 0, 2, 2, 2, 2, 2, 2], align=16, group=8) == [16, 0, 16, 16, 16, 16, 16, 16]
    assert padded_counts([0, 9, 10, 11, 0], group=8, by_load=True) == [0, 11, 11, 11, 0]
    # Runs of non-empty experts still pad to their largest count (8..11: 6 rows on 38).
    assert padded_counts([8, 9, 10, 11], group=4) == [11] * 4


def test_an_empty_expert_in_a_padded_run_never_reaches_token_zero(threads):
    # On 8 threads neighbouring blocks pad in runs of 8; under float16 autocast every block is rounded up to 16
    # rows. Expert 1 gets no token and overflows on every token: a block of copies of token 0 under it turned
    # token 0's output into nan.
    threads(8)
    routed = [0, 2, 3, 4, 5, 6, 7] * 2  # no token for expert 1
    outputs = {}
    for dispatch in ("grouped", "loop"):
        layer = _one_hot_router_layer(8, dispatch, overflowing=1)
        x = _tokens_to(routed).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.float16):
            y, stats = layer(x)
        assert stats.tokens_per_expert.tolist() == [2.0, 0.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
        y.float().sum().backward()
        outputs[dispatch] = (y.float(), x.grad, layer.experts.w1.grad, layer.experts.w2.grad)
    for grouped, loop in zip(outputs["grouped"], outputs["loop"], strict=True):
        assert torch.isfinite(grouped).all()
        torch.testing.assert_close(grouped, loop)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_a_dropped_copy_never_reaches_the_last_expert_on_the_grouped_mm_path(dtype):
    # kernel="grouped_mm" keeps the copies dropped for capacity in the last expert's block with weight zero, so
    # it never reads the counts back from the device. The last expert (3) overflows on every token; the four
    # tokens routed to expert 0 overflow its capacity ceil(1.0 * 8 / 4) = 2, so two of them are dropped: their
    # output must be the zero a dropped copy gives (the loop oracle), not 0 * inf = nan, and so must their
    # gradients and the last expert's.
    big = 60000.0 if dtype == torch.float16 else 3e38
    outputs = {}
    for dispatch in ("grouped", "loop"):
        kernel = "grouped_mm" if dispatch == "grouped" else "auto"
        layer = _one_hot_router_layer(
            4,
            dispatch,
            overflowing=3,
            experts=ExpertsConfig(hidden_dim=DIM, gated=False, activation="relu", kernel=kernel),
            capacity_factor=1.0,
        ).to(dtype)
        with torch.no_grad():
            layer.experts.w1[3] = big
        x = _tokens_to([0, 0, 0, 0, 1, 2, 1, 2]).to(dtype).requires_grad_(True)
        if dispatch == "grouped":
            assert not layer.experts.needs_host_counts(x)  # the sync-free dispatch
        y, stats = layer(x)
        assert stats.kept_per_expert.tolist() == [2.0, 2.0, 2.0, 0.0] and int(stats.num_dropped) == 2
        y.float().sum().backward()
        outputs[dispatch] = (y, x.grad, layer.experts.w1.grad, layer.experts.w2.grad)
    y_grouped = outputs["grouped"][0]
    assert y_grouped[2:4].eq(0).all()  # the two dropped tokens
    for grouped, loop in zip(outputs["grouped"], outputs["loop"], strict=True):
        assert torch.isfinite(grouped).all()
        torch.testing.assert_close(grouped, loop)


@pytest.mark.parametrize("kind", ["token_choice", "expert_choice"])
def test_no_live_copy_gives_the_loop_oracle_the_grouped_output_dtype(kind):
    # Under bf16 autocast the experts compute in bfloat16, so both paths return bfloat16 whenever a copy is live.
    # With none (a fully padded batch, an empty one) the loop oracle returned float32 zeros: its output dtype then
    # depended on the data, and disagreed with the grouped path's.
    cfg = MoEConfig(
        dim=DIM,
        router=RouterConfig(num_experts=4, top_k=2, kind=kind),
        experts=ExpertsConfig(hidden_dim=DIM),
        capacity_factor=1.0,
    )
    grouped = MoELayer(cfg)
    loop = MoELayer(MoEConfig(**{**cfg.__dict__, "dispatch": "loop"}))
    loop.load_state_dict(grouped.state_dict())
    cases = [
        (torch.randn(2, 3, DIM), torch.zeros(2, 3, dtype=torch.bool)),  # all padding
        (torch.randn(0, DIM), None),  # no tokens
        (torch.randn(2, 3, DIM), None),  # the ordinary case, for the dtype both must give
    ]
    for x, mask in cases:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_grouped, _ = grouped(x, mask)
            y_loop, _ = loop(x, mask)
        assert y_grouped.dtype == y_loop.dtype == torch.bfloat16
        torch.testing.assert_close(y_loop, y_grouped)
    for x, mask in cases[:2]:  # without autocast: the input's dtype
        assert loop(x, mask)[0].dtype == grouped(x, mask)[0].dtype == torch.float32


def test_a_mask_that_is_not_a_tensor_is_refused_by_name():
    # A list of flags crashed with an AttributeError deep in the checks ('list' object has no attribute ...).
    from lightning_moe.nn import Router
    from lightning_moe.zoo import registry

    router = RouterConfig(num_experts=4, top_k=2)
    layer = MoELayer(MoEConfig(dim=DIM, router=router, experts=ExpertsConfig(hidden_dim=4)))
    flags = [[True, True, False]]
    with pytest.raises(ValueError, match=r"mask of type list is invalid: expected a bool or integer tensor"):
        layer(torch.randn(1, 3, DIM), flags)
    with pytest.raises(ValueError, match=r"mask_T of type list is invalid"):
        Router(DIM, router)(torch.randn(3, DIM), flags[0])
    model = registry.build("mixtral-tiny")
    with pytest.raises(ValueError, match=r"attention_mask of type list is invalid"):
        model(torch.zeros(1, 3, dtype=torch.long), flags)

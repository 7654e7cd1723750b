"""Routing and load-balancing maths against independent references: transformers' routers and losses, and
hand-written implementations of the papers' formulas (nothing here shares code with the router or the losses)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.mixtral import modeling_mixtral
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
from transformers.models.switch_transformers import modeling_switch_transformers
from transformers.models.switch_transformers.configuration_switch_transformers import SwitchTransformersConfig
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersTop1Router,
    router_z_loss_func,
)

from lightning_moe.nn import losses
from lightning_moe.nn.capacity import expert_capacity
from lightning_moe.nn.config import ExpertsConfig, MoEConfig, RouterConfig
from lightning_moe.nn.moe import MoELayer
from lightning_moe.nn.router import Router
from tests.nn._helpers import random_router_config

DIM = 16


def _router(seed: int = 0, **kwargs) -> Router:
    torch.manual_seed(seed)
    return Router(DIM, RouterConfig(init_std=1.0, **kwargs))


def _sorted_pairs(ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = ids_TK.argsort(dim=-1)
    return ids_TK.gather(1, order), weights_TK.gather(1, order)


def _routed(router: Router, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    routing = router(x_TD)
    k = routing.top_k
    return _sorted_pairs(routing.expert_ids_N.view(-1, k), routing.weights_N.view(-1, k))


# ----------------------------------------------------------------------------------------------------------- routers


def _assert_routes_like(router, hf) -> None:
    """Give ``hf`` (a transformers top-k router) our gate weights; both must pick the same experts and weights."""
    with torch.no_grad():
        hf.weight.copy_(router.gate.weight)
    x = torch.randn(64, DIM)
    _, hf_w, hf_ids = hf(x)
    ids, weights = _routed(router, x)
    hf_ids, hf_w = _sorted_pairs(hf_ids, hf_w)
    torch.testing.assert_close(ids, hf_ids, rtol=0, atol=0)
    torch.testing.assert_close(weights, hf_w)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("scale", [1.0, 2.5])
@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)])
def test_sigmoid_biased_group_routing_matches_transformers_deepseek_v3_router(norm, scale, n_group, topk_group):

    num_experts, top_k = 16, 4
    router = _router(
        num_experts=num_experts,
        top_k=top_k,
        score_func="sigmoid",
        normalize_topk=norm,
        routed_scaling_factor=scale,
        n_group=n_group,
        topk_group=topk_group,
        group_score="top2_sum",
        score_bias=True,
    )
    router.score_bias.copy_(torch.randn(num_experts) * 0.3)
    hf_cfg = DeepseekV3Config(
        hidden_size=DIM,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=num_experts,
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
    )
    hf = DeepseekV3TopkRouter(hf_cfg)
    with torch.no_grad():
        hf.weight.copy_(router.gate.weight)
        hf.e_score_correction_bias.copy_(router.score_bias)
    x = torch.randn(64, DIM)
    logits, hf_w, hf_ids = hf(x)
    ids, weights = _routed(router, x)
    hf_ids, hf_w = _sorted_pairs(hf_ids, hf_w)
    torch.testing.assert_close(ids, hf_ids, rtol=0, atol=0)
    torch.testing.assert_close(weights, hf_w)


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2), (8, 3)])
def test_softmax_group_limited_greedy_matches_transformers_deepseek_v2_router(n_group, topk_group):

    num_experts, top_k = 16, 3
    router = _router(
        num_experts=num_experts,
        top_k=top_k,
        routed_scaling_factor=1.7,
        n_group=n_group,
        topk_group=topk_group,
        group_score="max",
    )
    hf_cfg = DeepseekV2Config(
        hidden_size=DIM,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=num_experts,
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        topk_method="greedy" if n_group == 1 else "group_limited_greedy",
        routed_scaling_factor=1.7,
    )
    hf = DeepseekV2TopkRouter(hf_cfg)
    _assert_routes_like(router, hf)


def test_softmax_after_topk_matches_transformers_mixtral_router():

    router = _router(num_experts=8, top_k=2, softmax_after_topk=True)
    hf = MixtralTopKRouter(
        MixtralConfig(
            hidden_size=DIM, num_attention_heads=2, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2
        )
    )
    _assert_routes_like(router, hf)


@pytest.mark.parametrize("norm", [False, True])
def test_softmax_then_topk_matches_transformers_qwen2_moe_router(norm):

    router = _router(num_experts=8, top_k=3, normalize_topk=norm)
    hf = Qwen2MoeTopKRouter(
        Qwen2MoeConfig(
            hidden_size=DIM,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=norm,
        )
    )
    _assert_routes_like(router, hf)


def test_top1_softmax_matches_transformers_switch_router_probabilities():

    router = _router(num_experts=8, top_k=1)
    hf = SwitchTransformersTop1Router(
        SwitchTransformersConfig(
            d_model=DIM, num_heads=2, d_kv=8, num_experts=8, expert_capacity=1000, router_jitter_noise=0.0
        )
    )
    with torch.no_grad():
        hf.classifier.weight.copy_(router.gate.weight)
    x = torch.randn(2, 32, DIM)
    hf_index, hf_probs, hf_logits = hf(x)
    routing = router(x.reshape(-1, DIM))
    torch.testing.assert_close(routing.logits_TE, hf_logits.reshape(-1, 8))
    torch.testing.assert_close(routing.expert_ids_N, hf_index.reshape(-1, 8).argmax(-1), rtol=0, atol=0)
    torch.testing.assert_close(routing.weights_N, hf_probs.reshape(-1))


# ------------------------------------------------------------------------------------------------------------ losses


def _padding_mask(batch: int, seq: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
    return torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_layer_load_balance_is_transformers_mixtral_loss_over_top_k(top_k, padded):

    num_experts, batch, seq = 8, 3, 10
    torch.manual_seed(top_k)
    layer = MoELayer(
        MoEConfig(
            dim=DIM,
            router=RouterConfig(num_experts=num_experts, top_k=top_k, init_std=1.0),
            experts=ExpertsConfig(hidden_dim=8),
        )
    )
    x = torch.randn(batch, seq, DIM)
    mask = _padding_mask(batch, seq, top_k) if padded else None
    _, stats = layer(x, mask)
    logits = layer.router.logits(x.reshape(-1, DIM))
    expected = modeling_mixtral.load_balancing_loss_func((logits,), num_experts, top_k, mask)
    torch.testing.assert_close(stats.losses["load_balance"], expected / top_k)


def _paper_switch_aux(probs_TE: torch.Tensor, ids_TK: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
    """Switch eq. (4)-(6) generalised to top-k: f_i = copies to i / (K * T), P_i = mean prob; E * sum f_i P_i."""
    num_experts = probs_TE.shape[1]
    real = mask_T.nonzero().squeeze(1).tolist()
    f = [0.0] * num_experts
    for t in real:
        for e in ids_TK[t].tolist():
            f[e] += 1.0 / (len(real) * ids_TK.shape[1])
    p = probs_TE[mask_T].mean(0)
    return num_experts * sum(f[e] * p[e] for e in range(num_experts))


def test_load_balance_loss_of_sigmoid_router_uses_normalised_scores_and_padding_counts_nowhere():
    torch.manual_seed(0)
    layer = MoELayer(
        MoEConfig(
            dim=DIM,
            router=RouterConfig(num_experts=6, top_k=2, score_func="sigmoid", init_std=1.0, score_bias=True),
            experts=ExpertsConfig(hidden_dim=8),
        )
    )
    layer.router.score_bias.copy_(torch.randn(6))
    x = torch.randn(2, 7, DIM)
    mask = _padding_mask(2, 7, 3)
    _, stats = layer(x, mask)
    x_TD = torch.where(mask.reshape(-1, 1), x.reshape(-1, DIM), 0)
    scores = torch.sigmoid(x_TD @ layer.router.gate.weight.t())
    ids = (scores + layer.router.score_bias).topk(2, dim=-1).indices
    expected = _paper_switch_aux(scores / scores.sum(-1, keepdim=True), ids, mask.reshape(-1))
    torch.testing.assert_close(stats.losses["load_balance"], expected)


def _paper_deepseek_seq_aux(scores_BSE: torch.Tensor, ids_BSK: torch.Tensor, mask_BS: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 eqs. (17)-(20) per sequence (without alpha), averaged over sequences with real tokens."""
    batch, _, num_experts = scores_BSE.shape
    top_k = ids_BSK.shape[-1]
    per_seq = []
    for b in range(batch):
        real = mask_BS[b]
        num = int(real.sum())
        if num == 0:
            continue
        s_prime = scores_BSE[b][real] / scores_BSE[b][real].sum(-1, keepdim=True)
        onehot = F.one_hot(ids_BSK[b][real], num_experts).sum(1).to(scores_BSE.dtype)  # (T, E)
        f = num_experts / (top_k * num) * onehot.sum(0)
        p = s_prime.mean(0)
        per_seq.append((f * p).sum())
    return torch.stack(per_seq).mean()


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_layer_seq_balance_matches_deepseek_v3_paper(score_func):
    torch.manual_seed(1)
    layer = MoELayer(
        MoEConfig(
            dim=DIM,
            router=RouterConfig(num_experts=8, top_k=3, score_func=score_func, init_std=1.0),
            experts=ExpertsConfig(hidden_dim=8),
        )
    )
    x = torch.randn(3, 9, DIM)
    mask = _padding_mask(3, 9, 5)
    _, stats = layer(x, mask)
    x_TD = torch.where(mask.reshape(-1, 1), x.reshape(-1, DIM), 0)
    logits = x_TD @ layer.router.gate.weight.t()
    scores = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1)
    ids = scores.topk(3, dim=-1).indices
    expected = _paper_deepseek_seq_aux(scores.view(3, 9, 8), ids.view(3, 9, 3), mask)
    torch.testing.assert_close(stats.losses["seq_balance"], expected)


def test_z_loss_matches_transformers_switch_and_ignores_padding():

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 8) * 3
    torch.testing.assert_close(losses.router_z_loss(logits.reshape(-1, 8)), router_z_loss_func(logits))
    mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    real = logits[mask]
    torch.testing.assert_close(losses.router_z_loss(logits.reshape(-1, 8), mask), router_z_loss_func(real[None]))


def test_top1_load_balance_matches_transformers_switch_for_one_group():

    torch.manual_seed(0)
    probs = torch.randn(1, 20, 8).softmax(-1)
    ids = probs.argmax(-1)
    expected = modeling_switch_transformers.load_balancing_loss_func(probs, ids)
    torch.testing.assert_close(losses.load_balancing_loss(probs[0], ids[0][:, None]), expected)


# ---------------------------------------------------------------------------------------------- capacity and dropping


def _expert_out(layer: MoELayer, e: int, x_MD: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    return (F.silu(x_MD @ ex.w1[e]) * (x_MD @ ex.w3[e])) @ ex.w2[e]


def _combine(layer: MoELayer, x_TD: torch.Tensor, kept: list[tuple[int, int, float]]) -> torch.Tensor:
    out = torch.zeros_like(x_TD)
    for t, e, w in kept:
        out[t] += w * _expert_out(layer, e, x_TD[t : t + 1])[0]
    return out


def _gshard_keep(
    ids_TK: list[list[int]],
    w_TK: list[list[float]],
    live_T: list[bool],
    capacity_of_group: dict[int, int],
    group_T: list[int],
    priority: str,
) -> list[tuple[int, int, float]]:
    """Greedy slot filling in priority order, one counter per (group, expert): GShard's position_in_expert."""
    copies = [(k, t) for k in range(len(ids_TK[0])) for t in range(len(ids_TK)) if live_T[t]]
    if priority == "weight":
        copies.sort(key=lambda kt: -w_TK[kt[1]][kt[0]])  # stable: ties keep the position order
    used: dict[tuple[int, int], int] = {}
    kept = []
    for k, t in copies:
        e, g = ids_TK[t][k], group_T[t]
        if used.get((g, e), 0) < capacity_of_group[g]:
            used[(g, e)] = used.get((g, e), 0) + 1
            kept.append((t, e, w_TK[t][k]))
    return kept


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("priority", ["position", "weight"])
@pytest.mark.parametrize("scope", ["batch", "sequence"])
@pytest.mark.parametrize("factor,absolute", [(0.5, None), (1.25, None), (None, 2)])
def test_capacity_dropping_matches_gshard_greedy_reference(top_k, priority, scope, factor, absolute):
    num_experts, batch, seq = 4, 2, 11
    torch.manual_seed(7)
    layer = MoELayer(
        MoEConfig(
            dim=DIM,
            router=RouterConfig(num_experts=num_experts, top_k=top_k, init_std=1.0),
            experts=ExpertsConfig(hidden_dim=8, init_std=0.5),
            capacity_factor=factor,
            expert_capacity=absolute,
            drop_priority=priority,
            capacity_scope=scope,
        )
    )
    x = torch.randn(batch, seq, DIM)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[1, 7:] = False
    out, stats = layer(x, mask)

    x_TD = torch.where(mask.reshape(-1, 1), x.reshape(-1, DIM), 0)
    probs = (x_TD @ layer.router.gate.weight.t()).softmax(-1)
    w, ids = probs.topk(top_k, dim=-1)
    live = mask.reshape(-1).tolist()
    if scope == "batch":
        group_T = [0] * (batch * seq)
        real = {0: int(mask.sum())}
    else:
        group_T = [t // seq for t in range(batch * seq)]
        real = {b: int(mask[b].sum()) for b in range(batch)}
    if absolute is not None:
        cap = {g: min(absolute, n) for g, n in real.items()}
    else:
        cap = {g: min(math.ceil(factor * n * top_k / num_experts), n) for g, n in real.items()}
    kept = _gshard_keep(ids.tolist(), w.tolist(), live, cap, group_T, priority)
    expected = _combine(layer, x_TD, kept)
    torch.testing.assert_close(out.reshape(-1, DIM), expected, atol=1e-5, rtol=1e-5)
    assert int(stats.num_dropped) == int(mask.sum()) * top_k - len(kept)


@pytest.mark.parametrize("factor,absolute", [(0.5, None), (2.0, None), (None, 3)])
def test_expert_choice_matches_each_expert_taking_its_top_c_real_tokens(factor, absolute):
    num_experts, top_k = 4, 2
    torch.manual_seed(3)
    layer = MoELayer(
        MoEConfig(
            dim=DIM,
            router=RouterConfig(num_experts=num_experts, top_k=top_k, kind="expert_choice", init_std=1.0),
            experts=ExpertsConfig(hidden_dim=8, init_std=0.5),
            capacity_factor=factor,
            expert_capacity=absolute,
        )
    )
    x = torch.randn(2, 9, DIM)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    out, _ = layer(x, mask)
    x_TD = torch.where(mask.reshape(-1, 1), x.reshape(-1, DIM), 0)
    probs = (x_TD @ layer.router.gate.weight.t()).softmax(-1)
    n_real = int(mask.sum())
    cap = min(absolute, n_real) if absolute else min(math.ceil(factor * n_real * top_k / num_experts), n_real)
    real_ids = mask.reshape(-1).nonzero().squeeze(1)
    kept = []
    for e in range(num_experts):
        for t in real_ids[probs[real_ids, e].topk(cap).indices].tolist():
            kept.append((t, e, float(probs[t, e])))
    torch.testing.assert_close(out.reshape(-1, DIM), _combine(layer, x_TD, kept), atol=1e-5, rtol=1e-5)


def test_eval_capacity_factor_replaces_the_training_factor_in_eval_only():
    layer = MoELayer(
        MoEConfig(
            dim=DIM,
            router=RouterConfig(num_experts=4, top_k=2),
            experts=ExpertsConfig(hidden_dim=8),
            capacity_factor=1.0,
            eval_capacity_factor=2.0,
        )
    )
    assert layer.capacity(10) == math.ceil(1.0 * 10 * 2 / 4)
    layer.eval()
    assert layer.capacity(10) == math.ceil(2.0 * 10 * 2 / 4)
    assert expert_capacity(10, 2, 4, 0.3) == math.ceil(0.3 * 10 * 2 / 4)


# -------------------------------------------------------------------------------------------------- fuzzed references


def _reference_token_choice(logits_TE: torch.Tensor, cfg: RouterConfig, bias_E: torch.Tensor | None):
    """Token by token, straight from the papers: pick, then weigh."""
    num_tokens, num_experts = logits_TE.shape
    per_group = num_experts // cfg.n_group
    ids_out, w_out = [], []
    for t in range(num_tokens):
        logits = logits_TE[t]
        scores = logits.sigmoid() if cfg.score_func == "sigmoid" else logits.softmax(-1)
        choice = (logits if cfg.softmax_after_topk else scores).clone()
        if bias_E is not None:
            choice = choice + bias_E
        allowed = list(range(num_experts))
        if cfg.n_group > 1:
            groups = []
            for g in range(cfg.n_group):
                members = sorted(choice[g * per_group : (g + 1) * per_group].tolist(), reverse=True)
                groups.append(members[0] if cfg.group_score == "max" else members[0] + members[1])
            best = sorted(range(cfg.n_group), key=lambda g: -groups[g])[: cfg.topk_group]
            allowed = [e for e in allowed if e // per_group in best]
        ids = sorted(allowed, key=lambda e: -float(choice[e]))[: cfg.top_k]
        if cfg.softmax_after_topk:
            w = logits[ids].softmax(-1)
        else:
            w = scores[ids]
        if cfg.normalize_topk:
            w = w / w.sum()
        w = w * cfg.routed_scaling_factor
        ids_out.append(ids)
        w_out.append(w)
    return torch.tensor(ids_out), torch.stack(w_out)


@pytest.mark.parametrize("seed", range(12))
def test_random_router_configs_match_the_per_token_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    cfg = random_router_config(gen)
    torch.manual_seed(seed)
    router = Router(DIM, cfg)
    if router.score_bias is not None:
        router.score_bias.copy_(torch.randn(cfg.num_experts, generator=gen) * 0.2)
    x = torch.randn(20, DIM, dtype=torch.float64, generator=gen)
    routing = router(x)
    logits = x @ router.gate.weight.double().t()
    ids, w = _reference_token_choice(logits, cfg, router.score_bias)
    got_ids, got_w = _sorted_pairs(routing.expert_ids_N.view(-1, cfg.top_k), routing.weights_N.view(-1, cfg.top_k))
    ids, w = _sorted_pairs(ids, w)
    assert torch.equal(got_ids, ids), cfg
    torch.testing.assert_close(got_w, w.to(got_w.dtype))


# ------------------------------------------------------------------------------------------- training-only randomness


def test_jitter_scales_only_the_router_input_by_uniform_noise_in_range():
    eps, num_experts = 0.3, 4
    torch.manual_seed(0)
    layer = MoELayer(
        MoEConfig(
            dim=DIM,
            router=RouterConfig(num_experts=num_experts, top_k=2, jitter_eps=eps, init_std=1.0),
            experts=ExpertsConfig(hidden_dim=8, init_std=0.5),
        )
    )
    x = torch.randn(12, DIM)
    torch.manual_seed(123)
    out, stats = layer(x)
    torch.manual_seed(123)
    noise = torch.empty(12, DIM).uniform_(1 - eps, 1 + eps)  # Switch: x * U(1 - eps, 1 + eps)
    assert noise.min() >= 1 - eps and noise.max() <= 1 + eps
    probs = ((x * noise) @ layer.router.gate.weight.t()).softmax(-1)
    w, ids = probs.topk(2, dim=-1)
    kept = [(t, int(ids[t, k]), float(w[t, k])) for t in range(12) for k in range(2)]
    # The experts see the clean tokens; only the routing decision and weights see the noise.
    torch.testing.assert_close(out, _combine(layer, x, kept), atol=1e-5, rtol=1e-5)
    layer.eval()
    eval_probs = (x @ layer.router.gate.weight.t()).softmax(-1)
    torch.testing.assert_close(layer.router(x).probs_TE, eval_probs)


def test_random_routing_keeps_the_second_expert_with_gshard_probability_before_capacity():
    num_experts, tokens = 4, 16
    torch.manual_seed(0)
    layer = MoELayer(
        MoEConfig(
            dim=DIM,
            router=RouterConfig(
                num_experts=num_experts, top_k=2, normalize_topk=True, random_routing=True, init_std=1.0
            ),
            experts=ExpertsConfig(hidden_dim=8, init_std=0.5),
            capacity_factor=0.75,
        )
    )
    x = torch.randn(tokens, DIM)
    torch.manual_seed(5)
    out, stats = layer(x)
    torch.manual_seed(5)
    uniform = torch.rand(tokens, 2)
    probs = (x @ layer.router.gate.weight.t()).softmax(-1)
    g, ids = probs.topk(2, dim=-1)
    g = g / g.sum(-1, keepdim=True)
    live_second = (uniform[:, 1] < (2 * g[:, 1]).clamp(max=1)).tolist()  # GShard: keep with probability 2 * g2
    # Copies dropped by random routing take no slot (GShard drops them before counting positions).
    cap = math.ceil(0.75 * tokens * 2 / num_experts)
    used = [0] * num_experts
    kept = []
    for k in range(2):
        for t in range(tokens):
            e = int(ids[t, k])
            if (k == 0 or live_second[t]) and used[e] < cap:
                used[e] += 1
                kept.append((t, e, float(g[t, k])))
    torch.testing.assert_close(out, _combine(layer, x, kept), atol=1e-5, rtol=1e-5)
    assert stats.expert_ids[:, 1].eq(-1).tolist() == [not live for live in live_second]


@pytest.mark.parametrize("seed", range(4))
def test_router_gradients_match_the_reference_in_float64(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    cfg = random_router_config(gen)
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(dim=DIM, router=cfg, experts=ExpertsConfig(hidden_dim=8, init_std=0.5))).double()
    if layer.router.score_bias is not None:
        layer.router.score_bias.copy_(torch.randn(cfg.num_experts, generator=gen) * 0.2)
    x = torch.randn(2, 6, DIM, dtype=torch.float64, generator=gen)
    out, stats = layer(x)
    (
        out.square().sum() + stats.losses["load_balance"] + stats.losses["seq_balance"] + stats.losses["z_loss"]
    ).backward()
    grad = layer.router.gate.weight.grad.clone()

    weight = layer.router.gate.weight.detach().clone().requires_grad_(True)
    x_TD = x.reshape(-1, DIM)
    logits = x_TD @ weight.t()
    ids, w = _reference_token_choice(logits, cfg, layer.router.score_bias)
    ref = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(cfg.top_k):
            e = int(ids[t, k])
            ref[t] = ref[t] + w[t, k] * _expert_out(layer, e, x_TD[t : t + 1])[0].detach()
    scores = logits.sigmoid() if cfg.score_func == "sigmoid" else logits.softmax(-1)
    probs = scores / scores.sum(-1, keepdim=True)
    mask = torch.ones(x_TD.shape[0], dtype=torch.bool)
    aux = _paper_switch_aux(probs, ids, mask)
    seq = _paper_deepseek_seq_aux(scores.view(2, 6, -1), ids.view(2, 6, -1), mask.view(2, 6))
    z = torch.logsumexp(logits, -1).square().mean()
    (ref.square().sum() + aux + seq + z).backward()
    torch.testing.assert_close(grad, weight.grad)


# ---------------------------------------------------------------------------------------------- standalone Router


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_compute_gate_precision_runs_the_gate_in_the_input_dtype_outside_autocast(dtype):
    router = _router(num_experts=4, top_k=2, gate_precision="compute")
    x = torch.randn(6, DIM).to(dtype)
    routing = router(x)
    expected = (x @ router.gate.weight.to(dtype).t()).to(routing.logits_TE.dtype)
    torch.testing.assert_close(routing.logits_TE, expected, rtol=0, atol=0)
    assert routing.logits_TE.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    routing.weights_N.sum().backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("capacity", [-1, 7])
def test_expert_choice_router_refuses_a_capacity_outside_the_token_count(capacity):
    router = _router(num_experts=4, top_k=2, kind="expert_choice")
    with pytest.raises(ValueError, match=rf"capacity={capacity} is invalid: .*\[0, 6\]"):
        router(torch.randn(6, DIM), capacity=capacity)

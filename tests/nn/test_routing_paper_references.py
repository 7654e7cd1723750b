"""Routing, balancing losses and capacity against references written here from the papers and `transformers`.

Nothing below shares code with the router, the losses or the capacity helpers: the references loop token by
token (GShard's greedy slot filling, each expert-choice expert taking its top tokens) in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

from lightning_moe.nn import ExpertsConfig, MoEConfig, MoELayer, RouterConfig, losses
from lightning_moe.nn.router import Router
from tests.nn._helpers import pick, random_router_config

DIM = 12


# ------------------------------------------------------------------------------------ z-loss and entropy shapes


@pytest.mark.parametrize("batch,seq", [(3, 3), (2, 5)])
def test_z_loss_and_entropy_of_batched_logits_equal_those_of_the_flat_tokens(batch, seq):
    # transformers' Switch z-loss takes (B, S, E) logits; ours must give the same per-token mean for them, not a
    # sum over S divided by B (B == S) or a broadcasting error (B != S).
    torch.manual_seed(0)
    logits = torch.randn(batch, seq, 6) * 3
    probs = logits.softmax(-1)
    flat_logits, flat_probs = logits.reshape(-1, 6), probs.reshape(-1, 6)
    torch.testing.assert_close(losses.router_z_loss(logits), router_z_loss_func(logits))
    torch.testing.assert_close(losses.router_z_loss(logits), losses.router_z_loss(flat_logits))
    entropy_T = -(flat_probs * flat_probs.log()).sum(-1)
    torch.testing.assert_close(losses.router_entropy(probs), entropy_T.mean())
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[-1, 1:] = False
    real = mask.reshape(-1)
    torch.testing.assert_close(losses.router_z_loss(logits, mask), router_z_loss_func(flat_logits[real][None]))
    torch.testing.assert_close(losses.router_entropy(probs, mask), entropy_T[real].mean())
    with pytest.raises(ValueError, match=r"mask.shape=\(2,\) is invalid"):
        losses.router_z_loss(logits, torch.ones(2, dtype=torch.bool))


# ------------------------------------------------------------------------------------------ token-choice layer


def _expert(layer: MoELayer, e: int, x_D: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    return (F.silu(x_D @ ex.w1[e]) * (x_D @ ex.w3[e])) @ ex.w2[e]


def _route_token(logits_E: torch.Tensor, cfg: RouterConfig, bias_E: torch.Tensor | None):
    """One token's experts and weights, straight from the papers (DeepSeek-V2/V3, Mixtral, Switch)."""
    num_experts = logits_E.shape[0]
    scores = logits_E.sigmoid() if cfg.score_func == "sigmoid" else logits_E.softmax(-1)
    choice = (logits_E if cfg.softmax_after_topk else scores).tolist()
    if bias_E is not None:
        choice = [c + float(b) for c, b in zip(choice, bias_E, strict=True)]
    allowed = list(range(num_experts))
    if cfg.n_group > 1:
        per_group = num_experts // cfg.n_group
        group_score = []
        for g in range(cfg.n_group):
            members = sorted(choice[g * per_group : (g + 1) * per_group], reverse=True)
            group_score.append(members[0] if cfg.group_score == "max" else members[0] + members[1])
        best = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[: cfg.topk_group]
        allowed = [e for e in allowed if e // per_group in best]
    ids = sorted(allowed, key=lambda e: -choice[e])[: cfg.top_k]
    weights = logits_E[ids].softmax(-1) if cfg.softmax_after_topk else scores[ids]
    if cfg.normalize_topk:
        weights = weights / weights.sum()
    return ids, (weights * cfg.routed_scaling_factor).tolist()


def _random_token_choice_layer(gen: torch.Generator, seed: int) -> tuple[MoELayer, dict]:
    router = random_router_config(gen, group_counts=(1, 2, 3), random_routing=True)
    factor, absolute = pick(gen, [(None, None), (0.5, None), (1.0, None), (1.3, None), (None, 2)])
    cfg = MoEConfig(
        dim=DIM,
        router=router,
        experts=ExpertsConfig(hidden_dim=8, init_std=0.5),
        capacity_factor=factor,
        eval_capacity_factor=pick(gen, [None, 0.7, 2.0]),
        expert_capacity=absolute,
        drop_priority=pick(gen, ["position", "weight"]),
        capacity_scope=pick(gen, ["batch", "sequence"]),
    )
    torch.manual_seed(seed)
    layer = MoELayer(cfg).double().train(pick(gen, [True, False]))
    if layer.router.score_bias is not None:
        layer.router.score_bias.copy_(torch.randn(router.num_experts, generator=gen, dtype=torch.float64) * 0.2)
    return layer, {"padded": pick(gen, [False, True])}


@pytest.mark.parametrize("seed", range(16))
def test_token_choice_layer_matches_gshard_greedy_reference_across_random_configs(seed):
    """Group-limited, biased, random routing, capacity by position or weight, per batch or sequence, padding."""
    gen = torch.Generator().manual_seed(seed)
    layer, case = _random_token_choice_layer(gen, seed)
    cfg, rcfg = layer.config, layer.config.router
    batch, seq, top_k = 3, 7, rcfg.top_k
    x = torch.randn(batch, seq, DIM, dtype=torch.float64, generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    if case["padded"]:
        mask[1, 4:] = False
        mask[2, :2] = False
    torch.manual_seed(100 + seed)
    out, stats = layer(x, mask)

    torch.manual_seed(100 + seed)  # random routing's draws: one uniform per (token, choice)
    x_TD = torch.where(mask.reshape(-1, 1), x.reshape(-1, DIM), 0)
    logits_TE = x_TD @ layer.router.gate.weight.detach().t()
    num_tokens, live = batch * seq, mask.reshape(-1).tolist()
    routes = [_route_token(logits_TE[t], rcfg, layer.router.score_bias) for t in range(num_tokens)]
    alive = [[live[t]] * top_k for t in range(num_tokens)]
    if layer.training and rcfg.random_routing:
        uniform = torch.rand(num_tokens, top_k, dtype=torch.float64)
        for t, (_, w) in enumerate(routes):
            largest = max(range(top_k), key=lambda k, w=w: (w[k], -k))  # the first of equal weights
            for k in set(range(top_k)) - {largest}:  # GShard: keep the others with probability min(1, K * w_k / sum(w))
                alive[t][k] = alive[t][k] and float(uniform[t, k]) < min(1.0, top_k * w[k] / sum(w))
    factor = cfg.capacity_factor
    if not layer.training and cfg.eval_capacity_factor is not None:
        factor = cfg.eval_capacity_factor
    group_T = [0] * num_tokens if cfg.capacity_scope == "batch" else [t // seq for t in range(num_tokens)]
    real = {g: sum(live[t] for t in range(num_tokens) if group_T[t] == g) for g in set(group_T)}
    if cfg.expert_capacity is not None:
        cap = {g: min(cfg.expert_capacity, n) for g, n in real.items()}
    elif factor is None:
        cap = {g: num_tokens * top_k for g in real}
    else:
        cap = {g: min(math.ceil(round(factor * n * top_k / rcfg.num_experts, 6)), n) for g, n in real.items()}
    copies = [(k, t) for k in range(top_k) for t in range(num_tokens) if alive[t][k]]
    if cfg.drop_priority == "weight":
        copies.sort(key=lambda kt: -routes[kt[1]][1][kt[0]])
    used: dict[tuple[int, int], int] = {}
    expected = torch.zeros_like(x_TD)
    for k, t in copies:
        e, g = routes[t][0][k], group_T[t]
        if used.get((g, e), 0) < cap[g]:
            used[(g, e)] = used.get((g, e), 0) + 1
            expected[t] += routes[t][1][k] * _expert(layer, e, x_TD[t])
    torch.testing.assert_close(out.reshape(-1, DIM), expected, rtol=1e-9, atol=1e-9)
    assert int(stats.num_dropped) == len(copies) - sum(used.values())
    routed_E = torch.zeros(rcfg.num_experts, dtype=torch.float64)
    for k, t in copies:
        routed_E[routes[t][0][k]] += 1
    torch.testing.assert_close(stats.tokens_per_expert.double(), routed_E)


@pytest.mark.parametrize("seed", range(10))
def test_expert_choice_layer_matches_each_expert_taking_its_top_real_tokens(seed):
    gen = torch.Generator().manual_seed(seed)
    num_experts = pick(gen, [2, 4, 6])
    top_k, scale = pick(gen, list(range(1, num_experts + 1))), pick(gen, [1.0, 2.5])
    factor, absolute = pick(gen, [(0.5, None), (1.3, None), (3.0, None), (None, 2), (None, 5)])
    router = RouterConfig(
        num_experts=num_experts,
        top_k=top_k,
        kind="expert_choice",
        score_func=pick(gen, ["softmax", "sigmoid"]),
        routed_scaling_factor=scale,
        init_std=1.0,
    )
    torch.manual_seed(seed)
    layer = MoELayer(
        MoEConfig(
            dim=DIM,
            router=router,
            experts=ExpertsConfig(hidden_dim=8, init_std=0.5),
            capacity_factor=factor,
            eval_capacity_factor=pick(gen, [None, 0.7]),
            expert_capacity=absolute,
        )
    ).double()
    layer.train(pick(gen, [True, False]))
    x = torch.randn(3, 7, DIM, dtype=torch.float64, generator=gen)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    out, stats = layer(x, mask)

    x_TD = torch.where(mask.reshape(-1, 1), x.reshape(-1, DIM), 0)
    logits = x_TD @ layer.router.gate.weight.detach().t()
    scores = logits.sigmoid() if router.score_func == "sigmoid" else logits.softmax(-1)
    n_real = int(mask.sum())
    f = layer.config.eval_capacity_factor if not layer.training and layer.config.eval_capacity_factor else factor
    cap = min(absolute, n_real) if absolute else min(math.ceil(round(f * n_real * top_k / num_experts, 6)), n_real)
    real = mask.reshape(-1).nonzero().squeeze(1).tolist()
    expected = torch.zeros_like(x_TD)
    for e in range(num_experts):
        for t in sorted(real, key=lambda t: -float(scores[t, e]))[:cap]:  # tokens no expert picks get zero
            expected[t] += scale * scores[t, e] * _expert(layer, e, x_TD[t])
    torch.testing.assert_close(out.reshape(-1, DIM), expected, rtol=1e-9, atol=1e-9)
    assert stats.kept_per_expert.tolist() == [cap] * num_experts
    assert int(stats.num_dropped) == 0 and int(stats.num_tokens) == n_real


# ----------------------------------------------------------------------------------------------- balancing losses


def test_load_balancing_loss_never_exceeds_e_over_k_and_reaches_it_when_all_tokens_share_k_experts():
    num_experts, top_k, tokens = 8, 2, 32
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        probs = (torch.randn(tokens, num_experts, generator=gen) * 4).softmax(-1)
        ids = torch.rand(tokens, num_experts, generator=gen).argsort(-1)[:, :top_k]
        assert losses.load_balancing_loss(probs, ids) <= num_experts / top_k + 1e-6
    probs = torch.zeros(tokens, num_experts)
    probs[:, 3], probs[:, 5] = 0.75, 0.25
    ids = torch.tensor([[3, 5]]).expand(tokens, 2)
    torch.testing.assert_close(losses.load_balancing_loss(probs, ids), torch.tensor(num_experts / top_k))
    # Balanced: every expert gets T * K / E copies and the mean probability 1 / E.
    ids = torch.arange(tokens * top_k).view(tokens, top_k) % num_experts
    torch.testing.assert_close(losses.load_balancing_loss(torch.full_like(probs, 1 / 8), ids), torch.tensor(1.0))


def test_layer_balance_losses_count_choices_before_capacity_dropping():
    # Switch (mesh-tensorflow's density_1) counts each token's choice before the capacity truncates it: a loss
    # from the kept copies only would reward an expert for being over-full.
    torch.manual_seed(4)
    layer = MoELayer(
        MoEConfig(
            dim=DIM,
            router=RouterConfig(num_experts=4, top_k=2, init_std=1.0),
            experts=ExpertsConfig(hidden_dim=8),
            capacity_factor=0.25,
        )
    )
    x = torch.randn(2, 10, DIM)
    _, stats = layer(x)
    assert int(stats.num_dropped) > 10
    probs = (x.reshape(-1, DIM) @ layer.router.gate.weight.detach().t()).softmax(-1)
    ids = probs.topk(2, dim=-1).indices
    f = torch.zeros(4).index_add_(0, ids.reshape(-1), torch.ones(40)) / 40
    torch.testing.assert_close(stats.losses["load_balance"].detach(), 4 * (f * probs.mean(0)).sum())
    seq = sum(
        (
            4
            / (2 * 10)
            * torch.bincount(ids.view(2, 10, 2)[b].reshape(-1), minlength=4)
            * probs.view(2, 10, 4)[b].mean(0)
        ).sum()
        for b in range(2)
    )
    torch.testing.assert_close(stats.losses["seq_balance"].detach(), seq / 2)


def test_sequence_balance_loss_is_deepseek_v2_reference_code():
    # DeepSeek-V2's MoEGate (seq_aux=True): ce counts each sequence's choices divided by S * K / E, times the
    # sequence's mean scores, summed over experts, averaged over sequences.
    torch.manual_seed(2)
    batch, seq, num_experts, top_k = 3, 10, 6, 2
    scores = torch.randn(batch, seq, num_experts).softmax(-1)
    ids = scores.topk(top_k, dim=-1).indices
    ce = torch.zeros(batch, num_experts).scatter_add_(1, ids.view(batch, -1), torch.ones(batch, seq * top_k))
    ce = ce.div_(seq * top_k / num_experts)
    expected = (ce * scores.mean(dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(losses.sequence_balance_loss(scores, ids), expected)


# ----------------------------------------------------------------------------------- GShard randomness, jitter


def test_layer_random_routing_keeps_second_choices_at_twice_their_normalised_weight():
    # One token repeated: the same two experts with the same weights; the second is kept 2 * g2 of the time.
    torch.manual_seed(0)
    router = Router(DIM, RouterConfig(num_experts=4, top_k=2, random_routing=True, init_std=1.0))
    x = torch.randn(1, DIM).expand(20000, DIM)
    routing = router(x)
    g = routing.weights_N.detach().view(-1, 2)[0]
    keep = routing.keep_N.view(-1, 2)
    assert keep[:, 0].all()
    expected = min(1.0, 2 * float(g[1] / g.sum()))
    assert abs(keep[:, 1].double().mean().item() - expected) < 0.02
    assert router.eval()(x).keep_N.all()


def test_jitter_noise_multiplies_the_router_input_by_uniform_noise_only_in_training():
    eps = 0.2
    torch.manual_seed(0)
    router = Router(DIM, RouterConfig(num_experts=4, top_k=2, jitter_eps=eps, init_std=1.0))
    x = torch.randn(4000, DIM)
    torch.manual_seed(7)
    logits = router(x).logits_TE
    torch.manual_seed(7)
    noise = torch.empty(4000, DIM).uniform_(1 - eps, 1 + eps)
    torch.testing.assert_close(logits, (x * noise) @ router.gate.weight.t())
    # Recover the noise of one feature from a one-hot input: mean 1, spread of U(1 - eps, 1 + eps).
    one_hot = torch.zeros(4000, DIM)
    one_hot[:, 0] = 1.0
    ratio = router(one_hot).logits_TE[:, 0] / router.gate.weight[0, 0]
    assert ratio.min() >= 1 - eps - 1e-5 and ratio.max() <= 1 + eps + 1e-5
    assert abs(ratio.mean().item() - 1) < 0.01 and abs(ratio.var().item() - (2 * eps) ** 2 / 12) < 0.002
    router.eval()
    torch.testing.assert_close(router(x).logits_TE, x @ router.gate.weight.t())


# --------------------------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("gate_precision", ["float32", "compute"])
def test_bfloat16_input_routes_by_float32_arithmetic_on_the_rounded_input(gate_precision):
    torch.manual_seed(0)
    router = Router(DIM, RouterConfig(num_experts=8, top_k=2, init_std=1.0, gate_precision=gate_precision))
    x = torch.randn(64, DIM).bfloat16()
    routing = router(x)
    weight = router.gate.weight.detach()
    if gate_precision == "float32":
        logits = x.float() @ weight.t()
    else:
        logits = (x @ weight.bfloat16().t()).float()
    torch.testing.assert_close(routing.logits_TE, logits, rtol=1e-6, atol=1e-6)
    probs = logits.softmax(-1)
    w, ids = probs.topk(2, dim=-1)
    assert routing.weights_N.dtype == routing.probs_TE.dtype == torch.float32
    assert torch.equal(routing.expert_ids_N.view(-1, 2), ids)
    torch.testing.assert_close(routing.weights_N.view(-1, 2), w)

import math
import warnings

import lightning.pytorch as L
import pytest
import torch

from lightning_moe import zoo
from lightning_moe.module import CausalLMModule, NonFiniteLossError, sample_next


def _module(arch="mixtral-tiny", **kwargs):
    torch.manual_seed(0)
    return CausalLMModule(arch=arch, overrides={"num_layers": 2}, **kwargs)


def test_unknown_preset_fails_before_any_work():
    with pytest.raises(ValueError, match=r"arch='mixtral-tinny' is not a known preset; closest: mixtral-tiny"):
        CausalLMModule(arch="mixtral-tinny")
    with pytest.raises(ValueError, match=r"nan_policy='ignore' is invalid"):
        CausalLMModule(nan_policy="ignore")


def test_loss_is_cross_entropy_plus_weighted_aux_terms():
    module = _module(load_balance_coef=0.5, z_loss_coef=0.25, seq_balance_coef=0.0)
    batch = torch.randint(0, 1024, (2, 17))
    outputs = module.training_step(batch, 0)
    loss = outputs["loss"]
    out = module.model(batch[:, :-1])
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 1024), batch[:, 1:].reshape(-1))
    aux = sum(0.5 * s.losses["load_balance"] + 0.25 * s.losses["z_loss"] for s in out.router_stats)
    torch.testing.assert_close(loss, ce + aux)
    # The per-layer statistics come back detached for callbacks.
    assert len(outputs["router_stats"]) == len(out.router_stats) == 2
    first = outputs["router_stats"][0]
    assert not first.losses["load_balance"].requires_grad
    assert first.expert_ids.shape == (2 * 16, 2)
    counts = torch.bincount(first.expert_ids.reshape(-1), minlength=8).float()
    torch.testing.assert_close(counts, first.tokens_per_expert)


def test_coefficients_default_to_the_preset():
    module = _module()
    assert module.coefs["load_balance"] == zoo.config("mixtral-tiny").load_balance_coef
    assert _module(z_loss_coef=0.1).coefs["z_loss"] == 0.1


def test_no_weight_decay_on_norms_biases_and_embeddings():
    module = _module(arch="qwen-moe-tiny")  # has QKV biases
    optimizer = module.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.1
    assert "embed.weight" in no_decay_names
    assert any(n.endswith("q_proj.bias") for n in no_decay_names)
    assert any(n.endswith("norm.weight") for n in no_decay_names)
    assert any(n.endswith("experts.w1") for n in decay_names)
    assert not any("norm" in n or n.endswith("bias") for n in decay_names)
    assert len(decay_names) + len(no_decay_names) == len(list(module.model.parameters()))


def test_learning_rate_warms_up_linearly_then_decays_by_cosine():
    module = _module(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    module._total_steps = lambda: 14
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    factors = []
    for _ in range(16):
        factors.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert factors[:4] == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5])
    assert factors[4] == pytest.approx(1.0)
    assert factors[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factors[14] == pytest.approx(0.1) and factors[15] == pytest.approx(0.1)


@pytest.mark.parametrize("init_from", ["/nonexistent/dir", 3])
def test_an_init_from_that_is_no_checkpoint_directory_is_refused_by_its_name(init_from):
    with pytest.raises(ValueError, match=rf"init_from={init_from!r} is invalid: must be the path of a local Hugging"):
        CausalLMModule(init_from=init_from)


def test_nan_in_router_logits_names_the_layer_and_step():
    module = _module()
    with torch.no_grad():
        module.model.layers[1].ffn.router.gate.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"router logits of layer model.layers.1.ffn at step 0"):
        module.training_step(torch.randint(0, 1024, (2, 9)), 0)


def test_nan_policy_skip_skips_the_batch():
    module = _module(nan_policy="skip")
    with torch.no_grad():
        module.model.embed.weight[:] = float("nan")
    with pytest.warns(UserWarning, match=r"skipping batch: non-finite value in the router logits of layer"):
        assert module.training_step(torch.randint(0, 1024, (2, 9)), 0) is None


class _AppliedSteps(L.Callback):
    """The learning rate and AdamW's step count of every optimizer step, as the optimizer is about to apply it."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, int]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        state = [s["step"] for s in optimizer.state.values() if "step" in s]
        self.steps.append((optimizer.param_groups[0]["lr"], int(max(state, default=0))))


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_skipped_step_holds_the_learning_rate_schedule(where):
    # Step 2 applies nothing (a NaN loss skips its batch, or a NaN gradient empties the step): the schedule waits, so
    # step 3 trains at the rate step 2 would have had (Megatron-Core, Hugging Face's trainer); before, it moved on.
    batches = [torch.randint(0, 63, (2, 9), generator=torch.Generator().manual_seed(i)) for i in range(5)]
    lrs = {}
    for run in ("clean", where):
        torch.manual_seed(0)
        tiny = {"vocab_size": 64, "dim": 32, "num_heads": 2, "num_kv_heads": 1, "ffn_hidden": 32, "num_experts": 4}
        module = CausalLMModule(arch="mixtral-tiny", overrides=tiny, nan_policy="skip", lr=1e-2, warmup_steps=1)
        data = [b.clone() for b in batches]
        if run == "loss":
            data[2][0, 3] = 63  # the only token 63: its embedding is NaN
            with torch.no_grad():
                module.model.embed.weight[63] = float("nan")
        record = _AppliedSteps()
        callbacks = [record]
        if run == "gradient":
            callbacks.append(_NanGradientAtStep(2))
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=5, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)  # fmt: skip
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"skipping")
            trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
        assert trainer.global_step == 5  # the skipped step still counts
        lrs[run] = record.steps
    clean = [lr for lr, _ in lrs["clean"]]
    assert [lr for lr, _ in lrs[where]] == [clean[0], clean[1], clean[2], clean[2], clean[3]]
    assert [step for _, step in lrs[where]] == [0, 1, 2, 2, 3]  # AdamW's own count skips step 2 as well


class _NanGradientAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            next(pl_module.parameters()).grad[0, 0] = float("nan")


@pytest.mark.parametrize("arch", ["mixtral-tiny", "qwen-moe-tiny", "qwen3-moe-tiny", "deepseek-tiny"])
def test_cached_generation_equals_full_recompute(arch):
    module = _module(arch)
    prompt = torch.randint(0, zoo.config(arch).vocab_size, (2, 7))
    cached = module.generate(prompt, 6, use_cache=True)
    full = module.generate(prompt, 6, use_cache=False)
    assert torch.equal(cached, full)
    assert torch.equal(cached[:, :7], prompt)
    # Greedy: the first new token is the argmax of the model's last logits.
    with torch.no_grad():
        first = module.model(prompt).logits[:, -1].argmax(-1)
    assert torch.equal(cached[:, 7], first)


def test_generation_stops_at_the_stop_id_per_sequence():
    module = _module()
    prompt = torch.randint(0, 1024, (2, 5))
    full = module.generate(prompt, 12)
    stop_id = int(full[0, 5 + 2])  # the third new token of the first sequence
    out = module.generate(prompt, 12, stop_id=stop_id)
    first = [next((i for i in range(12) if full[b, 5 + i] == stop_id), 12) for b in range(2)]
    assert out.shape[1] == 5 + min(12, max(first) + 1)
    for b in range(2):  # each sequence follows the plain generation up to its stop, then repeats the stop id
        end = 5 + min(first[b] + 1, out.shape[1] - 5)
        assert torch.equal(out[b, :end], full[b, :end])
        assert (out[b, end:] == stop_id).all()


@pytest.mark.parametrize("arch", ["mixtral-tiny", "deepseek-tiny"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_prompts_continue_as_they_would_alone(arch, use_cache):
    module = _module(arch).double()
    short, long = torch.randint(3, 1000, (1, 3)), torch.randint(3, 1000, (1, 6))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    out = module.generate(batch, 5, use_cache=use_cache, attention_mask=mask)
    assert torch.equal(out[0, 3:], module.generate(short, 5)[0])
    assert torch.equal(out[1], module.generate(long, 5)[0])
    with pytest.raises(ValueError, match=r"attention_mask is invalid: a row ends in padding; pad prompts on the left"):
        module.generate(batch, 2, attention_mask=mask.flip(1))


def test_generation_refuses_empty_prompts_and_running_past_max_seq_len():
    torch.manual_seed(0)
    module = CausalLMModule(arch="mixtral-tiny", overrides={"num_layers": 1, "max_seq_len": 12})
    with pytest.raises(ValueError, match=r"input_ids=\(1, 0\) is invalid: must be a \(batch, prompt length\) tensor"):
        module.generate(torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"input_ids=\(4,\) is invalid"):
        module.generate(torch.zeros(4, dtype=torch.long), 3)
    with pytest.raises(
        ValueError,
        match=r"max_new_tokens=5 is invalid for a prompt of 8 tokens: 13 tokens in all, "
        r"more than the model's max_seq_len=12",
    ):
        module.generate(torch.zeros(1, 8, dtype=torch.long), 5)
    assert module.generate(torch.zeros(1, 8, dtype=torch.long), 4).shape == (1, 12)
    with pytest.raises(ValueError, match=r"top_k=2.5 is invalid: must be an int >= 1"):
        module.generate(torch.zeros(1, 2, dtype=torch.long), 1, temperature=1.0, top_k=2.5)


@pytest.mark.parametrize("arch", ["mixtral-tiny", "deepseek-tiny"])
def test_an_empty_chunk_through_the_cache_gives_empty_logits(arch):
    module = _module(arch)
    cache = module.model.new_cache()
    with torch.no_grad():
        module.model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        out = module.model(torch.zeros(1, 0, dtype=torch.long), cache=cache)
    assert out.logits.shape == (1, 0, zoo.config(arch).vocab_size)


def test_cache_matches_full_forward_with_sliding_window_past_its_length():
    torch.manual_seed(0)
    model = zoo.build("mixtral-tiny", sliding_window=4).eval()
    ids = torch.randint(0, 1024, (1, 10))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model(ids[:, :3], cache=cache).logits]
        steps += [model(ids[:, i : i + 1], cache=cache).logits for i in range(3, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_sampling_respects_top_k_and_temperature():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    torch.manual_seed(0)
    draws = torch.cat([sample_next(logits, 1.0, 2) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {1, 2}
    assert torch.equal(sample_next(logits, 0.0, None), torch.tensor([[1]]))
    with pytest.raises(ValueError, match=r"temperature=-1.0 is invalid"):
        _module().generate(torch.zeros(1, 2, dtype=torch.long), 1, temperature=-1.0)
    with pytest.raises(ValueError, match=r"temperature=inf is invalid: must be a finite number"):
        _module().generate(torch.zeros(1, 2, dtype=torch.long), 1, temperature=float("inf"))
    with pytest.raises(ValueError, match=r"max_new_tokens=-3 is invalid: must be an int >= 1"):
        _module().generate(torch.zeros(1, 2, dtype=torch.long), -3)
    # A tiny temperature is near-greedy: scaled from the top logit down it never overflows into inf - inf.
    big = torch.tensor([[30.0, 50.0, 49.0, -1e4]])
    assert torch.equal(sample_next(big, 1e-45, None), torch.tensor([[1]]))
    # Temperature still shapes the distribution: the empirical shares follow softmax(logits / T).
    torch.manual_seed(0)
    draws = torch.cat([sample_next(logits, 2.0, None) for _ in range(4000)]).flatten()
    shares = torch.bincount(draws, minlength=4).double() / draws.numel()
    torch.testing.assert_close(shares, torch.softmax(logits[0].double() / 2.0, dim=0), atol=0.03, rtol=0)


def test_expert_grad_memory_is_kept_by_default_only_for_large_experts():
    # mixtral-tiny's stacked expert weights are far below 32 MiB: by default nothing is kept. 8 experts of
    # 512 x 2048 float32 are 32 MiB each: kept. Each threshold counted on its own model.
    def kept(module):
        experts = [m for m in module.model.modules() if m.__class__.__name__ == "GroupedExperts"]
        assert experts
        return [m.grad_buffers is not None for m in experts]

    assert not any(kept(CausalLMModule(arch="mixtral-tiny")))
    assert all(kept(CausalLMModule(arch="mixtral-tiny", reuse_expert_grad_memory_min_mib=0)))
    large = {"num_layers": 1, "dim": 512, "ffn_hidden": 2048}
    assert all(kept(CausalLMModule(arch="mixtral-tiny", overrides=large)))
    assert not any(kept(CausalLMModule(arch="mixtral-tiny", overrides=large, reuse_expert_grad_memory_min_mib=32.01)))
    assert not any(kept(CausalLMModule(arch="mixtral-tiny", overrides=large, reuse_expert_grad_memory=False)))
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"reuse_expert_grad_memory_min_mib={bad} is invalid: must be a finite"):
            CausalLMModule(arch="mixtral-tiny", reuse_expert_grad_memory_min_mib=bad)


def test_reused_expert_grad_memory_trains_like_fresh_memory():
    # Two identical modules, one keeping its expert gradient memory: same gradients over steps with
    # set_to_none zeroing, and the kept module's expert .grad lives in the same memory every step.
    torch.manual_seed(0)
    fresh = CausalLMModule(arch="mixtral-tiny", reuse_expert_grad_memory=False)
    kept = CausalLMModule(arch="mixtral-tiny", reuse_expert_grad_memory_min_mib=0)  # tiny experts kept too
    kept.load_state_dict(fresh.state_dict())
    experts = [m for m in kept.model.modules() if m.__class__.__name__ == "GroupedExperts"]
    assert experts and all(e.grad_buffers is not None for e in experts)
    assert all(m.grad_buffers is None for m in fresh.model.modules() if m.__class__.__name__ == "GroupedExperts")
    pointers = []
    for step in range(3):
        batch = torch.randint(0, 1024, (2, 17))
        for module in (fresh, kept):
            module.zero_grad(set_to_none=True)
            module.training_step(batch, step)["loss"].backward()
        pointers.append(experts[0].w2.grad.data_ptr())
        for (name, p_fresh), (_, p_kept) in zip(fresh.named_parameters(), kept.named_parameters(), strict=True):
            torch.testing.assert_close(p_kept.grad, p_fresh.grad, msg=name)
    assert len(set(pointers)) == 1


def test_adamw_is_fused_for_plain_parameters_and_not_for_sharded_ones():
    from lightning_moe.module import _can_fuse_adamw

    module = CausalLMModule(arch="mixtral-tiny")
    assert module.configure_optimizers()["optimizer"].defaults["fused"] is True
    assert _can_fuse_adamw([torch.nn.Parameter(torch.randn(3))])
    assert not _can_fuse_adamw([torch.nn.Parameter(torch.randint(0, 3, (3,)), requires_grad=False)])
    assert not _can_fuse_adamw([])


def test_bf16_mixed_clips_the_fused_optimizers_gradients():
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import MixedPrecision

    module = CausalLMModule(arch="mixtral-tiny")
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is True
    for p in module.parameters():
        p.grad = torch.full_like(p, 10.0)
    module._trainer = SimpleNamespace(precision_plugin=MixedPrecision("bf16-mixed", "cpu"))
    try:
        module.configure_gradient_clipping(optimizer, 1.0, "norm")  # Lightning's plugin would raise here
    finally:
        module._trainer = None
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in module.parameters()]))
    torch.testing.assert_close(norm, torch.tensor(1.0), rtol=1e-4, atol=1e-4)


def test_mtp_loss_is_added_with_its_coefficient_and_trains_the_mtp_modules():
    torch.manual_seed(0)
    module = CausalLMModule(
        arch="deepseek-tiny", overrides={"mtp_depth": 2}, load_balance_coef=0.0, z_loss_coef=0.0, seq_balance_coef=0.0
    )
    assert module.mtp_loss_coef == zoo.config("deepseek-tiny").mtp_loss_coef == 0.3
    batch = torch.randint(0, 1024, (2, 13))
    outputs = module.training_step(batch, 0)
    out = module.model(batch[:, :-1])
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 1024), batch[:, 1:].reshape(-1))
    # Independently, position by position: depth k at position i predicts batch token i + k + 1.
    depth_losses = []
    for k, logits in enumerate(out.mtp_logits, start=1):
        terms = [
            -torch.log_softmax(logits[b, i], -1)[batch[b, i + k + 1]] for b in range(2) for i in range(logits.shape[1])
        ]
        assert logits.shape[1] == 12 - k
        depth_losses.append(torch.stack(terms).mean())
    torch.testing.assert_close(outputs["loss"], ce + 0.3 * torch.stack(depth_losses).mean())
    outputs["loss"].backward()
    for depth in module.model.mtp:
        assert depth.eh_proj.weight.grad is not None and depth.eh_proj.weight.grad.abs().sum() > 0

    no_aux = {"load_balance_coef": 0.0, "z_loss_coef": 0.0, "seq_balance_coef": 0.0}
    off = CausalLMModule(arch="deepseek-tiny", overrides={"mtp_depth": 1}, mtp_loss_coef=0.0, **no_aux)
    off.training_step(batch, 0)["loss"].backward()
    assert off.model.mtp[0].eh_proj.weight.grad is None  # no term reaches the MTP block
    with pytest.raises(ValueError, match=r"mtp_loss_coef=-0.1 is invalid: must be a finite number >= 0"):
        CausalLMModule(arch="deepseek-tiny", mtp_loss_coef=-0.1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lr=float("inf")), r"lr=inf is invalid: must be a finite number > 0"),
        (dict(weight_decay=-0.1), r"weight_decay=-0.1 is invalid: must be a finite number >= 0"),
        (dict(betas=(1.5, 0.9)), r"betas=\(1.5, 0.9\) is invalid: must be two numbers in \[0, 1\)"),
        (dict(min_lr_ratio=-1.0), r"min_lr_ratio=-1.0 is invalid: must be in \[0, 1\]"),
        (dict(load_balance_coef=-1.0), r"load_balance_coef=-1.0 is invalid: must be a finite number >= 0"),
        (dict(z_loss_coef=float("nan")), r"z_loss_coef=nan is invalid"),
        (dict(lr=True), r"lr=True is invalid: must be a finite number > 0"),
        (dict(warmup_steps=2.5), r"warmup_steps=2.5 is invalid: must be an int >= 0"),
        (dict(mtp_loss_coef=float("inf")), r"mtp_loss_coef=inf is invalid: must be a finite number >= 0"),
        # A bool passes a range check as 0 or 1, a string fails it with a TypeError naming nothing.
        (dict(weight_decay=True), r"weight_decay=True is invalid: must be a finite number >= 0"),
        (dict(betas=(True, 0.9)), r"betas=\(True, 0.9\) is invalid: must be two numbers in \[0, 1\)"),
        (dict(betas=(0.9,)), r"betas=\(0.9,\) is invalid"),
        (dict(betas=0.9), r"betas=0.9 is invalid"),
        (dict(min_lr_ratio=False), r"min_lr_ratio=False is invalid: must be in \[0, 1\]"),
        (dict(z_loss_coef="0.1"), r"z_loss_coef='0.1' is invalid: must be a finite number >= 0"),
        (dict(mtp_loss_coef=True), r"mtp_loss_coef=True is invalid"),
        (dict(reuse_expert_grad_memory_min_mib=True), r"reuse_expert_grad_memory_min_mib=True is invalid"),
    ],
)
def test_optimizer_and_loss_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CausalLMModule(arch="mixtral-tiny", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mean_span_length=0), r"mean_span_length=0 is invalid: must be a finite number >= 1"),
        (dict(mean_span_length=0.5), r"mean_span_length=0.5 is invalid"),
        (dict(noise_density=1.0), r"noise_density=1.0 is invalid: must be in \(0, 1\)"),
    ],
)
def test_span_corruption_settings_are_checked_at_construction(kwargs, match):
    from lightning_moe.module import Seq2SeqLMModule

    with pytest.raises(ValueError, match=match):
        Seq2SeqLMModule(arch="switch-tiny", **kwargs)


def test_an_mtp_loss_coefficient_without_mtp_modules_warns():
    with pytest.warns(UserWarning, match=r"mtp_loss_coef=0.5 has no effect: the model has no multi-token-prediction"):
        _module(mtp_loss_coef=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CausalLMModule(arch="deepseek-tiny", overrides={"num_layers": 2, "mtp_depth": 1}, mtp_loss_coef=0.5)


def test_schedules_that_cannot_do_what_they_say_warn():
    import lightning as L

    module = _module()
    kwargs = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.trainer = L.Trainer(max_steps=3, **kwargs)
    with pytest.warns(UserWarning, match=r"warmup_steps=50 is not below the run's 3 optimizer steps"):
        module.configure_optimizers()
    module.trainer = L.Trainer(max_steps=-1, max_epochs=-1, **kwargs)
    with pytest.warns(UserWarning, match=r"no step limit .* decays over 1000 optimizer steps"):
        assert module._total_steps() == 1000


def test_fitting_in_float16_without_loss_scaling_warns():
    import lightning as L

    module = CausalLMModule(arch="mixtral-tiny")
    module.trainer = L.Trainer(precision="16-true", accelerator="cpu", logger=False, enable_checkpointing=False)
    with pytest.warns(UserWarning, match=r"precision='16-true' trains float16 weights and AdamW states without loss"):
        module.setup("fit")
    module.trainer = L.Trainer(precision="bf16-mixed", accelerator="cpu", logger=False, enable_checkpointing=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        module.setup("fit")

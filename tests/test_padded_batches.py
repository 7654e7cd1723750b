"""CausalLMModule on Hugging Face-style padded batches: ``{"input_ids", "attention_mask", "labels"}`` dicts.

References are independent of the module's target building and of the chunked loss: each sequence run alone
through the model without padding, and ``F.cross_entropy`` of the model's logits.
"""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_moe.module import CausalLMModule, Seq2SeqLMModule

VOCAB = 1024
NO_AUX = {"load_balance_coef": 0.0, "z_loss_coef": 0.0, "seq_balance_coef": 0.0}


def _module(arch="mixtral-tiny", dtype=torch.float64, overrides=None, **kwargs):
    torch.manual_seed(0)
    overrides = {"num_layers": 2, **(overrides or {})}
    if arch == "glam-tiny":
        overrides.setdefault("random_routing", False)  # no random draws: padded and alone route alike
    return CausalLMModule(arch=arch, overrides=overrides, **kwargs).to(dtype)


def _sequences(lengths, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (length,), generator=generator) for length in lengths]


def _pad(seqs, side, pad_id=0):
    """A padded ``(B, T)`` batch of the sequences and its attention mask; each row's real slice."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    slices = []
    for row, seq in enumerate(seqs):
        real = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, real], mask[row, real] = seq, 1
        slices.append(real)
    return {"input_ids": ids, "attention_mask": mask}, slices


def _alone_reference(module, seqs):
    """Token-weighted mean next-token cross-entropy of each sequence run alone, and its parameter gradients."""
    module.zero_grad()
    total, count = 0.0, 0
    for seq in seqs:
        logits = module.model(seq[None]).logits[0]
        total = total + F.cross_entropy(logits[:-1], seq[1:], reduction="sum")
        count += len(seq) - 1
    loss = total / count
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    module.zero_grad()
    return loss.detach(), grads


def _check_loss_and_grads(module, batch, ref_loss, ref_grads, tol):
    out = module.training_step(batch, 0)
    out["loss"].backward()
    torch.testing.assert_close(out["loss"].detach(), ref_loss, rtol=tol, atol=tol)
    grads = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize(
    ("arch", "side", "tol"),
    [
        ("mixtral-tiny", "right", 1e-10),
        ("qwen-moe-tiny", "right", 1e-10),
        ("deepseek-tiny", "right", 1e-10),
        ("glam-tiny", "left", 1e-10),  # relative position bias: a shift changes nothing
        ("glam-tiny", "right", 1e-10),
        # RoPE angles are computed in float32 (as transformers does), so a left shift moves them by ~1e-9.
        ("mixtral-tiny", "left", 1e-7),
    ],
)
def test_padded_batch_matches_each_sequence_alone(arch, side, tol):
    module = _module(arch, **NO_AUX)
    seqs = _sequences([7, 12, 4])
    ref_loss, ref_grads = _alone_reference(module, seqs)
    batch, _ = _pad(seqs, side)
    _check_loss_and_grads(module, batch, ref_loss, ref_grads, tol)


def test_left_and_right_padding_agree():
    module = _module("glam-tiny", **NO_AUX)
    seqs = _sequences([3, 9, 6], seed=2)
    losses = []
    for side in ("left", "right"):
        module.zero_grad()
        loss = module.training_step(_pad(seqs, side)[0], 0)["loss"]
        loss.backward()
        losses.append((loss.detach(), [p.grad.clone() for p in module.parameters() if p.grad is not None]))
    (left, left_grads), (right, right_grads) = losses
    torch.testing.assert_close(left, right, rtol=1e-10, atol=1e-10)
    for a, b in zip(left_grads, right_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _manual_ce(logits_BTV, labels_BT, mask_BT):
    """transformers' causal-LM loss: position i predicts labels[i + 1]; only from real positions, -100 ignored."""
    targets = F.pad(labels_BT[:, 1:], (0, 1), value=-100)
    targets = targets.masked_fill(mask_BT == 0, -100)
    return F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]), targets.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("side", ["left", "right"])
def test_labels_with_ignored_prompt_train_only_the_answer(side):
    module = _module(**NO_AUX)
    seqs = _sequences([10, 6, 8], seed=3)
    batch, slices = _pad(seqs, side)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for row, (real, prompt) in enumerate(zip(slices, (4, 2, 5), strict=True)):
        labels[row, real.start : real.start + prompt] = -100  # the prompt: not trained
    batch["labels"] = labels
    loss = module.training_step(batch, 0)["loss"]
    logits = module.model(batch["input_ids"], batch["attention_mask"]).logits
    torch.testing.assert_close(loss, _manual_ce(logits, labels, batch["attention_mask"]), rtol=1e-10, atol=1e-10)
    # Only the answers count: the same loss as the answer tokens' cross-entropy of each sequence alone.
    total, count = 0.0, 0
    for seq, prompt in zip(seqs, (4, 2, 5), strict=True):
        alone = module.model(seq[None]).logits[0]
        total = total + F.cross_entropy(alone[prompt - 1 : -1], seq[prompt:], reduction="sum")
        count += len(seq) - prompt
    torch.testing.assert_close(loss, total / count, rtol=1e-10, atol=1e-10)
    # Without labels the padding is left out and every real next token is trained.
    del batch["labels"]
    default = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = module.training_step(batch, 0)["loss"]
    torch.testing.assert_close(loss, _manual_ce(logits, default, batch["attention_mask"]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("arch", "side"), [("deepseek-tiny", "right"), ("glam-tiny", "left")])
def test_router_statistics_of_a_padded_batch_are_those_of_the_real_tokens(arch, side):
    module = _module(arch)
    seqs = _sequences([9, 5, 13], seed=4)
    layers = [layer for _, layer in module.moe_layers]
    alone = []
    for seq in seqs:
        alone.append(module.model(seq[None]).router_stats)
    for layer in layers:
        layer.tokens_per_expert.zero_()
    batch, slices = _pad(seqs, side)
    stats = module.training_step(batch, 0)["router_stats"]
    assert len(stats) == len(layers) == len(alone[0])
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.float64)
    for index, (got, layer) in enumerate(zip(stats, layers, strict=True)):
        ref = [a[index] for a in alone]
        tokens = sum(r.tokens_per_expert for r in ref)
        torch.testing.assert_close(got.tokens_per_expert, tokens)
        torch.testing.assert_close(layer.tokens_per_expert, tokens.to(layer.tokens_per_expert.dtype))
        torch.testing.assert_close(got.kept_per_expert, sum(r.kept_per_expert for r in ref))
        assert int(got.num_tokens) == int(lengths.sum()) and int(got.num_dropped) == 0
        weighted = {
            "router_entropy": sum(r.router_entropy * n for r, n in zip(ref, lengths, strict=True)) / lengths.sum(),
            "z_loss": sum(r.losses["z_loss"] * n for r, n in zip(ref, lengths, strict=True)) / lengths.sum(),
        }
        torch.testing.assert_close(got.router_entropy, weighted["router_entropy"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got.losses["z_loss"], weighted["z_loss"], rtol=1e-10, atol=1e-10)
        # Sequence-wise balance: the mean over sequences of each sequence's own loss.
        seq_balance = torch.stack([r.losses["seq_balance"] for r in ref]).mean()
        torch.testing.assert_close(got.losses["seq_balance"], seq_balance, rtol=1e-10, atol=1e-10)
        width = batch["input_ids"].shape[1]
        ids = got.expert_ids.view(len(seqs), width, -1)
        for row, (real, r) in enumerate(zip(slices, ref, strict=True)):
            assert torch.equal(ids[row, real], r.expert_ids)
            assert (ids[row, [i for i in range(width) if not real.start <= i < real.stop]] == -1).all()


def _mtp_reference(module, seqs, depth):
    """Per depth k, the mean over all sequences' positions i of CE(mtp_logits_k[i], seq[i + k + 1]), alone."""
    sums, counts = [0.0] * depth, [0] * depth
    for seq in seqs:
        out = module.model(seq[None])
        for k, logits in enumerate(out.mtp_logits, start=1):
            length = len(seq) - k - 1  # positions whose token i + k + 1 exists
            if length > 0:
                sums[k - 1] = sums[k - 1] + F.cross_entropy(logits[0, :length], seq[k + 1 :], reduction="sum")
                counts[k - 1] += length
    means = [torch.as_tensor(s) / c if c else torch.zeros(()) for s, c in zip(sums, counts, strict=True)]
    return torch.stack(means), counts


@pytest.mark.parametrize(("side", "tol"), [("right", 1e-10), ("left", 1e-7)])
def test_multi_token_prediction_loss_of_a_padded_batch_counts_only_real_targets(side, tol):
    module = _module("deepseek-tiny", overrides={"mtp_depth": 2}, **NO_AUX)
    seqs = _sequences([8, 5, 11], seed=5)
    ref, ref_counts = _mtp_reference(module, seqs, 2)
    batch, _ = _pad(seqs, side)
    _, mtp, _, counts = module._loss(batch)
    assert counts == [sum(len(seq) - 1 for seq in seqs), *ref_counts]  # [21, 18, 15]: each depth's own targets
    torch.testing.assert_close(torch.stack(mtp), ref.to(mtp[0].dtype), rtol=tol, atol=tol)


def test_multi_token_prediction_depth_without_targets_adds_zero():
    module = _module("deepseek-tiny", overrides={"mtp_depth": 2}, **NO_AUX)
    (seq,) = _sequences([6], seed=6)
    labels = torch.full((1, 6), -100)
    labels[0, 2] = seq[2]  # only token 2 is trained: depth 1 predicts it from position 0, depth 2 from nowhere
    ce, mtp, _, counts = module._loss({"input_ids": seq[None], "labels": labels})
    assert counts == [1, 1, 0]
    out = module.model(seq[None])
    torch.testing.assert_close(ce, F.cross_entropy(out.logits[0, 1:2], seq[2:3]), rtol=1e-10, atol=1e-10)
    depth1 = F.cross_entropy(out.mtp_logits[0][0, 0:1], seq[2:3])
    torch.testing.assert_close(mtp[0], depth1, rtol=1e-10, atol=1e-10)
    assert mtp[1].item() == 0.0


def test_batch_without_trained_tokens_trains_only_the_aux_losses():
    module = _module("mixtral-tiny", load_balance_coef=0.5, z_loss_coef=0.1)
    seqs = _sequences([5, 3], seed=7)
    batch, _ = _pad(seqs, "right")
    batch["labels"] = torch.full_like(batch["input_ids"], -100)
    with pytest.warns(UserWarning, match="no trained target"):
        out = module.training_step(batch, 0)
    stats = out["router_stats"]
    aux = sum(0.5 * s.losses["load_balance"] + 0.1 * s.losses["z_loss"] for s in stats)
    assert torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"].detach(), aux, rtol=1e-10, atol=1e-10)
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    assert not module.model.lm_head.weight.grad.any()  # the cross-entropy's gradient is zero
    module.validation_step(batch, 0)
    module.test_step(batch, 0)
    assert module.val_loss.update_count == 0 and module.test_loss.update_count == 0


def test_tokens_per_second_counts_the_real_input_tokens():
    module = _module()
    batch, _ = _pad(_sequences([5, 9, 2], seed=8), "left")
    module.training_step(batch, 0)
    assert module._step_tokens == 5 + 9 + 2
    packed = torch.randint(0, VOCAB, (2, 11))
    module.training_step(packed, 0)
    assert module._step_tokens == 2 * 10


def _collate(samples):
    """Right-pads a list of ``{"input_ids", "labels"}`` samples into a dict batch."""
    seqs = [s["input_ids"] for s in samples]
    batch, slices = _pad(seqs, "right")
    labels = torch.full_like(batch["input_ids"], -100)
    for row, (sample, real) in enumerate(zip(samples, slices, strict=True)):
        labels[row, real] = sample["labels"]
    batch["labels"] = labels
    return batch


def _samples(lengths, seed):
    samples = []
    for index, seq in enumerate(_sequences(lengths, seed)):
        labels = seq.clone()
        labels[: index % 3] = -100  # some prompts
        samples.append({"input_ids": seq, "labels": labels})
    return samples


def test_fit_on_dict_batches_logs_the_token_weighted_val_loss(tmp_path):
    module = _module(dtype=torch.float32, warmup_steps=1)
    train = DataLoader(_samples([6, 9, 4, 7, 12, 5], seed=9), batch_size=2, collate_fn=_collate)
    val_samples = _samples([8, 3, 10, 6, 2], seed=10)
    val = DataLoader(val_samples, batch_size=2, collate_fn=_collate)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train, val)
    assert module.train_samples_seen == 6
    module.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in val_samples:  # each sequence alone, no padding
            seq, labels = sample["input_ids"], sample["labels"]
            logits = module.model(seq[None]).logits[0]
            total += F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum").item()
            count += int((labels[1:] != -100).sum())
    assert trainer.callback_metrics["val/loss"].item() == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ({"attention_mask": torch.ones(2, 5, dtype=torch.long)}, r"batch is missing 'input_ids'"),
        ({"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 4)}, r"attention_mask"),
        (
            {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long)},
            r"attention_mask.shape=\(2, 4\) is invalid: expected the shape of input_ids, \(2, 5\)",
        ),
        (
            {"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.ones(2, 6, dtype=torch.long)},
            r"labels.shape=\(2, 6\) is invalid: expected the shape of input_ids, \(2, 5\)",
        ),
        (
            {"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.full((2, 5), 5000)},
            r"labels holds 5000, which is invalid: expected token ids in \[0, 1024\) or -100",
        ),
        ({"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.ones(2, 5)}, r"labels.dtype=torch.float"),
        ({"input_ids": torch.ones(5, dtype=torch.long)}, r"input_ids.shape=\(5,\) is invalid: expected \(B, T\)"),
        ({"input_ids": [[1, 2, 3]]}, r"input_ids of type list is invalid"),
        (
            {"input_ids": torch.ones(1, 5, dtype=torch.long), "position_ids": torch.arange(5)[None]},
            r"batch key 'position_ids' is invalid: expected only 'input_ids', 'attention_mask', 'labels'",
        ),
        ({"input_ids": torch.ones(1, 1025, dtype=torch.long)}, r"max_seq_len=1024"),
    ],
)
def test_bad_dict_batch_names_the_key(batch, match):
    module = _module(dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        module.training_step(batch, 0)
    with pytest.raises(ValueError, match=match):
        module.validation_step(batch, 0)


def test_seq2seq_module_refuses_dict_batches_clearly():
    torch.manual_seed(0)
    module = Seq2SeqLMModule(arch="switch-tiny")
    with pytest.raises(ValueError, match=r"Seq2SeqLMModule takes \(B, L\) token id tensors"):
        module.training_step({"input_ids": torch.ones(2, 5, dtype=torch.long)}, 0)


def test_predict_on_left_padded_dict_batches_continues_each_prompt_as_alone(tmp_path):
    module = _module(dtype=torch.float32)
    seqs = _sequences([7, 3, 5])
    batch, slices = _pad(seqs, "left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": ids[i]} for i in range(len(seqs))]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    (out,) = trainer.predict(module, DataLoader(rows, batch_size=3))
    for row, seq in enumerate(seqs):
        alone = module.generate(seq[None], max_new_tokens=out.shape[1] - ids.shape[1])
        assert torch.equal(out[row, slices[row].start :], alone[0])
    with pytest.raises(ValueError, match=r"batch keys \['input_ids', 'position_ids'\] are invalid for predict"):
        module.predict_step({"input_ids": ids, "position_ids": mask}, 0)

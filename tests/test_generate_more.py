"""Generation: Switch (encoder-decoder) parity with the decoder-only API and Hugging Face; stopping with collectives."""

import copy
import os
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from lightning_moe.module import CausalLMModule, Seq2SeqLMModule

transformers = pytest.importorskip("transformers")

VOCAB = 96


def _hf_switch() -> nn.Module:
    """A tiny Hugging Face Switch model (no capacity drops: 1000 slots per expert) with weights off their init scale."""
    cfg = transformers.SwitchTransformersConfig(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=2,
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1,
        num_experts=4,
        expert_capacity=1000,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=12,
        dropout_rate=0.0,
        tie_word_embeddings=False,
        attn_implementation="eager",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    hf = transformers.SwitchTransformersForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "relative_attention_bias" in name or name.endswith("router.classifier.weight"):
                p.normal_(std=1.0)
            elif name.endswith("layer_norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(std=1.0)
        hf.encoder.embed_tokens.weight.copy_(hf.shared.weight)  # transformers 5 unties the stacks' embeddings
        hf.decoder.embed_tokens.weight.copy_(hf.shared.weight)
    return hf.eval()


@pytest.fixture(scope="module")
def switch_pair() -> tuple[nn.Module, Seq2SeqLMModule]:
    """The Hugging Face model and a ``Seq2SeqLMModule`` holding the same weights (``from_hf``)."""
    from lightning_moe.interop import from_hf

    hf = _hf_switch()
    torch.manual_seed(0)
    module = Seq2SeqLMModule(arch="switch-tiny", overrides={"num_layers": 1})
    module.model = from_hf(hf)
    module.config = module.model.zoo_config
    return hf, module


def _padded_pair(right: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Two encoder inputs (4 and 9 tokens), and the batch of both with the short one padded with zeros."""
    torch.manual_seed(1)
    short, long = torch.randint(2, VOCAB, (1, 4)), torch.randint(2, VOCAB, (1, 9))
    pad = torch.zeros(1, 5, dtype=torch.long)
    row = torch.cat([short, pad] if right else [pad, short], dim=1)
    mask = torch.cat([torch.ones_like(short), pad] if right else [pad, torch.ones_like(short)], dim=1)
    return short, long, torch.cat([row, long]), torch.cat([mask, torch.ones_like(long)])


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("right", [True, False])
def test_switch_padded_batch_decodes_as_each_input_alone(switch_pair, use_cache, right):
    _, module = switch_pair
    short, long, batch, mask = _padded_pair(right)
    out = module.generate(batch, 10, use_cache=use_cache, attention_mask=mask)
    assert torch.equal(out[0], module.generate(short, 10, use_cache=use_cache)[0])
    assert torch.equal(out[1], module.generate(long, 10, use_cache=use_cache)[0])
    assert len(set(out[1, 1:].tolist())) > 2  # a real continuation, not one token repeated


@pytest.mark.parametrize("use_cache", [True, False])
def test_switch_greedy_generation_matches_hugging_face_with_padding(switch_pair, use_cache):
    hf, module = switch_pair
    _, _, batch, mask = _padded_pair(right=True)
    ours = module.generate(batch, 10, use_cache=use_cache, attention_mask=mask)
    with torch.no_grad():
        theirs = hf.generate(
            input_ids=batch, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None, use_cache=True
        )
    assert torch.equal(ours, theirs)


def test_switch_cached_decoding_gives_the_full_decoder_logits(switch_pair):
    _, module = switch_pair
    _, _, batch, mask = _padded_pair(right=True)
    dec = module.generate(batch, 8, attention_mask=mask, use_cache=False)
    model = copy.deepcopy(module.model).double().eval()
    with torch.no_grad():
        full = model(batch, dec, attention_mask=mask).logits
        memory, _ = model.encode(batch, mask)
        cache = model.new_cache()
        steps = [model.decode(memory, dec[:, :3], mask, cache=cache).logits]
        steps += [model.decode(memory, dec[:, i : i + 1], mask, cache=cache).logits for i in range(3, dec.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-9, atol=1e-9)


def test_switch_generation_stops_at_the_stop_id_per_sequence_as_hugging_face_does(switch_pair):
    hf, module = switch_pair
    _, _, batch, mask = _padded_pair(right=True)
    full = module.generate(batch, 10, attention_mask=mask)
    stop_id = int(full[0, 3])  # the third new token of the first sequence
    first = [next((i for i in range(1, 11) if full[b, i] == stop_id), 11) for b in range(2)]
    out = module.generate(batch, 10, stop_id=stop_id, attention_mask=mask)
    assert out.shape[1] == min(11, max(first) + 1)
    for b in range(2):  # each follows the plain decoding up to its stop, then repeats the stop id
        end = min(first[b] + 1, out.shape[1])
        assert torch.equal(out[b, :end], full[b, :end])
        assert (out[b, end:] == stop_id).all()
    with torch.no_grad():  # transformers pads a finished sequence with the pad id (0) instead
        theirs = hf.generate(
            input_ids=batch, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=stop_id
        )
    assert theirs.shape == out.shape
    for b in range(2):
        end = min(first[b] + 1, out.shape[1])
        assert torch.equal(theirs[b, :end], out[b, :end])


def test_switch_generate_checks_mask_and_stop_id_before_any_work(switch_pair):
    _, module = switch_pair
    _, _, batch, mask = _padded_pair(right=True)
    module.train()
    with pytest.raises(
        ValueError, match=r"attention_mask of shape \(2, 8\) and dtype torch.int64 is invalid: expected"
    ):
        module.generate(batch, 2, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match=r"attention_mask of shape \(2, 9\) and dtype torch.float32 is invalid"):
        module.generate(batch, 2, attention_mask=mask.float())
    with pytest.raises(ValueError, match=r"attention_mask is invalid: a row is all padding"):
        module.generate(batch, 2, attention_mask=mask * torch.tensor([[0], [1]]))
    for bad in (VOCAB, -1, 2.0, True):
        with pytest.raises(ValueError, match=rf"stop_id={bad!r} is invalid: must be a token id in \[0, {VOCAB}\)"):
            module.generate(batch, 2, stop_id=bad)
    assert module.training
    module.eval()


class _OtherRankStillGoing:
    """A strategy whose ``reduce_boolean_decision`` answers False for the first ``steps`` calls: another rank's
    sequences have not all stopped yet."""

    def __init__(self, steps: int) -> None:
        self.steps, self.calls = steps, 0

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:  # noqa: A002
        self.calls += 1
        return decision and self.calls > self.steps


@pytest.fixture
def one_rank_group():
    """A one-process gloo group on 127.0.0.1 (for a DTensor parameter, as ``ExpertParallelStrategy`` makes)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tests.strategies._distributed import free_port

    assert not dist.is_initialized()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("seq2seq", [False, True])
def test_stop_id_keeps_decoding_until_every_rank_is_done_when_forwards_are_collective(
    one_rank_group, switch_pair, seq2seq
):
    from torch.distributed.tensor import Replicate, distribute_tensor

    if seq2seq:
        module, prompt = switch_pair[1], _padded_pair(right=True)[1]
    else:
        torch.manual_seed(0)
        module = CausalLMModule(arch="mixtral-tiny", overrides={"num_layers": 1})
        prompt = torch.randint(0, 1024, (1, 5))
    plain = module.generate(prompt, 8)
    start = plain.shape[1] - 8
    stop_id = int(plain[0, start])  # the first new token: this rank is done after one step
    forwards = []
    hook = module.model.register_forward_hook(lambda *_: forwards.append(1))  # the decoder-only model's steps
    if seq2seq:  # the encoder-decoder's decoder steps run through decode
        decode = module.model.decode
        module.model.decode = lambda *a, **k: (forwards.append(1), decode(*a, **k))[1]
    try:
        assert module.generate(prompt, 8, stop_id=stop_id).shape[1] == start + 1  # alone: stops at once
        forwards.clear()
        # Sharded parameters make every forward a collective: the other rank needs 3 more steps.
        probe = nn.Parameter(distribute_tensor(torch.zeros(1), one_rank_group, [Replicate()]), requires_grad=False)
        module.model.register_parameter("probe", probe)
        strategy = _OtherRankStillGoing(steps=3)
        module._trainer = SimpleNamespace(world_size=2, strategy=strategy)
        out = module.generate(prompt, 8, stop_id=stop_id)
    finally:
        hook.remove()
        module._trainer = None
        if seq2seq:
            del module.model.decode
        module.model._parameters.pop("probe", None)
    assert strategy.calls == 4
    assert len(forwards) == 4  # the prompt's forward, then one per step until every rank is done
    assert out.shape[1] == start + 4
    assert (out[0, start:] == stop_id).all()


def _predict_uneven_batches(rank: int, world: int) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_moe.strategies import ExpertParallelStrategy

    torch.manual_seed(0)
    module = CausalLMModule(arch="mixtral-tiny", overrides={"num_layers": 1, "max_seq_len": 8})
    prompts = [torch.randint(0, 1024, (4,)) for _ in range(3)]  # rank 0: 2 prompts, rank 1: 1 (batches of 1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=ExpertParallelStrategy(),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # A loader of one's own: TextDataModule's pads the ranks' shares (tests/test_predict_and_data_gaps.py).
    match = r"the ranks would run \[\[2\], \[1\]\] batches .*PaddedPredictSampler.*\.limit_predict_batches=1"
    with pytest.raises(ValueError, match=match):
        trainer.predict(module, DataLoader(prompts, batch_size=1))
    out = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=ExpertParallelStrategy(),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_predict_batches=1,
    ).predict(module, DataLoader(prompts, batch_size=1))
    assert len(out) == 1 and out[0].shape == (1, 8)


@pytest.mark.multiprocess
def test_expert_parallel_predict_refuses_a_users_loader_with_different_batch_counts_instead_of_hanging():
    from tests.strategies._distributed import run_distributed

    run_distributed(_predict_uneven_batches, 2)

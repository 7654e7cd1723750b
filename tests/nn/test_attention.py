import pytest
import torch

from lightning_moe import zoo
from lightning_moe.nn import ExpertsConfig, MoEConfig, MoELayer, RouterConfig, load_balancing_loss
from lightning_moe.nn.attention import Attention, AttentionConfig, attention_bias


def _attention(**overrides):
    torch.manual_seed(0)
    config = AttentionConfig(num_heads=2, num_kv_heads=2, rope=False, **overrides)
    return Attention(16, config).eval()


def test_boolean_mask_means_may_attend_as_in_sdpa():
    # A boolean mask is SDPA's "True: may attend": the causal boolean mask must give exactly the causal output,
    # and a query that may see only itself returns its own value projection.
    attention, x = _attention(), torch.randn(1, 4, 16)
    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool)).view(1, 1, 4, 4)
    torch.testing.assert_close(attention(x, None, causal), attention(x))
    additive = torch.zeros(1, 1, 4, 4).masked_fill(~causal, float("-inf"))
    torch.testing.assert_close(attention(x, None, additive), attention(x))
    only_self = torch.eye(4, dtype=torch.bool).view(1, 1, 4, 4)
    torch.testing.assert_close(attention(x, None, only_self), attention.o_proj(attention.v_proj(x)))


def test_head_sizes_are_checked_when_the_attention_is_built():
    with pytest.raises(ValueError, match=r"dim=16 is invalid for num_heads=3: must be a multiple of it"):
        Attention(16, AttentionConfig(num_heads=3, num_kv_heads=3))
    assert Attention(16, AttentionConfig(num_heads=3, num_kv_heads=3, head_dim=4, rope=False)).q_proj.out_features == 12
    with pytest.raises(ValueError, match=r"head_dim=0 is invalid: must be >= 1"):
        AttentionConfig(head_dim=0)
    with pytest.raises(ValueError, match=r"head_dim=5 is invalid with rope=True"):
        Attention(16, AttentionConfig(num_heads=2, num_kv_heads=2, head_dim=5))


def test_sliding_window_below_one_is_refused():
    with pytest.raises(ValueError, match=r"sliding_window=0 is invalid: must be >= 1 or None"):
        zoo.build("mixtral-tiny", sliding_window=0)


def test_floating_token_masks_are_refused_everywhere_they_are_taken():
    # An additive 0/-inf mask read as a token mask would make the real tokens padding and the padding real.
    additive = torch.tensor([[0.0, 0.0, float("-inf")]])
    message = r"\.dtype=torch.float32 is invalid: expected a bool or integer mask"
    layer = MoELayer(MoEConfig(dim=8, router=RouterConfig(num_experts=4), experts=ExpertsConfig(hidden_dim=8)))
    with pytest.raises(ValueError, match="mask" + message):
        layer(torch.randn(1, 3, 8), additive)
    model = zoo.build("mixtral-tiny", num_layers=1)
    with pytest.raises(ValueError, match="attention_mask" + message):
        model(torch.zeros(1, 3, dtype=torch.long), attention_mask=additive)
    switch = zoo.build("switch-tiny", num_layers=2)
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="decoder_attention_mask" + message):
        switch(ids, ids, decoder_attention_mask=additive)
    with pytest.raises(ValueError, match="attention_mask" + message):
        switch.encode(ids, additive)
    with pytest.raises(ValueError, match="padding_mask_BS" + message):
        attention_bias(1, 3, padding_mask_BS=additive)
    with pytest.raises(ValueError, match="mask" + message):
        load_balancing_loss(torch.rand(3, 4).softmax(-1), torch.zeros(3, 2, dtype=torch.long), additive[0])
    # Integer and boolean masks mean the same thing.
    tokens = torch.tensor([[1, 1, 0]])
    y_int, stats = layer(torch.ones(1, 3, 8), tokens)
    y_bool, _ = layer(torch.ones(1, 3, 8), tokens.bool())
    assert torch.equal(y_int, y_bool) and int(stats.num_tokens) == 2 and y_int[0, 2].abs().sum() == 0


def test_token_ids_outside_the_vocabulary_and_a_cache_of_another_batch_are_refused():
    model = zoo.build("mixtral-tiny", num_layers=1).eval()
    vocab = model.embed.num_embeddings
    message = rf"input_ids holds {vocab}, which is invalid: expected token ids in \[0, {vocab}\)"
    with pytest.raises(ValueError, match=message):
        model(torch.tensor([[1, vocab]]))
    with pytest.raises(ValueError, match=r"input_ids holds -1, which is invalid"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match=r"input_ids.dtype=torch.float32 is invalid: expected integer token ids"):
        model(torch.zeros(1, 2))
    switch = zoo.build("switch-tiny", num_layers=2)
    with pytest.raises(ValueError, match=r"decoder_input_ids holds -1, which is invalid"):
        switch(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[0, -1]]))
    cache = model.new_cache()
    model(torch.zeros(2, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"input_ids.shape=\(1, 1\) is invalid with this cache: it holds 2 sequences"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)

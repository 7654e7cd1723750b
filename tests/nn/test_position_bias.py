"""T5-style relative position bias: bucketing against Hugging Face, bias shape and direction."""

import pytest
import torch

from lightning_moe.nn.position_bias import RelativePositionBias, relative_position_bucket


def test_small_distances_have_exact_buckets_and_far_ones_share_the_last():
    rel = torch.arange(-300, 301)
    uni = relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
    assert torch.equal(uni[rel >= 0], torch.zeros(301, dtype=torch.long))  # keys after the query: bucket 0
    assert torch.equal(uni[(rel <= 0) & (rel > -16)], torch.arange(15, -1, -1))  # exact: distance = bucket
    assert (uni[rel <= -128] == 31).all()
    by_distance = uni[rel <= 0].flip(0)  # distance 0, 1, 2, ...
    assert (by_distance.diff() >= 0).all() and by_distance.unique().numel() == 32  # monotone, every bucket used
    bi = relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    assert set(bi[rel > 0].tolist()) <= set(range(16, 32)) and set(bi[rel <= 0].tolist()) <= set(range(16))
    assert torch.equal(bi[rel > 0] - 16, relative_position_bucket(-rel[rel > 0], True, 32, 128))


def test_bias_is_looked_up_per_head_from_the_bucket_table():
    module = RelativePositionBias(num_heads=3, num_buckets=8, max_distance=20, bidirectional=True)
    bias = module(5, 7)
    assert bias.shape == (3, 5, 7)
    rel = torch.arange(7).view(1, -1) - torch.arange(5).view(-1, 1)
    expected = module.embedding.weight[relative_position_bucket(rel, True, 8, 20)].permute(2, 0, 1)
    torch.testing.assert_close(bias, expected)
    # An offset shifts the queries: the last query row of a longer sequence.
    torch.testing.assert_close(module(1, 7, offset=4), bias[:, 4:5])


@pytest.mark.parametrize("kwargs", [dict(num_buckets=1), dict(num_buckets=2, bidirectional=True), dict(max_distance=0)])
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="is invalid"):
        RelativePositionBias(num_heads=2, **kwargs)


@pytest.mark.parametrize(("bidirectional", "exact"), [(True, 8), (False, 16)])
def test_max_distance_must_exceed_the_exact_distances(bidirectional, exact):
    # At max_distance == exact the log scale divides 0 by 0 (a NaN bucket), below it buckets go negative.
    for max_distance in (exact, exact - 3):
        with pytest.raises(ValueError, match=rf"max_distance={max_distance} is invalid: must be > {exact}"):
            RelativePositionBias(2, num_buckets=32, max_distance=max_distance, bidirectional=bidirectional)
    module = RelativePositionBias(2, num_buckets=32, max_distance=exact + 1, bidirectional=bidirectional)
    assert torch.isfinite(module(40, 40)).all()


transformers = pytest.importorskip("transformers")
from transformers.models.switch_transformers import modeling_switch_transformers as hf_switch  # noqa: E402


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (8, 12), (16, 40), (6, 7), (64, 256)])
def test_bucket_matches_hugging_face(bidirectional, num_buckets, max_distance):
    rel = torch.arange(-1000, 1001).view(-1, 1) + torch.zeros(1, 3, dtype=torch.long)  # any shape works
    expected = hf_switch.SwitchTransformersAttention._relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    actual = relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("is_decoder", [False, True])
def test_bias_matches_hugging_face_compute_bias(is_decoder):
    config = transformers.SwitchTransformersConfig(
        d_model=16, d_kv=4, num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=30
    )
    config.is_decoder = is_decoder
    torch.manual_seed(0)
    hf = hf_switch.SwitchTransformersAttention(config, has_relative_attention_bias=True, layer_idx=0)
    ours = RelativePositionBias(4, 16, 30, bidirectional=not is_decoder)
    with torch.no_grad():
        ours.embedding.weight.copy_(hf.relative_attention_bias.weight)
        torch.testing.assert_close(ours(40, 40), hf.compute_bias(40, 40)[0], rtol=0, atol=0)

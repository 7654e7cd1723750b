"""Sparse upcycling: a dense baseline becomes an MoE model with the same output at step 0."""

import pytest
import torch

from lightning_moe import zoo
from lightning_moe.nn.moe import MoELayer
from lightning_moe.zoo.baselines import DECODER_TINY_PRESETS


@pytest.mark.parametrize("name", DECODER_TINY_PRESETS)
@pytest.mark.parametrize("dense", ["dense", "dense-total"])
def test_upcycled_output_equals_dense_output(name, dense):
    torch.manual_seed(0)
    dense_model = zoo.build(f"{name}-{dense}").eval()
    cfg = zoo.config(name)
    moe = zoo.upcycle(dense_model, num_experts=cfg.num_experts, top_k=cfg.top_k).eval()
    assert type(moe) is type(dense_model)
    layers = [m for m in moe.modules() if isinstance(m, MoELayer)]
    assert len(layers) == sum(isinstance(m, MoELayer) for m in zoo.build(name).modules())
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense_model(ids).logits, atol=1e-5, rtol=0)


def test_upcycling_copies_everything_but_the_ffns_and_starts_a_fresh_router():
    torch.manual_seed(0)
    dense = zoo.build("mixtral-tiny-dense")
    moe = zoo.upcycle(dense, num_experts=4, top_k=2)
    dense_state = dense.state_dict()
    for key, value in moe.state_dict().items():
        if ".ffn." not in key:
            torch.testing.assert_close(value, dense_state[key], rtol=0, atol=0)
    layer = moe.layers[0].ffn
    assert layer.experts.w1.shape == (4, 128, 512)
    for e in range(4):
        torch.testing.assert_close(layer.experts.w1[e], dense.layers[0].ffn.w1.weight.T)
        torch.testing.assert_close(layer.experts.w2[e], dense.layers[0].ffn.w2.weight.T)
    assert layer.router.gate.weight.abs().sum() > 0
    assert dense.layers[0].ffn.w1.weight.data_ptr() != layer.experts.w1.data_ptr()  # the input is left alone


def test_noise_makes_experts_differ():
    dense = zoo.build("mixtral-tiny-dense")
    moe = zoo.upcycle(dense, 4, 2, noise_std=1e-3, generator=torch.Generator().manual_seed(0))
    w1 = moe.layers[0].ffn.experts.w1
    assert not torch.equal(w1[0], w1[1])
    torch.testing.assert_close(w1[0], dense.layers[0].ffn.w1.weight.T, atol=1e-2, rtol=0)


def test_split_hidden_makes_fine_grained_experts_equal_to_dense_with_all_experts_on():
    torch.manual_seed(0)
    dense = zoo.build("qwen3-moe-tiny-dense").eval()  # hidden 4 * 64 = 256
    moe = zoo.upcycle(dense, num_experts=4, top_k=4, split_hidden=True, zero_router=True).eval()
    assert moe.layers[0].ffn.experts.w1.shape == (4, 128, 64)
    ids = torch.randint(0, 1024, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=0)


def test_upcycling_an_unsupported_model_names_what_is_unsupported():
    with pytest.raises(ValueError, match="does not support an MoE model"):
        zoo.upcycle(zoo.build("mixtral-tiny"), 8, 2)
    with pytest.raises(ValueError, match="does not support Linear without a zoo_config"):
        zoo.upcycle(torch.nn.Linear(2, 2), 8, 2)
    with pytest.raises(ValueError, match="does not split into num_experts=3"):
        zoo.upcycle(zoo.build("mixtral-tiny-dense"), 3, 1, split_hidden=True)
    with pytest.raises(ValueError, match="top_k=9 is invalid"):
        zoo.upcycle(zoo.build("mixtral-tiny-dense"), 8, 9)
    dense = zoo.build("mixtral-tiny-dense")
    for kwargs, match in [
        ({"num_experts": "many"}, r"num_experts='many' is invalid: must be an int >= 1"),
        ({"noise_std": float("inf")}, r"noise_std=inf is invalid: must be a finite number >= 0"),
        ({"split_hidden": "maybe"}, r"split_hidden='maybe' is invalid: must be true or false"),
        ({"zero_router": 1}, r"zero_router=1 is invalid: must be true or false"),
    ]:
        with pytest.raises(ValueError, match=match):
            zoo.upcycle(dense, **{"num_experts": 8, "top_k": 2, **kwargs})

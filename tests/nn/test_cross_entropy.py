import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_moe.nn.cross_entropy import default_chunk_size, linear_cross_entropy


def reference(x, weight, targets, ignore_index=-100):
    logits = F.linear(x, weight).float() if x.dtype != torch.float64 else F.linear(x, weight)
    return F.cross_entropy(logits.reshape(-1, weight.shape[0]), targets.reshape(-1), ignore_index=ignore_index)


def loss_and_grads(fn, x, weight, targets, **kwargs):
    x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(x, weight, targets, **kwargs)
    loss.backward()
    return loss.detach(), x.grad, weight.grad


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40),
    vocab=st.integers(2, 50),
    chunk=st.integers(1, 45),
    ignored=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**16),
)
def test_matches_cross_entropy_of_the_logits_in_float64(rows, vocab, chunk, ignored, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, 6, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[torch.rand(rows, generator=g) < ignored] = -100
    expected = loss_and_grads(reference, x, weight, targets)
    got = loss_and_grads(linear_cross_entropy, x, weight, targets, chunk_size=chunk)
    for e, o in zip(expected, got, strict=True):
        torch.testing.assert_close(o, e, rtol=1e-10, atol=1e-12, equal_nan=True)


def test_leading_shape_ignore_index_and_default_chunks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 200, 8, generator=g, dtype=torch.float64)  # 600 positions: several default chunks
    weight = torch.randn(70_000, 8, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 70_000, (3, 200), generator=g)
    targets[1, 50:] = 7
    assert default_chunk_size(70_000, torch.float64) == 128  # 8 MiB is 14 float64 rows: the minimum wins
    expected = loss_and_grads(reference, x, weight, targets, ignore_index=7)
    got = loss_and_grads(linear_cross_entropy, x, weight, targets, ignore_index=7)
    for e, o in zip(expected, got, strict=True):
        torch.testing.assert_close(o, e, rtol=1e-10, atol=1e-12)
    assert default_chunk_size(8192) == 256


def test_float32_matches_and_the_incoming_gradient_scales():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 32, generator=g)
    weight = torch.randn(500, 32, generator=g) * 0.1
    targets = torch.randint(0, 500, (300,), generator=g)
    loss, gx, gw = loss_and_grads(lambda *a, **k: 3.0 * reference(*a, **k), x, weight, targets)
    got = loss_and_grads(lambda *a, **k: 3.0 * linear_cross_entropy(*a, **k), x, weight, targets, chunk_size=64)
    torch.testing.assert_close(got[0], loss)
    torch.testing.assert_close(got[1], gx)
    torch.testing.assert_close(got[2], gw)
    assert got[0].dtype == torch.float32


def test_bf16_autocast_runs_the_matmuls_in_bf16_like_the_reference():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 64, generator=g)
    weight = torch.randn(1000, 64, generator=g) * 0.05
    targets = torch.randint(0, 1000, (256,), generator=g)

    def under_autocast(fn):
        def run(*args, **kwargs):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*args, **kwargs)

        return run

    exact = loss_and_grads(reference, x, weight, targets)
    expected = loss_and_grads(under_autocast(reference), x, weight, targets)
    got = loss_and_grads(under_autocast(linear_cross_entropy), x, weight, targets, chunk_size=100)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    # The same bf16 logits as the reference (its float32 loss differs), the same bf16 product for x's gradient;
    # the weight's gradient is summed over chunks in float32 where the reference rounds it to bf16 once.
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=0)
    assert abs(exact[0] - expected[0]) > 1e-5
    torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-9)
    assert (got[2] - expected[2]).norm() < 5e-3 * expected[2].norm()


def test_no_grad_gives_the_loss_and_retain_graph_backward_twice_accumulates():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 30, (50,), generator=g)
    with torch.no_grad():
        plain = linear_cross_entropy(x, weight, targets, chunk_size=16)
    assert not plain.requires_grad
    torch.testing.assert_close(plain, reference(x, weight, targets).detach())
    loss = linear_cross_entropy(x, weight, targets, chunk_size=16)
    loss.backward(retain_graph=True)
    once = x.grad.clone(), weight.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * once[0])
    torch.testing.assert_close(weight.grad, 2 * once[1])


def test_only_the_weight_needs_a_gradient():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 30, (20,), generator=g)
    linear_cross_entropy(x, weight, targets, chunk_size=7).backward()
    expected = weight.grad.clone()
    weight.grad = None
    reference(x, weight, targets).backward()
    torch.testing.assert_close(expected, weight.grad)


def test_every_target_ignored_gives_nan_and_zero_gradients_like_cross_entropy():
    x, weight = torch.randn(4, 3), torch.randn(5, 3)
    targets = torch.full((4,), -100)
    expected, got = (
        loss_and_grads(reference, x, weight, targets),
        loss_and_grads(linear_cross_entropy, x, weight, targets),
    )
    assert math.isnan(expected[0].item()) and math.isnan(got[0].item())
    for e, o in zip(expected[1:], got[1:], strict=True):
        assert torch.equal(o, e) and not o.any()


def test_bad_shapes_and_chunk_size_name_the_field():
    x, weight, targets = torch.randn(4, 3), torch.randn(5, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"weight_VD.shape=\(5, 4\) is invalid: expected \(V, 3\)"):
        linear_cross_entropy(x, torch.randn(5, 4), targets)
    with pytest.raises(ValueError, match=r"targets_N.shape=\(3,\) is invalid: expected \(4,\)"):
        linear_cross_entropy(x, weight, targets[:3])
    with pytest.raises(ValueError, match="chunk_size=0 is invalid"):
        linear_cross_entropy(x, weight, targets, chunk_size=0)


def test_targets_must_be_token_ids_or_the_ignore_index():
    x, weight = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"targets_N.dtype=torch.float32 is invalid: expected integer token ids"):
        linear_cross_entropy(x, weight, torch.zeros(4))
    for bad in (-1, 5):  # -1 is a common padding value; here ignore_index is -100
        targets = torch.tensor([0, bad, 4, -100])
        with pytest.raises(ValueError, match=rf"targets_N holds {bad}, which is invalid: expected token ids in \[0, 5"):
            linear_cross_entropy(x, weight, targets)
    targets = torch.tensor([0, -1, 4, -1])
    loss = linear_cross_entropy(x, weight, targets, ignore_index=-1)  # -1 as the ignore index is fine
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(x @ weight.T, targets, ignore_index=-1))

import pytest
import torch

from lightning_moe.data.span_corruption import span_corruption, span_counts


def test_inputs_and_targets_reassemble_the_sequence():
    tokens = torch.arange(100, 164).view(2, 32)
    inputs, targets = span_corruption(tokens, first_sentinel=999, generator=torch.Generator().manual_seed(0))
    noise, spans = span_counts(32, 0.15, 3.0)
    assert (noise, spans) == (5, 2)
    assert inputs.shape == (2, 32 - noise + spans) and targets.shape == (2, noise + spans)
    for row in range(2):
        # Replace each sentinel in the input by the target tokens that follow that sentinel.
        spans_by_sentinel, current = {}, None
        for tok in targets[row].tolist():
            if tok >= 998:
                current = tok
                spans_by_sentinel[current] = []
            else:
                spans_by_sentinel[current].append(tok)
        rebuilt = []
        for tok in inputs[row].tolist():
            rebuilt += spans_by_sentinel[tok] if tok >= 998 else [tok]
        assert rebuilt == tokens[row].tolist()
        assert sorted(t for t in inputs[row].tolist() if t >= 998) == [998, 999]


def test_seeded_corruption_repeats_and_rows_differ():
    tokens = torch.arange(200).view(4, 50)
    a = span_corruption(tokens, 999, generator=torch.Generator().manual_seed(3))
    b = span_corruption(tokens, 999, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    sentinel_positions = [(row >= 998).nonzero().flatten().tolist() for row in a[0]]
    assert len({tuple(p) for p in sentinel_positions}) > 1


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"noise_density=1.5 is invalid"):
        span_corruption(torch.zeros(1, 10, dtype=torch.long), 99, noise_density=1.5)
    with pytest.raises(ValueError, match=r"sequence length 1 is invalid"):
        span_corruption(torch.zeros(1, 1, dtype=torch.long), 99)
    with pytest.raises(ValueError, match=r"tokens_BL of shape \(10,\) is invalid: span corruption takes \(B, L\) rows"):
        span_corruption(torch.zeros(10, dtype=torch.long), 99)
    # 100 tokens, 15 noise tokens in 5 spans: sentinels first_sentinel .. first_sentinel - 4 must all be ids >= 0.
    with pytest.raises(ValueError, match=r"first_sentinel=3 is invalid: must be an int >= 4, as 5 spans of 100 tokens"):
        span_corruption(torch.zeros(1, 100, dtype=torch.long), 3)
    inputs, targets = span_corruption(torch.zeros(1, 100, dtype=torch.long), 4)
    assert inputs.min() == 0 and sorted(set(targets.flatten().tolist()) - {0}) == [1, 2, 3, 4]

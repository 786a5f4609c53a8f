"""Batched variable-k transfer selection against the reference's per-row topk loop."""
import pytest
import torch

from genjo_fast import reference, sampling


def per_row_reference(confidence, k):
    out = torch.zeros_like(confidence, dtype=torch.bool)
    for j in range(confidence.shape[0]):
        out[j, reference.topk_lowest_position(confidence[j], int(k[j]))] = True
    return out


@pytest.mark.parametrize("batch,num_pos", [(1, 1), (3, 7), (8, 33), (5, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_matches_per_row_topk(batch, num_pos, dtype):
    g = torch.Generator().manual_seed(batch * num_pos)
    # few distinct values: many ties; some positions already decoded (-inf)
    confidence = (torch.randint(0, 4, (batch, num_pos), generator=g).to(dtype) / 4)
    decoded = torch.rand(batch, num_pos, generator=g) < 0.3
    confidence[decoded] = -torch.inf
    available = (~decoded).sum(1)
    k = (torch.rand(batch, generator=g) * (available + 1)).long().clamp(max=available)
    got = sampling.select_transfer(confidence, k)
    assert torch.equal(got, per_row_reference(confidence, k))
    assert torch.equal(got.sum(1), k)
    assert not (got & decoded).any()


def test_ties_lowest_position_first():
    confidence = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.5, -torch.inf, 0.5],
                               [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]])
    got = sampling.select_transfer(confidence, torch.tensor([3, 2]))
    assert got[0].nonzero().flatten().tolist() == [0, 1, 3]
    assert got[1].nonzero().flatten().tolist() == [0, 1]


def test_k_zero_selects_nothing():
    assert not sampling.select_transfer(torch.rand(4, 9), torch.zeros(4, dtype=torch.long)).any()


def random_rows(batch, num_pos, seed, levels=8):
    """Confidences in [0, 1] with ties, some -inf (already decoded), one row all -inf."""
    g = torch.Generator().manual_seed(seed)
    confidence = torch.randint(0, levels + 1, (batch, num_pos), generator=g).float() / levels
    confidence[torch.rand(batch, num_pos, generator=g) < 0.3] = -torch.inf
    confidence[-1] = -torch.inf
    return confidence


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.9, 1.0, 1.5])
@pytest.mark.parametrize("batch,num_pos", [(3, 7), (6, 32)])
def test_threshold_rule_matches_per_row_statement(threshold, batch, num_pos):
    confidence = random_rows(batch, num_pos, seed=num_pos)
    got = sampling.select_transfer(confidence, threshold=threshold)
    for j in range(batch):
        want = torch.zeros(num_pos, dtype=torch.bool)
        want[reference.threshold_transfer_row(confidence[j], threshold)] = True
        assert torch.equal(got[j], want)
    assert not got[-1].any()  # nothing to transfer in a finished row
    assert (got.sum(1)[:-1] >= 1).all()  # always at least the most confident


@pytest.mark.parametrize("factor", [0.0, 0.5, 1.0, 2.0, 10.0])
@pytest.mark.parametrize("batch,num_pos", [(3, 7), (6, 32)])
def test_factor_rule_matches_per_row_statement(factor, batch, num_pos):
    confidence = random_rows(batch, num_pos, seed=int(10 * factor) + num_pos, levels=16)
    got = sampling.select_transfer(confidence, factor=factor)
    for j in range(batch):
        want = torch.zeros(num_pos, dtype=torch.bool)
        want[reference.factor_transfer_row(confidence[j], factor)] = True
        assert torch.equal(got[j], want)


def test_threshold_and_factor_by_hand():
    c = torch.tensor([[0.2, 0.95, 0.5, 0.91, -torch.inf, 0.95]])
    assert sampling.select_transfer(c, threshold=0.9)[0].nonzero().flatten().tolist() == [1, 3, 5]
    assert sampling.select_transfer(c, threshold=0.99)[0].nonzero().flatten().tolist() == [1]
    # sorted: 0.95 (pos 1), 0.95 (pos 5), 0.91 (pos 3), 0.5, 0.2. Thresholds for n = 2, 3, 4:
    # 1 - 1/3, 1 - 1/4, 1 - 1/5 with factor 1: 0.95, 0.91 pass, 0.5 < 0.8 stops.
    assert sampling.select_transfer(c, factor=1.0)[0].nonzero().flatten().tolist() == [1, 3, 5]
    assert sampling.select_transfer(c, factor=0.1)[0].nonzero().flatten().tolist() == [1]


def test_exactly_one_rule():
    with pytest.raises(ValueError, match="exactly one of"):
        sampling.select_transfer(torch.rand(2, 3), torch.ones(2, dtype=torch.long), threshold=0.5)
    with pytest.raises(ValueError, match="exactly one of"):
        sampling.select_transfer(torch.rand(2, 3))

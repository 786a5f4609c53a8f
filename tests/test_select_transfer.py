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

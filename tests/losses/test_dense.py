"""``dvml.losses.dense`` against the one-batch losses of ``dvml.losses.metric`` (themselves tested against
pytorch-metric-learning) and, for the triplet loss, against pml directly: batches in class blocks with shuffled
class ids, every reducer, cross-pair anchors, and triplet-dws draws from each member's own generator."""

from __future__ import annotations

import pytest
import torch

from dvml.losses import dense
from dvml.losses.metric import BatchedNPairLoss, BatchedTripletLoss, pml_reference
from dvml.losses.names import LossName, MetricReduction


def block_batches(g: int, c: int, m: int, seed: int = 0) -> torch.Tensor:
    """(G, C·m) labels: each batch C distinct random class ids out of 50, in contiguous blocks of m."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(50, generator=gen)[:c].repeat_interleave(m) for _ in range(g)])


@pytest.mark.parametrize("reducer", list(MetricReduction))
@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("cross", [False, True])
def test_block_triplet_matches_batched_triplet(reducer, squared, cross):
    torch.manual_seed(0)
    g, c, m, e = 5, 6, 4, 8
    z, labels = torch.randn(g, c * m, e), block_batches(g, c, m)
    anchors = torch.randn(g, c * m, e) if cross else None
    got = dense.block_triplet(z, m, margin=0.2, squared=squared, reducer=reducer, anchors=anchors)
    ref = BatchedTripletLoss(margin=0.2, squared=squared, reducer=reducer)
    for i in range(g):
        want = ref(z[i], labels[i], anchors=None if anchors is None else anchors[i])
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)


def test_block_triplet_matches_pml_and_its_gradient():
    torch.manual_seed(1)
    g, c, m, e = 3, 5, 4, 6
    z, labels = torch.randn(g, c * m, e, requires_grad=True), block_batches(g, c, m, seed=1)
    pml, _ = pml_reference(LossName.triplet, num_classes=50, embedding_size=e)
    got = dense.block_triplet(z, m, margin=0.2, squared=True, reducer="nonzero")
    want = torch.stack([pml(z[i], labels[i]) for i in range(g)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (ga,) = torch.autograd.grad(got.sum(), z)
    (gb,) = torch.autograd.grad(want.sum(), z)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cross", [False, True])
def test_block_npair_matches_batched_npair_and_pml(cross):
    torch.manual_seed(2)
    g, c, e = 4, 7, 8
    z, labels = torch.randn(g, 2 * c, e), block_batches(g, c, 2, seed=2)
    anchors = torch.randn(g, 2 * c, e) if cross else None
    got = dense.block_npair(z, anchors=anchors)
    ref = BatchedNPairLoss()
    for i in range(g):
        torch.testing.assert_close(got[i], ref(z[i], labels[i], anchors=None if anchors is None else anchors[i]),
                                   rtol=1e-5, atol=1e-6)
    if not cross:
        pml, _ = pml_reference(LossName.npair, num_classes=50, embedding_size=e)
        torch.testing.assert_close(got, torch.stack([pml(z[i], labels[i]) for i in range(g)]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reducer", list(MetricReduction))
@pytest.mark.parametrize("cross", [False, True])
def test_dws_draws_each_member_as_its_own_fit(reducer, cross):
    """Member i's negatives come from its own generator exactly as the one-batch loss draws them: same draws,
    same value; a shared generator would give other draws (checked)."""
    torch.manual_seed(3)
    mm, t, c, m, e = 3, 4, 6, 4, 16
    z = torch.randn(mm, t, c * m, e) * 0.3
    labels = block_batches(mm, c, m, seed=3)
    anchors = torch.randn(mm, c * m, e) * 0.3 if cross else None
    flat = z.reshape(mm * t, c * m, e)
    anc = None if anchors is None else anchors[:, None].expand(mm, t, c * m, e).reshape(mm * t, c * m, e)
    d = dense.distances(flat, squared=False, anchors=anc)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(mm)]
    n, valid = dense.dws_draws(d.view(mm, t, c * m, c * m), m, e, gens)
    k = n.shape[-1]
    got = dense.dws_triplet(d, n.reshape(mm * t, k), valid.reshape(mm * t, k), m, margin=0.2,
                            reducer=reducer).view(mm, t).mean(1)
    for i in range(mm):
        ref = BatchedTripletLoss(margin=0.2, squared=False, dws=True, reducer=reducer)
        ref.generator = torch.Generator().manual_seed(100 + i)
        want = ref(z[i], labels[i], anchors=None if anchors is None else anchors[i])
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)
        assert torch.equal(gens[i].get_state(), ref.generator.get_state())  # consumed exactly as one fit
    shared = torch.Generator().manual_seed(100)
    n2, _ = dense.dws_draws(d.view(mm, t, c * m, c * m), m, e, [shared] * mm)
    assert not torch.equal(n2[1:], n[1:])


def test_block_layout_check():
    labels = block_batches(2, 3, 4)
    assert dense.is_block_layout(labels, 4)
    assert not dense.is_block_layout(labels[:, torch.randperm(12, generator=torch.Generator().manual_seed(0))], 4)
    assert not dense.is_block_layout(torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1]]), 4)  # two blocks, one class
    assert not dense.is_block_layout(labels[:, :10], 4)

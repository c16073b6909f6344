"""``--synthetic-pairs cross``: the metric losses with real anchors and synthetic positives/negatives, against
brute-force loops and pytorch-metric-learning's ``ref_emb`` (anchors from ``embeddings``, the rest from ``ref_emb``)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses, reducers

from dvml.losses import MetricReduction
from dvml.losses.metric import BatchedTripletLoss, _pair_distances, make_metric_loss

T, E, C, M = 3, 8, 5, 4


def _batch(per_class=M, classes=C, seed=0, counts=None):
    g = torch.Generator().manual_seed(seed)
    if counts is None:
        labels = torch.arange(classes).repeat_interleave(per_class)
    else:
        labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    anchors = torch.randn(len(labels), E, generator=g, dtype=torch.float64)
    z = anchors + 0.7 * torch.randn(T, len(labels), E, generator=g, dtype=torch.float64)  # "synthetic" rows
    return anchors, z, labels


def _brute_triplets(anchors, z, labels, margin, squared, reducer):
    """Every (a, p, n) with p ≠ a of a's class and n of another: max(0, m + D(anchor_a, z_p) − D(anchor_a, z_n))."""
    per_t = []
    for t in range(z.shape[0]):
        vals = []
        for a, p, n in itertools.product(range(len(labels)), repeat=3):
            if a == p or labels[a] != labels[p] or labels[n] == labels[a]:
                continue
            ua, up, un = (F.normalize(v, dim=0) for v in (anchors[a], z[t, p], z[t, n]))
            dp, dn = (ua - up).square().sum(), (ua - un).square().sum()
            if not squared:
                dp, dn = dp.sqrt(), dn.sqrt()
            vals.append(torch.relu(dp - dn + margin))
        v = torch.stack(vals)
        per_t.append({"sum": v.sum(), "mean": v.mean(),
                      "nonzero": v.sum() / (v > 0).sum().clamp_min(1)}[reducer])
    return torch.stack(per_t).mean()


@pytest.mark.parametrize("reducer", [r.value for r in MetricReduction])
@pytest.mark.parametrize("counts", [None, (4, 3, 2, 4, 1)], ids=["equal-classes", "unequal-classes"])
def test_triplet_cross_against_brute_force(reducer, counts):
    anchors, z, labels = _batch(counts=counts)
    loss = BatchedTripletLoss(margin=0.2, squared=True, reducer=reducer)
    a1, z1 = anchors.clone().requires_grad_(True), z.clone().requires_grad_(True)
    a2, z2 = anchors.clone().requires_grad_(True), z.clone().requires_grad_(True)
    ours = loss(z1, labels, anchors=a1)
    ref = _brute_triplets(a2, z2, labels, 0.2, True, reducer)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-7, atol=1e-12)
    assert ours.item() > 0 and a1.grad.abs().sum() > 0  # the anchors are trained through the cross term


def test_triplet_cross_against_pml_ref_emb():
    """pml's TripletMarginLoss with anchors as ``embeddings`` and batch t as ``ref_emb``, on Lm(z_I)'s triplets."""
    anchors, z, labels = _batch()
    ours = make_metric_loss("triplet", num_classes=C, embedding_size=E)(z, labels, anchors=anchors)
    same = labels[:, None] == labels[None, :]
    a, p, n = torch.nonzero((same & ~torch.eye(len(labels), dtype=torch.bool))[:, :, None] & ~same[:, None, :],
                            as_tuple=True)
    ref = losses.TripletMarginLoss(margin=0.2, distance=distances.LpDistance(power=2))
    expected = sum(ref(anchors, labels, (a, p, n), ref_emb=z[t], ref_labels=labels) for t in range(T)) / T
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)


def test_cross_with_anchors_equal_to_the_batch_is_the_plain_loss():
    """When the synthetic batch is the real one, cross pairs are Lm(z_I)'s own pairs: the same value."""
    anchors, _, labels = _batch()
    for name in ("triplet", "npair"):
        per_class = 2 if name == "npair" else M
        a, _, lab = _batch(per_class=per_class)
        loss = make_metric_loss(name, num_classes=C, embedding_size=E)
        torch.testing.assert_close(loss(a[None], lab, anchors=a), loss(a, lab), rtol=1e-12, atol=1e-12)
    loss = make_metric_loss("triplet", num_classes=C, embedding_size=E)
    assert not torch.isclose(loss(anchors[None] * 1.0 + 0.5, labels, anchors=anchors), loss(anchors, labels))


def test_npair_cross_against_brute_force():
    anchors, z, labels = _batch(per_class=2)
    loss = make_metric_loss("npair", num_classes=C, embedding_size=E)
    ours = loss(z, labels, anchors=anchors)
    a, p = loss.pairs(labels)
    expected = 0.0
    for t in range(T):
        ce = 0.0
        for i in range(len(a)):
            logits = torch.stack([anchors[a[i]] @ z[t, p[j]] for j in range(len(p))])
            ce = ce + torch.logsumexp(logits, 0) - logits[i]
        expected = expected + ce / len(a) + 0.002 * z[t].square().sum(-1).mean()
    torch.testing.assert_close(ours, expected / T, rtol=1e-9, atol=1e-12)


def test_dws_cross_with_its_sampled_triplets_equals_pml_ref_emb():
    anchors, z, labels = _batch()
    ours = make_metric_loss("triplet-dws", num_classes=C, embedding_size=E)
    g = torch.Generator().manual_seed(5)
    ours.generator = g
    a, p, n, valid = ours.sample_negatives(_pair_distances(z, squared=False, anchors=anchors), labels, E)
    g.manual_seed(5)
    loss = ours(z, labels, anchors=anchors)
    ref = losses.TripletMarginLoss(margin=0.2, distance=distances.LpDistance(power=1),
                                   reducer=reducers.AvgNonZeroReducer())
    expected = sum(ref(anchors, labels, (a[valid[t]], p[valid[t]], n[t][valid[t]]), ref_emb=z[t], ref_labels=labels)
                   for t in range(T)) / T
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    assert (labels[n] != labels[a]).all()


def test_pair_distances_with_anchors():
    anchors, z, _ = _batch()
    d = _pair_distances(z, squared=False, anchors=anchors)
    expected = torch.cdist(F.normalize(anchors, dim=-1)[None].expand_as(z), F.normalize(z, dim=-1))
    torch.testing.assert_close(d, expected, rtol=1e-7, atol=1e-7)


def test_triplet_input_cross_takes_anchors_from_the_first_third():
    g = torch.Generator().manual_seed(2)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 1, 2, 0])
    anchors = torch.randn(9, E, generator=g, dtype=torch.float64)
    z = torch.randn(T, 9, E, generator=g, dtype=torch.float64)
    loss = BatchedTripletLoss(reducer="sum", fixed_triplets=True)
    u, ua = F.normalize(z, dim=-1), F.normalize(anchors, dim=-1)
    v = torch.relu((ua[None, :3] - u[:, 3:6]).square().sum(-1) - (ua[None, :3] - u[:, 6:]).square().sum(-1) + 0.2)
    torch.testing.assert_close(loss(z, labels, anchors=anchors), v.sum(1).mean(), rtol=1e-12, atol=1e-12)


def test_losses_without_anchors_refuse_them():
    anchors, z, labels = _batch()
    for name in ("proxy-nca-pp", "contrastive"):
        loss = make_metric_loss(name, num_classes=C, embedding_size=E).double()
        with pytest.raises(ValueError, match="takes no anchors"):
            loss(z, labels, anchors=anchors)
    with pytest.raises(ValueError, match="anchors must be"):
        make_metric_loss("triplet", num_classes=C, embedding_size=E)(z, labels, anchors=anchors[:-1])


def test_the_losses_that_take_anchors_are_the_cross_pair_losses():
    """The config's list (CROSS_PAIR_LOSSES, what --synthetic-pairs cross accepts) and the modules' takes_anchors
    say the same for every loss."""
    from dvml.losses import CROSS_PAIR_LOSSES, LossName

    for name in LossName:
        loss = make_metric_loss(name, num_classes=C, embedding_size=E)
        assert loss.takes_anchors == (name in CROSS_PAIR_LOSSES), name

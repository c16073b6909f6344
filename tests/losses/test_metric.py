"""Metric losses over T batches against pytorch-metric-learning looped over t (the independent reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dvml.losses import LossName
from dvml.losses.metric import (
    BatchedTripletLoss,
    FlattenT,
    ForwardBatched,
    LoopOverT,
    _pair_distances,
    make_metric_loss,
    pml_reference,
)

T, E, C, M = 4, 8, 6, 4
PML_NAMES = ["triplet", "npair", "proxy-nca", "contrastive", "lifted", "angular", "multi-similarity", "proxy-anchor"]


def _batch(per_class=M, classes=C, seed=0, t=T, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)[torch.randperm(classes * per_class, generator=g)]
    z = torch.randn(t, len(labels), E, generator=g, dtype=torch.float64) * scale
    return z, labels


def _pair(name):
    ours = make_metric_loss(name, num_classes=C, embedding_size=E).double()
    ref, miner = pml_reference(name, num_classes=C, embedding_size=E)
    ref = ref.double()
    if hasattr(ref, "proxies"):
        with torch.no_grad():
            ref.proxies.copy_(ours.loss.proxies)
    return ours, ref, miner


def _loop_reference(ref, miner, z, labels):
    total = 0.0
    for t in range(z.shape[0]):
        total = total + (ref(z[t], labels, miner(z[t], labels)) if miner is not None else ref(z[t], labels))
    return total / z.shape[0]


@pytest.mark.parametrize("name", PML_NAMES)
def test_against_pml_loop_over_t(name):
    """Lm(ẑ) of all T batches at once equals the pml loss of each batch, averaged over t; same gradients."""
    per_class = 2 if name == "npair" else M
    ours, ref, miner = _pair(name)
    z, labels = _batch(per_class=per_class)
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    a = ours(z1, labels)
    b = _loop_reference(ref, miner, z2, labels)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    a.backward()
    b.backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-7, atol=1e-10)
    assert a.item() > 0


def test_strategies():
    assert make_metric_loss("triplet", num_classes=C, embedding_size=E).strategy == "batched"
    assert make_metric_loss("npair", num_classes=C, embedding_size=E).strategy == "batched"
    assert make_metric_loss("triplet-dws", num_classes=C, embedding_size=E).strategy == "batched"
    assert isinstance(make_metric_loss("proxy-nca", num_classes=C, embedding_size=E), FlattenT)
    assert isinstance(make_metric_loss("proxy-anchor", num_classes=C, embedding_size=E), LoopOverT)


def test_triplet_with_unequal_class_counts_against_pml():
    """The general (gather) path, used when the classes of a batch have different counts."""
    ours, ref, _ = _pair("triplet")
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4])  # class 3 has no positive
    z = torch.randn(T, len(labels), E, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours(z, labels), _loop_reference(ref, None, z, labels), rtol=1e-9, atol=1e-10)


def test_single_batch_input_is_one_t():
    ours, ref, _ = _pair("triplet")
    z, labels = _batch()
    torch.testing.assert_close(ours(z[0], labels), ref(z[0], labels))


def test_no_violated_triplet_gives_exactly_zero_with_finite_gradient():
    labels = torch.arange(3).repeat_interleave(2)
    centres = torch.eye(E, dtype=torch.float64)[:3] * 10
    z = (centres[labels] + 1e-3 * torch.randn(len(labels), E, dtype=torch.float64)).expand(T, -1, -1).clone()
    z.requires_grad_(True)
    for name in ("triplet", "triplet-dws"):
        loss = make_metric_loss(name, num_classes=3, embedding_size=E)(z, labels)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.isfinite(z.grad).all()


def test_dws_with_its_sampled_triplets_equals_pml_triplet2_loss():
    ours = make_metric_loss("triplet-dws", num_classes=C, embedding_size=E)
    ref, _ = pml_reference("triplet-dws", num_classes=C, embedding_size=E)
    z, labels = _batch(scale=1.0)
    g = torch.Generator().manual_seed(11)
    ours.generator = g
    a, p, n, valid = ours.sample_negatives(_pair_distances(z, squared=False), labels, E)
    g.manual_seed(11)  # the forward pass draws the same negatives
    loss = ours(z, labels)
    expected = sum(ref(z[t], labels, (a[valid[t]], p[valid[t]], n[t][valid[t]])) for t in range(T)) / T
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-10)
    assert (labels[n] != labels[a]).all()  # negatives are negatives
    assert (labels[p] == labels[a]).all() and (p != a).all()


def _wu_weights_numpy(d, labels, dim, cutoff=0.5, nonzero=1.4):
    """Independent reference: Wu et al. (2017) inverse-density weights, one row at a time in float64."""
    d = np.asarray(d, dtype=np.float64)
    w = np.zeros_like(d)
    for i in range(d.shape[0]):
        row = []
        for j in range(d.shape[1]):
            if labels[i] == labels[j] or d[i, j] >= nonzero:
                row.append(-math.inf)
                continue
            x = max(d[i, j], cutoff)
            row.append((2 - dim) * math.log(x) - (dim - 3) / 2 * math.log(1 - x * x / 4))
        row = np.array(row)
        if np.isfinite(row).any():
            e = np.exp(row - row[np.isfinite(row)].max())
            w[i] = e / e.sum()
    return w


def test_dws_weights_against_wu_et_al_formula():
    ours = BatchedTripletLoss(dws=True, squared=False)
    ours.embedding_dim = E
    z, labels = _batch(t=1)
    d = _pair_distances(z, squared=False)
    w = ours.dws_weights(d, labels)[0].numpy()
    np.testing.assert_allclose(w, _wu_weights_numpy(d[0].numpy(), labels.numpy(), E), rtol=1e-9, atol=1e-12)


def test_dws_draw_frequencies_follow_the_weights():
    ours = BatchedTripletLoss(dws=True, squared=False)
    ours.generator = torch.Generator().manual_seed(0)
    z, labels = _batch(t=1)
    z = z.expand(3000, -1, -1)  # 3000 independent draws of the same batch
    d = _pair_distances(z, squared=False)
    a, p, n, valid = ours.sample_negatives(d, labels, E)
    w = ours.dws_weights(d[:1], labels)[0]
    anchor = int(a[0])
    draws = n[:, a == anchor].flatten()
    freq = torch.bincount(draws, minlength=len(labels)).double() / draws.numel()
    assert torch.allclose(freq, w[anchor], atol=0.03)
    assert valid.all()


@pytest.mark.parametrize("name", ["dr-triplet", "dr-proxy-nca", "proxy-nca-pp"])
def test_direction_regularised_losses_equal_their_loop_over_t(name):
    dr = pytest.importorskip("dvml.losses.dr")
    ours = make_metric_loss(name, num_classes=C, embedding_size=E).double()
    assert isinstance(ours, ForwardBatched)
    assert hasattr(dr, type(ours.loss).__name__)
    z, labels = _batch()
    expected = sum(ours.loss(z[t], labels) for t in range(T)) / T
    torch.testing.assert_close(ours(z, labels), expected)


def test_every_name_builds():
    for name in LossName:
        loss = make_metric_loss(name, num_classes=C, embedding_size=E)
        assert isinstance(loss, torch.nn.Module)
        has_proxies = any(True for _ in loss.parameters())
        assert has_proxies == (name.value in ("proxy-nca", "proxy-anchor", "dr-proxy-nca", "proxy-nca-pp"))

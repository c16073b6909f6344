"""ClassBalancedSampler: class structure of each batch, determinism, small classes, errors."""

from __future__ import annotations

import pytest
import torch

from dvml.errors import DvmlError
from dvml.heads.sampler import ClassBalancedSampler


def _labels():
    # classes 0..9 with 3..12 images, class 10 with a single image
    return torch.cat([torch.full((3 + c,), c) for c in range(10)] + [torch.tensor([10])])


def test_batches_hold_m_images_of_k_distinct_classes():
    labels = _labels()
    s = ClassBalancedSampler(labels, batch_size=12, per_class=4, generator=torch.Generator().manual_seed(0))
    batches = s.epoch()
    assert batches.shape == (len(labels) // 12, 12)
    for b in batches:
        lab = labels[b].view(3, 4)
        assert (lab == lab[:, :1]).all()  # contiguous runs of one class
        assert len(set(lab[:, 0].tolist())) == 3  # distinct classes
        assert 10 not in lab  # a single-image class is never drawn
        for row, idx in zip(lab, b.view(3, 4), strict=True):
            if int((labels == row[0]).sum()) >= 4:
                assert len(set(idx.tolist())) == 4  # without replacement when the class is big enough


def test_small_classes_repeat_their_images():
    labels = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    s = ClassBalancedSampler(labels, batch_size=8, per_class=4, generator=torch.Generator().manual_seed(1))
    seen = set()
    for _ in range(20):
        for b in s.epoch():
            for idx in b.view(2, 4):
                if labels[idx[0]] == 0:
                    assert sorted(set(idx.tolist())) == [0, 1] and len(idx) == 4
                    seen.add(0)
    assert seen == {0}


def test_same_generator_state_same_epoch_and_epochs_differ():
    labels = _labels()
    a = ClassBalancedSampler(labels, 12, 4, torch.Generator().manual_seed(5))
    b = ClassBalancedSampler(labels, 12, 4, torch.Generator().manual_seed(5))
    e1, e2 = a.epoch(), a.epoch()
    assert torch.equal(e1, b.epoch()) and torch.equal(e2, b.epoch())
    assert not torch.equal(e1, e2)


def test_draws_cover_every_eligible_class():
    labels = _labels()
    s = ClassBalancedSampler(labels, 12, 4, torch.Generator().manual_seed(2))
    drawn = torch.cat([s.epoch().flatten() for _ in range(30)])
    assert set(labels[drawn].tolist()) == set(range(10))


def test_too_few_classes_is_a_dvml_error():
    with pytest.raises(DvmlError, match="--batch-size"):
        ClassBalancedSampler(torch.arange(4).repeat(5), 40, 4, torch.Generator())

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
    with pytest.raises(DvmlError, match="but there are 4: lower batch_size or per_class$"):
        ClassBalancedSampler(torch.arange(4).repeat(5), 40, 4, torch.Generator())


def test_with_views_a_repeated_image_gets_another_view_never_the_same_pair():
    """Class 0 has 2 images, per_class 4, 3 views: its slots hold each image twice, with ranks 0 and 1, so the
    trainer's view (v + rank) mod 3 differs between the two occurrences; (image, view) pairs are all distinct."""
    labels = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    s = ClassBalancedSampler(labels, batch_size=8, per_class=4, generator=torch.Generator().manual_seed(1), views=3)
    g = torch.Generator().manual_seed(2)
    small = 0
    for _ in range(20):
        idx, ranks = s.epoch_with_ranks()
        assert idx.shape == ranks.shape
        v_img = torch.randint(3, (len(labels),), generator=g)  # the epoch's view per image, as the trainer draws
        for b, r in zip(idx, ranks, strict=True):
            view = (v_img[b] + r) % 3
            pairs = list(zip(b.tolist(), view.tolist(), strict=True))
            assert len(set(pairs)) == len(pairs)  # never the same image and view twice in a batch
            for row, rr in zip(b.view(2, 4), r.view(2, 4), strict=True):
                if labels[row[0]] == 0:
                    small += 1
                    assert sorted(row.tolist()) == [0, 0, 1, 1] and sorted(rr.tolist()) == [0, 0, 1, 1]
                else:
                    assert len(set(row.tolist())) == 4 and (rr == 0).all()
    assert small > 0


def test_with_one_view_classes_smaller_than_per_class_are_never_drawn(caplog):
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])  # class 0: 3 images < per_class 4
    with caplog.at_level("WARNING"):
        s = ClassBalancedSampler(labels, 8, 4, torch.Generator().manual_seed(0), views=1)
    assert "never sampled" in caplog.text
    drawn = torch.cat([s.epoch_with_ranks()[0].flatten() for _ in range(30)])
    assert set(labels[drawn].tolist()) == {1, 2, 3}
    with pytest.raises(DvmlError, match="distinct"):
        ClassBalancedSampler(labels, 16, 4, torch.Generator(), views=1)  # 4 classes per batch, 3 eligible


def test_epoch_and_epoch_with_ranks_draw_the_same_batches():
    labels = _labels()
    a = ClassBalancedSampler(labels, 12, 4, torch.Generator().manual_seed(5))
    b = ClassBalancedSampler(labels, 12, 4, torch.Generator().manual_seed(5), views=4)
    assert torch.equal(a.epoch(), b.epoch_with_ranks()[0])


def test_the_batch_fit_counts_the_classes_the_sampler_draws():
    """fit_batch (the default batch fitted to the data) and the sampler share one rule: with one view, a class
    of 3 images cannot give 4 distinct (image, view) pairs and counts for neither; with 2 views it does."""
    import numpy as np

    from dvml.heads.batch import eligible_classes

    labels = np.array([0, 0, 0] + [1] * 4 + [2] * 4 + [3])  # 3, 4, 4, 1 images
    assert eligible_classes(labels) == 3  # >= 2 images
    assert eligible_classes(labels, 4, views=1) == 2
    assert eligible_classes(labels, 4, views=2) == 3
    for views, want in ((1, {1, 2}), (2, {0, 1, 2})):
        s = ClassBalancedSampler(torch.from_numpy(labels), 4, 2 * 2, torch.Generator().manual_seed(0), views=views)
        drawn = torch.cat([s.epoch().flatten() for _ in range(20)])
        assert set(labels[drawn.numpy()].tolist()) == want

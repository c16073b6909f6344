"""Training images for finetune: the paper's augmentation keyed by (seed, epoch, batch, position) for determinism."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dvml.errors import DvmlError
from dvml.extract.datasets import DatasetIndex, Sample
from dvml.extract.transforms import BadImageError, load_rgb, resize_shorter
from dvml.finetune import distributed as D

log = logging.getLogger(__name__)


def drop_unreadable(index: DatasetIndex) -> tuple[DatasetIndex, list[str]]:
    """``finetune --skip-bad``: the index without its unreadable training images (each decoded once), and the
    error message of each one left out (naming the file).

    Raises:
        DvmlError: no training image is readable.
    """
    keep, bad = [], []
    for s in index.train:
        try:
            load_rgb(index.root / s.path)
        except BadImageError as e:
            bad.append(str(e))
            continue
        keep.append(s)
    if not keep:
        raise DvmlError(f"{index.root}: none of the {len(index.train)} training images is readable")
    if bad:
        log.warning("--skip-bad: left out %d unreadable training image(s) of %d (listed in config.json), first: %s",
                    len(bad), len(index.train), bad[0])
    return dataclasses.replace(index, train=keep), bad


class AugmentedImages(Dataset):
    """Training images with the paper's augmentation, keyed for determinism.

    ``__getitem__((i, epoch, batch, position))`` loads sample ``i``, resizes its shorter side to
    ``preprocess.resize``, cuts a random ``crop`` window mirrored with probability 1/2, drawn from
    ``numpy.random.default_rng((seed, epoch, batch, position))``. Returns ``{"image": uint8 (3, c, c),
    "label": int (0-based training class), "error": "" or a message naming the file}`` (never raises, so a
    worker never dies; the trainer raises).
    """

    def __init__(self, root: Path, samples: list[Sample], labels: np.ndarray, preprocess, seed: int):
        self.root, self.samples, self.labels = Path(root), samples, labels
        self.preprocess, self.seed = preprocess, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int, int, int]) -> dict:
        i, epoch, batch, pos = key
        c = self.preprocess.crop
        try:
            img = resize_shorter(load_rgb(self.root / self.samples[i].path), self.preprocess.resize,
                                 self.preprocess.interpolation)
        except BadImageError as e:
            return {"image": torch.zeros(3, c, c, dtype=torch.uint8), "label": int(self.labels[i]), "error": str(e)}
        h, w = img.shape[:2]
        rng = np.random.default_rng((self.seed, epoch, batch, pos))
        top, left = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        view = img[top:top + c, left:left + c].transpose(2, 0, 1)
        if rng.random() < 0.5:
            view = view[:, :, ::-1]
        return {"image": torch.from_numpy(np.ascontiguousarray(view)), "label": int(self.labels[i]), "error": ""}


def collate(items: list[dict]) -> dict:
    return {"images": torch.stack([it["image"] for it in items]),
            "labels": torch.tensor([it["label"] for it in items], dtype=torch.int64),
            "errors": [it["error"] for it in items]}


class KeyedBatches:
    """Turns a :class:`~dvml.finetune.distributed.DistributedClassBalancedSampler` into batches of augmentation keys."""

    def __init__(self, sampler: D.DistributedClassBalancedSampler):
        self.sampler = sampler

    def __iter__(self):
        s = self.sampler
        offset = s.rank * s.local_batch_size
        for b, idx in enumerate(s, start=s.start):
            yield [(i, s.epoch, b, offset + p) for p, i in enumerate(idx)]

    def __len__(self) -> int:
        return len(self.sampler)

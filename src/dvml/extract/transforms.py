"""Views of an image: decoded and resized once, every view cut from that one resized image.

* view 0 (train and test): the centre crop, exactly what ``GoogLeNet_Weights.IMAGENET1K_V1.transforms()``
  does (resize the shorter side to ``resize`` with antialiased bilinear, centre crop ``crop``);
* train views 1..P-1: a random ``crop`` x ``crop`` window of the same resized image, horizontally
  mirrored with probability 1/2 (the paper's "random crop and horizontal mirroring", section 3.5, on the
  torchvision resize instead of the paper's 256x256 squash);
* test view 1 (``test_flip``): the mirrored centre crop.

Randomness: view j of image i (its index in the split) draws from ``numpy.random.default_rng((seed, i, j))``,
so the views do not depend on batch size, worker count, resume point or the other views.

Views leave here as uint8 tensors (P, 3, crop, crop); normalisation happens on the device
(:meth:`dvml.extract.backbone.Preprocess.normalize`), so only a quarter of the bytes cross to it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

# imported here, not in resize_shorter: DataLoader workers fork from a parent that has it already (a TorchScript
# backbone imports no torchvision; importing it in every fresh worker cost seconds per extraction)
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from dvml.errors import DvmlError
from dvml.extract.backbone import Preprocess
from dvml.extract.datasets import Sample

# what PIL raises for unreadable/truncated/corrupt images
IMAGE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


class BadImageError(DvmlError):
    """An image that cannot be decoded; the message names the file."""


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image fully as RGB. Raises :class:`BadImageError` naming the file if it is unreadable."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() forces the full decode: truncation is caught here
    except FileNotFoundError:
        raise BadImageError(f"{path}: image not found") from None
    except IMAGE_ERRORS as e:
        raise BadImageError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def resize_shorter(img: Image.Image, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """Resize so the shorter side is ``size`` (torchvision's rule for the longer side), as uint8 (H, W, 3)."""
    out = F.resize(img, [size], interpolation=InterpolationMode(interpolation), antialias=True)
    return np.asarray(out, dtype=np.uint8)


def centre_offset(length: int, crop: int) -> int:
    """Top/left offset of a centre crop, rounded as torchvision's ``center_crop`` does."""
    return int(f"{(length - crop) / 2.0:.0f}")  # nearest integer, halves to even (torchvision's)


@dataclass(frozen=True)
class ViewSpec:
    """Which views to cut: ``train_views`` P for the train split, centre (+ mirrored centre) for test."""

    crop: int
    train_views: int = 10
    test_flip: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.train_views < 1:
            raise ValueError(f"views must be >= 1, got {self.train_views}")

    def n_views(self, split: str) -> int:
        return self.train_views if split == "train" else 1 + int(self.test_flip)

    def describe(self, split: str, preprocess: Preprocess) -> tuple[str, ...]:
        """One string per view of ``split`` (stored in the cache's ``views`` attribute for train)."""
        centre = f"centre(resize={preprocess.resize},crop={preprocess.crop})"
        if split == "test":
            return (centre,) + ((f"centre+hflip(resize={preprocess.resize},crop={preprocess.crop})",)
                                if self.test_flip else ())
        return (centre,) + tuple(f"random_crop+hflip_p0.5(resize={preprocess.resize},crop={preprocess.crop},"
                                 f"seed={self.seed},view={j})" for j in range(1, self.train_views))

    def cut(self, image: np.ndarray, index: int, split: str) -> np.ndarray:
        """image: resized uint8 (H, W, 3), ``index`` its position in the split -> uint8 (P, 3, crop, crop)."""
        c = self.crop
        h, w = image.shape[:2]
        out = np.empty((self.n_views(split), 3, c, c), dtype=np.uint8)
        top, left = centre_offset(h, c), centre_offset(w, c)
        centre = image[top:top + c, left:left + c].transpose(2, 0, 1)
        out[0] = centre
        if split == "test":
            if self.test_flip:
                out[1] = centre[:, :, ::-1]
            return out
        for j in range(1, self.train_views):
            rng = np.random.default_rng((self.seed, index, j))
            top, left = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
            view = image[top:top + c, left:left + c].transpose(2, 0, 1)
            out[j] = view[:, :, ::-1] if rng.random() < 0.5 else view
        return out


class ViewDataset(Dataset):
    """Item ``i`` of one split: its P views, decoded and resized once, cut in the worker.

    ``__getitem__(i)`` returns a dict: ``views`` uint8 (P, 3, crop, crop) (zeros for a bad image),
    ``label`` int, ``index`` i, ``error`` "" or the message naming the file. Errors are returned rather
    than raised so the caller decides (stop, or skip with ``--skip-bad``) and a worker never dies.
    """

    def __init__(self, root: str | Path, samples: Sequence[Sample], split: str, preprocess: Preprocess,
                 views: ViewSpec):
        if views.crop != preprocess.crop:
            raise ValueError(f"view crop {views.crop} != preprocess crop {preprocess.crop}")
        self.root = Path(root)
        self.samples = samples
        self.split = split
        self.preprocess = preprocess
        self.views = views

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        error = ""
        try:
            img = load_rgb(self.root / sample.path)
            views = self.views.cut(resize_shorter(img, self.preprocess.resize, self.preprocess.interpolation),
                                   i, self.split)
        except BadImageError as e:
            error = str(e)
            c = self.views.crop
            views = np.zeros((self.views.n_views(self.split), 3, c, c), dtype=np.uint8)
        return {"views": torch.from_numpy(views), "label": sample.label, "index": i, "error": error}


def collate_views(items: list[dict]) -> dict:
    """Stack items: ``views`` (B, P, 3, c, c) uint8, ``labels`` (B,) int64, ``index`` (B,) int64, ``errors``."""
    return {"views": torch.stack([it["views"] for it in items]),
            "labels": torch.tensor([it["label"] for it in items], dtype=torch.int64),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
            "errors": [it["error"] for it in items]}


def worker_init(_worker_id: int) -> None:
    """DataLoader workers decode with PIL; keep torch from spawning threads that fight the main process."""
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

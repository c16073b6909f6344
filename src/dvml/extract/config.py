"""The extract stage's configuration and the light names it needs, importable without torch (so that
``dvml extract --help`` and ``dvml finetune --help`` stay fast): :class:`ExtractConfig`, :data:`DEFAULT_WORKERS`,
:func:`check_image_options` (shared with finetune), :data:`DEFAULT_BACKBONE`, :data:`INTERPOLATIONS` and
:func:`parse_spec` (torchvision is imported only to check a model name). The old homes
(:mod:`dvml.extract.extractor`, :mod:`dvml.extract.backbone`) re-export them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from dvml.cache import schema as S
from dvml.config_fields import option
from dvml.devices import check_device_name
from dvml.errors import DvmlError, FieldError
from dvml.extract.registry import DatasetName, dataset_spec, resolve_dataset

if TYPE_CHECKING:
    import torch

DEFAULT_BACKBONE = "googlenet"
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")
_FILE_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit", ".ptl")
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)
PREPROCESS_PANEL = "Preprocessing (default: the backbone's own)"  # dvml extract --help panels
DATA_PANEL = "Dataset and output"


class FeatureDtype(str, Enum):
    """On-disk dtype of cached features (extract, synth): :data:`dvml.cache.schema.FEATURE_DTYPES`."""

    float16 = "float16"
    float32 = "float32"


class Interpolation(str, Enum):
    """Resize interpolation of extract's preprocessing (:data:`INTERPOLATIONS`)."""

    nearest = "nearest"
    nearest_exact = "nearest-exact"
    bilinear = "bilinear"
    bicubic = "bicubic"


def check_image_options(cfg) -> None:
    """Validate the image options extract and finetune share: ``resize``, ``crop`` (None or >= 8 pixels, crop
    <= resize), ``mean``/``std`` (3 values, std > 0, when the config has them), ``train_classes`` (folder datasets
    only) and ``device`` (auto, cpu, cuda, cuda:N, mps). Raises ValueError naming the option."""
    for name in ("resize", "crop"):
        v = getattr(cfg, name)
        if v is not None and v < 8:
            raise FieldError(f"`{name}` must be >= 8 pixels, got {v}")
    if cfg.resize is not None and cfg.crop is not None and cfg.crop > cfg.resize:
        raise FieldError(f"`crop` {cfg.crop} must not exceed `resize` {cfg.resize}")
    if cfg.train_classes is not None and not dataset_spec(cfg.dataset).train_classes:
        raise FieldError("`train_classes` applies to the folder dataset only")
    for name in ("mean", "std"):
        v = getattr(cfg, name, None)
        if v is not None and (len(v) != 3 or (name == "std" and min(v) <= 0)):
            raise ValueError(f"--{name} needs 3 values (R,G,B){', all > 0' if name == 'std' else ''}, got {v}")
    check_device_name(cfg.device)


@dataclass(frozen=True)
class ExtractConfig:
    """One extraction job. ``backbone``: see :func:`~dvml.extract.backbone.load_backbone`. ``resize``, ``crop``,
    ``mean``, ``std``, ``interpolation`` ``None`` take the backbone's own preprocessing (GoogLeNet: 256 / 224)."""

    dataset: DatasetName | str  # a registered dataset (dvml.extract.registry); a plug-in's name is a DatasetKey
    root: Path = field(metadata=option(
        "Dataset directory (CUB_200_2011, the Cars196 directory with cars_annos.mat, Stanford_Online_Products, or a "
        "<class>/<image> folder).", flags=("--root",)))
    out: Path = field(metadata=option("Output HDF5 feature cache.", flags=("--out", "-o")))
    backbone: str = field(default=DEFAULT_BACKBONE, metadata=option(
        "googlenet (the paper's), any torchvision classification model (resnet50, efficientnet_b0, convnext_tiny, "
        "vit_b_16, ...), timm:NAME (pip install 'dvml\\[timm]'), or a model file: torch.export .pt2 or TorchScript "
        ".pt (images in, features out; a model file is code: use only files you trust)."))
    weights: str = field(default="imagenet", metadata=option(
        "'imagenet' (the model's default pretrained weights; must be in the torch hub / Hugging Face cache "
        "offline), a torchvision weights name (IMAGENET1K_V2), 'none' (seeded random init, for tests) or a path to "
        "a state dict. Ignored for a TorchScript file."))
    views: int = field(default=10, metadata=option(
        "Views per training image: view 0 = centre crop, the rest seeded random crop + horizontal flip."))
    test_flip: bool = field(default=False, metadata=option("Also store the flipped centre view of test images."))
    seed: int = field(default=0, metadata=option("Seed of the random views."))
    batch_size: int = field(default=32, metadata=option("Images per batch (each with all its views)."))
    workers: int = field(default=DEFAULT_WORKERS, metadata=option(
        "DataLoader worker processes decoding images (0 = main)."))
    device: str = field(default="auto", metadata=option("auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."))
    amp: bool = field(default=True, metadata=option("float16 autocast on CUDA and MPS."))  # ignored on CPU
    resize: int | None = field(default=None, metadata=option(
        "Shorter side after resizing (default: the backbone's own, e.g. 256).", panel=PREPROCESS_PANEL))
    crop: int | None = field(default=None, metadata=option(
        "Crop size = network input size (default: the backbone's own, e.g. 224).", panel=PREPROCESS_PANEL))
    mean: tuple[float, float, float] | None = field(default=None, metadata=option(
        "Per-channel mean R,G,B on \\[0, 1] pixels (default: the backbone's own).", panel=PREPROCESS_PANEL))
    std: tuple[float, float, float] | None = field(default=None, metadata=option(
        "Per-channel std R,G,B (default: the backbone's own).", panel=PREPROCESS_PANEL))
    interpolation: str | None = field(default=None, metadata=option(
        "Resize interpolation (default: the backbone's own).", panel=PREPROCESS_PANEL, choices=Interpolation))
    dtype: str = field(default="float16", metadata=option("On-disk feature dtype.", panel=DATA_PANEL,
                                                          choices=FeatureDtype))
    train_classes: int | None = field(default=None, metadata=option(
        "folder only: number of (sorted) classes in the train split (default: half).", panel=DATA_PANEL))
    transform_input: bool | None = field(default=None, metadata=option(  # None: the weights' convention
        "torchvision GoogLeNet input re-normalisation (default: on for imagenet, off for none, for a file its "
        "stored value or on).", panel=PREPROCESS_PANEL))
    skip_bad: bool = field(default=False, metadata=option(
        "Skip unreadable images (listed in the cache's extra) instead of stopping.", panel=DATA_PANEL))
    overwrite: bool = field(default=False, metadata=option("Replace an existing complete output."))

    def __post_init__(self):
        object.__setattr__(self, "dataset", resolve_dataset(self.dataset))
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "backbone", str(self.backbone))
        for name in ("mean", "std"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise FieldError(f"`interpolation` must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.views < 1:
            raise FieldError(f"`views` must be >= 1, got {self.views}")
        if self.batch_size < 1:
            raise FieldError(f"`batch_size` must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise FieldError(f"`workers` must be >= 0, got {self.workers}")
        if self.dtype not in S.FEATURE_DTYPES:
            raise FieldError(f"`dtype` must be one of {', '.join(S.FEATURE_DTYPES)}, got {self.dtype!r}")
        check_image_options(self)

    def torch_device(self) -> torch.device:
        from dvml.devices import resolve_device

        return resolve_device(self.device)


# --------------------------------------------------------------------------- spec parsing

class BackboneKind(str, Enum):
    """Where a backbone comes from."""

    torchvision = "torchvision"  # a torchvision classification model, by name
    timm = "timm"  # a timm model, by name (the optional extra)
    exported = "exported"  # a torch.export .pt2 file
    torchscript = "torchscript"  # a TorchScript file


@dataclass(frozen=True)
class BackboneSpec:
    """A parsed ``--backbone``: ``kind`` (:class:`BackboneKind`, or its value) and the model name or file path."""

    kind: BackboneKind
    name: str  # model name, or the file path for a model file

    def __post_init__(self):
        object.__setattr__(self, "kind", BackboneKind(self.kind))


def parse_spec(spec: str | Path) -> BackboneSpec:
    """``googlenet`` / ``torchvision:NAME`` / ``torchvision.NAME`` / ``timm:NAME`` / ``torchscript:PATH`` / a path.

    Raises DvmlError for an unknown torchvision name (listing how to see the valid ones) or a missing file."""
    s = str(spec).strip()
    if not s:
        raise DvmlError("`backbone` is empty")
    for prefix, kind in (("torchvision:", "torchvision"), ("torchvision.", "torchvision"), ("timm:", "timm"),
                         ("torchscript:", "torchscript")):
        if s.startswith(prefix):
            s, forced = s[len(prefix):], kind
            break
    else:
        forced = None
    if forced == "timm":
        return BackboneSpec("timm", s)
    looks_like_file = forced == "torchscript" or "/" in s or s.endswith(_FILE_SUFFIXES) or Path(s).is_file()
    if looks_like_file and forced != "torchvision":
        path = Path(s).expanduser()
        if not path.is_file():
            raise DvmlError(f"`backbone` {s}: no such model file (expected a torchvision model name, "
                            f"timm:NAME or a TorchScript file)")
        return BackboneSpec("exported" if path.suffix.lower() == ".pt2" and forced is None else "torchscript",
                            str(path))
    from torchvision import models

    names = set(models.list_models(module=models))
    if s not in names:
        raise DvmlError(f"`backbone` {s}: not a torchvision classification model (e.g. googlenet, resnet50, "
                        f"efficientnet_b0, convnext_tiny, vit_b_16; see torchvision.models.list_models()); "
                        f"use timm:NAME for timm models or a path for a TorchScript file")
    return BackboneSpec("torchvision", s)

"""The extract stage's configuration and the light names it needs, importable without torch (so that
``dvml extract --help`` and ``dvml finetune --help`` stay fast): :class:`ExtractConfig`, :data:`DEFAULT_WORKERS`,
:func:`check_image_options` (shared with finetune), :data:`DEFAULT_BACKBONE`, :data:`INTERPOLATIONS` and
:func:`parse_spec` (torchvision is imported only to check a model name). The old homes
(:mod:`dvml.extract.extractor`, :mod:`dvml.extract.backbone`) re-export them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dvml.cache import schema as S
from dvml.devices import check_device_name
from dvml.errors import DvmlError, FieldError
from dvml.extract.registry import DatasetName, dataset_spec, resolve_dataset

if TYPE_CHECKING:
    import torch

DEFAULT_BACKBONE = "googlenet"
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")
_FILE_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit", ".ptl")
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


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
    root: Path
    out: Path
    backbone: str = DEFAULT_BACKBONE
    weights: str = "imagenet"
    views: int = 10
    test_flip: bool = False
    seed: int = 0
    batch_size: int = 32  # images per batch (each with P views)
    workers: int = DEFAULT_WORKERS
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    amp: bool = True  # float16 autocast on CUDA and MPS (ignored on CPU)
    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: str | None = None
    dtype: str = "float16"
    train_classes: int | None = None  # folder only
    transform_input: bool | None = None  # None: the weights' convention
    skip_bad: bool = False
    overwrite: bool = False

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

@dataclass(frozen=True)
class BackboneSpec:
    """A parsed ``--backbone``: ``kind`` is ``torchvision``, ``timm``, ``exported`` (a ``.pt2`` file) or
    ``torchscript``."""

    kind: str
    name: str  # model name, or the file path for torchscript


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

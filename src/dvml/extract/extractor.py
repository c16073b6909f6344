"""The extraction loop: dataset -> P views per image -> backbone -> streaming HDF5 cache.

``run(ExtractConfig(...))`` writes train then test through :class:`~dvml.cache.CacheWriter`, one batch
at a time (memory does not grow with the dataset). DataLoader workers decode, resize and cut the views;
the main process normalises on the device and runs the model channels-last under ``torch.inference_mode``
(on CUDA and MPS also with float16 autocast); features are stored as ``dtype`` (float16 by default).

The backbone (``--backbone``, see :mod:`dvml.extract.backbone`) decides the feature dimension and the
preprocessing (resize, crop, mean, std, interpolation); options override single fields, and the result is
stored in the cache's ``preprocess`` attribute, its name in ``backbone`` and its weights' identity in ``weights``.

Resuming: the dataset order is deterministic, so after a kill or Ctrl-C the same command reopens the
file and continues at the first unwritten image. With ``skip_bad`` the skipped images are listed in the
cache's ``extra["skipped"]`` (split, index, path, error) *before* the batch that skipped them is
appended, and the resume point is the smallest dataset position p with
``p - #skipped(index < p) == n_written`` -- correct whether or not the last batch reached the disk.

Several processes (``torchrun --nproc-per-node N -m dvml extract ...``, the caller having joined the process
group): each rank writes a contiguous block of whole batches to its own shard and the last to finish merges them;
the cache is the single-process one, bit for bit (see :mod:`dvml.extract.sharding`).

Options that change the features (backbone, weights, preprocessing, views, seed, test flip, dtype, the image list) are
part of the writer's configuration: resuming with different ones is refused. Batch size, workers,
device and ``skip_bad`` are not (``--skip-bad`` may be added to continue past a bad image).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader

from dvml.cache import CacheExistsError, CacheSpec, CacheWriter
from dvml.cache import schema as S
from dvml.devices import autocast_dtype, pin_memory
from dvml.errors import DvmlError
from dvml.extract import sharding
from dvml.extract.backbone import (
    Backbone,
    Preprocess,
    load_backbone,
    preprocess_from_options,
)
from dvml.extract.config import DEFAULT_WORKERS as DEFAULT_WORKERS  # re-exported: the light home of these
from dvml.extract.config import ExtractConfig as ExtractConfig
from dvml.extract.config import check_image_options as check_image_options
from dvml.extract.datasets import DatasetIndex, DatasetName, read_dataset
from dvml.extract.transforms import ViewDataset, ViewSpec, collate_views, worker_init
from dvml.files import check_not_busy

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
"""``progress(split, done, total)``: images of ``split`` processed so far (written or skipped) of ``total``.
Called once when a split starts (``done`` > 0 when resuming) and after every written batch. It may raise
(e.g. KeyboardInterrupt) to stop: the file stays resumable."""


@dataclass(frozen=True)
class ExtractResult:
    path: Path
    n_train: int  # rows written
    n_test: int
    skipped: list[dict]
    seconds: float  # wall time of this call
    images_processed: int  # images decoded in this call (resume excludes earlier ones)
    backbone: str = ""  # the cache's backbone / weights / feature_dim / preprocess attributes
    weights: str = ""
    feature_dim: int = 0
    preprocess: dict | None = None
    world_size: int = 1  # processes of a torchrun extraction (see dvml.extract.sharding)
    merged: bool = True  # False: this rank wrote its shard (``path``), another rank merges the cache


def make_spec(index: DatasetIndex, backbone: Backbone, views: ViewSpec, dtype: str, seed: int) -> CacheSpec:
    """The cache description of a job; everything in it must match for a resume."""
    pre = backbone.preprocess
    extra = {
        **backbone.describe(),
        "seed": seed,
        "test_views": list(views.describe("test", pre)),
        "split_rule": index.split_rule,
        "n_images": {"train": len(index.train), "test": len(index.test)},
        "index_digest": index.digest(),
    }
    if index.name == DatasetName.folder.value:
        extra["class_names"] = {str(k): v for k, v in index.class_names.items()}
    if index.test_roles is not None:
        extra["n_images"].update(query=sum(1 for r in index.test_roles if r & S.ROLE_QUERY),
                                 gallery=sum(1 for r in index.test_roles if r & S.ROLE_GALLERY))
    return CacheSpec(dataset=index.name, backbone=backbone.name, weights=backbone.weights,
                     feature_dim=backbone.feature_dim, views=views.describe("train", pre),
                     test_views=views.n_views("test"), dtype=dtype, with_paths=True, extra=extra,
                     query_gallery=index.test_roles is not None, preprocess=pre.as_dict())


def preprocess_for(default: Preprocess | None, resize: int | None = None, crop: int | None = None, mean=None,
                   std=None, interpolation: str | None = None, *, what: str = "the backbone") -> Preprocess:
    """``default`` with the given fields overridden; one size given alone keeps the default crop/resize ratio.
    ``default`` None (a model file that stores no preprocessing): the options must give crop, mean and std."""
    if default is None:
        return preprocess_from_options(resize, crop, mean, std, interpolation, what)
    return default.override(resize=resize, crop=crop, mean=mean, std=std, interpolation=interpolation)


def resolve_backbone(backbone: Backbone, cfg) -> Backbone:
    """The backbone with the config's preprocessing overrides applied and its feature dimension known."""
    pre = preprocess_for(backbone.preprocess, cfg.resize, cfg.crop, getattr(cfg, "mean", None),
                         getattr(cfg, "std", None), getattr(cfg, "interpolation", None), what=backbone.name)
    return replace(backbone, preprocess=pre).ensure_feature_dim()


def resume_position(n_written: int, skipped_indices: list[int]) -> int:
    """Smallest dataset position p with ``p - #(skipped < p) == n_written`` (see the module docstring)."""
    p = n_written
    for i in sorted(skipped_indices):
        if i < p:
            p += 1
        else:
            break
    return p


class FeatureModel:
    """Backbone on a device: uint8 views (B, P, 3, c, c) -> float32 numpy features (B, P, D).

    ``amp``: float16 autocast where the device has it (CUDA, MPS); the CPU always runs float32."""

    def __init__(self, backbone: Backbone, device: torch.device, amp: bool = True):
        self.backbone = backbone
        self.device = device
        self.cuda = pin_memory(device)
        self.amp_dtype = autocast_dtype(device) if amp else None
        self.amp = self.amp_dtype is not None
        # channels-last: faster on GPUs (tensor cores) and on CPUs too (oneDNN convolutions, vectorised
        # max-pooling: 1.7x for GoogLeNet on one core here)
        self.model = backbone.model.to(device).eval().to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, views: torch.Tensor) -> np.ndarray:
        b, p = views.shape[:2]
        x = views.to(self.device, non_blocking=True).flatten(0, 1)
        x = self.backbone.preprocess.normalize(x).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float16, enabled=self.amp):
            feats = self.model(x)
        return feats.float().reshape(b, p, -1).cpu().numpy()


def _refuse_complete(out: Path) -> None:
    if not out.is_file():
        return
    try:
        with h5py.File(out, "r") as f:
            complete = bool(f.attrs.get(S.ATTR_COMPLETE, False))
    except OSError:
        return  # not HDF5: CacheWriter reports it
    if complete:
        raise CacheExistsError(out, "a complete cache already exists here; pass `overwrite` to replace it")


def _read_skipped(writer: CacheWriter) -> list[dict]:
    return list(writer.extra().get("skipped", []))


def _extract_rows(cfg: ExtractConfig, writer: CacheWriter, index: DatasetIndex, split: str, rows: range,
                  skipped: list[dict], progress: ProgressFn | None, model: FeatureModel, pre: Preprocess,
                  view_spec: ViewSpec) -> int:
    """Write the images ``rows`` (dataset positions of ``split``, a contiguous range) to ``writer``, resuming after
    its ``n_written`` rows of them; ``skipped`` (every split's, updated in place) lists the images left out.
    Returns the number of images processed by this call. ``progress`` sees positions relative to ``rows``."""
    samples = index.split(split)
    mine = [s for s in skipped if s["split"] == split and s["index"] in rows]
    start = rows.start + resume_position(writer.n_written(split), [s["index"] - rows.start for s in mine])
    stale = [s for s in mine if s["index"] >= start]  # listed, but their batch never landed
    if stale:
        skipped[:] = [s for s in skipped if s not in stale]
        writer.set_extra(skipped=skipped)
    if start > rows.start:
        log.info("%s: resuming at image %d of %d", split, start, len(samples))
    if progress is not None:
        progress(split, start - rows.start, len(rows))
    if start >= rows.stop:
        return 0
    processed = 0
    dataset = ViewDataset(index.root, samples, split, pre, view_spec)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=range(start, rows.stop),
                        num_workers=cfg.workers, collate_fn=collate_views, pin_memory=model.cuda,
                        worker_init_fn=worker_init if cfg.workers else None,
                        prefetch_factor=4 if cfg.workers else None)
    for batch in loader:
        ok = np.array([not e for e in batch["errors"]])
        if not ok.all():
            bad = [(int(i), err) for i, err, good in zip(batch["index"], batch["errors"], ok, strict=True)
                   if not good]
            if not cfg.skip_bad:
                raise DvmlError(f"{bad[0][1]} (pass `skip_bad` to skip unreadable images; "
                                "rerun to resume)")
            for i, err in bad:
                log.warning("skipped: %s", err)
                skipped.append({"split": split, "index": i, "path": samples[i].path, "error": err})
            writer.set_extra(skipped=skipped)  # before the append: see the module docstring
        views = batch["views"][torch.from_numpy(ok)] if not ok.all() else batch["views"]
        if len(views):
            feats = model(views)
            if not np.isfinite(feats).all():
                raise DvmlError(f"{split}: the backbone produced NaN/inf features for images "
                                f"{samples[int(batch['index'][0])].path} ...; check `weights`")
            idx = batch["index"].numpy()[ok]
            roles = ([index.test_roles[i] for i in idx] if split == S.TEST and index.test_roles is not None
                     else None)  # query/gallery marks (In-Shop), row by row like the paths
            writer.append(split, feats, batch["labels"].numpy()[ok], [samples[i].path for i in idx], roles)
        processed += len(ok)
        if progress is not None:
            progress(split, int(batch["index"][-1]) + 1 - rows.start, len(rows))
    return processed


def run(cfg: ExtractConfig, *, progress: ProgressFn | None = None, index: DatasetIndex | None = None,
        backbone: Backbone | None = None) -> ExtractResult:
    """Extract features of ``cfg.dataset`` into ``cfg.out`` (resuming an incomplete file); return a summary.

    ``index``/``backbone`` may be passed prebuilt (tests, benchmarks); by default they come from ``cfg``.
    Raises DvmlError for a bad root, bad weights, a bad image (unless ``skip_bad``), an existing complete
    output (unless ``overwrite``) or an incomplete one written with other settings.
    """
    t0 = time.perf_counter()
    world = sharding.world_size()
    if world > 1:
        token = sharding.check_same_arguments(cfg)  # first: a rank that refused alone would leave the others waiting
    error = None
    try:
        check_not_busy(cfg.out, "wait for it to finish, or stop it")  # before the slow part; CacheWriter locks it
        if not cfg.overwrite:
            _refuse_complete(cfg.out)  # before the slow part (model build); CacheWriter checks again
        if sharding.rank() == 0:
            sharding.refuse_leftover_shards(cfg.out, cfg.overwrite, world)
        index = index or read_dataset(cfg.dataset, cfg.root, train_classes=cfg.train_classes)
    except DvmlError as e:
        if world == 1:
            raise
        error = str(e)
    if world > 1:  # every rank refuses alike (none hangs), and all see the same image list
        sharding.agree({"the image list": None if error else index.digest()}, error)
    backbone = backbone or load_backbone(cfg.backbone, cfg.weights, transform_input=cfg.transform_input)
    backbone = resolve_backbone(backbone, cfg)
    pre = backbone.preprocess
    view_spec = ViewSpec(crop=pre.crop, train_views=cfg.views, test_flip=cfg.test_flip, seed=cfg.seed)
    device = cfg.torch_device()
    spec = make_spec(index, backbone, view_spec, cfg.dtype, cfg.seed)
    model = FeatureModel(backbone, device, cfg.amp)
    log.info("extracting %s (%d train / %d test images, %s) with %s (%d-D), %d view(s) at %d/%d on %s into %s",
             index.name, len(index.train), len(index.test), index.split_rule, backbone.name, backbone.feature_dim,
             cfg.views, pre.resize, pre.crop, device, cfg.out)
    merged = True
    if world > 1:
        n_train, n_test, skipped, processed, path = sharding.run_rank(
            cfg, index, spec, token=token, extract_rows=lambda writer, split, rows, skipped, report: _extract_rows(
                cfg, writer, index, split, rows, skipped, report, model, pre, view_spec),
            extra=dict(root=str(index.root.resolve()), device=str(device), amp=model.amp), progress=progress)
        merged, path = path is not None, path or sharding.shard_path(cfg.out, sharding.rank(), world)
    else:
        with CacheWriter(cfg.out, spec, overwrite=cfg.overwrite) as writer:
            writer.set_extra(root=str(index.root.resolve()), device=str(device), amp=model.amp)
            skipped = _read_skipped(writer)
            processed = 0
            for split in S.SPLITS:
                rows = range(len(index.split(split)))
                processed += _extract_rows(cfg, writer, index, split, rows, skipped, progress, model, pre, view_spec)
            writer.set_extra(skipped=skipped)
            n_train, n_test = writer.n_written(S.TRAIN), writer.n_written(S.TEST)
            path = writer.finalize()
    seconds = time.perf_counter() - t0
    log.info("wrote %s: %d train x %d views, %d test x %d views, %d skipped, %.1f s",
             path, n_train, cfg.views, n_test, view_spec.n_views("test"), len(skipped), seconds)
    return ExtractResult(path=path, n_train=n_train, n_test=n_test, skipped=skipped, seconds=seconds,
                         images_processed=processed, backbone=backbone.name, weights=backbone.weights,
                         feature_dim=int(backbone.feature_dim), preprocess=pre.as_dict(), world_size=world,
                         merged=merged)

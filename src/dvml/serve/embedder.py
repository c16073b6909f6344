"""From images to the test-time embedding z_I, in one module: what ``dvml export`` saves and ``dvml search`` runs.

:class:`ImageEmbedder` maps uint8 RGB images ``(B, 3, crop, crop)`` (already resized and centre-cropped) to
``(B, E)`` float32: normalisation → backbone → the embedding layer of the heads (z_I). It is built from

* a **fit-heads run**: the backbone named by the run's feature cache (its ``backbone``/``weights``
  attributes, ``transform_input`` and preprocessing from the cache's provenance) and the run's embedding
  layer. The features go through the cache's storage dtype before the embedding layer (float16 caches:
  ``x.half().float()``), because the heads were fit — and ``dvml evaluate`` embeds — on the stored values;
* a **finetune run**: its tuned backbone (``backbone.pt``) and heads (float32 features, as evaluate's
  ``embed_test_split``);
* a **raw cache** (the raw-feature floor): the cache's backbone alone, rounded like the cache.

Resize and crop stay outside the module (PIL's antialiased resize is what extract used; a tensor
resize would give other pixels), described by :func:`preprocess_record`; :func:`load_images` is that
recipe in dvml (the extract code itself). Backbones: whatever the cache records
(:func:`~dvml.extract.backbone.backbone_from_cache`: torchvision by name, ``timm:NAME``, a TorchScript file),
with the cache's preprocessing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dvml import __version__
from dvml.errors import DvmlError
from dvml.extract.backbone import Backbone, Preprocess

log = logging.getLogger(__name__)



class ExportError(DvmlError):
    """A run, cache or model file that cannot be turned into (or used as) an image embedder."""


def check_images(images: torch.Tensor, crop: int) -> None:
    """Refuse (ValueError) anything but uint8 ``(B, 3, crop, crop)``: a float image in [0, 1] would otherwise
    give a different embedding without a word."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 RGB in [0, 255], shape (B, 3, {crop}, {crop}); got dtype "
                         f"{images.dtype} (floats in [0, 1]? scale by 255 to uint8)")
    if images.dim() != 4 or tuple(images.shape[1:]) != (3, crop, crop):
        raise ValueError(f"images must have shape (B, 3, {crop}, {crop}) (uint8 RGB), got {tuple(images.shape)}")


class ImageEmbedder(nn.Module):
    """uint8 images (B, 3, H, W) RGB in [0, 255] → (B, E) float32 z_I (or raw features without heads).

    The normalisation is :meth:`~dvml.extract.backbone.Preprocess.normalize`'s, op for op, so the
    backbone sees bit-identical input to ``dvml extract``'s.
    """

    def __init__(self, backbone: nn.Module, embedding: nn.Module | None, preprocess: Preprocess,
                 round_features_to_float16: bool):
        super().__init__()
        # channels-last weights and input, as extract's FeatureModel runs it: the same CPU kernels, so the
        # features are bit-identical to the cached ones (contiguous NCHW convolutions sum in another order)
        self.backbone = backbone.to(memory_format=torch.channels_last)
        self.embedding = embedding if embedding is not None else nn.Identity()
        self.round_features = bool(round_features_to_float16)
        self.crop = int(preprocess.crop)
        self.register_buffer("mean255", torch.tensor(preprocess.mean, dtype=torch.float32).view(3, 1, 1) * 255)
        self.register_buffer("inv_std255",
                             1.0 / (torch.tensor(preprocess.std, dtype=torch.float32).view(3, 1, 1) * 255))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.crop)
        x = (images.to(torch.float32) - self.mean255) * self.inv_std255
        feats = self.backbone(x.contiguous(memory_format=torch.channels_last))
        if self.round_features:
            feats = feats.half().float()  # the values the heads were fit on (a float16 cache)
        return self.embedding(feats)


@dataclass
class Embedding:
    """An :class:`ImageEmbedder` plus the facts an exported file carries (see :func:`describe`)."""

    module: ImageEmbedder
    preprocess: Preprocess
    embedding_dim: int
    source: dict  # what it was built from: kind, run_dir / cache, fingerprint, backbone, weights
    feature_rounding: str | None  # "float16" or None
    metric: str = "cosine"
    extra: dict = field(default_factory=dict)

    @torch.inference_mode()
    def embed_uint8(self, images: np.ndarray | torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """(N, 3, crop, crop) uint8 → (N, E) float32."""
        x = torch.as_tensor(images)
        out = np.empty((x.shape[0], self.embedding_dim), dtype=np.float32)
        self.module.eval()
        for i in range(0, x.shape[0], batch_size):
            out[i:i + batch_size] = self.module(x[i:i + batch_size]).numpy()
        return out

    def embed_paths(self, paths: Sequence[str | Path], batch_size: int = 64) -> np.ndarray:
        """Image files → (N, E) float32 (see :func:`load_images`)."""
        out = np.empty((len(paths), self.embedding_dim), dtype=np.float32)
        for i in range(0, len(paths), batch_size):
            out[i:i + batch_size] = self.embed_uint8(load_images(paths[i:i + batch_size], self.preprocess))
        return out


def preprocess_record(pre: Preprocess) -> dict:
    """The preprocessing, as stored in an exported file: enough to reproduce extract's input without dvml."""
    return {
        "resize": pre.resize, "crop": pre.crop, "interpolation": pre.interpolation, "antialias": True,
        "mean": list(pre.mean), "std": list(pre.std), "color": "RGB", "layout": "NCHW", "dtype": "uint8",
        "recipe": (f"decode as RGB; resize (PIL, {pre.interpolation}) so the shorter side is {pre.resize} and the "
                   f"longer int({pre.resize} * long / short); cut the centre {pre.crop}x{pre.crop} window at "
                   f"top = (height - {pre.crop}) / 2 and left = (width - {pre.crop}) / 2, each to the nearest integer "
                   "(halves to even); feed uint8 (B, 3, crop, crop). Mean/std normalisation is inside the model."),
    }


def load_images(paths: Sequence[str | Path], pre: Preprocess) -> np.ndarray:
    """Images → uint8 (N, 3, crop, crop), exactly as ``dvml extract`` cuts a test image's centre view.

    Raises :class:`~dvml.extract.transforms.BadImageError` naming an unreadable file.
    """
    from dvml.extract.transforms import ViewSpec, load_rgb, resize_shorter

    spec = ViewSpec(crop=pre.crop, train_views=1)
    out = np.empty((len(paths), 3, pre.crop, pre.crop), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = spec.cut(resize_shorter(load_rgb(p), pre.resize, pre.interpolation), i, "test")[0]
    return out


# ------------------------------------------------------------------------------------------------ builders
def backbone_of_cache(info, weights: str | Path | None = None) -> Backbone:
    """Rebuild the backbone that wrote a cache (``info``: :class:`~dvml.cache.CacheInfo`) on the CPU, with the
    cache's preprocessing (:func:`dvml.extract.backbone.backbone_from_cache`): any torchvision model, ``timm:NAME``
    or TorchScript file, with the weights the cache names. ``weights`` (a file) is needed when the cache was made
    from a local state dict, whose path a cache does not keep (its hash is checked).

    Raises :class:`ExportError` for a backbone dvml cannot build and DvmlError for weights it cannot have.
    """
    from dvml.extract.backbone import backbone_from_cache, parse_spec

    recorded = backbone_from_cache(info)
    if weights is not None and not recorded.identity.startswith("state_dict:"):
        raise ExportError(f"`weights` {weights}: {info.path} was extracted with weights {recorded.identity}, not a "
                          "local state dict file, so there is nothing to pass; drop `weights`")
    try:
        parse_spec(recorded.spec)
    except DvmlError as e:
        raise ExportError(f"{info.path}: made by backbone {recorded.spec!r}, which dvml cannot rebuild ({e})") from None
    try:
        backbone = recorded.load(weights)
    except DvmlError as e:
        raise ExportError(f"{info.path}: {e}") from None
    if backbone.feature_dim != info.feature_dim:
        raise ExportError(f"{info.path}: feature_dim {info.feature_dim} but {recorded.spec} gives "
                          f"{backbone.feature_dim}")
    return backbone


def _cache_source(cache: Path) -> tuple:
    from dvml.cache import fingerprint, read_info

    info = read_info(cache)
    rounding = "float16" if info.splits["test"].dtype == "float16" else None
    return info, fingerprint(cache), rounding


def from_cache(cache: str | Path, *, weights: str | Path | None = None) -> Embedding:
    """The raw-feature embedder of a cache: its backbone, features rounded to the cache's dtype."""
    cache = Path(cache)
    info, fp, rounding = _cache_source(cache)
    bb = backbone_of_cache(info, weights)
    module = ImageEmbedder(bb.model, None, bb.preprocess, rounding == "float16").eval()
    return Embedding(module=module, preprocess=bb.preprocess, embedding_dim=bb.feature_dim,
                     feature_rounding=rounding,
                     source={"kind": "cache", "cache": str(cache.resolve()), "cache_fingerprint": fp,
                             "dataset": info.dataset, **bb.describe()})


def from_run(run_dir: str | Path, *, weights: str | Path | None = None) -> Embedding:
    """The z_I embedder of a fit-heads or finetune run directory (see the module docstring).

    Raises:
        ExportError / RunError: not a run, its cache missing or changed since the fit (as ``dvml evaluate``
            refuses it), a backbone that cannot be rebuilt.
    """
    from dvml import runs as R
    from dvml.heads.embed import embedding_layer

    run_dir = Path(run_dir)
    info = R.load_run(run_dir)
    if info.kind == R.FINETUNE_KIND:
        from dvml.finetune import load_finetuned

        ft = load_finetuned(run_dir, read_index=False)
        bb = ft.backbone
        emb = ft.heads.embedding
        module = ImageEmbedder(bb.model, emb, bb.preprocess, False).eval()
        source = {"kind": "finetune", "run_dir": str(run_dir.resolve()), "dataset": info.config.get("dataset"),
                  **bb.describe()}
        return Embedding(module=module, preprocess=bb.preprocess, embedding_dim=emb.out_features, source=source,
                         feature_rounding=None)
    if info.kind != R.HEADS_KIND:
        raise ExportError(f"{run_dir}: a {info.kind} run; export takes fit-heads and finetune runs")
    if info.cache is None:
        raise ExportError(f"{run_dir}: its config.json names no feature cache")
    cache = Path(info.cache)
    if not cache.exists():
        raise ExportError(f"{run_dir}: its feature cache {cache} no longer exists (recorded in "
                          f"{run_dir / R.CONFIG_FILE}); the cache names the backbone to export: restore it")
    cinfo, fp, rounding = _cache_source(cache)
    if fp != info.cache_fingerprint:
        raise ExportError(f"{run_dir}: feature cache {cache} changed since the heads were fit (fingerprint {fp} != "
                          f"recorded {info.cache_fingerprint}); re-fit the heads or restore the original file")
    ckpt = R.load_checkpoint(run_dir)
    layer = embedding_layer(ckpt, run_dir / R.HEADS_FILE)
    if layer.in_features != cinfo.feature_dim:
        raise ExportError(f"{run_dir}: heads take {layer.in_features}-D features, its cache has {cinfo.feature_dim}")
    bb = backbone_of_cache(cinfo, weights)
    module = ImageEmbedder(bb.model, layer, bb.preprocess, rounding == "float16").eval()
    source = {"kind": "heads", "run_dir": str(run_dir.resolve()), "cache": str(cache.resolve()),
              "cache_fingerprint": fp, "dataset": cinfo.dataset, "epoch": ckpt.get("epoch"),
              "selection": ckpt.get("selection"), **bb.describe()}
    return Embedding(module=module, preprocess=bb.preprocess, embedding_dim=layer.out_features, source=source,
                     feature_rounding=rounding)


def from_target(target: str | Path, *, weights: str | Path | None = None) -> Embedding:
    """:func:`from_run` for a directory, :func:`from_cache` for a file."""
    target = Path(target)
    if not target.exists():
        raise ExportError(f"{target}: no such run directory or cache file")
    return from_run(target, weights=weights) if target.is_dir() else from_cache(target, weights=weights)


def describe(e: Embedding) -> dict:
    """The metadata an exported file carries (JSON-able)."""
    return {
        "format": "dvml-embedding-model",
        "format_version": 1,
        "input": {"name": "images", "dtype": "uint8", "shape": ["batch", 3, e.preprocess.crop, e.preprocess.crop],
                  "layout": "NCHW", "color": "RGB", "range": [0, 255]},
        "output": {"name": "embeddings", "dtype": "float32", "shape": ["batch", e.embedding_dim],
                   "what": "z_I (the DVML test-time embedding)" if e.source.get("kind") != "cache"
                   else "raw backbone features (no heads)"},
        "preprocess": preprocess_record(e.preprocess),
        "embedding_dim": e.embedding_dim,
        "metric": e.metric,
        "feature_rounding": e.feature_rounding,
        "source": e.source,
        "dvml_version": __version__,
        "torch_version": torch.__version__,
    }

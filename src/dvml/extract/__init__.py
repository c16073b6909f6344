"""Stage one: images (or a generator) -> HDF5 feature cache.

Public API (also for end-to-end fine-tuning, which trains from the same images):

* datasets: :class:`DatasetName`, :class:`Sample`, :class:`DatasetIndex`, :func:`read_dataset`
  (and :func:`read_cub`, :func:`read_cars196`, :func:`read_sop`, :func:`read_inshop`, :func:`read_folder`);
* backbone: :func:`load_backbone` ``(spec, weights, device=None)`` -> :class:`Backbone` (``.model``,
  ``.preprocess`` (:class:`Preprocess`), ``.feature_dim``, ``.name``, ``.weights``) for googlenet, any torchvision
  classifier, ``timm:NAME`` or a TorchScript file; :func:`save_torchscript` (a model + its preprocessing in one
  file), :func:`backbone_from_cache` (``backbone_from_cache(read_info(cache)).load()``: the network that wrote a
  cache, with its preprocessing);
* views: :func:`load_rgb`, :func:`resize_shorter`, :class:`ViewSpec`, :class:`ViewDataset`,
  :func:`collate_views`, :class:`BadImageError`;
* the stage: :class:`ExtractConfig`, :func:`run` -> :class:`ExtractResult`;
* getting the images: :mod:`dvml.extract.download` (``download``/``verify``: resumable, MD5-checked) and
  :mod:`dvml.extract.archive` (safe, atomic unpacking); imported on use, not here.
"""

from dvml._lazy import lazy_exports

# imported on first use: importing a light submodule (e.g. a config) must not import torch
__getattr__, __dir__ = lazy_exports(__name__, {
    "dvml.extract.backbone": ["BACKBONE_NAME", "DEFAULT_BACKBONE", "FEATURE_DIM", "Backbone", "CacheBackbone",
        "Preprocess", "backbone_from_cache", "load_backbone", "save_exported", "save_torchscript"],
    "dvml.extract.datasets": ["DatasetIndex", "DatasetName", "Sample", "read_cars196", "read_cub", "read_dataset",
        "read_folder", "read_inshop", "read_sop"],
    "dvml.extract.extractor": ["ExtractConfig", "ExtractResult", "FeatureModel", "run"],
    "dvml.extract.transforms": ["BadImageError", "ViewDataset", "ViewSpec", "collate_views", "load_rgb",
        "resize_shorter"],
})

__all__ = [
    "BACKBONE_NAME", "DEFAULT_BACKBONE", "FEATURE_DIM", "Backbone", "CacheBackbone", "Preprocess",
    "backbone_from_cache",
    "load_backbone", "save_exported", "save_torchscript",
    "DatasetIndex", "DatasetName", "Sample", "read_cars196", "read_cub", "read_dataset", "read_folder",
    "read_inshop", "read_sop", "ExtractConfig", "ExtractResult", "FeatureModel", "run", "BadImageError",
    "ViewDataset", "ViewSpec", "collate_views", "load_rgb", "resize_shorter",
]

"""Using a finetune run: load its backbone and heads, extract a split's features, embed the test split."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from dvml import runs as R
from dvml.devices import pin_memory, resolve_device
from dvml.errors import DvmlError
from dvml.extract.backbone import (
    DEFAULT_BACKBONE,
    TRANSFORM_INPUT_MODELS,
    Backbone,
    Preprocess,
    load_backbone,
    parse_spec,
)
from dvml.extract.datasets import DatasetIndex, read_dataset
from dvml.extract.extractor import DEFAULT_WORKERS, FeatureModel
from dvml.extract.transforms import ViewDataset, ViewSpec, collate_views
from dvml.extract.transforms import worker_init as _extract_worker_init
from dvml.finetune.config import LEGACY_HEAD_FIELDS
from dvml.heads.config import HEADS_KWARGS
from dvml.heads.model import DVMLHeads

log = logging.getLogger(__name__)

@dataclass
class Finetuned:
    """A finetune run loaded for inference: backbone (eval mode, the run's preprocessing), heads, run info."""

    backbone: Backbone
    heads: DVMLHeads
    config: dict  # config.json
    index: DatasetIndex | None = None


def load_finetuned(run_dir: str | Path, *, read_index: bool = True) -> Finetuned:
    """Load a finetune run's backbone and heads (checking they come from the same step) and its dataset index.

    Raises:
        RunError: not a finetune run, missing/damaged files, backbone and heads from different steps, or the
            dataset's image list changed since training.
    """
    run_dir = Path(run_dir)
    info = R.load_run(run_dir)
    if info.kind != R.FINETUNE_KIND:
        raise R.RunError(f"{run_dir}: a {info.kind} run, not a finetune run")
    conf = json_config(run_dir)
    ckpt = R.load_checkpoint(run_dir)
    bb_path = run_dir / R.BACKBONE_FILE
    if not bb_path.is_file():
        raise R.RunError(f"{run_dir}: no {R.BACKBONE_FILE} (the run never reached a checkpoint)")
    bb = R.load_torch(bb_path)
    if bb.get("global_step") != ckpt.get("global_step"):
        raise R.RunError(f"{run_dir}: {R.BACKBONE_FILE} (step {bb.get('global_step')}) and {R.HEADS_FILE} (step "
                         f"{ckpt.get('global_step')}) are from different steps; rerun with `resume` to rewrite them")
    spec = bb.get("backbone_spec") or conf.get("config", {}).get("backbone") or DEFAULT_BACKBONE
    ti = conf.get("transform_input")  # None for networks without the option; runs before it: GoogLeNet, True
    if ti is None and parse_spec(spec).name in TRANSFORM_INPUT_MODELS:
        ti = True
    backbone = load_backbone(spec, bb_path, transform_input=ti)
    p = conf.get("preprocess") or {}
    pre = Preprocess.from_dict(p) if {"mean", "std", "resize", "crop"} <= set(p) else \
        backbone.preprocess.with_sizes(p.get("resize"), p.get("crop"))
    backbone = replace(backbone, preprocess=pre)
    cfgd = info.config
    recorded = {**LEGACY_HEAD_FIELDS, **cfgd}  # a run from before the DVML options: the paper's heads
    heads = DVMLHeads(int(ckpt["in_dim"]), **{k: recorded[k] for k in HEADS_KWARGS},
                      variance_source=recorded.get("variance_source", "learned"))  # older runs: learned
    heads.load_state_dict(ckpt["model"])
    heads.eval()
    index = None
    if read_index:
        index = read_dataset(cfgd["dataset"], cfgd["root"], train_classes=cfgd.get("train_classes"))
        if conf.get("index_digest") and index.digest() != conf["index_digest"]:
            raise R.RunError(f"{run_dir}: the image list of {cfgd['root']} ({cfgd['dataset']}) changed since the run "
                             f"was trained (index digest {index.digest()} != recorded {conf['index_digest']})")
    return Finetuned(backbone=backbone, heads=heads, config=conf, index=index)


def json_config(run_dir: Path) -> dict:
    """``RUN_DIR/config.json`` as a dict."""
    return json.loads((Path(run_dir) / R.CONFIG_FILE).read_text())


def extract_split(ft: Finetuned, split: str = "test", *, device: str | torch.device | None = None,
                  batch_size: int = 64, workers: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Centre-view backbone features of a split through the extract code. Returns (features (N, D) float32,
    labels (N,) int64). ``device`` None: auto (cuda, then mps, then cpu). Raises DvmlError naming an unreadable
    image."""
    if ft.index is None:
        raise ValueError("the run was loaded without its dataset index")
    samples = ft.index.split(split)
    pre = ft.backbone.preprocess
    dev = resolve_device("auto" if device is None else device)
    workers = int(ft.config.get("config", {}).get("workers", DEFAULT_WORKERS)) if workers is None else workers
    fm = FeatureModel(ft.backbone, dev, amp=True)
    dataset = ViewDataset(ft.index.root, samples, split, pre, ViewSpec(crop=pre.crop, train_views=1))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_views,
                        pin_memory=pin_memory(dev), worker_init_fn=_extract_worker_init if workers else None)
    feats = np.empty((len(samples), ft.backbone.feature_dim), dtype=np.float32)
    labels = np.empty(len(samples), dtype=np.int64)
    for batch in loader:
        bad = [e for e in batch["errors"] if e]
        if bad:
            raise DvmlError(bad[0])
        idx = batch["index"].numpy()
        feats[idx] = fm(batch["views"])[:, 0]
        labels[idx] = batch["labels"].numpy()
        if progress is not None:
            progress(int(idx[-1]) + 1, len(samples))
    return feats, labels


def embed_test_split(run_dir: str | Path, *, device: str | torch.device | None = None,
                     progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Test embeddings of a finetune run: the test split's centre-view features from the tuned backbone
    (extract code), embedded with the heads (z_I only).

    Returns:
        (embeddings (N, E) float32, labels (N,) int64), in the dataset's test order.
    Raises:
        RunError / DvmlError: see :func:`load_finetuned`, or an unreadable test image.
    """
    ft = load_finetuned(run_dir)
    feats, labels = extract_split(ft, "test", device=device, progress=progress)
    with torch.no_grad():
        emb = ft.heads.embed(torch.from_numpy(feats)).numpy().astype(np.float32, copy=False)
    return emb, labels

"""The end-to-end network: backbone + DVML heads as one module, the gathered metric loss, BN freezing, and the
initial model of a run (optionally warm-started from a heads run)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dvml import runs as R
from dvml.errors import DvmlError
from dvml.extract.backbone import Backbone, load_backbone
from dvml.extract.extractor import preprocess_for
from dvml.finetune import distributed as D
from dvml.finetune.config import FinetuneConfig
from dvml.heads.core import dvml_loss, metric_loss
from dvml.heads.model import DVMLHeads, HeadsOutput
from dvml.heads.objective import DVMLLoss
from dvml.losses import MetricLoss

log = logging.getLogger(__name__)

class FinetuneNet(nn.Module):
    """Backbone + heads as one module (what DistributedDataParallel wraps).

    ``forward(images (B, 3, c, c) normalised, labels (B,)) -> (x (B, D) float32, HeadsOutput)``: the backbone
    under autocast when ``amp_dtype`` is set, the heads in float32, their batch statistics over the global batch
    (:func:`~dvml.finetune.distributed.gather_batch`).
    """

    def __init__(self, backbone: nn.Module, heads: DVMLHeads, amp_dtype: torch.dtype | None = None):
        super().__init__()
        self.backbone, self.heads, self.amp_dtype = backbone, heads, amp_dtype

    def forward(self, images: torch.Tensor, labels: torch.Tensor, *, samples: int, stop_recon_grad: bool,
                eps: torch.Tensor | None) -> tuple[torch.Tensor, HeadsOutput]:
        dev = images.device.type
        with torch.autocast(dev, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            x = self.backbone(images)
        x = x.float()
        with torch.autocast(dev, enabled=False):
            out = self.heads(x, samples=samples, stop_recon_grad=stop_recon_grad, eps=eps, labels=labels,
                             gather=D.gather_batch)
        return x, out


class GatheredMetric(MetricLoss):
    """A metric loss applied to the batch gathered over all processes (embeddings keep their gradient).

    ``forward(embeddings (B, E) | (T, B, E), labels (B,), anchors (B, E) | None)``: gathers along the batch
    dimension, then calls the wrapped loss. Holds the wrapped loss without registering it, so state dicts keep
    fit-heads' key names.
    """

    def __init__(self, inner: MetricLoss):
        super().__init__()
        object.__setattr__(self, "inner", inner)
        self.takes_anchors = inner.takes_anchors

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                anchors: torch.Tensor | None = None) -> torch.Tensor:
        z = D.gather_with_grad(embeddings, dim=embeddings.dim() - 2)  # the batch dimension of (B, E) / (T, B, E)
        if anchors is not None:
            anchors = D.gather_with_grad(anchors, dim=0)
        return self.inner(z, D.gather_no_grad(labels), anchors=anchors)


def set_bn_frozen(module: nn.Module) -> int:
    """Put every BatchNorm layer of ``module`` in eval mode with frozen affine parameters; returns the count."""
    n = 0
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
            n += 1
    return n


def set_train_mode(net: FinetuneNet, freeze_bn: bool) -> None:
    net.train()
    if freeze_bn:
        for m in net.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


@dataclass
class Model:
    """What :func:`init_model` builds: the network, the metric loss and the (non-gathered) DVML loss."""

    backbone: Backbone
    net: FinetuneNet
    metric: MetricLoss
    loss: DVMLLoss


def init_model(cfg: FinetuneConfig, n_classes: int, *, backbone: Backbone | None = None) -> Model:
    """The initial network of a run: ``cfg.backbone`` with ``cfg.weights`` (classifier and the dropout on the
    feature removed by :func:`~dvml.extract.load_backbone`, BN frozen if asked) and heads seeded by ``cfg.seed``
    (then warm-started from ``cfg.init_heads`` if given). Deterministic in ``cfg``."""
    if backbone is None:
        backbone = load_backbone(cfg.backbone, cfg.weights, transform_input=cfg.transform_input, init_seed=cfg.seed)
    backbone = replace(backbone, preprocess=preprocess_for(backbone.preprocess, cfg.resize, cfg.crop))
    model = backbone.model
    if cfg.freeze_bn:
        set_bn_frozen(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        heads = DVMLHeads(backbone.feature_dim, **cfg.heads_kwargs())
        metric = metric_loss(cfg, n_classes)
    return Model(backbone, FinetuneNet(model, heads), metric, dvml_loss(cfg, metric))


def load_init_heads(run_dir: Path, model: Model, cfg: FinetuneConfig, train_classes: np.ndarray,
                    dataset: str) -> None:
    """Warm-start ``model``'s heads (and proxies, when compatible) from a heads run. Raises DvmlError on a
    feature-dimension, embedding-size, decoder-width or DVML/baseline mismatch, naming both values."""
    ckpt = R.load_checkpoint(run_dir)
    where = Path(run_dir) / R.HEADS_FILE
    sd = ckpt["model"]
    heads = model.net.heads
    in_dim = ckpt.get("in_dim", sd["embedding.weight"].shape[1] if "embedding.weight" in sd else None)
    if in_dim != heads.in_dim:
        raise DvmlError(f"`init_heads` {run_dir}: its heads take {in_dim}-D features (the feature dimension of "
                        f"the cache they were fit on) but the {model.backbone.name} backbone gives "
                        f"{heads.in_dim}-D; fit the heads on a cache extracted with this backbone")
    emb = ckpt.get("embedding_size", sd["embedding.weight"].shape[0])
    if emb != cfg.embedding_size:
        raise DvmlError(f"`init_heads` {run_dir}: embedding size {emb} != `embedding_size` {cfg.embedding_size}; "
                        f"pass `embedding_size` {emb}")
    has_var = "mu.weight" in sd
    if cfg.dvml and not has_var:
        raise DvmlError(f"`init_heads` {run_dir}: a baseline run (`dvml` off) has no variance heads or decoder to "
                        "start DVML from; pass `dvml` off or initialise from a DVML run")
    if cfg.dvml:
        hidden = sd["decoder.hidden.weight"].shape[0]
        if hidden != cfg.decoder_hidden:
            raise DvmlError(f"`init_heads` {run_dir}: decoder width {hidden} != `decoder_hidden` "
                            f"{cfg.decoder_hidden}; pass `decoder_hidden` {hidden}")
        heads.load_state_dict(sd)
    else:
        heads.load_state_dict({k: v for k, v in sd.items() if k.startswith("embedding.")})
    src_dataset = ckpt.get("dataset")
    if src_dataset is not None and src_dataset != dataset:
        log.warning("--init-heads %s was fit on %s features, this run trains on %s", run_dir, src_dataset, dataset)
    src_cfg = ckpt.get("config", {})
    if list(model.loss.parameters()):
        same = (src_cfg.get("loss") == cfg.loss.value and ckpt.get("loss")
                and [int(c) for c in ckpt.get("train_classes", [])] == [int(c) for c in train_classes])
        if same:
            model.loss.load_state_dict(ckpt["loss"])
        else:
            log.warning("--init-heads %s: proxies not reused (different loss or training classes); they start "
                        "random", run_dir)
    log.info("heads initialised from %s (epoch %s)", where, ckpt.get("epoch"))

"""``dvml finetune``: the optional end-to-end mode — GoogLeNet backbone and DVML heads trained together from images.

This is the paper's own setting (section 3.5), for users with GPU time; the cached-feature pipeline
(extract → fit-heads) is the fast default. It reuses the same pieces: the datasets, backbone, preprocessing
and test-time extraction of :mod:`dvml.extract`; the heads (:class:`~dvml.heads.model.DVMLHeads`), the
four-term loss, the metric losses, the class-balanced sampler, the phase/λ schedule
(:meth:`~dvml.heads.config.FitConfig.lambdas`) and the run-directory format of fit-heads.

Training, per step (one global class-balanced batch of ``batch_size`` images, ``per_class`` per class):

* **Augmentation** (the paper's "random crop and horizontal mirroring" after resizing to 256): each image is
  decoded, its shorter side resized to ``resize`` (torchvision's rule, as in extract), a random ``crop`` ×
  ``crop`` window cut and mirrored with probability 1/2. The draw of the image at position ``p`` of global
  batch ``b`` of epoch ``e`` comes from ``numpy.random.default_rng((seed, e, b, p))``: it depends on neither
  the worker count, nor the number of processes, nor the resume point.
* **Backbone** (mixed precision on CUDA: bfloat16 autocast where supported, else float16 with a gradient
  scaler) → x (B, 1024), cast to float32; the **heads and the loss run in float32** (they are a tiny part of
  the cost, and exp(log σ²) and the metric losses are the numerically delicate part).
* **Loss**: the four DVML terms with the fit-heads schedule (phase 1 then phase 2 at ``phase2_epoch``, KL
  warm-up), or Lm(z_I) alone with ``dvml=False``. The metric terms see the batch gathered over all
  processes (:mod:`dvml.heads.distributed`).
* **Optimiser**: Adam with separate learning rates — ``backbone_lr`` for the backbone, ``lr`` for the heads,
  ``proxy_lr`` for a proxy loss's proxies.

Decisions (what the paper leaves open):

* **The reconstruction target is detached.** The decoder reconstructs the backbone's 1024-D feature x, and
  ``recon = ‖x.detach() − dec(ẑ)‖²``. If the target carried gradient, the backbone could lower the
  reconstruction error by *changing x itself* — shrinking or flattening its features towards whatever the
  decoder already outputs — a shortcut with a degenerate optimum (constant features) that fights the metric
  loss. The paper reconstructs "the output features of GoogLeNet's last average pooling layer" as a target,
  the role the image plays in a VAE; detaching keeps that meaning and makes the end-to-end objective the same
  function of (x, heads) as the cached-feature one, where x is a constant. The backbone still receives the
  reconstruction gradient *through the encoder* (x → z_I, μ, σ → ẑ → decoder) in phase 2; in phase 1 the
  heads stop that path too (:class:`~dvml.heads.model.DVMLHeads` recomputes μ, σ on ``x.detach()``), so in
  phase 1 the backbone learns only from the metric terms and the KL.
* **BatchNorm is frozen by default** (``freeze_bn``): every BN layer stays in eval mode (ImageNet running
  statistics) and its affine parameters are not trained. torchvision's GoogLeNet is the BN variant, while the
  paper's (Caffe) GoogLeNet had no BN at all: a frozen BN is a fixed affine map, the closest match; it also
  avoids noisy statistics from small per-GPU class-balanced batches and makes the result independent of how
  the batch is split over processes. ``freeze_bn=False`` trains BN with per-process batch statistics.
* **Dropout off**: the backbone's dropout (p = 0.2, after the pool) is replaced by identity, so the trained
  feature is exactly the one extract caches and evaluation uses ("global average pool output").
* The reparameterisation noise ε of a step is drawn for the whole global batch from a generator seeded by
  ``(seed, global step)`` and each process takes its slice; with the augmentation rule above, a run on N
  processes follows the same trajectory as on one (up to floating-point summation order; exactly so with
  frozen BN), and ``--resume`` needs no RNG state.

Run directory (``out``), the fit-heads format plus the backbone:

::

    RUN_DIR/config.json    {"kind": "finetune", "config": FinetuneConfig dict (dataset, root, ...), "cache": null,
                            "cache_fingerprint": null, "dataset", "index_digest", "backbone", "transform_input",
                            "preprocess", "seed", "versions", "status", "epochs_done", "global_step",
                            "world_size"}
    RUN_DIR/heads.pt       as fit-heads' (kind "finetune"; model = DVMLHeads state_dict, loss = proxies, in_dim,
                           embedding_size, train_classes, config, epoch, ...; no "resume" entry)
    RUN_DIR/backbone.pt    {"backbone": GoogLeNet state_dict (torchvision layout, no fc), "global_step",
                           "transform_input"} — usable as ``dvml extract --weights RUN_DIR/backbone.pt``
    RUN_DIR/checkpoint.pt  everything needed to resume: backbone, heads, loss, optimiser, grad scaler, step
    RUN_DIR/log.jsonl      one JSON object per epoch: loss terms, λ1, phase, seconds, samples/s

Files are written atomically (temporary file + rename) by rank 0: ``checkpoint.pt`` first, then
``backbone.pt`` and ``heads.pt`` (both carry the global step, checked to agree when loaded). Checkpoints are
written every ``checkpoint_every`` steps and at the end of every epoch; ``resume=True`` continues from the
last one at the exact step (also with another number of processes: the global batch does not depend on it).

Evaluation: ``dvml evaluate RUN_DIR`` calls :func:`embed_test_split`, which extracts the test split's
centre-view features with the tuned backbone through the extract code (:class:`~dvml.extract.ViewDataset`,
:class:`~dvml.extract.FeatureModel`) and embeds them with the heads (z_I).

Warm start: ``init_heads=RUN_DIR`` starts the heads (and a proxy loss's proxies, when the loss and the
training classes match) from a fit-heads run — cached-feature training as the warm start, end-to-end as the
finish. Its feature dimension must be the backbone's 1024 and its embedding size / decoder width those of
this run.

Multi-GPU (one process per GPU, DistributedDataParallel over NCCL; gloo on CPU)::

    torchrun --standalone --nproc_per_node=4 --no-python dvml finetune cub --root CUB_200_2011 --out runs/ft

``batch_size`` is the global batch (all processes together) and must be divisible by the number of
processes; each process loads and augments its own shard. Every process must see ``--root`` and ``--out``
at the same paths (one machine, or a shared file system).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dvml.errors import DvmlError
from dvml.extract.backbone import Backbone, build_backbone
from dvml.extract.datasets import DatasetIndex, DatasetName, Sample, read_dataset
from dvml.extract.extractor import DEFAULT_WORKERS, FeatureModel, check_image_options, preprocess_for
from dvml.extract.transforms import BadImageError, ViewDataset, ViewSpec, collate_views, load_rgb, resize_shorter
from dvml.extract.transforms import worker_init as _extract_worker_init
from dvml.heads import distributed as D
from dvml.heads import run as R
from dvml.heads.config import PROXY_LOSSES, FitConfig, Lambdas, LossName, Reduction, plain_dict
from dvml.heads.loss import TERMS, DVMLLoss
from dvml.heads.metric_losses import MetricLoss, make_metric_loss
from dvml.heads.model import DVMLHeads, HeadsOutput
from dvml.heads.train import FitEvent

log = logging.getLogger(__name__)

KIND = "finetune"
BACKBONE_FILE = "backbone.pt"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1

Callback = Callable[[FitEvent], None]

#: FinetuneConfig fields with the same meaning as FitConfig's: validated by FitConfig, and they drive the
#: same λ/phase schedule.
HEAD_FIELDS = ("loss", "dvml", "embedding_size", "decoder_hidden", "samples", "epochs", "phase2_epoch",
               "kl_warmup_epochs", "lambdas_phase1", "lambdas_phase2", "reduction", "lr", "proxy_lr",
               "weight_decay", "batch_size", "per_class", "margin", "gamma", "temperature", "label_smoothing",
               "seed")

#: Fields that may differ on resume (how the run is executed, not what it trains). ``root`` may move: the
#: dataset's index digest is checked instead.
CONTROL_FIELDS = frozenset({"root", "out", "epochs", "device", "workers", "checkpoint_every", "resume",
                            "overwrite"})

_FIT_DEFAULTS = {f.name: f.default for f in fields(FitConfig)}


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything an end-to-end run depends on. Validated in ``__post_init__``; ``None`` fields get resolved.

    Attributes:
        dataset, root: the image dataset (official format, zero-shot split; see :mod:`dvml.extract.datasets`).
        out: run directory.
        loss, dvml, embedding_size, decoder_hidden, samples, epochs, phase2_epoch, kl_warmup_epochs,
        lambdas_phase1, lambdas_phase2, reduction, lr, proxy_lr, weight_decay, batch_size, per_class,
        seed: as in :class:`~dvml.heads.config.FitConfig` (``lr`` is the heads' learning rate; ``batch_size`` is
            the global batch over all processes; ``weight_decay`` applies to backbone and heads).
        backbone_lr: Adam learning rate of the backbone. Default 1e-4, the paper's single rate for the whole
            network; 1e-5 is a gentler choice with ``init_heads``.
        weights: backbone initialisation: "imagenet", "none" (seeded random, tests) or a state-dict path.
        transform_input: torchvision's input re-normalisation; None = the weights' convention.
        init_heads: a fit-heads (or finetune) run directory whose heads start this run.
        freeze_bn: BN layers in eval mode with frozen affine parameters (see the module docstring).
        amp: mixed precision on CUDA (ignored on CPU).
        resize, crop: image sizes; None = the weights' preprocessing (256 / 224).
        train_classes: folder dataset only: number of (sorted) training classes.
        steps_per_epoch: global batches per epoch; None = ``N_train // batch_size``.
        checkpoint_every: also checkpoint every this many steps (0 = at epoch ends only).
        workers: DataLoader worker processes per training process (0 = load in the main process).
        device: "auto", "cpu", "cuda" (under torchrun: ``cuda:LOCAL_RANK``).
        resume / overwrite: continue / replace a run in ``out``.
    """

    dataset: DatasetName
    root: Path
    out: Path
    loss: LossName = _FIT_DEFAULTS["loss"]
    dvml: bool = True
    embedding_size: int = _FIT_DEFAULTS["embedding_size"]
    decoder_hidden: int = _FIT_DEFAULTS["decoder_hidden"]
    samples: int = _FIT_DEFAULTS["samples"]
    epochs: int = _FIT_DEFAULTS["epochs"]
    phase2_epoch: int = _FIT_DEFAULTS["phase2_epoch"]
    kl_warmup_epochs: int = _FIT_DEFAULTS["kl_warmup_epochs"]
    lambdas_phase1: tuple[float, float, float, float] = _FIT_DEFAULTS["lambdas_phase1"]
    lambdas_phase2: tuple[float, float, float, float] = _FIT_DEFAULTS["lambdas_phase2"]
    reduction: Reduction = _FIT_DEFAULTS["reduction"]
    lr: float = _FIT_DEFAULTS["lr"]
    backbone_lr: float = 1e-4
    proxy_lr: float | None = None
    weight_decay: float = _FIT_DEFAULTS["weight_decay"]
    batch_size: int | None = None
    per_class: int | None = None
    margin: float | None = None
    gamma: float | None = None
    temperature: float | None = None
    label_smoothing: float | None = None
    seed: int = 0
    weights: str = "imagenet"
    transform_input: bool | None = None
    init_heads: Path | None = None
    freeze_bn: bool = True
    amp: bool = True
    resize: int | None = None
    crop: int | None = None
    train_classes: int | None = None
    steps_per_epoch: int | None = None
    checkpoint_every: int = 200
    workers: int = DEFAULT_WORKERS
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self):
        s = object.__setattr__
        try:
            s(self, "dataset", DatasetName(self.dataset))
        except ValueError:
            raise ValueError(f"dataset must be one of {', '.join(d.value for d in DatasetName)}, "
                             f"got {self.dataset!r}") from None
        s(self, "root", Path(self.root))
        s(self, "out", Path(self.out))
        if self.init_heads is not None:
            s(self, "init_heads", Path(self.init_heads))
        # the head-training fields: FitConfig validates and resolves them (one set of rules and messages)
        fit = FitConfig(cache=self.root, out=self.out, eval_every=0,
                        **{k: getattr(self, k) for k in HEAD_FIELDS if k in _FIT_DEFAULTS})
        for k in HEAD_FIELDS:
            if k in _FIT_DEFAULTS:
                s(self, k, getattr(fit, k))
        s(self, "_fit", fit)
        if not self.backbone_lr > 0:
            raise ValueError(f"backbone_lr must be > 0, got {self.backbone_lr}")
        check_image_options(self)
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if self.checkpoint_every < 0 or self.workers < 0:
            raise ValueError("checkpoint_every and workers must be >= 0")

    def loss_params(self) -> dict[str, float]:
        """The metric loss's parameters, resolved (:meth:`FitConfig.loss_params`)."""
        return self._fit.loss_params()

    def lambdas(self, epoch: float) -> Lambdas:
        """The fit-heads schedule (:meth:`FitConfig.lambdas`) at fractional epoch ``epoch``."""
        return self._fit.lambdas(epoch)

    def to_dict(self) -> dict:
        """Plain-python dict (paths and enums as strings) of every field."""
        return plain_dict(self)

    def model_dict(self) -> dict:
        """:meth:`to_dict` without the execution-control fields (what must match on resume)."""
        return {k: v for k, v in self.to_dict().items() if k not in CONTROL_FIELDS}


# ------------------------------------------------------------------------------------------------ data
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


def _collate(items: list[dict]) -> dict:
    return {"images": torch.stack([it["image"] for it in items]),
            "labels": torch.tensor([it["label"] for it in items], dtype=torch.int64),
            "errors": [it["error"] for it in items]}


class _KeyedBatches:
    """Turns a :class:`~dvml.heads.distributed.DistributedClassBalancedSampler` into batches of augmentation keys."""

    def __init__(self, sampler: D.DistributedClassBalancedSampler):
        self.sampler = sampler

    def __iter__(self):
        s = self.sampler
        offset = s.rank * s.local_batch_size
        for b, idx in enumerate(s, start=s.start):
            yield [(i, s.epoch, b, offset + p) for p, i in enumerate(idx)]

    def __len__(self) -> int:
        return len(self.sampler)


# ------------------------------------------------------------------------------------------------ model
class FinetuneNet(nn.Module):
    """Backbone + heads as one module (what DistributedDataParallel wraps).

    ``forward(images (B, 3, c, c) normalised) -> (x (B, 1024) float32, HeadsOutput)``: the backbone under
    autocast when ``amp_dtype`` is set, the heads in float32.
    """

    def __init__(self, backbone: nn.Module, heads: DVMLHeads, amp_dtype: torch.dtype | None = None):
        super().__init__()
        self.backbone, self.heads, self.amp_dtype = backbone, heads, amp_dtype

    def forward(self, images: torch.Tensor, *, samples: int, stop_recon_grad: bool,
                eps: torch.Tensor | None) -> tuple[torch.Tensor, HeadsOutput]:
        dev = images.device.type
        with torch.autocast(dev, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            x = self.backbone(images)
        x = x.float()
        with torch.autocast(dev, enabled=False):
            out = self.heads(x, samples=samples, stop_recon_grad=stop_recon_grad, eps=eps)
        return x, out


class GatheredMetric(MetricLoss):
    """A metric loss applied to the batch gathered over all processes (embeddings keep their gradient).

    ``forward(embeddings (B, E) | (T, B, E), labels (B,))``: gathers along the batch dimension, then calls the
    wrapped loss. Holds the wrapped loss without registering it, so state dicts keep fit-heads' key names.
    """

    def __init__(self, inner: MetricLoss):
        super().__init__()
        object.__setattr__(self, "inner", inner)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = D.gather_with_grad(embeddings, dim=embeddings.dim() - 2)  # the batch dimension of (B, E) / (T, B, E)
        return self.inner(z, D.gather_no_grad(labels))


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


def _train_mode(net: FinetuneNet, freeze_bn: bool) -> None:
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
    """The initial network of a run: backbone from ``cfg.weights`` (dropout off, BN frozen if asked) and heads
    seeded by ``cfg.seed`` (then warm-started from ``cfg.init_heads`` if given). Deterministic in ``cfg``."""
    if backbone is None:
        backbone = build_backbone(cfg.weights, transform_input=cfg.transform_input, init_seed=cfg.seed)
    backbone = replace(backbone, preprocess=preprocess_for(backbone.preprocess, cfg.resize, cfg.crop))
    model = backbone.model
    model.dropout = nn.Identity()  # the feature is the pooled output (see the module docstring)
    if cfg.freeze_bn:
        set_bn_frozen(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        heads = DVMLHeads(backbone.feature_dim, cfg.embedding_size, cfg.decoder_hidden, dvml=cfg.dvml)
        metric = make_metric_loss(cfg.loss, num_classes=n_classes, embedding_size=cfg.embedding_size,
                                  **cfg.loss_params())
    loss = DVMLLoss(metric, dvml=cfg.dvml, reduction=cfg.reduction.value)
    return Model(backbone, FinetuneNet(model, heads), metric, loss)


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
        raise DvmlError(f"--init-heads {run_dir}: its heads take {in_dim}-D features (the feature dimension of "
                        f"the cache they were fit on) but the {model.backbone.name} backbone gives "
                        f"{heads.in_dim}-D; fit the heads on a cache extracted with this backbone")
    emb = ckpt.get("embedding_size", sd["embedding.weight"].shape[0])
    if emb != cfg.embedding_size:
        raise DvmlError(f"--init-heads {run_dir}: embedding size {emb} != --embedding-size {cfg.embedding_size}; "
                        f"pass --embedding-size {emb}")
    has_var = "mu.weight" in sd
    if cfg.dvml and not has_var:
        raise DvmlError(f"--init-heads {run_dir}: a --no-dvml (baseline) run has no variance heads or decoder to "
                        "start DVML from; pass --no-dvml or initialise from a DVML run")
    if cfg.dvml:
        hidden = sd["decoder.hidden.weight"].shape[0]
        if hidden != cfg.decoder_hidden:
            raise DvmlError(f"--init-heads {run_dir}: decoder width {hidden} != --decoder-hidden "
                            f"{cfg.decoder_hidden}; pass --decoder-hidden {hidden}")
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


def _step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, 0xD7, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


# ------------------------------------------------------------------------------------------------ run dir
def _prepare_dir(cfg: FinetuneConfig, ctx: D.DistContext) -> dict | None:
    """Check ``cfg.out`` against resume/overwrite (every rank, read-only); rank 0 then clears it if asked.
    Returns the checkpoint to resume from (loaded on every rank) or None."""
    out, ckpt_path = cfg.out, cfg.out / CHECKPOINT_FILE
    if out.exists() and not out.is_dir():
        raise DvmlError(f"--out {out}: exists and is not a directory")
    exists = ckpt_path.exists() or (out / R.CONFIG_FILE).exists()
    resume_from = None
    if exists and not cfg.overwrite:
        if not ckpt_path.exists():
            if not cfg.resume:
                raise DvmlError(f"{out}: holds a run that never reached a checkpoint; pass --resume to start it "
                                "again or --overwrite")
        else:
            ckpt = _load(ckpt_path)
            if ckpt.get("kind") != KIND:
                raise DvmlError(f"{ckpt_path}: not a finetune checkpoint")
            if not cfg.resume:
                state = "a finished" if ckpt.get("finished") else "an unfinished"
                raise DvmlError(f"{out}: holds {state} finetune run (epoch {ckpt['epochs_done']}, step "
                                f"{ckpt['global_step']}); pass --resume to continue it or --overwrite to replace it")
            old, new = ckpt["config"], cfg.model_dict()
            diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in new if old.get(k) != new.get(k)]
            if diff:
                raise DvmlError(f"{out}: --resume with a different config ({'; '.join(diff)}); rerun with the "
                                "original options or use --overwrite")
            resume_from = ckpt
    D.barrier()
    if ctx.is_main:
        if cfg.overwrite:
            for name in (CHECKPOINT_FILE, BACKBONE_FILE, R.HEADS_FILE, R.CONFIG_FILE, R.LOG_FILE, "metrics.json"):
                if (out / name).exists():
                    (out / name).unlink()
        out.mkdir(parents=True, exist_ok=True)
    D.barrier()
    return resume_from


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise R.RunError(f"{path}: cannot be loaded ({type(e).__name__}: {e})") from None


def _cpu(sd):
    if isinstance(sd, torch.Tensor):
        return sd.detach().to("cpu", copy=True)
    if isinstance(sd, dict):
        return {k: _cpu(v) for k, v in sd.items()}
    if isinstance(sd, list | tuple):
        return type(sd)(_cpu(v) for v in sd)
    return sd


# ------------------------------------------------------------------------------------------------ training
def finetune(cfg: FinetuneConfig, *, callback: Callback | None = None, index: DatasetIndex | None = None,
             backbone: Backbone | None = None) -> Path:
    """Train backbone + heads end to end and write the run directory ``cfg.out``; returns it.

    Single process, or one of N under torchrun (joins the process group itself; see the module docstring).

    Args:
        cfg: the run's configuration.
        callback: receives :class:`~dvml.heads.train.FitEvent` s on rank 0 ("start", "step" with
            ``record={"total": loss}``, "epoch" with the epoch's log record, "end").
        index, backbone: prebuilt dataset index / backbone (tests, benchmarks); by default from ``cfg``.
    Raises:
        DvmlError: bad dataset/run directory/options, an unreadable image, a non-finite loss.
    """
    ctx = D.init_distributed(None if cfg.device == "auto" else cfg.device)
    if not ctx.is_main:
        logging.getLogger("dvml").setLevel(logging.WARNING)
        callback = None
    try:
        return _finetune(cfg, ctx, callback, index, backbone)
    finally:
        D.shutdown(ctx)


def _finetune(cfg: FinetuneConfig, ctx: D.DistContext, callback: Callback | None, index: DatasetIndex | None,
              backbone: Backbone | None) -> Path:
    t_start = time.perf_counter()
    device, out = ctx.device, cfg.out
    index = index or read_dataset(cfg.dataset, cfg.root, train_classes=cfg.train_classes)
    ckpt = _prepare_dir(cfg, ctx)
    digest = index.digest()
    if ckpt is not None and ckpt.get("index_digest") != digest:
        raise DvmlError(f"{out}: --resume on a different image list ({cfg.root}: {index.name} index digest {digest}, "
                        f"the run started on {ckpt.get('index_digest')}); use --overwrite to start again")
    labels = np.array([s.label for s in index.train], dtype=np.int64)
    train_classes, y = np.unique(labels, return_inverse=True)

    model = init_model(cfg, len(train_classes), backbone=backbone)
    pre, net, heads = model.backbone.preprocess, model.net, model.net.heads
    if cfg.init_heads is not None and ckpt is None:
        load_init_heads(cfg.init_heads, model, cfg, train_classes, index.name)
    cuda = device.type == "cuda"
    amp_dtype = None
    if cfg.amp and cuda:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    net.amp_dtype = amp_dtype
    net.to(device)
    model.loss.to(device)
    if cuda:
        net.backbone.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True

    bb_params = [p for p in net.backbone.parameters() if p.requires_grad]
    groups = [{"params": bb_params, "lr": cfg.backbone_lr, "weight_decay": cfg.weight_decay},
              {"params": list(heads.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    loss_params = list(model.loss.parameters())
    if loss_params:
        groups.append({"params": loss_params, "lr": cfg.proxy_lr, "weight_decay": 0.0})
    elif cfg.loss in PROXY_LOSSES:
        raise DvmlError(f"--loss {cfg.loss.value}: the loss module has no proxies to train")
    optimizer = torch.optim.Adam(groups)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)

    sampler = D.DistributedClassBalancedSampler(y, batch_size=cfg.batch_size, samples_per_class=cfg.per_class,
                                                seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size,
                                                num_batches=cfg.steps_per_epoch)
    steps = sampler.num_batches
    start_epoch, start_step, sums = 0, 0, np.zeros(len(TERMS))
    if ckpt is not None:
        net.backbone.load_state_dict(ckpt["backbone"])
        heads.load_state_dict(ckpt["heads"])
        model.loss.load_state_dict(ckpt["loss"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_step = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
        if int(ckpt["steps_per_epoch"]) != steps:
            raise DvmlError(f"{out}: the run has {ckpt['steps_per_epoch']} steps per epoch, this one {steps}")
        sums = np.asarray(ckpt["epoch_sums"], dtype=np.float64)
        if ctx.is_main:
            R.write_log(out, [r for r in R.read_log(out) if r.get("epoch", 0) <= start_epoch])
        log.info("resuming %s at epoch %d, step %d of %d", out, start_epoch + 1, start_step, steps)
    elif ctx.is_main:
        R.write_log(out, [])

    ddp = net
    if ctx.distributed:
        ddp = nn.parallel.DistributedDataParallel(net, device_ids=[device] if cuda else None)
    train_loss = DVMLLoss(GatheredMetric(model.metric), dvml=cfg.dvml,
                          reduction=cfg.reduction.value)
    dataset = AugmentedImages(index.root, index.train, y, pre, cfg.seed)

    header = {"kind": KIND, "cache": None, "cache_fingerprint": None, "seed": cfg.seed, "versions": R.versions(),
              "dataset": index.name, "index_digest": digest, "split_rule": index.split_rule,
              "backbone": model.backbone.describe(), "transform_input": model.backbone.transform_input,
              "preprocess": pre.as_dict(), "world_size": ctx.world_size}

    def write_config(status: str, epochs_done: int, global_step: int) -> None:
        R.atomic_write_json({**header, "config": cfg.to_dict(), "status": status, "epochs_done": epochs_done,
                             "global_step": global_step}, out / R.CONFIG_FILE)

    def save(epoch: int, step_in_epoch: int, epochs_done: int, finished: bool) -> None:
        if not ctx.is_main:
            return
        gs = epoch * steps + step_in_epoch
        bb, hd, ls = _cpu(net.backbone.state_dict()), _cpu(heads.state_dict()), _cpu(model.loss.state_dict())
        R.atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "kind": KIND, "config": cfg.model_dict(), "index_digest": digest,
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": gs, "steps_per_epoch": steps,
            "epochs_done": epochs_done, "finished": finished, "epoch_sums": sums.tolist(),
            "backbone": bb, "heads": hd, "loss": ls, "optimizer": _cpu(optimizer.state_dict()),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None}, out / CHECKPOINT_FILE)
        R.atomic_torch_save({"backbone": bb, "global_step": gs,
                             "transform_input": model.backbone.transform_input}, out / BACKBONE_FILE)
        R.atomic_torch_save({
            "kind": KIND, "format": R.CHECKPOINT_FORMAT, "model": hd, "loss": ls, "config": cfg.to_dict(),
            "seed": cfg.seed, "cache": None, "cache_fingerprint": None, "dataset": index.name,
            "epoch": epochs_done, "epochs_done": epochs_done, "finished": finished, "selection": "last",
            "global_step": gs, "in_dim": heads.in_dim, "embedding_size": cfg.embedding_size,
            "train_classes": [int(c) for c in train_classes], "versions": R.versions()}, out / R.HEADS_FILE)
        write_config("finished" if finished else "running", epochs_done, gs)

    if ctx.is_main:
        write_config("running", start_epoch, start_epoch * steps + start_step)
    if callback:
        callback(FitEvent("start", start_epoch, cfg.epochs, start_step, steps))
    log.info("finetune: %s, %d train images / %d classes, %s loss%s, %d epochs x %d steps of %d images (%d per "
             "process x %d) at %d/%d on %s%s%s", index.name, len(index.train), len(train_classes), cfg.loss.value,
             "" if cfg.dvml else " (no DVML)", cfg.epochs, steps, cfg.batch_size, sampler.local_batch_size,
             ctx.world_size, pre.resize, pre.crop, device, f", amp {amp_dtype}" if amp_dtype else "",
             ", frozen BN" if cfg.freeze_bn else "")

    b_local, e_dim = sampler.local_batch_size, cfg.embedding_size
    lo, hi = ctx.rank * b_local, (ctx.rank + 1) * b_local
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        first = start_step if epoch == start_epoch else 0
        if epoch != start_epoch:
            sums = np.zeros(len(TERMS))
        sampler.set_epoch(epoch, start=first)
        loader = DataLoader(dataset, batch_sampler=_KeyedBatches(sampler), num_workers=cfg.workers,
                            collate_fn=_collate, pin_memory=cuda,
                            worker_init_fn=_extract_worker_init if cfg.workers else None,
                            prefetch_factor=4 if cfg.workers else None, persistent_workers=False)
        _train_mode(net, cfg.freeze_bn)
        step = first
        for batch in loader:
            bad = [e for e in batch["errors"] if e]
            if bad:
                raise DvmlError(f"{bad[0]} (finetune needs every training image readable)")
            images = batch["images"].to(device, non_blocking=True)
            labels_b = batch["labels"].to(device, non_blocking=True)
            images = pre.normalize(images)
            if cuda:
                images = images.contiguous(memory_format=torch.channels_last)
            lam = cfg.lambdas(epoch + step / steps)
            gs = epoch * steps + step
            gen = torch.Generator(device=device).manual_seed(_step_seed(cfg.seed, gs))
            eps = None
            if cfg.dvml:  # the global batch's noise, this process's slice (independent of the world size)
                eps = torch.randn((cfg.samples, cfg.batch_size, e_dim), generator=gen, device=device)[:, lo:hi]
            if hasattr(model.metric, "generator"):
                model.metric.generator = gen
            x, heads_out = ddp(images, samples=cfg.samples, stop_recon_grad=lam.stop_recon_grad, eps=eps)
            terms = train_loss(heads_out, x.detach(), labels_b, lam)  # the reconstruction target is detached
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms["total"]).backward()
            D.average_gradients(loss_params)
            scaler.step(optimizer)
            scaler.update()
            values = D.all_reduce_mean(torch.stack([terms[k].detach() for k in TERMS])).double().cpu().numpy()
            if not np.isfinite(values).all():
                raise DvmlError(f"non-finite loss at epoch {epoch + 1}, step {step + 1} of {steps} "
                                f"({dict(zip(TERMS, values.round(4).tolist(), strict=True))}); the last checkpoint "
                                f"is kept in {out / CHECKPOINT_FILE}; lower --lr / --backbone-lr")
            sums += values
            step += 1
            if callback:
                callback(FitEvent("step", epoch, cfg.epochs, step, steps, {"total": float(values[-1])}))
            if cfg.checkpoint_every and (gs + 1) % cfg.checkpoint_every == 0 and step < steps:
                save(epoch, step, epoch, finished=False)
        lam = cfg.lambdas(epoch)
        dt = time.perf_counter() - t0
        done_now = steps - first
        record = {"epoch": epoch + 1, "phase": lam.phase if cfg.dvml else 0,
                  **{k: float(v) for k, v in zip(TERMS, sums / steps, strict=True)},
                  "lambda_kl": lam.kl if cfg.dvml else 0.0, "global_step": (epoch + 1) * steps,
                  "seconds": round(dt, 4), "samples_per_s": round(done_now * cfg.batch_size / dt, 2)}
        sums = np.zeros(len(TERMS))
        if ctx.is_main:
            R.append_log(out, record)
        save(epoch + 1, 0, epoch + 1, finished=epoch + 1 == cfg.epochs)
        if callback:
            callback(FitEvent("epoch", epoch + 1, cfg.epochs, steps, steps, record))
    if start_epoch >= cfg.epochs:
        log.info("%s: already trained for %d epochs", out, start_epoch)
        if ckpt is not None and not ckpt.get("finished"):
            save(start_epoch, 0, start_epoch, finished=True)
    D.barrier()
    if callback:
        callback(FitEvent("end", cfg.epochs, cfg.epochs, steps, steps))
    log.info("finetune done in %.1fs: %s", time.perf_counter() - t_start, out)
    return out


# ------------------------------------------------------------------------------------------------ using a run
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
    if info.kind != KIND:
        raise R.RunError(f"{run_dir}: a {info.kind} run, not a finetune run")
    conf = json_config(run_dir)
    ckpt = R.load_checkpoint(run_dir)
    bb_path = run_dir / BACKBONE_FILE
    if not bb_path.is_file():
        raise R.RunError(f"{run_dir}: no {BACKBONE_FILE} (the run never reached a checkpoint)")
    bb = _load(bb_path)
    if bb.get("global_step") != ckpt.get("global_step"):
        raise R.RunError(f"{run_dir}: {BACKBONE_FILE} (step {bb.get('global_step')}) and {R.HEADS_FILE} (step "
                         f"{ckpt.get('global_step')}) are from different steps; rerun with --resume to rewrite them")
    backbone = build_backbone(bb_path, transform_input=bool(conf.get("transform_input", True)))
    p = conf.get("preprocess") or {}
    backbone = replace(backbone, preprocess=backbone.preprocess.with_sizes(p.get("resize"), p.get("crop")))
    cfgd = info.config
    heads = DVMLHeads(int(ckpt["in_dim"]), int(cfgd["embedding_size"]), int(cfgd["decoder_hidden"]),
                      dvml=bool(cfgd["dvml"]))
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
    """Centre-view backbone features of a split through the extract code. Returns (features (N, 1024) float32,
    labels (N,) int64). Raises DvmlError naming an unreadable image."""
    if ft.index is None:
        raise ValueError("the run was loaded without its dataset index")
    samples = ft.index.split(split)
    pre = ft.backbone.preprocess
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else
                                                                        "cpu")
    workers = int(ft.config.get("config", {}).get("workers", DEFAULT_WORKERS)) if workers is None else workers
    fm = FeatureModel(ft.backbone, dev, amp=True)
    dataset = ViewDataset(ft.index.root, samples, split, pre, ViewSpec(crop=pre.crop, train_views=1))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_views,
                        pin_memory=dev.type == "cuda", worker_init_fn=_extract_worker_init if workers else None)
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


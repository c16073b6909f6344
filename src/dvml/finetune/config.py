"""Configuration of an end-to-end run: :class:`FinetuneConfig` (frozen, validated): the head-training fields of
:class:`~dvml.heads.config.HeadsConfig` (shared with fit-heads: one set of defaults, rules and messages) plus the
images, the backbone and how the run executes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dvml.config_fields import IMAGES_PANEL, SCHEDULE_PANEL, option
from dvml.errors import FieldError
from dvml.extract.config import DEFAULT_BACKBONE, DEFAULT_WORKERS, BackboneKind, check_image_options, parse_spec
from dvml.extract.registry import DatasetName, resolve_dataset
from dvml.heads.config import (
    CONTROL_FIELDS,
    LEGACY_PHASE2_FIELDS,
    OVERWRITE_OPTION,
    RESUME_OPTION,
    DeviceChoice,
    HeadsConfig,
)

#: What a finetune run from before these fields were recorded trained with (the paper's heads and objective: L2
#: reconstruction, raw z_V at unit scale; the triplet losses' pml ``nonzero`` reducer): read under its checkpoint's
#: config on --resume and by :func:`~dvml.finetune.inference.load_finetuned`, so old runs keep their meaning.
LEGACY_HEAD_FIELDS = {"metric_reduction": "nonzero", "likelihood": "l2", "standardize": False, "free_bits": 0.0,
                      "variance_space": "raw", "variance_scale": "unit", "variance_kappa": 1.0,
                      "metric_grad_to_variance": True, "centre_mu": False, "synthetic_pairs": "within",
                      **LEGACY_PHASE2_FIELDS}

@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(HeadsConfig):
    """Everything an end-to-end run depends on. Validated in ``__post_init__``; ``None`` fields get resolved.

    Attributes:
        dataset, root: the image dataset (official format, zero-shot split; see :mod:`dvml.extract.datasets`).
        out: run directory.
        loss ... seed: :class:`~dvml.heads.config.HeadsConfig` (``lr`` is the heads' learning rate; ``batch_size``
            is the global batch over all processes; ``weight_decay`` applies to backbone and heads). The DVML
            objective and variance branch have fit-heads' defaults: the calibrated ``gaussian``
            likelihood, z_V on the unit sphere at the class's scale (``normalized``, ``class``) and the
            per-loss ``reduction`` (``sum`` for triplet and triplet-dws, ``mean`` otherwise): the gaussian
            reconstruction does not scale with the backbone's feature units, so the summed terms weigh as the
            paper's λs assume end to end too; the paper's heads are ``likelihood="l2", variance_space="raw",
            variance_scale="unit"`` (with ``reduction="mean"``, finetune's default before those deviations, since the
            L2 reconstruction summed over D swamps the metric loss). The batch statistics (class scale, class
            centring, the gaussian's s²) are the global batch's under torchrun. ``standardize`` is refused: it
            needs fixed training features, and the backbone's change as it trains.
        backbone_lr: Adam learning rate of the backbone. Default 1e-4, the paper's single rate for the whole
            network; 1e-5 is a gentler choice with ``init_heads``.
        backbone: the network, as for ``dvml extract --backbone`` (``googlenet``, any torchvision classifier,
            ``timm:NAME``); a TorchScript file is refused (extraction only).
        weights: backbone initialisation: "imagenet", "none" (seeded random, tests) or a state-dict path.
        transform_input: torchvision GoogLeNet/Inception input re-normalisation; None = the weights' convention.
        init_heads: a fit-heads (or finetune) run directory whose heads start this run.
        freeze_bn: BN layers in eval mode with frozen affine parameters (see the module docstring).
        amp: mixed precision on CUDA (ignored on CPU).
        resize, crop: image sizes; None = the backbone's preprocessing (GoogLeNet: 256 / 224).
        train_classes: folder dataset only: number of (sorted) training classes.
        steps_per_epoch: global batches per epoch; None = ``N_train // batch_size``.
        checkpoint_every: also checkpoint every this many steps (0 = at epoch ends only).
        workers: DataLoader worker processes per training process (0 = load in the main process).
        device: "auto" (cuda, then mps, then cpu), "cpu", "cuda", "mps" (under torchrun: ``cuda:LOCAL_RANK``).
        resume / overwrite: continue / replace a run in ``out``.
        skip_bad: leave unreadable training images out (found by one decoding pass before training, listed in
            ``config.json``'s ``skipped_images``) instead of stopping at the first (as ``dvml extract --skip-bad``).
    """

    dataset: DatasetName | str  # a registered dataset (dvml.extract.registry); a plug-in's name is a DatasetKey
    root: Path = field(metadata=option("Dataset directory (as for dvml extract).", flags=("--root",)))
    out: Path = field(metadata=option("Run directory (heads.pt, backbone.pt, checkpoint.pt, config.json, "
                                      "log.jsonl).", flags=("--out", "-o")))
    backbone_lr: float = field(default=1e-4, metadata=option(
        "Adam learning rate of the backbone (the paper: 1e-4 for the whole network; 1e-5 is gentler after "
        "--init-heads)."))
    backbone: str = field(default=DEFAULT_BACKBONE, metadata=option(
        "googlenet (the paper's), any torchvision classification model (resnet50, efficientnet_b0, vit_b_16, ...) "
        "or timm:NAME (pip install 'dvml\\[timm]'), as for dvml extract."))
    weights: str = field(default="imagenet", metadata=option(
        "Backbone start: 'imagenet', 'none' (seeded random, tests) or a state-dict path for that backbone."))
    transform_input: bool | None = field(default=None, metadata=option(
        "torchvision GoogLeNet input re-normalisation (default: the weights' convention).", panel=IMAGES_PANEL))
    init_heads: Path | None = field(default=None, metadata=option(
        "Start the heads from this fit-heads run (cached-feature warm start)."))
    freeze_bn: bool = field(default=True, metadata=option(
        "Keep BatchNorm in eval mode with frozen affine parameters.", flags=("--freeze-bn/--train-bn",),
        panel=IMAGES_PANEL))
    amp: bool = field(default=True, metadata=option(
        "Mixed precision on CUDA (bfloat16, else float16 + grad scaling)."))
    resize: int | None = field(default=None, metadata=option(
        "Shorter side after resizing (default: the backbone's, e.g. 256).", panel=IMAGES_PANEL))
    crop: int | None = field(default=None, metadata=option(
        "Random-crop size (default: the backbone's input size, e.g. 224).", panel=IMAGES_PANEL))
    train_classes: int | None = field(default=None, metadata=option(
        "folder only: number of (sorted) training classes.", panel=IMAGES_PANEL))
    steps_per_epoch: int | None = field(default=None, metadata=option(
        "Global batches per epoch (default: N_train // batch-size).", panel=SCHEDULE_PANEL))
    checkpoint_every: int = field(default=200, metadata=option(
        "Also checkpoint every N steps (0 = epoch ends only).", panel=SCHEDULE_PANEL))
    workers: int = field(default=DEFAULT_WORKERS, metadata=option(
        "DataLoader worker processes per training process."))
    device: str = field(default="auto", metadata=option(
        "auto (CUDA, then MPS, then CPU), cpu, cuda or mps (under torchrun, cuda is each process's "
        "cuda:LOCAL_RANK).", choices=DeviceChoice))
    resume: bool = field(default=False, metadata=RESUME_OPTION)
    overwrite: bool = field(default=False, metadata=OVERWRITE_OPTION)
    skip_bad: bool = field(default=False, metadata=option(
        "Leave unreadable training images out (one decoding pass before training; listed in config.json) instead "
        "of stopping.", panel=IMAGES_PANEL))

    def __post_init__(self):
        s = object.__setattr__
        s(self, "dataset", resolve_dataset(self.dataset))  # any registered dataset (FieldError otherwise)
        s(self, "root", Path(self.root))
        s(self, "out", Path(self.out))
        if self.init_heads is not None:
            s(self, "init_heads", Path(self.init_heads))
        super().__post_init__()  # the head-training fields
        if self.standardize:
            raise FieldError("`standardize` is for fit-heads only: it needs fixed training features, and finetune's "
                             "change as the backbone trains")
        if not self.backbone_lr > 0:
            raise ValueError(f"backbone_lr must be > 0, got {self.backbone_lr}")
        check_image_options(self)
        s(self, "backbone", str(self.backbone))
        if parse_spec(self.backbone).kind is BackboneKind.torchscript:
            raise FieldError(f"`backbone` {self.backbone}: finetune trains torchvision or timm backbones; a "
                             "TorchScript file is for extraction (dvml extract)")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if self.checkpoint_every < 0 or self.workers < 0:
            raise ValueError("checkpoint_every and workers must be >= 0")

    def model_dict(self) -> dict:
        """:meth:`to_dict` without the execution-control fields (what must match on resume)."""
        return {k: v for k, v in self.to_dict().items() if k not in CONTROL_FIELDS}

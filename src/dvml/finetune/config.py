"""Configuration of an end-to-end run: :class:`FinetuneConfig` (frozen, validated): the head-training fields of
:class:`~dvml.heads.config.HeadsConfig` (shared with fit-heads: one set of defaults, rules and messages) plus the
images, the backbone and how the run executes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dvml.errors import FieldError
from dvml.extract.config import DEFAULT_BACKBONE, DEFAULT_WORKERS, check_image_options, parse_spec
from dvml.extract.datasets import DatasetName
from dvml.heads.config import CONTROL_FIELDS, LEGACY_PHASE2_FIELDS, HeadsConfig

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

    dataset: DatasetName
    root: Path
    out: Path
    backbone_lr: float = 1e-4
    backbone: str = DEFAULT_BACKBONE
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
    skip_bad: bool = False

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
        super().__post_init__()  # the head-training fields
        if self.standardize:
            raise FieldError("`standardize` is for fit-heads only: it needs fixed training features, and finetune's "
                             "change as the backbone trains")
        if not self.backbone_lr > 0:
            raise ValueError(f"backbone_lr must be > 0, got {self.backbone_lr}")
        check_image_options(self)
        s(self, "backbone", str(self.backbone))
        if parse_spec(self.backbone).kind == "torchscript":
            raise FieldError(f"`backbone` {self.backbone}: finetune trains torchvision or timm backbones; a "
                             "TorchScript file is for extraction (dvml extract)")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if self.checkpoint_every < 0 or self.workers < 0:
            raise ValueError("checkpoint_every and workers must be >= 0")

    def model_dict(self) -> dict:
        """:meth:`to_dict` without the execution-control fields (what must match on resume)."""
        return {k: v for k, v in self.to_dict().items() if k not in CONTROL_FIELDS}

"""Configuration of an end-to-end run: :class:`FinetuneConfig` (frozen, validated; the head-training fields are
validated and resolved by :class:`~dvml.heads.config.FitConfig`, one set of rules and messages)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from dvml.extract.datasets import DatasetName
from dvml.extract.extractor import DEFAULT_WORKERS, check_image_options
from dvml.heads.config import FitConfig, Lambdas, Reduction, plain_dict
from dvml.losses import LossName

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

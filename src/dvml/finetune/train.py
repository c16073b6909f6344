"""``dvml finetune``: the optional end-to-end mode — backbone (GoogLeNet by default) and DVML heads trained together
from images.

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
  scaler) → x (B, D), cast to float32; the **heads and the loss run in float32** (they are a tiny part of
  the cost, and exp(log σ²) and the metric losses are the numerically delicate part).
* **Loss**: the four DVML terms with the fit-heads schedule (phase 1 then phase 2 at ``phase2_epoch``, KL
  warm-up) and fit-heads' objective options and defaults (the calibrated ``gaussian`` likelihood, z_V on the
  unit sphere at the class's scale, the per-loss reduction; :class:`~dvml.finetune.config.FinetuneConfig`), or
  Lm(z_I) alone with ``dvml=False``. The metric terms see the batch gathered over all processes, and so do the
  batch statistics (the class scale and centring of z_V, the gaussian's s²; :mod:`dvml.finetune.distributed`).
* **Optimiser**: Adam with separate learning rates — ``backbone_lr`` for the backbone, ``lr`` for the heads,
  ``proxy_lr`` for a proxy loss's proxies.

Decisions (what the paper leaves open):

* **The reconstruction target is detached.** The decoder reconstructs the backbone's D-dimensional feature x, and
  the reconstruction term compares ``x.detach()`` with ``dec(ẑ)`` (``‖x.detach() − dec(ẑ)‖²`` with
  ``likelihood="l2"``). If the target carried gradient, the backbone could lower the
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
* **Dropout off**: the backbone's dropout on the feature (GoogLeNet's p = 0.2 after the pool, the dropout in
  EfficientNet's/MobileNet's classifier) is replaced by identity when the classifier is removed, so the trained
  feature is exactly the one extract caches and evaluation uses.
* **Any torchvision or timm backbone** (``backbone``, as for ``dvml extract``; a TorchScript file is for
  extraction only): BN frozen where the network has BN (LayerNorm networks such as ViT/ConvNeXt have none to
  freeze), the backbone's own learning rate, its own preprocessing; ``backbone.pt`` records the spec so that
  ``dvml evaluate RUN_DIR`` rebuilds the same network. Mixed precision runs on CUDA; on MPS the run is float32.
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
    RUN_DIR/backbone.pt    {"backbone": state_dict (the torchvision/timm layout, no classifier), "global_step",
                           "backbone_spec", "transform_input"} — usable as
                           ``dvml extract --backbone SPEC --weights RUN_DIR/backbone.pt``
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
finish. Its feature dimension must be the backbone's (GoogLeNet: 1024) and its embedding size / decoder width those of
this run.

Multi-GPU (one process per GPU, DistributedDataParallel over NCCL; gloo on CPU)::

    torchrun --standalone --nproc_per_node=4 --no-python dvml finetune cub --root CUB_200_2011 --out runs/ft

``batch_size`` is the global batch (all processes together) and must be divisible by the number of
processes; each process loads and augments its own shard. Every process must see ``--root`` and ``--out``
at the same paths (one machine, or a shared file system).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from dvml import runs as R
from dvml.errors import DvmlError
from dvml.extract.backbone import DEFAULT_BACKBONE, Backbone
from dvml.extract.datasets import DatasetIndex, read_dataset
from dvml.extract.transforms import worker_init as _extract_worker_init
from dvml.files import check_not_busy, make_dir
from dvml.finetune import distributed as D
from dvml.finetune.config import LEGACY_HEAD_FIELDS, FinetuneConfig
from dvml.finetune.data import AugmentedImages, KeyedBatches, collate, drop_unreadable
from dvml.finetune.model import GatheredMetric, init_model, load_init_heads, set_train_mode
from dvml.heads.batch import fit_batch
from dvml.heads.core import (
    Callback,
    FitEvent,
    check_out_dir,
    check_resume_config,
    dvml_loss,
    epoch_record,
    non_finite_error,
    optimizer,
    start_log,
)
from dvml.heads.objective import TERMS
from dvml.heads.schedule import schedule_warnings, warn_schedule
from dvml.seeding import step_seed

log = logging.getLogger(__name__)



def _prepare_dir(cfg: FinetuneConfig, ctx: D.DistContext) -> dict | None:
    """Check ``cfg.out`` against resume/overwrite (every rank, read-only); rank 0 then clears it if asked.
    Returns the checkpoint to resume from (loaded on every rank) or None."""
    out, ckpt_path = cfg.out, cfg.out / R.CHECKPOINT_FILE
    check_out_dir(out)
    exists = ckpt_path.exists() or (out / R.CONFIG_FILE).exists()
    resume_from = None
    if exists and not cfg.overwrite:
        if not ckpt_path.exists():
            if not cfg.resume:
                raise DvmlError(f"{out}: holds a run that never reached a checkpoint; pass `resume` to start it "
                                "again or `overwrite`")
        else:
            ckpt = R.load_torch(ckpt_path)
            if ckpt.get("kind") != R.FINETUNE_KIND:
                raise DvmlError(f"{ckpt_path}: not a finetune checkpoint")
            if not cfg.resume:
                state = "a finished" if ckpt.get("finished") else "an unfinished"
                raise DvmlError(f"{out}: holds {state} finetune run (epoch {ckpt['epochs_done']}, step "
                                f"{ckpt['global_step']}); pass `resume` to continue it or `overwrite` to replace it")
            # runs from before --backbone: GoogLeNet; from before the DVML options: the paper's heads
            old = {"backbone": DEFAULT_BACKBONE, **LEGACY_HEAD_FIELDS, **ckpt["config"]}
            check_resume_config(out, old, cfg.model_dict())
            resume_from = ckpt
    D.barrier()
    if ctx.is_main:
        if cfg.overwrite:
            R.set_aside_run(out)
        make_dir(out)
    D.barrier()
    return resume_from


def finetune(cfg: FinetuneConfig, *, callback: Callback | None = None, index: DatasetIndex | None = None,
             backbone: Backbone | None = None) -> Path:
    """Train backbone + heads end to end and write the run directory ``cfg.out``; returns it.

    Single process, or one of N under torchrun (joins the process group itself; see the module docstring).

    Args:
        cfg: the run's configuration.
        callback: receives :class:`~dvml.heads.core.FitEvent` s on rank 0 ("start", "step" with
            ``record={"total": loss}``, "epoch" with the epoch's log record, "end").
        index, backbone: prebuilt dataset index / backbone (tests, benchmarks); by default from ``cfg``.
    Raises:
        DvmlError: bad dataset/run directory/options, an unreadable image, a non-finite loss;
            :class:`~dvml.files.BusyError` while another process writes ``cfg.out``;
            :class:`~dvml.files.WriteError` when a file cannot be written.
    """
    ctx = D.init_distributed(None if cfg.device == "auto" else cfg.device)
    if not ctx.is_main:
        logging.getLogger("dvml").setLevel(logging.WARNING)
        callback = None
    try:
        t_start = time.perf_counter()
        check_not_busy(cfg.out, "wait for it to finish, or stop it")  # every rank: all refuse alike, none hangs
        D.barrier()
        # rank 0 writes the run, so rank 0 holds its writer lock and the run --overwrite set aside
        with R.run_writer(cfg.out) if ctx.is_main else contextlib.nullcontext():
            _Finetune(cfg, ctx, index, backbone).train(callback)
        log.info("finetune done in %.1fs: %s", time.perf_counter() - t_start, cfg.out)
        return cfg.out
    finally:
        D.shutdown(ctx)


class _Finetune:
    """One end-to-end run on this process: data, network, optimiser, sampler, resumed if asked."""

    def __init__(self, cfg: FinetuneConfig, ctx: D.DistContext, index: DatasetIndex | None,
                 backbone: Backbone | None):
        self.cfg, self.ctx, out = cfg, ctx, cfg.out
        self.device = device = ctx.device
        index = index or read_dataset(cfg.dataset, cfg.root, train_classes=cfg.train_classes)
        self.skipped: list[str] = []
        if cfg.skip_bad:
            index, self.skipped = drop_unreadable(index)
        self.index = index
        # a default batch too large for the data's classes is fitted to them (as fit-heads does)
        cfg, self.batch = fit_batch(cfg, np.array([s.label for s in index.train]), where=str(cfg.root),
                                    multiple_of=ctx.world_size)
        self.warnings = warn_schedule(cfg) if ctx.is_main else schedule_warnings(cfg)  # said once, in config.json
        self.cfg = cfg
        self.ckpt = ckpt = _prepare_dir(cfg, ctx)
        self.digest = index.digest()
        if ckpt is not None and ckpt.get("index_digest") != self.digest:
            raise DvmlError(f"{out}: `resume` on a different image list ({cfg.root}: {index.name} index digest "
                            f"{self.digest}, the run started on {ckpt.get('index_digest')}); use `overwrite` to "
                            "start again")
        if ctx.is_main:
            R.invalidate_metrics(out)  # the checkpoint is about to change: no metrics.json may describe the old one
        labels = np.array([s.label for s in index.train], dtype=np.int64)
        self.train_classes, y = np.unique(labels, return_inverse=True)
        self.model = model = init_model(cfg, len(self.train_classes), backbone=backbone)
        self.pre, self.net, self.heads = model.backbone.preprocess, model.net, model.net.heads
        if cfg.init_heads is not None and ckpt is None:
            load_init_heads(cfg.init_heads, model, cfg, self.train_classes, index.name)
        self._place_on_device()
        bb_params = [p for p in self.net.backbone.parameters() if p.requires_grad]
        self.loss_params = list(model.loss.parameters())
        self.optimizer = optimizer(cfg, self.heads.parameters(), self.loss_params, before=[
            {"params": bb_params, "lr": cfg.backbone_lr, "weight_decay": cfg.weight_decay}])
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.net.amp_dtype is torch.float16)
        self.sampler = D.DistributedClassBalancedSampler(
            y, batch_size=cfg.batch_size, samples_per_class=cfg.per_class, seed=cfg.seed, rank=ctx.rank,
            world_size=ctx.world_size, num_batches=cfg.steps_per_epoch)
        self.steps = self.sampler.num_batches
        self.start_epoch, self.start_step, self.sums = 0, 0, np.zeros(len(TERMS))
        if ckpt is not None:
            self._restore(ckpt)
        if ctx.is_main:
            start_log(out, self.start_epoch if ckpt is not None else None)
        self.ddp = self.net
        if ctx.distributed:
            self.ddp = nn.parallel.DistributedDataParallel(self.net, device_ids=[device] if self.cuda else None)
        self.train_loss = dvml_loss(cfg, GatheredMetric(model.metric), gather=D.gather_batch)
        self.dataset = AugmentedImages(index.root, index.train, y, self.pre, cfg.seed)
        self.header = {"kind": R.FINETUNE_KIND, "cache": None, "cache_fingerprint": None, "seed": cfg.seed,
                       "versions": R.versions(), "dataset": index.name, "index_digest": self.digest,
                       "split_rule": index.split_rule, "backbone": model.backbone.describe(),
                       "transform_input": model.backbone.transform_input, "preprocess": self.pre.as_dict(),
                       "world_size": ctx.world_size, "skipped_images": self.skipped, "batch": self.batch}

    def _place_on_device(self) -> None:
        """Mixed precision (bfloat16 where supported, else float16) and channels-last on CUDA."""
        net, device = self.net, self.device
        self.cuda = cuda = device.type == "cuda"
        amp_dtype = None
        if self.cfg.amp and cuda:
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        net.amp_dtype = amp_dtype
        net.to(device)
        self.model.loss.to(device)
        if cuda:
            net.backbone.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True

    def _restore(self, ckpt: dict) -> None:
        self.net.backbone.load_state_dict(ckpt["backbone"])
        self.heads.load_state_dict(ckpt["heads"])
        self.model.loss.load_state_dict(ckpt["loss"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch, self.start_step = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
        if int(ckpt["steps_per_epoch"]) != self.steps:
            raise DvmlError(f"{self.cfg.out}: the run has {ckpt['steps_per_epoch']} steps per epoch, this one "
                            f"{self.steps}")
        self.sums = np.asarray(ckpt["epoch_sums"], dtype=np.float64)
        log.info("resuming %s at epoch %d, step %d of %d", self.cfg.out, self.start_epoch + 1, self.start_step,
                 self.steps)

    def write_config(self, status: str, epochs_done: int, global_step: int) -> None:
        R.write_config(self.cfg.out, {**self.header, "config": self.cfg.to_dict(), "status": status,
                                      "epochs_done": epochs_done, "global_step": global_step,
                                      "warnings": self.warnings})

    def save(self, epoch: int, step_in_epoch: int, epochs_done: int, finished: bool) -> None:
        """Rank 0: checkpoint.pt, then backbone.pt and heads.pt (both carrying the global step), config.json."""
        if not self.ctx.is_main:
            return
        cfg, out, steps = self.cfg, self.cfg.out, self.steps
        gs = epoch * steps + step_in_epoch
        bb, hd = R.cpu_state(self.net.backbone.state_dict()), R.cpu_state(self.heads.state_dict())
        ls = R.cpu_state(self.model.loss.state_dict())
        R.atomic_torch_save({
            "format": R.FINETUNE_CHECKPOINT_FORMAT, "kind": R.FINETUNE_KIND, "config": cfg.model_dict(),
            "index_digest": self.digest, "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": gs,
            "steps_per_epoch": steps, "epochs_done": epochs_done, "finished": finished,
            "epoch_sums": self.sums.tolist(), "backbone": bb, "heads": hd, "loss": ls,
            "optimizer": R.cpu_state(self.optimizer.state_dict()),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}, out / R.CHECKPOINT_FILE)
        R.atomic_torch_save({"backbone": bb, "global_step": gs, "backbone_spec": cfg.backbone,
                             "transform_input": self.model.backbone.transform_input}, out / R.BACKBONE_FILE)
        R.save_heads(out, kind=R.FINETUNE_KIND, model=hd, loss=ls, config=cfg.to_dict(), seed=cfg.seed, cache=None,
                     cache_fingerprint=None, dataset=self.index.name, epoch=epochs_done, epochs_done=epochs_done,
                     finished=finished, selection="last", global_step=gs, in_dim=self.heads.in_dim,
                     embedding_size=cfg.embedding_size, train_classes=[int(c) for c in self.train_classes],
                     versions=R.versions())
        self.write_config("finished" if finished else "running", epochs_done, gs)

    def train(self, callback: Callback | None) -> None:
        cfg, ctx, steps, start = self.cfg, self.ctx, self.steps, self.start_epoch
        if ctx.is_main:
            self.write_config("running", start, start * steps + self.start_step)
        if callback:
            callback(FitEvent("start", start, cfg.epochs, self.start_step, steps))
        log.info("finetune: %s, %d train images / %d classes, %s loss%s, %d epochs x %d steps of %d images (%d per "
                 "process x %d) at %d/%d on %s%s%s", self.index.name, len(self.index.train),
                 len(self.train_classes), cfg.loss.value, "" if cfg.dvml else " (no DVML)", cfg.epochs, steps,
                 cfg.batch_size, self.sampler.local_batch_size, ctx.world_size, self.pre.resize, self.pre.crop,
                 self.device, f", amp {self.net.amp_dtype}" if self.net.amp_dtype else "",
                 ", frozen BN" if cfg.freeze_bn else "")
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            first = self.start_step if epoch == start else 0
            if epoch != start:
                self.sums = np.zeros(len(TERMS))
            self._epoch(epoch, first, callback)
            dt = time.perf_counter() - t0
            record = epoch_record(cfg, epoch, self.sums / steps, dt, (steps - first) * cfg.batch_size / dt,
                                  digits=2, global_step=(epoch + 1) * steps)
            self.sums = np.zeros(len(TERMS))
            if ctx.is_main:
                R.append_log(cfg.out, record)
            self.save(epoch + 1, 0, epoch + 1, finished=epoch + 1 == cfg.epochs)
            if callback:
                callback(FitEvent("epoch", epoch + 1, cfg.epochs, steps, steps, record))
        if start >= cfg.epochs:
            log.info("%s: already trained for %d epochs", cfg.out, start)
            if self.ckpt is not None and not self.ckpt.get("finished"):
                self.save(start, 0, start, finished=True)
        D.barrier()
        if callback:
            callback(FitEvent("end", cfg.epochs, cfg.epochs, steps, steps))

    def _epoch(self, epoch: int, first: int, callback: Callback | None) -> None:
        """Steps ``first``.. of ``epoch``, accumulating the terms' means over processes into ``self.sums``."""
        cfg, steps, device, sampler = self.cfg, self.steps, self.device, self.sampler
        sampler.set_epoch(epoch, start=first)
        loader = DataLoader(self.dataset, batch_sampler=KeyedBatches(sampler), num_workers=cfg.workers,
                            collate_fn=collate, pin_memory=self.cuda,
                            worker_init_fn=_extract_worker_init if cfg.workers else None,
                            prefetch_factor=4 if cfg.workers else None, persistent_workers=False)
        set_train_mode(self.net, cfg.freeze_bn)
        step = first
        for batch in loader:
            bad = [e for e in batch["errors"] if e]
            if bad:
                raise DvmlError(f"{bad[0]} (finetune needs every training image readable; pass `skip_bad` to "
                                "leave unreadable images out)")
            images = self.pre.normalize(batch["images"].to(device, non_blocking=True))
            if self.cuda:
                images = images.contiguous(memory_format=torch.channels_last)
            values = self._step(images, batch["labels"].to(device, non_blocking=True), epoch, step)
            if not np.isfinite(values).all():
                detail = str(dict(zip(TERMS, np.around(values, 4).tolist(), strict=True)))
                if not (cfg.out / R.CHECKPOINT_FILE).is_file():  # never name a checkpoint that was never written
                    raise DvmlError(f"non-finite loss at epoch {epoch + 1}, step {step + 1} of {steps} ({detail}); "
                                    "no checkpoint was written yet; lower `lr` / `backbone_lr`")
                raise non_finite_error(epoch + 1, step + 1, steps, detail,
                                       f"checkpoint is kept in {cfg.out / R.CHECKPOINT_FILE}",
                                       "lower `lr` / `backbone_lr`")
            self.sums += values
            step += 1
            if callback:
                callback(FitEvent("step", epoch, cfg.epochs, step, steps, {"total": float(values[-1])}))
            if cfg.checkpoint_every and (epoch * steps + step) % cfg.checkpoint_every == 0 and step < steps:
                self.save(epoch, step, epoch, finished=False)

    def _step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, step: int) -> np.ndarray:
        """One optimiser step on this process's slice of a global batch; returns the terms averaged over
        processes (float64, :data:`TERMS` order)."""
        cfg, device = self.cfg, self.device
        lam = cfg.lambdas(epoch + step / self.steps)
        gen = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, epoch * self.steps + step))
        eps = None
        if cfg.dvml:  # the global batch's noise, this process's slice (independent of the world size)
            b_local = self.sampler.local_batch_size
            lo, hi = self.ctx.rank * b_local, (self.ctx.rank + 1) * b_local
            eps = torch.randn((cfg.samples, cfg.batch_size, cfg.embedding_size), generator=gen,
                              device=device)[:, lo:hi]
        self.model.metric.generator = gen  # the step's draws (MetricLoss.generator)
        x, heads_out = self.ddp(images, labels, samples=cfg.samples, stop_recon_grad=lam.stop_recon_grad, eps=eps)
        terms = self.train_loss(heads_out, x.detach(), labels, lam)  # the reconstruction target is detached
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["total"]).backward()
        D.average_gradients(self.loss_params)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return D.all_reduce_mean(torch.stack([terms[k].detach() for k in TERMS])).double().cpu().numpy()

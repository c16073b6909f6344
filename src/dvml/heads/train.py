"""``fit``: train the DVML heads on cached features, in memory, on one device.

Per epoch: one cached view is drawn per training image (the views stand in for data augmentation), then
``N // batch_size`` class-balanced batches; each step gathers its (B, D) features on the device, runs the heads
(T draws through the decoder as one (T·B, E) batch), the four-term loss and one Adam step. Loss terms are
accumulated on the device and read once per epoch (no per-step host sync), then the epoch is logged and
checkpointed. A non-finite loss stops the fit with a :class:`~dvml.errors.DvmlError` naming the epoch and step;
the checkpoint on disk is still the last good epoch's.

Determinism: :func:`seed_everything` once, then one CPU ``torch.Generator`` for views and batches and one on
the device for the z_V noise (and DWS draws); all states are checkpointed, so ``--resume`` continues exactly
where the interrupted run would have gone.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from dvml import devices
from dvml import runs as R
from dvml.cache import Split, fingerprint, load_labels, load_split, read_info
from dvml.errors import DvmlError
from dvml.files import make_dir
from dvml.heads import diagnostics as diag
from dvml.heads.batch import fit_batch
from dvml.heads.config import DeviceChoice, FitConfig
from dvml.heads.core import (
    Callback,
    FitEvent,
    check_out_dir,
    check_resume_config,
    dvml_loss,
    epoch_record,
    metric_loss,
    non_finite_error,
    optimizer,
    start_log,
)
from dvml.heads.model import DVMLHeads
from dvml.heads.objective import TERMS
from dvml.heads.sampler import ClassBalancedSampler
from dvml.heads.schedule import warn_schedule
from dvml.heads.triplet_input import TripletInputSampler
from dvml.seeding import diag_seeds, hold_out_classes, noise_seed, seed_everything

log = logging.getLogger(__name__)


def resolve_device(choice: DeviceChoice) -> torch.device:
    """``auto`` = cuda, then mps, then cpu (:func:`dvml.devices.resolve_device`); DvmlError if unavailable."""
    return devices.resolve_device(DeviceChoice(choice).value)


def _recall_at_1(emb: torch.Tensor, labels: np.ndarray, roles: np.ndarray | None = None) -> float:
    """Cosine Recall@1 of every row among the others, or (``roles``: a schema-2 test split) of the queries
    against the gallery, a row that is both never retrieving itself."""
    from dvml.retrieval import knn
    from dvml.retrieval.metrics import recall_at_k
    from dvml.retrieval.protocol import query_gallery

    x = emb.detach().float().cpu().numpy()
    if roles is None:
        _, idx = knn.search(x, 1, metric="cosine")
        return recall_at_k(labels[idx], labels, (1,))["recall@1"]
    q, g, exclude = query_gallery(roles)
    _, idx = knn.search(x[q], 1, database=x[g], metric="cosine", exclude=exclude)
    return recall_at_k(labels[g][idx], labels[q], (1,))["recall@1"]


def _check_split(split: Split, name: str, where: Path, feature_dim: int) -> None:
    f = split.features
    if f.ndim != 3 or f.shape[2] != feature_dim or f.shape[0] != len(split.labels) or f.shape[0] == 0:
        raise DvmlError(f"{where}: {name} features must be (N, P, {feature_dim}) with one label per row, got "
                        f"features {f.shape} and {len(split.labels)} labels")


def _prepare_dir(cfg: FitConfig) -> dict | None:
    """Check the run directory against resume/overwrite; return the checkpoint to resume from (or None)."""
    out = cfg.out
    heads = out / R.HEADS_FILE
    check_out_dir(out)
    if cfg.overwrite:
        R.set_aside_run(out)
        return None
    if not heads.exists():
        if (out / R.CONFIG_FILE).exists() and not cfg.resume:
            raise DvmlError(f"{out}: holds a run that never finished an epoch; pass `resume` to start it again or "
                            "`overwrite`")
        return None
    ckpt = R.load_checkpoint(out)
    done, finished = int(ckpt.get("epochs_done", 0)), bool(ckpt.get("finished", False))
    if not cfg.resume:
        if finished:
            raise DvmlError(f"{out}: holds a finished run ({done} epochs); pass `overwrite` to replace it (or "
                            "choose another `out`)")
        raise DvmlError(f"{out}: holds an unfinished run (epoch {done} of {ckpt['config'].get('epochs')}); pass "
                        "`resume` to continue it or `overwrite` to start again")
    check_resume_config(out, FitConfig.from_dict(ckpt["config"]).model_dict(), cfg.model_dict())
    return ckpt


def _hold_out_validation(train: Split, k: int, seed: int, min_train_classes: int, where: Path):
    """Split K whole classes (:func:`~dvml.seeding.hold_out_classes`) off the training split →
    (train', val features (M, D) of view 0, val labels (M,))."""
    n_classes = len(np.unique(train.labels))
    if k >= n_classes:
        raise DvmlError(f"{where}: `val_classes` {k} holds out every training class (there are {n_classes}); "
                        "hold out fewer, leaving enough to train on")
    if k + min_train_classes > n_classes:
        raise DvmlError(f"{where}: `val_classes` {k} leaves {n_classes - k} training classes, fewer than the "
                        f"{min_train_classes} a batch needs")
    _, val_cls = hold_out_classes(train.labels, k, seed)
    is_val = np.isin(train.labels, val_cls)
    rest = Split(features=train.features[~is_val], labels=train.labels[~is_val])
    return rest, train.features[is_val, 0], train.labels[is_val]


def fit(cfg: FitConfig, *, train: Split | None = None, test: Split | None = None,
        callback: Callback | None = None) -> Path:
    """Fit the heads described by ``cfg`` and write the run directory ``cfg.out``; returns it.

    Args:
        cfg: the fit's configuration.
        train: the cache's training split, preloaded (else read from ``cfg.cache``); features (N, P, D).
        test: the cache's test split (only view 0 is used, for the watch-only Recall@1); read when needed.
        callback: receives :class:`FitEvent` s (progress display).
    Raises:
        DvmlError: bad cache/run directory/options, non-finite loss (naming epoch and step);
            :class:`~dvml.files.BusyError` while another process writes ``cfg.out``;
            :class:`~dvml.files.WriteError` when a file cannot be written (the run is then not marked finished).
    """
    t_start = time.perf_counter()
    with R.run_writer(cfg.out):
        run = _HeadsFit(cfg, train, test)
        run.train(callback)
    log.info("fit-heads done in %.1fs: %s", time.perf_counter() - t_start, cfg.out)
    return cfg.out


class _HeadsFit:
    """One heads fit: the data on the device, the model, loss, optimiser and generators, resumed if asked."""

    def __init__(self, cfg: FitConfig, train: Split | None, test: Split | None):
        labels = train.labels if train is not None else load_labels(cfg.cache, "train")
        views = train.features.shape[1] if train is not None else read_info(cfg.cache).splits["train"].views
        cfg, self.batch = fit_batch(cfg, labels, where=str(cfg.cache), views=views)  # before the resume check
        self.warnings = warn_schedule(cfg)  # once, at the start; recorded in config.json
        self.cfg, out = cfg, cfg.out
        self.ckpt = ckpt = _prepare_dir(cfg)
        self.info = read_info(cfg.cache)
        fp = fingerprint(cfg.cache)
        if ckpt is not None and ckpt.get("cache_fingerprint") != fp:
            raise DvmlError(f"{out}: `resume` on a changed cache ({cfg.cache} has fingerprint {fp}, the run was fit "
                            f"on {ckpt.get('cache_fingerprint')}); use `overwrite` to start again")
        self.device = device = resolve_device(cfg.device)
        self._load_data(train, test)
        seed_everything(cfg.seed)
        d = self.dims[2]
        self.model = DVMLHeads(d, **cfg.heads_kwargs()).to(device)
        self.gen_cpu = torch.Generator().manual_seed(cfg.seed)
        self.gen_dev = torch.Generator(device=device).manual_seed(noise_seed(cfg.seed))
        metric = metric_loss(cfg, len(self.train_classes), self.gen_dev)  # same proxies for baseline and DVML
        t_mean = t_std = None
        if cfg.dvml and cfg.standardize:  # per-dimension statistics of the training features (all views)
            flat = self.feats.float().reshape(-1, d)
            t_mean, t_std = flat.mean(0), flat.std(0)
            del flat
        self.loss_fn = dvml_loss(cfg, metric, target_mean=t_mean, target_std=t_std).to(device)
        self.optimizer = optimizer(cfg, self.model.parameters(), list(self.loss_fn.parameters()), fused=True)
        if cfg.triplet_input:
            self.sampler = TripletInputSampler(torch.from_numpy(self.y_mapped), cfg.batch_size, self.gen_cpu)
        else:
            self.sampler = ClassBalancedSampler(torch.from_numpy(self.y_mapped), cfg.batch_size, cfg.per_class,
                                                self.gen_cpu, views=self.dims[1])
        self.steps = len(self.sampler)
        self._diag_setup()
        self.start_epoch, self.best = 0, None  # best: {"epoch", "val_recall@1", "model", "loss"}
        if ckpt is not None:
            self._restore(ckpt)
        else:
            make_dir(out)
        start_log(out, self.start_epoch if ckpt is not None else None)
        self.header = {"kind": R.HEADS_KIND, "cache": str(Path(cfg.cache).resolve()), "cache_fingerprint": fp,
                       "seed": cfg.seed, "versions": R.versions(), "batch": self.batch, "trainer": "one-by-one"}

    def _load_data(self, train: Split | None, test: Split | None) -> None:
        cfg, info, device = self.cfg, self.info, self.device
        if train is None:
            train = load_split(cfg.cache, "train")
        _check_split(train, "train", cfg.cache, info.feature_dim)
        val_x = val_y = None
        if cfg.val_classes:
            train, val_x, val_y = _hold_out_validation(train, cfg.val_classes, cfg.seed, cfg.classes_per_batch,
                                                       cfg.cache)
        test_x = self.test_y = self.test_roles = None
        if cfg.eval_every:
            if test is None:
                test = load_split(cfg.cache, "test", views=[0])
            _check_split(test, "test", cfg.cache, info.feature_dim)
            test_x, self.test_y = test.features[:, 0], np.asarray(test.labels)
            self.test_roles = getattr(test, "roles", None)  # query/gallery marks of a schema-2 cache
        self.dims = train.features.shape  # (N, P, D)
        self.train_classes, self.y_mapped = np.unique(train.labels, return_inverse=True)
        self.feats = torch.from_numpy(np.ascontiguousarray(train.features)).to(device)
        self.labels = torch.from_numpy(self.y_mapped.astype(np.int64)).to(device)

        def to_t(a):
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)

        self.test_t = to_t(test_x) if test_x is not None else None
        self.val_t, self.val_y = (to_t(val_x) if val_x is not None else None), val_y

    def _diag_setup(self) -> None:
        """The diagnostics' fixed subset of training images (view 0) and their own seeds: drawn from generators
        the fit never uses, so diagnostics cannot change its trajectory (:mod:`dvml.heads.diagnostics`)."""
        cfg, n = self.cfg, self.dims[0]
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(diag_seeds(cfg.seed)[0]))
        idx = torch.sort(idx[:cfg.diag_images]).values.to(self.device)
        self.diag_x = self.feats[idx, 0].float() if len(idx) else None
        self.diag_y = self.labels[idx] if len(idx) else None
        self.emb_params = [self.model.embedding.weight, self.model.embedding.bias]

    def _diagnostics(self, grad_stats: list[dict]) -> dict:
        """The epoch's diagnostics: branch statistics on the fixed subset (the same noise every epoch) and the
        mean of the gradient statistics sampled during the epoch (each over the steps that logged it)."""
        out: dict = {}
        if self.diag_x is not None:
            g = torch.Generator(device=self.device).manual_seed(diag_seeds(self.cfg.seed)[1])
            out.update(diag.heads_branch_stats(self.model, self.diag_x, self.diag_y, samples=2, generator=g))
        if grad_stats:
            for k in dict.fromkeys(k for gs in grad_stats for k in gs):
                out[k] = float(np.mean([gs[k] for gs in grad_stats if k in gs]))
            out["grad_samples"] = len(grad_stats)
        return out

    def _restore(self, ckpt: dict) -> None:
        rs = ckpt["resume"]
        self.model.load_state_dict(rs["model"])
        self.loss_fn.load_state_dict(rs["loss"])
        self.optimizer.load_state_dict(rs["optimizer"])
        self.gen_cpu.set_state(rs["rng"]["sampler"])
        self.gen_dev.set_state(rs["rng"]["noise"])
        torch.set_rng_state(rs["rng"]["torch"])
        if self.device.type == "cuda" and rs["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(rs["rng"]["cuda"], self.device)
        if self.device.type == "mps" and rs["rng"].get("mps") is not None:
            torch.mps.set_rng_state(rs["rng"]["mps"])
        self.start_epoch = int(ckpt["epochs_done"])
        if rs.get("best") is not None:
            self.best = {"epoch": rs["best"]["epoch"], "val_recall@1": rs["best"]["val_recall@1"],
                         "model": ckpt["model"], "loss": ckpt["loss"]}
        log.info("resuming %s after epoch %d of %d", self.cfg.out, self.start_epoch, self.cfg.epochs)

    def write_config(self, status: str, done: int) -> None:
        R.write_config(self.cfg.out, {**self.header, "config": self.cfg.to_dict(), "status": status,
                                      "epochs_done": done, "dataset": self.info.dataset, "warnings": self.warnings})

    def save(self, done: int, finished: bool) -> None:
        cfg, device, best = self.cfg, self.device, self.best
        latest_model, latest_loss = R.cpu_state(self.model.state_dict()), R.cpu_state(self.loss_fn.state_dict())
        reported = best if (cfg.val_classes and best is not None) else None
        rng = {"sampler": self.gen_cpu.get_state(), "noise": self.gen_dev.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        if device.type == "mps":
            rng["mps"] = torch.mps.get_rng_state()
        R.save_heads(
            cfg.out, **self.header, config=cfg.to_dict(), in_dim=self.dims[2], embedding_size=cfg.embedding_size,
            train_classes=[int(c) for c in self.train_classes], dataset=self.info.dataset,
            model=reported["model"] if reported else latest_model,
            loss=reported["loss"] if reported else latest_loss,
            epoch=reported["epoch"] if reported else done,
            selection="val" if cfg.val_classes else "last", epochs_done=done, finished=finished,
            resume={"model": latest_model, "loss": latest_loss, "optimizer": R.cpu_state(self.optimizer.state_dict()),
                    "rng": rng,
                    "best": None if best is None else {"epoch": best["epoch"], "val_recall@1": best["val_recall@1"]}})

    def train(self, callback: Callback | None) -> None:
        cfg, steps, start = self.cfg, self.steps, self.start_epoch
        if start < cfg.epochs or self.ckpt is None or not self.ckpt.get("finished"):
            R.invalidate_metrics(cfg.out)  # the checkpoint is about to change: no metrics.json may describe the old one
        self.write_config("running", start)
        if callback:
            callback(FitEvent("start", start, cfg.epochs, 0, steps))
        n, p, d = self.dims
        log.info("fit-heads: %d train images x %d views x %d-D, %d classes, %s loss%s, %d epochs x %d steps on %s",
                 n, p, d, len(self.train_classes), cfg.loss.value, "" if cfg.dvml else " (no DVML)", cfg.epochs,
                 steps, self.device)
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            means, grad_stats = self._epoch(epoch, callback)
            dt = time.perf_counter() - t0
            record = epoch_record(cfg, epoch, means, dt, steps * cfg.batch_size / dt)
            record.update(self._diagnostics(grad_stats))
            last = epoch + 1 == cfg.epochs
            if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or last):
                self._evaluate(epoch, record)
            R.append_log(cfg.out, record)
            self.save(epoch + 1, finished=last)
            if callback:
                callback(FitEvent("epoch", epoch + 1, cfg.epochs, steps, steps, record))
        if start >= cfg.epochs:
            log.info("%s: already trained for %d epochs", cfg.out, start)
            if self.ckpt is not None and not self.ckpt.get("finished"):
                self.save(start, finished=True)
        self.write_config("finished", max(start, cfg.epochs))
        if callback:
            callback(FitEvent("end", cfg.epochs, cfg.epochs, steps, steps))

    def _epoch(self, epoch: int, callback: Callback | None) -> tuple[list[float], list[dict]]:
        """One epoch of steps; returns the mean of every term and the sampled gradient statistics (the first step
        and every ``grad_every``-th global step). Raises at the first non-finite loss."""
        cfg, steps, device, model = self.cfg, self.steps, self.device, self.model
        n, p = self.dims[:2]
        views = torch.randint(p, (n,), generator=self.gen_cpu).to(device)
        batches, ranks = (b.to(device) for b in self.sampler.epoch_with_ranks())
        sums = torch.zeros(len(TERMS), device=device)
        finite = torch.ones(steps, dtype=torch.bool, device=device)
        grad_stats: list[dict] = []
        model.train()
        step = 0
        try:
            for step in range(steps):
                idx = batches[step]
                x = self.feats[idx, (views[idx] + ranks[step]) % p].float()  # a repeated image: another view
                lam = cfg.lambdas(epoch + step / steps)
                y = self.labels[idx]
                heads_out = model(x, samples=cfg.samples, stop_recon_grad=lam.stop_recon_grad, generator=self.gen_dev,
                                  labels=y)
                terms = self.loss_fn(heads_out, x, y, lam)
                if cfg.dvml and cfg.grad_every and (step == 0 or (epoch * steps + step) % cfg.grad_every == 0):
                    grad_stats.append(diag.step_gradients(self.loss_fn, heads_out, x, y, lam, terms, self.emb_params,
                                                          self.gen_dev))
                self.optimizer.zero_grad(set_to_none=True)
                terms["total"].backward()
                self.optimizer.step()
                values = torch.stack([terms[k].detach() for k in TERMS])
                finite[step] = torch.isfinite(values).all()
                sums += values
                if callback:
                    callback(FitEvent("step", epoch, cfg.epochs, step + 1, steps))
        except RuntimeError:  # e.g. a miner choking on NaN: report the non-finite loss that came first, if any
            if bool(finite[:step].all()):
                raise
        bad = torch.nonzero(~finite[:step + 1]).flatten()
        if bad.numel():
            detail, hint = f"{cfg.loss.value}, lr {cfg.lr}", "check the features for NaN/inf or lower `lr`"
            if epoch == 0:  # never name a heads.pt that was never written
                raise DvmlError(f"non-finite loss at epoch 1, step {int(bad[0]) + 1} of {steps} ({detail}); no "
                                f"epoch finished, so no checkpoint was written; {hint}")
            raise non_finite_error(epoch + 1, int(bad[0]) + 1, steps, detail,
                                   f"good checkpoint (epoch {epoch}) is kept in {cfg.out / R.HEADS_FILE}", hint)
        return (sums / steps).tolist(), grad_stats

    def _evaluate(self, epoch: int, record: dict) -> None:
        """Watch-only test Recall@1 and validation Recall@1 (keeping the best epoch's state) into ``record``."""
        self.model.eval()
        with torch.no_grad():
            record["test_recall@1"] = _recall_at_1(self.model.embed(self.test_t), self.test_y, self.test_roles)
            if self.val_t is not None:
                r1 = _recall_at_1(self.model.embed(self.val_t), self.val_y)
                record["val_recall@1"] = r1
                if self.best is None or r1 > self.best["val_recall@1"]:
                    self.best = {"epoch": epoch + 1, "val_recall@1": r1,
                                 "model": R.cpu_state(self.model.state_dict()),
                                 "loss": R.cpu_state(self.loss_fn.state_dict())}

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

import copy
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dvml.cache import Split, fingerprint, load_split, read_info
from dvml.errors import DvmlError
from dvml.heads import run as R
from dvml.heads.config import PROXY_LOSSES, DeviceChoice, FitConfig
from dvml.heads.loss import TERMS, DVMLLoss
from dvml.heads.metric_losses import make_metric_loss
from dvml.heads.model import DVMLHeads
from dvml.heads.sampler import ClassBalancedSampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitEvent:
    """Progress report handed to ``fit``'s callback.

    kind: "start" (epoch = first epoch to run, 0-based), "step" (step steps of epoch done), "epoch" (record =
    the epoch's log record), "end".
    """

    kind: str
    epoch: int
    epochs: int
    step: int
    steps: int
    record: dict | None = None


Callback = Callable[[FitEvent], None]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(choice: DeviceChoice) -> torch.device:
    if choice is DeviceChoice.cuda:
        if not torch.cuda.is_available():
            raise DvmlError("--device cuda: no CUDA device is available (use --device cpu or auto)")
        return torch.device("cuda")
    if choice is DeviceChoice.auto and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _cpu_state(sd: dict) -> dict:
    """Deep copy of a (nested) state dict with every tensor on the CPU."""
    if isinstance(sd, torch.Tensor):
        return sd.detach().to("cpu", copy=True)
    if isinstance(sd, dict):
        return {k: _cpu_state(v) for k, v in sd.items()}
    if isinstance(sd, list | tuple):
        return type(sd)(_cpu_state(v) for v in sd)
    return copy.deepcopy(sd)


def _recall_at_1(emb: torch.Tensor, labels: np.ndarray) -> float:
    from dvml.evaluate import knn
    from dvml.evaluate.metrics import recall_at_k

    _, idx = knn.search(emb.detach().float().cpu().numpy(), 1, metric="cosine")
    return recall_at_k(labels[idx], labels, (1,))["recall@1"]


def _check_split(split: Split, name: str, where: Path, feature_dim: int) -> None:
    f = split.features
    if f.ndim != 3 or f.shape[2] != feature_dim or f.shape[0] != len(split.labels) or f.shape[0] == 0:
        raise DvmlError(f"{where}: {name} features must be (N, P, {feature_dim}) with one label per row, got "
                        f"features {f.shape} and {len(split.labels)} labels")


def _prepare_dir(cfg: FitConfig) -> dict | None:
    """Check the run directory against resume/overwrite; return the checkpoint to resume from (or None)."""
    out = cfg.out
    heads = out / R.HEADS_FILE
    if out.exists() and not out.is_dir():
        raise DvmlError(f"--out {out}: exists and is not a directory")
    if not heads.exists():
        if (out / R.CONFIG_FILE).exists() and not cfg.overwrite and not cfg.resume:
            raise DvmlError(f"{out}: holds a run that never finished an epoch; pass --resume to start it again or "
                            "--overwrite")
        if cfg.overwrite:
            _clear(out)
        return None
    if cfg.overwrite:
        _clear(out)
        return None
    ckpt = R.load_checkpoint(out)
    done, finished = int(ckpt.get("epochs_done", 0)), bool(ckpt.get("finished", False))
    if not cfg.resume:
        if finished:
            raise DvmlError(f"{out}: holds a finished run ({done} epochs); pass --overwrite to replace it (or "
                            "choose another --out)")
        raise DvmlError(f"{out}: holds an unfinished run (epoch {done} of {ckpt['config'].get('epochs')}); pass "
                        "--resume to continue it or --overwrite to start again")
    old = FitConfig.from_dict(ckpt["config"]).model_dict()
    new = cfg.model_dict()
    diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in new if old.get(k) != new.get(k)]
    if diff:
        raise DvmlError(f"{out}: --resume with a different config ({'; '.join(diff)}); rerun with the original "
                        "options or use --overwrite")
    return ckpt


def _clear(out: Path) -> None:
    for name in (R.HEADS_FILE, R.CONFIG_FILE, R.LOG_FILE, "metrics.json"):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _carve_validation(train: Split, k: int, seed: int, min_train_classes: int, where: Path):
    """Split K whole classes (seeded choice) off the training split → (train', val features (M, D), val labels)."""
    classes = np.unique(train.labels)
    if k + min_train_classes > len(classes):
        raise DvmlError(f"{where}: --val-classes {k} leaves {len(classes) - k} training classes, fewer than the "
                        f"{min_train_classes} a batch needs")
    g = torch.Generator().manual_seed(seed + 7919)
    val_cls = np.sort(classes[torch.randperm(len(classes), generator=g)[:k].numpy()])
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
        DvmlError: bad cache/run directory/options, non-finite loss (naming epoch and step).
    """
    t_start = time.perf_counter()
    out = cfg.out
    ckpt = _prepare_dir(cfg)
    info = read_info(cfg.cache)
    fp = fingerprint(cfg.cache)
    if ckpt is not None and ckpt.get("cache_fingerprint") != fp:
        raise DvmlError(f"{out}: --resume on a changed cache ({cfg.cache} has fingerprint {fp}, the run was fit "
                        f"on {ckpt.get('cache_fingerprint')}); use --overwrite to start again")
    device = resolve_device(cfg.device)
    if train is None:
        train = load_split(cfg.cache, "train")
    _check_split(train, "train", cfg.cache, info.feature_dim)
    val_x = val_y = None
    if cfg.val_classes:
        train, val_x, val_y = _carve_validation(train, cfg.val_classes, cfg.seed, cfg.classes_per_batch, cfg.cache)
    test_x = test_y = None
    if cfg.eval_every:
        if test is None:
            test = load_split(cfg.cache, "test", views=[0])
        _check_split(test, "test", cfg.cache, info.feature_dim)
        test_x, test_y = test.features[:, 0], np.asarray(test.labels)

    n, p, d = train.features.shape
    train_classes, y_mapped = np.unique(train.labels, return_inverse=True)
    n_classes = len(train_classes)

    seed_everything(cfg.seed)
    model = DVMLHeads(d, cfg.embedding_size, cfg.decoder_hidden, dvml=cfg.dvml).to(device)
    metric = make_metric_loss(cfg.loss, num_classes=n_classes, embedding_size=cfg.embedding_size,
                              **cfg.loss_params())
    loss_fn = DVMLLoss(metric, dvml=cfg.dvml, reduction=cfg.reduction.value).to(device)
    groups = [{"params": list(model.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    loss_params = list(loss_fn.parameters())
    if loss_params:
        groups.append({"params": loss_params, "lr": cfg.proxy_lr, "weight_decay": 0.0})
    elif cfg.loss in PROXY_LOSSES:
        raise DvmlError(f"--loss {cfg.loss.value}: the loss module has no proxies to train")
    try:  # one fused kernel per step instead of ~10 elementwise passes per parameter
        optimizer = torch.optim.Adam(groups, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.Adam(groups)
    gen_cpu = torch.Generator().manual_seed(cfg.seed)
    gen_dev = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    if hasattr(metric, "generator"):
        metric.generator = gen_dev
    sampler = ClassBalancedSampler(torch.from_numpy(y_mapped), cfg.batch_size, cfg.per_class, gen_cpu)
    steps = len(sampler)

    start_epoch, best = 0, None  # best: {"epoch", "val_recall@1", "model", "loss"}
    if ckpt is not None:
        rs = ckpt["resume"]
        model.load_state_dict(rs["model"])
        loss_fn.load_state_dict(rs["loss"])
        optimizer.load_state_dict(rs["optimizer"])
        gen_cpu.set_state(rs["rng"]["sampler"])
        gen_dev.set_state(rs["rng"]["noise"])
        torch.set_rng_state(rs["rng"]["torch"])
        if device.type == "cuda" and rs["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(rs["rng"]["cuda"], device)
        start_epoch = int(ckpt["epochs_done"])
        if rs.get("best") is not None:
            best = {"epoch": rs["best"]["epoch"], "val_recall@1": rs["best"]["val_recall@1"],
                    "model": ckpt["model"], "loss": ckpt["loss"]}
        R.write_log(out, [r for r in R.read_log(out) if r.get("epoch", 0) <= start_epoch])
        log.info("resuming %s after epoch %d of %d", out, start_epoch, cfg.epochs)
    else:
        out.mkdir(parents=True, exist_ok=True)
        R.write_log(out, [])

    header = {"kind": "heads", "cache": str(Path(cfg.cache).resolve()), "cache_fingerprint": fp, "seed": cfg.seed,
              "versions": R.versions()}
    static = {**header, "config": cfg.to_dict(), "in_dim": d, "embedding_size": cfg.embedding_size,
              "train_classes": [int(c) for c in train_classes], "format": R.CHECKPOINT_FORMAT,
              "dataset": info.dataset}

    def write_config(status: str, done: int) -> None:
        R.atomic_write_json({**header, "config": cfg.to_dict(), "status": status, "epochs_done": done,
                             "dataset": info.dataset}, out / R.CONFIG_FILE)

    def save(done: int, finished: bool) -> None:
        latest_model, latest_loss = _cpu_state(model.state_dict()), _cpu_state(loss_fn.state_dict())
        reported = best if (cfg.val_classes and best is not None) else None
        rng = {"sampler": gen_cpu.get_state(), "noise": gen_dev.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        R.atomic_torch_save({
            **static,
            "model": reported["model"] if reported else latest_model,
            "loss": reported["loss"] if reported else latest_loss,
            "epoch": reported["epoch"] if reported else done,
            "selection": "val" if cfg.val_classes else "last",
            "epochs_done": done,
            "finished": finished,
            "resume": {"model": latest_model, "loss": latest_loss, "optimizer": _cpu_state(optimizer.state_dict()),
                       "rng": rng,
                       "best": None if best is None else {"epoch": best["epoch"],
                                                          "val_recall@1": best["val_recall@1"]}},
        }, out / R.HEADS_FILE)

    write_config("running", start_epoch)
    feats = torch.from_numpy(np.ascontiguousarray(train.features)).to(device)
    labels_dev = torch.from_numpy(y_mapped.astype(np.int64)).to(device)

    def to_t(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)

    test_t = to_t(test_x) if test_x is not None else None
    val_t = to_t(val_x) if val_x is not None else None
    if callback:
        callback(FitEvent("start", start_epoch, cfg.epochs, 0, steps))
    log.info("fit-heads: %d train images x %d views x %d-D, %d classes, %s loss%s, %d epochs x %d steps on %s",
             n, p, d, n_classes, cfg.loss.value, "" if cfg.dvml else " (no DVML)", cfg.epochs, steps, device)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        views = torch.randint(p, (n,), generator=gen_cpu).to(device)
        batches = sampler.epoch().to(device)
        sums = torch.zeros(len(TERMS), device=device)
        finite = torch.ones(steps, dtype=torch.bool, device=device)
        model.train()
        step = 0
        try:
            for step in range(steps):
                idx = batches[step]
                x = feats[idx, views[idx]].float()
                y = labels_dev[idx]
                lam = cfg.lambdas(epoch + step / steps)
                heads_out = model(x, samples=cfg.samples, stop_recon_grad=lam.stop_recon_grad, generator=gen_dev)
                terms = loss_fn(heads_out, x, y, lam)
                optimizer.zero_grad(set_to_none=True)
                terms["total"].backward()
                optimizer.step()
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
            first = int(bad[0]) + 1
            raise DvmlError(f"non-finite loss at epoch {epoch + 1}, step {first} of {steps} ({cfg.loss.value}, "
                            f"lr {cfg.lr}); the last good checkpoint (epoch {epoch}) is kept in {out / R.HEADS_FILE}"
                            "; check the features for NaN/inf or lower --lr")
        means = (sums / steps).tolist()
        lam = cfg.lambdas(epoch)
        dt = time.perf_counter() - t0
        record = {"epoch": epoch + 1, "phase": lam.phase if cfg.dvml else 0,
                  **{k: float(v) for k, v in zip(TERMS, means, strict=True)},
                  "lambda_kl": lam.kl if cfg.dvml else 0.0, "seconds": round(dt, 4),
                  "samples_per_s": round(steps * cfg.batch_size / dt, 1)}
        last = epoch + 1 == cfg.epochs
        if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or last):
            model.eval()
            with torch.no_grad():
                record["test_recall@1"] = _recall_at_1(model.embed(test_t), test_y)
                if val_t is not None:
                    r1 = _recall_at_1(model.embed(val_t), val_y)
                    record["val_recall@1"] = r1
                    if best is None or r1 > best["val_recall@1"]:
                        best = {"epoch": epoch + 1, "val_recall@1": r1, "model": _cpu_state(model.state_dict()),
                                "loss": _cpu_state(loss_fn.state_dict())}
        R.append_log(out, record)
        save(epoch + 1, finished=last)
        if callback:
            callback(FitEvent("epoch", epoch + 1, cfg.epochs, steps, steps, record))
    if start_epoch >= cfg.epochs:
        log.info("%s: already trained for %d epochs", out, start_epoch)
        if ckpt is not None and not ckpt.get("finished"):
            save(start_epoch, finished=True)
    write_config("finished", max(start_epoch, cfg.epochs))
    if callback:
        callback(FitEvent("end", cfg.epochs, cfg.epochs, steps, steps))
    log.info("fit-heads done in %.1fs: %s", time.perf_counter() - t_start, out)
    return out

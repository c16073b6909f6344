"""What the always-on diagnostics of issue 14 cost a heads fit, measured in one process, alternating.

On the CUB-sized cache of ``bench/fit_heads.py`` (generated there; pass ``--cache``), for the DVML default, the
paper's settings and the baseline: the median time of one training step, of one step with a gradient sample
(``dvml.heads.diagnostics.step_gradients``: extra partial backward passes, and the loss on each half of the
T draws) and of one per-epoch branch-statistics
call on 2,048 images, timed rep after rep so that all see the same machine load. Prints the projected
samples/s ratio with vs without diagnostics for an epoch of 49 steps with 2 gradient samples (DVML; the
baseline samples none).

    python bench/diagnostics_cost.py --cache /tmp/dvml-bench/cub-sized-synth.h5 [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from dvml.cache import load_split
from dvml.heads import DVMLHeads, DVMLLoss, FitConfig
from dvml.heads import diagnostics as diag
from dvml.losses import make_metric_loss

CONFIGS = {"default": {}, "paper": dict(reduction="mean", likelihood="l2", variance_space="raw",
                                         variance_scale="unit"), "baseline": dict(dvml=False)}


def measure(cache: str, name: str, reps: int) -> str:
    train = load_split(cache, "train", views=[0])
    lab = torch.from_numpy(train.labels)
    cfg = FitConfig(cache=cache, out="unused", phase2_epoch=0, kl_warmup_epochs=0, **CONFIGS[name])
    classes = torch.unique(lab)[: cfg.classes_per_batch]
    idx = torch.cat([torch.nonzero(lab == c).flatten()[: cfg.per_class] for c in classes])
    x = torch.from_numpy(train.features[idx.numpy(), 0]).float()
    y = torch.searchsorted(classes, lab[idx])
    torch.manual_seed(0)
    model = DVMLHeads(x.shape[1], **cfg.heads_kwargs())
    metric = make_metric_loss(cfg.loss, num_classes=len(classes), embedding_size=cfg.embedding_size)
    metric.reducer = cfg.metric_reduction
    loss_fn = DVMLLoss(metric, dvml=cfg.dvml, reduction=cfg.reduction.value, likelihood=cfg.likelihood)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    lam, g = cfg.lambdas(0), torch.Generator().manual_seed(0)
    dx = torch.from_numpy(train.features[:2048, 0]).float()
    dy = torch.from_numpy(np.unique(train.labels[:2048], return_inverse=True)[1])

    def step(with_grad: bool = False) -> None:
        out = model(x, samples=cfg.samples, stop_recon_grad=lam.stop_recon_grad, generator=g, labels=y)
        terms = loss_fn(out, x, y, lam)
        if with_grad:
            diag.step_gradients(loss_fn, out, x, y, lam, terms, [model.embedding.weight, model.embedding.bias])
        opt.zero_grad()
        terms["total"].backward()
        opt.step()

    def stats() -> None:
        diag.heads_branch_stats(model, dx, dy, samples=2, generator=torch.Generator().manual_seed(1))

    fns = {"step": step, "step+grad": lambda: step(True), "stats": stats}
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    m = {k: statistics.median(v) for k, v in times.items()}
    steps, samples = 49, (2 if cfg.dvml else 0)
    epoch = steps * m["step"]
    extra = samples * (m["step+grad"] - m["step"]) + m["stats"]
    ratio = epoch / (epoch + extra)
    return (f"{name:8s} step {1e3 * m['step']:.1f} ms, gradient sample +{1e3 * (m['step+grad'] - m['step']):.1f} "
            f"ms, branch stats {1e3 * m['stats']:.1f} ms: samples/s with / without diagnostics {ratio:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    for name in CONFIGS:
        print(measure(args.cache, name, args.reps), flush=True)


if __name__ == "__main__":
    main()

"""fit-heads speed on a CUB-sized cache: seconds/epoch, samples/s, and how close DVML's step runs to its matmuls.

Cache: a ``dvml synth`` world the size of CUB-200-2011's training split (100 train classes x 59 images = 5,900
images x 10 views x 1024, float16; 100 test classes), generated once into ``--work`` and reused.

Measured side by side in one process, with the paper's defaults (E = 512, T = 20, decoder 512, triplet batch
120 = 30 classes x 4, Adam):

* ``dvml``:     DVML + triplet (all four terms, T draws through the decoder, phase 1 then phase 2);
* ``baseline``: ``--no-dvml`` triplet (the same embedding layer, Lm(z_I) only);
* ``matmuls``:  the dense matrix products one DVML step contains, timed alone with the same shapes: forward
  and both backward products of the three encoder layers (B x D x E each), of the decoder's two layers
  (T·B x E x H, T·B x H x D), and of the batched distance matrices of Lm(ẑ) (T x B x E x B) and Lm(z_I).
  For the ratio, single DVML training steps (the library's model, loss and fused Adam on a real batch of the
  cache, phase 2) and the matmul set are timed *alternately*, rep after rep, so both see the same machine load.

Prints per-epoch times, medians, samples/s, the ratio dvml step / matmul time (1.0 = every cycle spent in
the unavoidable matmuls), the baseline's cost relative to DVML, and the projected time of a default fit.

    python bench/fit_heads.py [--device auto|cpu|cuda|mps] [--epochs 2] [--work DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dvml.cache import load_split, read_info
from dvml.extract.synth import SynthConfig, generate
from dvml.heads import DVMLHeads, DVMLLoss, FitConfig, fit
from dvml.heads.train import resolve_device
from dvml.losses import make_metric_loss

SYNTH = SynthConfig(n_classes=200, images_per_class=59, views=10)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def cub_cache(work: Path) -> Path:
    path = work / "cub-sized-synth.h5"
    if path.exists():
        try:
            info = read_info(path)
            if info.extra.get("synth", {}).get("images_per_class") == SYNTH.images_per_class:
                return path
        except Exception:  # noqa: BLE001 - stale or partial file: regenerate
            pass
    t0 = time.perf_counter()
    generate(SYNTH, path, overwrite=True)
    print(f"generated {path} in {time.perf_counter() - t0:.1f}s")
    return path


def time_fit(cache: Path, out: Path, device: str, epochs: int, **kw) -> tuple[list[float], int, int]:
    """Run a fit; returns (wall seconds of each epoch, steps per epoch, batch size)."""
    stamps: list[float] = []
    steps = {"n": 0}

    def cb(ev):
        if ev.kind == "start":
            steps["n"] = ev.steps
            stamps.append(time.perf_counter())
        elif ev.kind == "epoch":
            stamps.append(time.perf_counter())

    kw = {"phase2_epoch": max(1, epochs // 2), "kl_warmup_epochs": 1, **kw}  # phase 2 timed too, by default
    cfg = FitConfig(cache=cache, out=out, device=device, epochs=epochs, eval_every=0, overwrite=True, **kw)
    fit(cfg, callback=cb)
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)], steps["n"], cfg.batch_size


def matmul_set(device: torch.device, b: int, d: int, e: int, h: int, t: int):
    """(run once, GFLOP): the dense products of one DVML step with their shapes (forward + both backward)."""
    g = torch.Generator(device=device).manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, device=device, generator=g)

    # (m, k, n) of each C = A(m×k)·B(k×n) in the step; backward adds dA = dC·Bᵀ and dB = Aᵀ·dC
    mms = [(b, d, e)] * 3 + [(t * b, e, h), (t * b, h, d)]
    bmms = [(t, b, e, b), (1, b, e, b)]  # distance matrices of Lm(ẑ) and Lm(z_I)
    tensors = []
    for m, k, n in mms:
        tensors.append(("mm", r(m, k), r(k, n), r(m, n)))
    for bt, m, k, n in bmms:
        tensors.append(("bmm", r(bt, m, k), r(bt, k, n), r(bt, m, n)))
    flops = sum(3 * 2 * m * k * n for m, k, n in mms) + sum(3 * 2 * bt * m * k * n for bt, m, k, n in bmms)

    def once():
        for kind, a, bb, gc in tensors:
            if kind == "mm":
                a @ bb
                gc @ bb.T
                a.T @ gc
            else:
                torch.bmm(a, bb)
                torch.bmm(gc, bb.transpose(1, 2))
                torch.bmm(a.transpose(1, 2), gc)

    return once, flops / 1e9


def dvml_step(cache: Path, device: torch.device):
    """One training step of DVML + triplet with the paper's shapes, as ``fit`` runs it (phase 2)."""
    cfg = FitConfig(cache=cache, out="unused", phase2_epoch=0, kl_warmup_epochs=0)
    train = load_split(cache, "train", views=[0])
    labels = torch.from_numpy(train.labels)
    classes = torch.unique(labels)[: cfg.classes_per_batch]
    idx = torch.cat([torch.nonzero(labels == c).flatten()[: cfg.per_class] for c in classes])
    x = torch.from_numpy(train.features[idx.numpy(), 0]).to(device)
    y = torch.searchsorted(classes, labels[idx]).to(device)
    torch.manual_seed(0)
    model = DVMLHeads(x.shape[1], **cfg.heads_kwargs()).to(device)
    metric = make_metric_loss(cfg.loss, num_classes=len(classes), embedding_size=cfg.embedding_size)
    metric.reducer = cfg.metric_reduction
    loss_fn = DVMLLoss(metric, reduction=cfg.reduction.value, likelihood=cfg.likelihood).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    gen = torch.Generator(device=device).manual_seed(0)
    lam = cfg.lambdas(0)

    def step():
        out = model(x, samples=cfg.samples, stop_recon_grad=lam.stop_recon_grad, generator=gen, labels=y)
        total = loss_fn(out, x, y, lam)["total"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    return step


def alternate(fns: dict, device: torch.device, reps: int) -> dict[str, list[float]]:
    """Time each fn once per rep, alternating, after 3 warm-up calls each."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    ap.add_argument("--epochs", type=int, default=2, help="epochs timed per configuration (after a warm-up one)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dvml-bench",
                    help="where the cache and run dirs go (the cache is reused)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--reps", type=int, default=10, help="alternating step / matmul repetitions for the ratio")
    ap.add_argument("--default-epochs", type=int, default=FitConfig.epochs, help="for the projected fit time")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    device = resolve_device(FitConfig(cache="x", out="x", device=args.device).device)
    cache = cub_cache(args.work)
    info = read_info(cache)
    d = info.feature_dim
    e = FitConfig.embedding_size
    h = FitConfig.decoder_hidden
    t = FitConfig.samples
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({where}), torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    print(f"cache {cache}: train {info.splits['train'].n} x {info.splits['train'].views} x {d}")

    results = {}
    for name, kw in (("dvml", {}), ("baseline", {"dvml": False})):
        epoch_s, steps, bs = time_fit(cache, args.work / f"run-{name}", args.device, 1 + args.epochs, **kw)
        timed = epoch_s[1:]  # the first epoch warms up allocators / kernels
        med = statistics.median(timed)
        results[name] = (med, steps, bs)
        print(f"{name:9s} epochs {', '.join(f'{s:.2f}' for s in epoch_s)} s (first = warm-up) | median "
              f"{med:.2f} s/epoch, {steps} steps x {bs} = {steps * bs / med:,.0f} samples/s, "
              f"{1e3 * med / steps:.1f} ms/step")
    med, steps, bs = results["dvml"]
    mm_once, gflop = matmul_set(device, bs, d, e, h, t)
    times = alternate({"step": dvml_step(cache, device), "matmuls": mm_once}, device, args.reps)
    step_s, mm_s = statistics.median(times["step"]), statistics.median(times["matmuls"])
    per_rep = [a / b for a, b in zip(times["step"], times["matmuls"], strict=True)]
    print(f"step      one DVML step alone: median {1e3 * step_s:.1f} ms "
          f"(in fit: {1e3 * med / steps:.1f} ms incl. batch gather, logging, checkpoint share)")
    print(f"matmuls   of one DVML step (B={bs}, D={d}, E={e}, H={h}, T={t}): median {1e3 * mm_s:.1f} ms, "
          f"{gflop:.1f} GFLOP ({gflop / mm_s:,.0f} GFLOP/s)")
    print(f"ratio     DVML step / its matmuls: {step_s / mm_s:.2f} (medians; per-rep median "
          f"{statistics.median(per_rep):.2f}, range {min(per_rep):.2f}-{max(per_rep):.2f}); 1.00 = at the "
          "dense-matmul limit")
    print(f"ratio     DVML epoch / baseline epoch: {med / results['baseline'][0]:.1f}")
    print(f"projected default fit ({args.default_epochs} epochs): DVML {args.default_epochs * med:.0f} s, "
          f"baseline {args.default_epochs * results['baseline'][0]:.0f} s (excluding load and checkpoint I/O "
          "variance)")


if __name__ == "__main__":
    main()

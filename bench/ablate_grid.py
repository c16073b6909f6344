"""Stacked vs one-by-one ablation grids, side by side in one run (``dvml ablate --stack`` / ``--no-stack``).

1. **Demo grid**: ``dvml demo``'s world and schedule (2 losses x {baseline, DVML} x 2 seeds = 8 cells, 40 epochs),
   the whole ablation (fits and evaluation) run ``--repeats`` times per path, the two paths interleaved (the order
   alternating) because the machine is shared; prints each run's wall time, the medians and their ratio.
2. **CUB-sized grid**: a synth cache with CUB-200's training shape (100 classes x 59 images = 5,900, 1024-D
   features, ``--cub-views`` views) and the paper's heads (E 512, decoder 512, T 20, batch 120/128); 3 losses x
   {baseline, DVML} x ``--cub-seeds`` seeds; each fit is timed over its first ``--cub-steps`` training steps (a
   full epoch is 48-49 steps and the default schedule 60 epochs: on 2 CPU cores the table takes hours), without
   the per-epoch diagnostics and gradient statistics; prints the seconds per step of both paths, per loss and
   method, and the 60-epoch time per cell and of the table they extrapolate to.

Usage: ``python bench/ablate_grid.py [--repeats 3] [--cub-steps 4] [--cub-seeds 5] [--skip-demo] [--skip-cub]
[--device cpu]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from dvml.cache import load_split
from dvml.experiments import ablate, demo
from dvml.extract.synth import SynthConfig, generate
from dvml.heads.config import FitConfig
from dvml.heads.stacked import StackedFit
from dvml.heads.train import _HeadsFit


def demo_grid(root: Path, repeats: int, device: str) -> None:
    dcfg = demo.DemoConfig(out=root / "demo", fit={"device": device})
    demo.world(dcfg)
    base = dcfg.ablation()
    times: dict[bool, list[float]] = {True: [], False: []}
    fits: dict[bool, list[float]] = {True: [], False: []}
    r1: dict[bool, list[float]] = {True: [], False: []}
    print(f"demo grid: {len(base.cells())} cells ({', '.join(base.losses)} x base/DVML x seeds {base.seeds}), "
          f"{base.fit['epochs']} epochs, device {device}")
    for rep in range(repeats):
        for stack in ((True, False) if rep % 2 == 0 else (False, True)):
            cfg = ablate.AblateConfig(cache=base.cache, out=root / f"demo-{'stack' if stack else 'one'}-{rep}",
                                      losses=base.losses, seeds=base.seeds, fit=base.fit, stack=stack)
            t0 = time.perf_counter()
            result = ablate.run(cfg)
            dt = time.perf_counter() - t0
            times[stack].append(dt)
            fits[stack].append(sum(r["fit_seconds"] for r in result["rows"]))
            r1[stack].append(statistics.mean(r["recall@1"] for r in result["rows"]))
            print(f"  run {rep + 1} {'stacked   ' if stack else 'one-by-one'}: {dt:6.1f} s wall "
                  f"(fits {fits[stack][-1]:6.1f} s), mean Recall@1 {100 * r1[stack][-1]:.2f}", flush=True)
    ms, mo = statistics.median(times[True]), statistics.median(times[False])
    fs, fo = statistics.median(fits[True]), statistics.median(fits[False])
    print(f"demo grid medians over {repeats} runs: stacked {ms:.1f} s, one-by-one {mo:.1f} s wall -> {mo / ms:.2f}x "
          f"(fits alone: {fs:.1f} s vs {fo:.1f} s -> {fo / fs:.2f}x)")


def cub_grid(root: Path, steps: int, seeds: int, views: int, device: str, stack_size: int) -> None:
    path = generate(SynthConfig(n_classes=200, images_per_class=59, views=views, feature_dim=1024, class_dim=128,
                                variation_dim=32, hidden_dim=256, seed=0), root / "cub.h5")
    train = load_split(path, "train")
    n, p, d = train.features.shape
    print(f"CUB-sized grid: {n} train images x {p} views x {d}-D, {len(set(train.labels.tolist()))} classes, the "
          f"paper's heads (E 512, decoder 512, T 20, batch 120 / 128); 3 losses x base/DVML x {seeds} seeds; each fit "
          f"timed over its first {steps} steps (no diagnostics), stacks of up to {stack_size}, device {device}")
    print(f"  {'loss':12s} {'method':6s} {'one-by-one s/step':>18s} {'stacked s/step':>15s} {'ratio':>6s} "
          f"{'per cell at 60 epochs: one-by-one':>34s} {'stacked':>8s}")
    tot = {True: 0.0, False: 0.0}
    for loss in ("triplet", "npair", "triplet-dws"):
        for dvml in (False, True):
            kw = {"cache": path, "loss": loss, "dvml": dvml, "eval_every": 0, "device": device, "diag_images": 0,
                  "grad_every": 0}
            cfgs = {tag: [FitConfig(out=root / f"cub-{loss}-{dvml}-{s}-{tag}", seed=s, overwrite=True, **kw)
                          for s in range(seeds)] for tag in ("st", "one")}
            t0 = time.perf_counter()
            for i in range(0, seeds, stack_size):
                sf = StackedFit(cfgs["st"][i:i + stack_size], train)
                sf.steps = steps
                sf._epoch(0, None)
            ts = (time.perf_counter() - t0) / seeds / steps
            t0 = time.perf_counter()
            for c in cfgs["one"]:
                f = _HeadsFit(c, train, None)
                per_epoch = f.steps
                f.steps = steps
                f._epoch(0, None)
            to = (time.perf_counter() - t0) / seeds / steps
            tot[True] += ts * seeds * per_epoch * 60
            tot[False] += to * seeds * per_epoch * 60
            print(f"  {loss:12s} {'DVML' if dvml else 'base':6s} {to:18.3f} {ts:15.3f} {to / ts:6.2f} "
                  f"{to * per_epoch * 60 / 60:31.1f} min {ts * per_epoch * 60 / 60:5.1f} min", flush=True)
    print(f"CUB-sized table ({6 * seeds} cells, 60 epochs each, extrapolated from the steps timed; setup and "
          f"evaluation not included): stacked {tot[True] / 60:.0f} min, one-by-one {tot[False] / 60:.0f} min -> "
          f"{tot[False] / tot[True]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cub-steps", type=int, default=4)
    ap.add_argument("--cub-seeds", type=int, default=5)
    ap.add_argument("--cub-views", type=int, default=3)
    ap.add_argument("--stack-size", type=int, default=8)
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--skip-cub", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = a.dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        if not a.skip_demo:
            demo_grid(root, a.repeats, a.device)
        if not a.skip_cub:
            cub_grid(root, a.cub_steps, a.cub_seeds, a.cub_views, a.device, a.stack_size)


if __name__ == "__main__":
    main()

"""Stacked vs one-by-one ablation grids, side by side in one run (``dvml ablate --stack`` / ``--no-stack``).

1. **Demo grid**: ``dvml demo``'s world and schedule (2 losses x {baseline, DVML} x 2 seeds = 8 cells, 40 epochs),
   the whole ablation (fits and evaluation) run ``--repeats`` times per path, the two paths interleaved (the order
   alternating) because the machine is shared; prints each run's wall and CPU time, each pair's ratio, the medians
   and their ratio.
2. **CUB-sized grid**: a synth cache with CUB-200's training shape (100 classes x 59 images = 5,900, 1024-D
   features, ``--cub-views`` views) and the paper's heads (E 512, decoder 512, T 20, batch 120/128); 3 losses x
   {baseline, DVML} x ``--cub-seeds`` seeds, each fit ``--cub-epochs`` epochs (the default schedule is 60; the
   time per epoch is what scales), fits only (no evaluation, no watch-only Recall@1); prints the seconds per cell
   and per cell-epoch of both paths, per loss and method.

Usage: ``python bench/ablate_grid.py [--repeats 3] [--cub-epochs 1] [--cub-seeds 5] [--skip-cub] [--device cpu]``.
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
from dvml.heads.stacked import fit_stacked
from dvml.heads.train import fit


def demo_grid(root: Path, repeats: int, device: str) -> None:
    dcfg = demo.DemoConfig(out=root / "demo", fit={"device": device})
    demo.world(dcfg)
    base = dcfg.ablation()
    times: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}  # this process's CPU seconds: less sensitive to sharing
    fits: dict[bool, list[float]] = {True: [], False: []}
    r1: dict[bool, list[float]] = {True: [], False: []}
    print(f"demo grid: {len(base.cells())} cells ({', '.join(base.losses)} x base/DVML x seeds {base.seeds}), "
          f"{base.fit['epochs']} epochs, device {device}")
    for rep in range(repeats):
        for stack in ((True, False) if rep % 2 == 0 else (False, True)):
            cfg = ablate.AblateConfig(cache=base.cache, out=root / f"demo-{'stack' if stack else 'one'}-{rep}",
                                      losses=base.losses, seeds=base.seeds, fit=base.fit, stack=stack)
            t0, c0 = time.perf_counter(), time.process_time()
            result = ablate.run(cfg)
            dt = time.perf_counter() - t0
            times[stack].append(dt)
            cpu[stack].append(time.process_time() - c0)
            fits[stack].append(sum(r["fit_seconds"] for r in result["rows"]))
            r1[stack].append(statistics.mean(r["recall@1"] for r in result["rows"]))
            print(f"  run {rep + 1} {'stacked   ' if stack else 'one-by-one'}: {dt:6.1f} s wall "
                  f"(fits {fits[stack][-1]:6.1f} s, {cpu[stack][-1]:6.1f} s CPU), mean Recall@1 "
                  f"{100 * r1[stack][-1]:.2f}", flush=True)
        print(f"  run {rep + 1} ratio (one-by-one / stacked): wall {times[False][-1] / times[True][-1]:.2f}x, CPU "
              f"{cpu[False][-1] / cpu[True][-1]:.2f}x", flush=True)
    ms, mo = statistics.median(times[True]), statistics.median(times[False])
    fs, fo = statistics.median(fits[True]), statistics.median(fits[False])
    cs, co = statistics.median(cpu[True]), statistics.median(cpu[False])
    print(f"demo grid medians over {repeats} runs: stacked {ms:.1f} s, one-by-one {mo:.1f} s wall -> {mo / ms:.2f}x "
          f"(fits alone: {fs:.1f} s vs {fo:.1f} s -> {fo / fs:.2f}x; CPU {cs:.1f} s vs {co:.1f} s -> {co / cs:.2f}x)")


def cub_grid(root: Path, epochs: int, seeds: int, views: int, device: str, stack_size: int) -> None:
    path = generate(SynthConfig(n_classes=200, images_per_class=59, views=views, feature_dim=1024, class_dim=128,
                                variation_dim=32, hidden_dim=256, seed=0), root / "cub.h5")
    train = load_split(path, "train")
    n, p, d = train.features.shape
    print(f"CUB-sized grid: {n} train images x {p} views x {d}-D, {len(set(train.labels.tolist()))} classes; "
          f"3 losses x base/DVML x {seeds} seeds, {epochs} epoch(s) per fit (default schedule: 60), fits only, "
          f"stacks of up to {stack_size}, device {device}")
    print(f"  {'loss':12s} {'method':8s} {'one-by-one s/cell':>18s} {'stacked s/cell':>15s} {'ratio':>6s}")
    tot = {True: 0.0, False: 0.0}
    for loss in ("triplet", "npair", "triplet-dws"):
        for dvml in (False, True):
            kw = {"cache": path, "loss": loss, "dvml": dvml, "epochs": epochs, "eval_every": 0, "device": device}
            cfgs = [FitConfig(out=root / f"cub-{loss}-{dvml}-{s}-{tag}", seed=s, **kw)
                    for tag in ("st", "one") for s in range(seeds)]
            st, one = cfgs[:seeds], cfgs[seeds:]
            t0 = time.perf_counter()
            for i in range(0, seeds, stack_size):
                chunk = st[i:i + stack_size]
                if len(chunk) > 1:
                    fit_stacked(chunk, train=train)
                else:
                    fit(chunk[0], train=train)
            ts = (time.perf_counter() - t0) / seeds
            t0 = time.perf_counter()
            for c in one:
                fit(c, train=train)
            to = (time.perf_counter() - t0) / seeds
            tot[True] += ts * seeds
            tot[False] += to * seeds
            print(f"  {loss:12s} {'DVML' if dvml else 'base':8s} {to / epochs:15.2f}/ep {ts / epochs:12.2f}/ep "
                  f"{to / ts:6.2f}x", flush=True)
    cells = 6 * seeds
    print(f"CUB-sized grid, {cells} cells x {epochs} epoch(s): stacked {tot[True]:.1f} s, one-by-one "
          f"{tot[False]:.1f} s "
          f"-> {tot[False] / tot[True]:.2f}x; at the default 60 epochs about {tot[True] * 60 / epochs / 60:.0f} vs "
          f"{tot[False] * 60 / epochs / 60:.0f} min")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cub-epochs", type=int, default=1)
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
            cub_grid(root, a.cub_epochs, a.cub_seeds, a.cub_views, a.device, a.stack_size)


if __name__ == "__main__":
    main()

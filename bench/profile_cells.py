"""Where a demo cell's time goes, one by one and stacked: arithmetic vs per-step overhead vs evaluation.

Fits the demo's triplet cells (baseline and DVML; the demo's world and fit options, ``--epochs`` epochs instead of
40) one by one (seed 0) and as a stack of the grid's two seeds, then evaluates them as the ablation does; prints
each phase's wall time (fit, its per-epoch diagnostics and watch-only Recall@1, checkpoint writing, the cell's
evaluation) from cProfile, and, from ``torch.profiler`` over the training steps, the share of the aten operators'
self time that is matrix arithmetic (mm/bmm/addmm/baddbmm), the optimizer, noise/negative sampling and the rest,
and the time outside any operator (Python).

Usage: ``OMP_NUM_THREADS=1 python bench/profile_cells.py [--epochs 4] [--loss triplet]``.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import pstats
import tempfile
import time
from pathlib import Path

import torch

from dvml.cache import load_split
from dvml.experiments import ablate, demo
from dvml.heads.stacked import StackedFit
from dvml.heads.train import fit

MATMUL = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"}
OPTIM = {"aten::_fused_adam_", "aten::_fused_adam"}
RNG = {"aten::normal_", "aten::randn", "aten::multinomial", "aten::randint", "aten::randperm"}
#: the phases reported from cProfile: the function whose cumulative time is the phase
RUNS = itertools.count()  # a fresh run directory per fit
TOP = [0]  # --top: how many of the heaviest operators to list
PHASES = {"steps": "_epoch", "diagnostics": "_diagnostics", "grad stats": "step_gradients",
          "recall@1 watch": "_recall_at_1", "save": "save", "evaluate cell": "_evaluate_cell"}


def op_shares(prof) -> dict[str, float]:
    out = {"matmul": 0.0, "optimizer": 0.0, "rng": 0.0, "other ops": 0.0}
    for e in prof.key_averages():
        if e.key.startswith("ProfilerStep") or not e.key.startswith("aten::"):
            continue
        s = e.self_cpu_time_total / 1e6
        key = "matmul" if e.key in MATMUL else "optimizer" if e.key in OPTIM else "rng" if e.key in RNG else \
            "other ops"
        out[key] += s
    return out


def phases(stats: pstats.Stats) -> dict[str, float]:
    out = dict.fromkeys(PHASES, 0.0)
    for (_, _, name), (_, _, _, cum, _) in stats.stats.items():
        for phase, fn in PHASES.items():
            if name == fn:
                out[phase] += cum
    return out


def run(label: str, members: int, body) -> None:
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    body(profile=False)
    prof.disable()
    wall = time.perf_counter() - t0
    ph = phases(pstats.Stats(prof))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
        t1 = time.perf_counter()
        body(profile=True)
        twall = time.perf_counter() - t1
    ops = op_shares(tp)
    if TOP[0]:
        rows = sorted((e for e in tp.key_averages() if e.key.startswith("aten::")),
                      key=lambda e: -e.self_cpu_time_total)[:TOP[0]]
        print("    top ops: " + ", ".join(f"{e.key[6:]} {e.self_cpu_time_total / 1e6:.2f}" for e in rows))
    per = f"per cell {wall / members:6.2f} s"
    print(f"{label:28s} wall {wall:6.2f} s ({per}); " + ", ".join(f"{k} {v:5.2f}" for k, v in ph.items()))
    total_ops = sum(ops.values())
    print(f"{'':28s} steps under torch.profiler {twall:6.2f} s: " + ", ".join(
        f"{k} {v:5.2f} s ({100 * v / twall:.0f}%)" for k, v in ops.items())
        + f", outside ops {twall - total_ops:5.2f} s ({100 * (twall - total_ops) / twall:.0f}%)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--loss", default="triplet")
    ap.add_argument("--top", type=int, default=0, help="list the heaviest operators of each profile")
    args = ap.parse_args()
    TOP[0] = args.top
    root = Path(tempfile.mkdtemp(prefix="dvml-prof-"))
    dcfg = demo.DemoConfig(out=root / "demo", fit={"device": "cpu"})
    demo.world(dcfg)
    base = dcfg.ablation()
    cfg = ablate.AblateConfig(cache=base.cache, out=root / "ab", losses=(args.loss,), seeds=base.seeds,
                              fit={**base.fit, "epochs": args.epochs, "eval_every": args.epochs})
    train, test = load_split(cfg.cache, "train"), load_split(cfg.cache, "test")
    print(f"demo world, {args.loss}, {args.epochs} epochs, torch threads {torch.get_num_threads()}")
    for dvml in (False, True):
        method = "dvml" if dvml else "base"
        cells = [c for c in cfg.cells() if c.dvml == dvml and c.method.value in ("base", "dvml")]

        def one(profile: bool, cells=cells) -> None:
            cell = cells[0]
            run_dir = root / f"one-{cell.name}-{next(RUNS)}"
            fit(ablate._fit_config(cfg, cell, run_dir), train=train, test=test)
            if not profile:
                ablate._evaluate_cell(cfg, cell, run_dir, 0.0)

        def stacked(profile: bool, cells=cells) -> None:
            k = next(RUNS)
            fcs = [ablate._fit_config(cfg, c, root / f"st-{c.name}-{k}") for c in cells]
            StackedFit(fcs, train, test).train()
            if not profile:
                for c, fc in zip(cells, fcs, strict=True):
                    ablate._evaluate_cell(cfg, c, fc.out, 0.0)

        one(profile=True)  # warm-up: first calls, allocator
        run(f"{args.loss} {method} one-by-one", 1, one)
        run(f"{args.loss} {method} stacked x{len(cells)}", len(cells), stacked)


if __name__ == "__main__":
    main()

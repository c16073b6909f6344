"""Extraction throughput with 1 and N ranks (``torchrun -m dvml extract``, gloo on the CPU), side by side.

Generates a folder of CUB-sized JPEGs (``bench/extract.py``'s ``make_folder``) and runs, alternating, ``--reps``
times each, as separate commands into fresh outputs:

* ``1 rank x T threads``: ``python -m dvml extract folder ...`` with ``OMP_NUM_THREADS=T`` (``--threads``);
* ``1 rank x N*T threads``: the same process given the threads the N ranks have together;
* ``N ranks x T threads``: ``torchrun --standalone --nproc-per-node N -m dvml extract ...`` (torchrun sets one
  thread per rank unless ``OMP_NUM_THREADS`` is given; it is given as T).

Reported per configuration: the median wall time of the whole command (interpreter and torch start-up, model
build, shards and merge included) and images/s over it, and the ratio to ``1 rank x T threads``. Every output's
fingerprint is printed: N ranks x T threads must match 1 rank x T threads (the sharded cache is the
single-process cache); another thread count may give sums that differ in the last bit (oneDNN splits them by thread).
"in run()" is the time ``dvml.extract.run`` itself logs in the process that wrote OUT (the single process, or the
merging rank: its shard, the wait for nobody, the merge), i.e. without interpreter and torch start-up.
On a shared machine the figures move with the other processes' load; the medians and the side-by-side order
are there to keep the comparison fair, not to make it exact.

    python bench/extract_scaling.py --images 64 --views 2 --crop 112 --reps 3
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _make_folder():
    spec = importlib.util.spec_from_file_location("bench_extract", Path(__file__).with_name("extract.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="images in the folder (half train, half test classes)")
    ap.add_argument("--views", type=int, default=2, help="views per training image")
    ap.add_argument("--resize", type=int, default=128)
    ap.add_argument("--crop", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()

    from dvml.cache import fingerprint

    work = args.dir or Path(tempfile.mkdtemp(prefix="dvml-scaling-"))
    root = _make_folder()(work / "images", args.images)
    common = ["extract", "folder", "--root", str(root), "--weights", "none", "--resize", str(args.resize),
              "--crop", str(args.crop), "--views", str(args.views), "--batch-size", str(args.batch_size),
              "--workers", "0", "--device", "cpu"]
    n, t = args.ranks, args.threads
    configs = {
        f"1 rank x {t} thread(s)": ([sys.executable, "-m", "dvml"], t),
        f"1 rank x {n * t} thread(s)": ([sys.executable, "-m", "dvml"], n * t),
        f"{n} ranks x {t} thread(s)": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc-per-node", str(n), "-m", "dvml"], t),
    }
    times: dict[str, list[float]] = {k: [] for k in configs}
    inrun: dict[str, list[float]] = {k: [] for k in configs}
    prints: dict[str, set[str]] = {k: set() for k in configs}
    for rep in range(args.reps):
        for name, (prefix, threads) in configs.items():
            out = work / f"out-{rep}-{len(times[name])}-{name.split()[0]}-{threads}.h5"
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "COLUMNS": "400"}  # unwrapped log lines
            t0 = time.perf_counter()
            p = subprocess.run([*prefix, *common, "--out", str(out)], env=env, capture_output=True, text=True)
            dt = time.perf_counter() - t0
            if p.returncode:
                sys.exit(f"{name} failed:\n{p.stderr[-2000:]}")
            times[name].append(dt)
            prints[name].add(fingerprint(out))
            # run()'s own time of the process that wrote OUT (single process, or the merging rank): no start-up
            found = re.findall(rf"wrote {re.escape(str(out))}: .*?([\d.]+) s\s*$", p.stderr + p.stdout, re.M)
            inrun[name].append(float(found[-1]) if found else float("nan"))
            print(f"rep {rep}: {name:<24} {dt:6.1f} s command, {inrun[name][-1]:6.1f} s in run()", flush=True)
    base = statistics.median(times[next(iter(configs))])
    print(f"\n{args.images} images ({args.images // 2} train x {args.views} views + {args.images // 2} test), "
          f"crop {args.crop}, batch {args.batch_size}, GoogLeNet random weights, CPU (gloo); {os.cpu_count()} "
          "cores visible; wall time of the whole command, median of "
          f"{args.reps}\n")
    base_run = statistics.median(inrun[next(iter(configs))])
    print(f"| configuration | command s | images/s | vs 1 rank x {t} | in run() s | images/s | vs 1 rank x {t} "
          "| fingerprint |")
    print("|---|---|---|---|---|---|---|---|")
    for name, ts in times.items():
        med, run_med = statistics.median(ts), statistics.median(inrun[name])
        print(f"| {name} | {med:.1f} | {args.images / med:.1f} | {base / med:.2f}x | {run_med:.1f} | "
              f"{args.images / run_med:.1f} | {base_run / run_med:.2f}x | {', '.join(sorted(prints[name]))} |")


if __name__ == "__main__":
    main()

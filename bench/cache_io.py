"""Cache write/read throughput on a CUB-sized cache vs numpy.save/numpy.load of the same arrays.

CUB-sized: train 5,864 x 10 views x 1024, test 5,924 x 1 x 1024, float16 (~131 MB of features).
Each repetition measures, side by side in one process on the same arrays and disk:

* ours-write: CacheWriter.append in chunks of --chunk rows + finalize (flushes after every chunk,
  the price of resumability);
* ours-read:  load_split of both splits (float16 -> float32 in memory, NaN/inf and structure checks);
* numpy-write / numpy-read: np.save / np.load of the same float16 arrays (+ labels).

MB/s counts the float16 feature bytes. Prints per-repetition figures, medians and the ratios ours/numpy.

    python bench/cache_io.py [--reps 3] [--dir /tmp] [--chunk 256]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from dvml.cache import CacheSpec, CacheWriter, load_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--chunk", type=int, default=256, help="rows per CacheWriter.append")
    ap.add_argument("--n-train", type=int, default=5864)
    ap.add_argument("--n-test", type=int, default=5924)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--dim", type=int, default=1024)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    arrays = {
        "train": (rng.random((args.n_train, args.views, args.dim), dtype=np.float32).astype(np.float16),
                  np.repeat(np.arange(100), args.n_train // 100 + 1)[: args.n_train]),
        "test": (rng.random((args.n_test, 1, args.dim), dtype=np.float32).astype(np.float16),
                 100 + np.repeat(np.arange(100), args.n_test // 100 + 1)[: args.n_test]),
    }
    mb = sum(f.nbytes for f, _ in arrays.values()) / 1e6
    spec = CacheSpec(dataset="bench", backbone="none", weights="none", feature_dim=args.dim,
                     views=tuple(f"v{i}" for i in range(args.views)), dtype="float16")
    print(f"cache: train {arrays['train'][0].shape}, test {arrays['test'][0].shape}, float16, {mb:.1f} MB features")

    results: dict[str, list[float]] = {k: [] for k in ("ours-write", "ours-read", "numpy-write", "numpy-read")}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        for rep in range(args.reps):
            path = tmp / f"cache{rep}.h5"
            t0 = time.perf_counter()
            with CacheWriter(path, spec) as w:
                for split, (feats, labels) in arrays.items():
                    for i in range(0, len(labels), args.chunk):
                        w.append(split, feats[i:i + args.chunk], labels[i:i + args.chunk])
                w.finalize()
            results["ours-write"].append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            loaded = [load_split(path, split) for split in arrays]
            results["ours-read"].append(time.perf_counter() - t0)
            assert loaded[0].features.shape == arrays["train"][0].shape

            t0 = time.perf_counter()
            for split, (feats, labels) in arrays.items():
                np.save(tmp / f"{split}{rep}_f.npy", feats)
                np.save(tmp / f"{split}{rep}_l.npy", labels)
            results["numpy-write"].append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            for split in arrays:
                np.load(tmp / f"{split}{rep}_f.npy")
                np.load(tmp / f"{split}{rep}_l.npy")
            results["numpy-read"].append(time.perf_counter() - t0)
            print(f"rep {rep}: " + "  ".join(f"{k} {mb / v[-1]:7.1f} MB/s" for k, v in results.items()))
            del loaded

    med = {k: statistics.median(v) for k, v in results.items()}
    print("\nmedian over reps (MB/s of float16 feature bytes):")
    for k, v in med.items():
        print(f"  {k:12s} {mb / v:8.1f} MB/s   ({v:.3f} s)")
    print(f"ratio write ours/numpy: {med['numpy-write'] / med['ours-write']:.2f}")
    print(f"ratio read  ours/numpy: {med['numpy-read'] / med['ours-read']:.2f}  "
          "(ours also converts to float32 and checks every value)")


if __name__ == "__main__":
    main()

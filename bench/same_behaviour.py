"""Behaviour check: the same default fits under a reference checkout and under this one give identical files.

For each loss (triplet, npair, triplet-dws, proxy-nca-pp) and each method (DVML, baseline), fits the heads with
``dvml fit-heads`` on one small ``dvml synth`` world at a short schedule, once with the reference source tree
(``--reference-src``, e.g. an unchanged main's ``src``) and once with this tree, into the same run-directory path,
then evaluates each run. Compares the sha256 of ``heads.pt``; its contents entry by entry (every tensor bit for
bit: state dicts, optimizer state, RNG states; every plain value, the recorded config included, where a field this
tree records and the reference did not have is listed as *added*, not as a difference); every field of ``log.jsonl``
but the timings (``seconds``, ``samples_per_s``); ``config.json`` as ``heads.pt``'s config (added fields listed);
and the metrics of ``dvml evaluate --json``. Prints one line per
fit and exits non-zero on any difference other than added fields.

    python bench/same_behaviour.py --reference-src /work/main/src [--work /tmp/same_behaviour] [--losses triplet]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE_SRC = Path(__file__).resolve().parents[1] / "src"
LOSSES = ("triplet", "npair", "triplet-dws", "proxy-nca-pp")
TIMING = {"seconds", "samples_per_s"}
SCHEDULE = ["--epochs", "4", "--phase2-epoch", "2", "--kl-warmup-epochs", "1", "--embedding-size", "32",
            "--decoder-hidden", "32", "--samples", "4", "--eval-every", "2", "--diag-images", "64",
            "--grad-every", "5", "--device", "cpu"]


def dvml(src: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "dvml", *args], env=env, check=True, capture_output=True)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def log_fields(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in path.read_text().splitlines() if line.strip()]


def compare(ref, this, path: str = "") -> tuple[list[str], list[str]]:
    """(paths that differ, paths only ``this`` has) between two loaded checkpoints; tensors compared bit for bit
    (dtype, shape, bytes), dicts key by key, sequences item by item, other values by ``==``."""
    import torch

    if isinstance(ref, torch.Tensor) or isinstance(this, torch.Tensor):
        same = (isinstance(ref, torch.Tensor) and isinstance(this, torch.Tensor) and ref.dtype == this.dtype
                and ref.shape == this.shape and torch.equal(ref.reshape(-1).contiguous().view(torch.uint8),
                                                            this.reshape(-1).contiguous().view(torch.uint8)))
        return ([] if same else [path]), []
    if isinstance(ref, dict) and isinstance(this, dict):
        differ = [f"{path}.{k}" for k in ref if k not in this]
        added = [f"{path}.{k}" for k in this if k not in ref]
        for k in ref:
            if k in this:
                d, a = compare(ref[k], this[k], f"{path}.{k}")
                differ += d
                added += a
        return differ, added
    if isinstance(ref, list | tuple) and isinstance(this, list | tuple) and len(ref) == len(this):
        differ, added = [], []
        for i, (r, t) in enumerate(zip(ref, this, strict=True)):
            d, a = compare(r, t, f"{path}[{i}]")
            differ += d
            added += a
        return differ, added
    return ([] if (type(ref) is type(this) and ref == this) else [path]), []


def checkpoint(path: Path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def metrics(path: Path) -> dict:
    d = json.loads(path.read_text())
    return {k: v for k, v in d.items() if isinstance(v, float | int) and k not in TIMING}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference-src", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dvml_same_behaviour"))
    ap.add_argument("--losses", default=",".join(LOSSES), help="comma-separated losses to fit (default: all four)")
    args = ap.parse_args()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cache = work / "world.h5"
    dvml(args.reference_src, "synth", str(cache), "--classes", "24", "--images-per-class", "12", "--views", "3",
         "--feature-dim", "48", "--class-dim", "24", "--variation-dim", "6", "--seed", "3")
    failures = 0
    for loss in args.losses.split(","):
        for method in ("--dvml", "--no-dvml"):
            name = f"{loss}{'' if method == '--dvml' else '-base'}"
            facts = {}
            for side, src in (("reference", args.reference_src), ("this", HERE_SRC)):
                run = work / "run"  # one path for both sides: the checkpoint records it
                shutil.rmtree(run, ignore_errors=True)
                dvml(src, "fit-heads", str(cache), "--out", str(run), "--loss", loss, method, *SCHEDULE)
                dvml(src, "evaluate", str(run), "--json", str(run / "eval.json"))
                facts[side] = (sha(run / "heads.pt"), log_fields(run / "log.jsonl"), metrics(run / "eval.json"),
                               {"heads.pt": checkpoint(run / "heads.pt"),
                                "config.json": json.loads((run / "config.json").read_text())})
                shutil.copytree(run, work / side / name)
            (h0, l0, m0, c0), (h1, l1, m1, c1) = facts["reference"], facts["this"]
            differ, added = compare(c0, c1)
            log_differ, log_added = compare(l0, l1)
            same = (not differ, not log_differ, m0 == m1)
            failures += not all(same)
            print(f"{name:20s} heads.pt bytes {'same' if h0 == h1 else 'differ'} ({h1[:12]}); "
                  f"entries {'same' if same[0] else 'DIFFERENT: ' + ', '.join(differ)}"
                  f"{' (added: ' + ', '.join(a.lstrip('.') for a in added) + ')' if added else ''}  "
                  f"log.jsonl {'same' if same[1] else 'DIFFERENT: ' + ', '.join(log_differ[:8])} ({len(l1)} records"
                  f"{'; added: ' + ', '.join(sorted({a.split('.', 1)[-1] for a in log_added})) if log_added else ''})  "
                  f"metrics {'same' if same[2] else 'DIFFERENT'} (recall@1 {m1.get('recall@1')})", flush=True)
    print("all identical" if not failures else f"{failures} fit(s) differ")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

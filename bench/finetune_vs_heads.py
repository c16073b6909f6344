"""What the feature cache buys: per-sample training cost of ``finetune`` (images → GoogLeNet → heads) vs ``fit-heads``
(cached features → heads), same loss, batch size and DVML settings, measured in one run on one device.

Both run the library's own training loops with the paper's settings: DVML + triplet, batch 120 (30 classes x 4),
E = 512, T = 20, decoder 512, Adam, phase 1; then the same pair for the ``--no-dvml`` triplet baseline (``--variants``).
Why the two differ: a finetune sample costs a GoogLeNet forward + backward at 224 px (several GFLOP) plus its
decoding; a fit-heads sample costs the heads only — about 0.1 GFLOP for DVML (T = 20 draws through the 512 → 512
→ 1024 decoder, forward and backward) and about 10 MFLOP for the baseline's one linear layer.

* ``finetune``: a CUB-format dataset of generated 500 x 375 JPEGs (30 training classes x 4 images, plus 2 test
  classes), resize 256 / random crop 224 / flip, weights ``none`` (no download; the same cost as ImageNet
  weights), frozen BN, the default DataLoader workers; AMP on CUDA. The finetune loop syncs every step, so each
  step is timed from the progress callback; the first ``--warmup`` steps are dropped.
* ``fit-heads``: a ``dvml synth`` cache (60 training classes x 40 images x 4 views x 1024, float16), whole epochs timed
  (fit-heads does not sync per step), the first epoch dropped.

The two modes are measured alternately, ``--pairs`` times (each pair: one finetune run, one fit-heads run), so
both see the same machine load; prints every pair, the medians of samples/s of each mode and the ratio (the
speed-up the cache buys per training sample), with the load average (wall-clock timings on a possibly shared
machine).

    python bench/finetune_vs_heads.py [--device auto|cpu|cuda] [--pairs 3] [--steps 3] [--warmup 1] [--epochs 3]
        [--variants dvml,baseline] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dvml.extract.synth import SynthConfig, generate
from dvml.finetune import FinetuneConfig, finetune
from dvml.heads import FitConfig
from fit_heads import time_fit  # bench/fit_heads.py (this script's directory is on sys.path)

TRAIN_CLASSES, PER_CLASS_IMAGES, TEST_CLASSES = 30, 4, 2
SYNTH = SynthConfig(n_classes=120, images_per_class=40, views=4)


def tiny_cub(root: Path, size=(500, 375)) -> Path:
    """A CUB_200_2011-format dataset of seeded smooth-noise JPEGs (written once, reused)."""
    if (root / "images.txt").exists():
        return root
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    images, labels = [], []
    classes = list(range(1, TRAIN_CLASSES + 1)) + list(range(101, 101 + TEST_CLASSES))
    for cls in classes:
        for k in range(PER_CLASS_IMAGES if cls <= 100 else 2):
            base = rng.uniform(0, 255, 3) * (0.5 + 0.5 * np.sin(xx / rng.uniform(5, 40)))[..., None]
            img = np.clip(base + rng.normal(0, 30, (h, w, 3)) + yy[..., None] * rng.uniform(-0.3, 0.3, 3), 0, 255)
            rel = f"{cls:03d}.Class_{cls}/img_{k}.jpg"
            (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.astype(np.uint8)).save(root / "images" / rel, quality=90)
            images.append(f"{len(images) + 1} {rel}")
            labels.append(f"{len(labels) + 1} {cls}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return root


def time_finetune(root: Path, out: Path, device: str, steps: int, dvml: bool) -> tuple[list[float], int]:
    """Seconds of each finetune step (callback to callback) and the batch size."""
    stamps: list[float] = []

    def cb(ev):
        if ev.kind in ("start", "step"):
            stamps.append(time.perf_counter())

    cfg = FinetuneConfig(dataset="cub", root=root, out=out, weights="none", epochs=1, steps_per_epoch=steps,
                         checkpoint_every=0, device=device, overwrite=True, dvml=dvml)
    finetune(cfg, callback=cb)
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)], cfg.batch_size


def time_fit_heads(cache: Path, out: Path, device: str, epochs: int, dvml: bool) -> tuple[list[float], int, int]:
    """Seconds of each fit-heads epoch, steps per epoch, batch size (fit-heads' default schedule: phase 1)."""
    return time_fit(cache, out, device, epochs, dvml=dvml, phase2_epoch=FitConfig.phase2_epoch,
                    kl_warmup_epochs=FitConfig.kl_warmup_epochs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    ap.add_argument("--pairs", type=int, default=3, help="alternating (finetune, fit-heads) measurements per variant")
    ap.add_argument("--steps", type=int, default=3, help="finetune steps run (the first --warmup are dropped)")
    ap.add_argument("--warmup", type=int, default=1, help="finetune steps dropped from the median")
    ap.add_argument("--epochs", type=int, default=3, help="fit-heads epochs run (the first is dropped)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dvml-bench-finetune")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--variants", default="dvml,baseline", help="comma list of dvml (DVML + triplet) and baseline "
                    "(--no-dvml triplet), each measured for both modes")
    args = ap.parse_args()
    if args.steps <= args.warmup or args.epochs < 2:
        ap.error("need --steps > --warmup and --epochs >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    from dvml.devices import resolve_device

    dev = resolve_device(args.device)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {dev} ({where}), torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")

    root = tiny_cub(args.work / "CUB_200_2011")
    cache = args.work / "synth.h5"
    if not cache.exists():
        generate(SYNTH, cache)

    n_cub = 5864
    for variant in args.variants.split(","):
        dvml = {"dvml": True, "baseline": False}[variant]
        label = "DVML + triplet" if dvml else "triplet alone (--no-dvml)"
        print(f"[{label}]")
        ft_rates, fh_rates = [], []
        for pair in range(1, args.pairs + 1):  # alternate the two modes so both see the same machine load
            ft_steps, bs_ft = time_finetune(root, args.work / f"run-finetune-{variant}", dev.type, args.steps, dvml)
            ft_med = statistics.median(ft_steps[args.warmup:])
            ft_rates.append(bs_ft / ft_med)
            ep, steps, bs_fh = time_fit_heads(cache, args.work / f"run-heads-{variant}", dev.type, args.epochs, dvml)
            fh_med = statistics.median(ep[1:])
            fh_rates.append(steps * bs_fh / fh_med)
            assert bs_ft == bs_fh, "the comparison needs the same batch size"
            print(f"  pair {pair}: finetune steps {', '.join(f'{s:.2f}' for s in ft_steps)} s (first {args.warmup} "
                  f"= warm-up), median {ft_med:.2f} s/step x {bs_ft} = {ft_rates[-1]:,.2f} samples/s | fit-heads "
                  f"epochs {', '.join(f'{s:.3f}' for s in ep)} s (first = warm-up), median {fh_med:.3f} s/epoch = "
                  f"{steps} x {bs_fh} = {fh_rates[-1]:,.0f} samples/s | ratio {fh_rates[-1] / ft_rates[-1]:,.0f}x "
                  f"| load {os.getloadavg()[0]:.1f}")
        ft_rate, fh_rate = statistics.median(ft_rates), statistics.median(fh_rates)
        ratios = [b / a for a, b in zip(ft_rates, fh_rates, strict=True)]
        print(f"  finetune  median {ft_rate:,.2f} samples/s ({bs_ft / ft_rate:.2f} s/step of {bs_ft})")
        print(f"  fit-heads median {fh_rate:,.0f} samples/s ({1e3 * bs_fh / fh_rate:.1f} ms/step of {bs_fh})")
        print(f"  ratio     fit-heads / finetune per training sample: {fh_rate / ft_rate:,.0f}x (of the medians; "
              f"per pair {', '.join(f'{r:,.0f}' for r in ratios)}; batch {bs_ft}"
              + (f", T = {FitConfig.samples}, E = {FitConfig.embedding_size}" if dvml else "") + ")")
        print(f"  per CUB epoch ({n_cub} training images): finetune {n_cub / ft_rate:,.0f} s, fit-heads "
              f"{n_cub / fh_rate:.2f} s (plus one extract pass for the cache)")

if __name__ == "__main__":
    main()

"""Extraction throughput vs the model forward alone, ONNX Runtime vs torch on the CPU, and peak memory.

Generates image folders of CUB-like JPEGs (~500x375, 20 classes, smooth content + noise, quality 90) and
measures, in one process, on the same device, for each ``--backbone`` (comma-separated: googlenet, any
torchvision name, timm:NAME, a TorchScript file; ``--weights``), batch size and crop size (default: each
backbone's own input size):

* **extract**: ``dvml.extract.run`` over the ``--images`` folder (decode -> resize -> P views -> normalise
  -> forward -> float16 HDF5 write; train half with ``--views`` views, test half with the centre view),
  wall time of the whole call with the index and the model prebuilt (DataLoader start-up included);
* **forward**: the same :class:`~dvml.extract.extractor.FeatureModel` on in-memory uint8 tensors, the exact
  same sequence of batch shapes (normalise + forward + copy back to the host), no decoding, no writing;

alternating, ``--reps`` times, after one warm-up batch of each shape. Prints crops/s and images/s of
both, per repetition and median, and the ratio extract/forward (1.0 = loading fully hidden behind compute).

``--onnx`` (needs ``pip install -e ".[onnx]"``): each backbone exported with ``torch.onnx.export`` and run by
ONNX Runtime's CPU provider against the same torch model (channels-last, ``inference_mode``), same input
batch (``--batch-size`` normalised crops), same thread count, alternating ``--reps`` times after a warm-up;
reports images/s of both, the speed-up and the max abs feature difference.

Then **peak RSS**: for folders of each ``--rss-sizes`` images (default 200 and 2,000), one extraction per
size in a fresh subprocess, reporting the process's RSS after imports + model build, its peak RSS during
the run (``VmHWM`` reset via ``/proc/self/clear_refs`` after set-up; ``ru_maxrss`` is not used because
Linux carries the parent's high-water mark across fork + exec), and the peak of its reaped DataLoader
workers (``RUSAGE_CHILDREN``; forked workers count pages shared with the main process).

    python bench/extract.py --device cpu --images 64 --views 4 --batch-size 16 --workers 1 --threads 1 \\
        --rss-crop 64
    python bench/extract.py --backbone googlenet,resnet50 --images 48 --views 2 --batch-size 8 --workers 1 \\
        --threads 1 --rss-sizes '' --onnx
    python bench/extract.py --device cuda --images 2000 --views 10 --batch-size 64 --workers 12
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image


def make_folder(root: Path, n_images: int, n_classes: int = 20, size: tuple[int, int] = (500, 375),
                seed: int = 0) -> Path:
    """``root/<class>/<i>.jpg``: n_images CUB-sized JPEGs spread evenly over n_classes classes."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n_images):
        cls = i % n_classes
        colour = rng.uniform(30, 220, 3).astype(np.float32)
        img = colour * (0.6 + 0.4 * np.sin(xx / rng.uniform(8, 40) + yy / rng.uniform(8, 40)))[..., None]
        img += rng.normal(0, 12, (h, w, 3)).astype(np.float32)
        d = root / f"class{cls:03d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:05d}.jpg", quality=90)
    return root


def bench_throughput(args, folder: Path, tmp: Path, spec: str) -> dict:
    import torch

    from dvml.devices import resolve_device
    from dvml.extract import load_backbone, read_dataset
    from dvml.extract.extractor import ExtractConfig, FeatureModel, preprocess_for, run

    index = read_dataset("folder", folder)
    backbone = load_backbone(spec, args.weights)
    pre = preprocess_for(backbone.preprocess, args.resize, args.crop, what=spec)
    backbone = dataclasses.replace(backbone, preprocess=pre).ensure_feature_dim()
    device = resolve_device(args.device)
    model = FeatureModel(backbone, device, amp=True)
    n_train, n_test = len(index.train), len(index.test)
    shapes = []  # (images, views) per batch, exactly as run() batches them
    for n, p in ((n_train, args.views), (n_test, 1)):
        shapes += [(min(args.batch_size, n - i), p) for i in range(0, n, args.batch_size)]
    crops = n_train * args.views + n_test
    gen = torch.Generator().manual_seed(0)
    inputs = {s: torch.randint(0, 256, (*s, 3, pre.crop, pre.crop), dtype=torch.uint8, generator=gen)
              for s in set(shapes)}
    if device.type == "cuda":
        inputs = {s: t.pin_memory() for s, t in inputs.items()}
    for s in inputs:  # warm-up: first-call costs (allocator, kernel selection) for each shape
        model(inputs[s])

    def forward_only() -> float:
        t0 = time.perf_counter()
        for s in shapes:
            model(inputs[s])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def full_extract(rep: int) -> float:
        cfg = ExtractConfig(dataset="folder", root=folder, out=tmp / f"bench{rep}.h5", backbone=spec,
                            weights=args.weights,
                            views=args.views, batch_size=args.batch_size, workers=args.workers,
                            device=args.device, resize=pre.resize, crop=pre.crop, overwrite=True)
        t0 = time.perf_counter()
        result = run(cfg, index=index, backbone=backbone)
        dt = time.perf_counter() - t0
        assert result.n_train == n_train and result.n_test == n_test
        return dt

    print(f"throughput of {backbone.name} ({backbone.feature_dim}-D): {len(index.train) + n_test} images "
          f"({n_train} train x {args.views} views + {n_test} test x 1) = {crops} crops of {pre.crop}px "
          f"(resize {pre.resize}), batch {args.batch_size} images, "
          f"{args.workers} workers, torch threads {torch.get_num_threads()}, device {device}, "
          f"weights {backbone.weights}")
    fwd, ext = [], []
    for rep in range(args.reps):
        fwd.append(forward_only())
        ext.append(full_extract(rep))
        print(f"  rep {rep}: forward {crops / fwd[-1]:8.1f} crops/s   extract {crops / ext[-1]:8.1f} crops/s "
              f"({(n_train + n_test) / ext[-1]:.1f} img/s)   ratio {fwd[-1] / ext[-1]:.3f}")
    f, e = statistics.median(fwd), statistics.median(ext)
    per_rep = statistics.median(a / b for a, b in zip(fwd, ext, strict=True))
    print(f"  median: forward {crops / f:.1f} crops/s ({(n_train + n_test) / f:.1f} img/s), extract "
          f"{crops / e:.1f} crops/s ({(n_train + n_test) / e:.1f} img/s), ratio extract/forward "
          f"{f / e:.3f} (median of per-rep ratios {per_rep:.3f})")
    return {"backbone": backbone.name, "dim": backbone.feature_dim, "crop": pre.crop,
            "forward_img_s": (n_train + n_test) / f, "extract_img_s": (n_train + n_test) / e, "ratio": f / e,
            "ratio_per_rep": per_rep}


def bench_onnx(args, spec: str) -> dict:
    """ONNX Runtime (CPU provider) vs torch on the CPU: same model, inputs, threads; alternating reps."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from dvml.extract import load_backbone
    from dvml.extract.extractor import preprocess_for

    backbone = load_backbone(spec, args.weights)
    pre = preprocess_for(backbone.preprocess, args.resize, args.crop, what=spec)
    model = backbone.model.eval().to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    x = pre.normalize(torch.randint(0, 256, (args.batch_size, 3, pre.crop, pre.crop), dtype=torch.uint8,
                                    generator=gen))
    path = Path(tempfile.mkdtemp()) / "model.onnx"
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # the TorchScript-based exporter: no onnxscript/torch.export needed
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["features"], dynamo=False,
                          dynamic_axes={"x": {0: "batch"}, "features": {0: "batch"}}, opset_version=17)
    export_s = time.perf_counter() - t0
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    xn, xc = x.numpy(), x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = model(xc).numpy()
    out = sess.run(None, {"x": xn})[0]  # also the warm-up of both
    diff = float(np.abs(out - ref).max())
    t_torch, t_ort = [], []
    for _ in range(args.reps):
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(xc)
            t_torch.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sess.run(None, {"x": xn})
        t_ort.append(time.perf_counter() - t0)
    tt, to = statistics.median(t_torch), statistics.median(t_ort)
    n = args.batch_size
    print(f"onnxruntime {ort.__version__} vs torch on the CPU, {backbone.name}, batch {n} x {pre.crop}px, "
          f"{args.threads} thread(s): torch {n / tt:.2f} img/s, onnxruntime {n / to:.2f} img/s, speed-up "
          f"{tt / to:.2f}x (per rep {', '.join(f'{a / b:.2f}' for a, b in zip(t_torch, t_ort, strict=True))}); "
          f"max abs feature diff {diff:.2e} (max |feature| {np.abs(ref).max():.1f}); export {export_s:.1f} s")
    return {"backbone": backbone.name, "torch_img_s": n / tt, "ort_img_s": n / to, "speedup": tt / to, "diff": diff}


_RSS_CHILD = """
import json, resource, sys, time
from pathlib import Path


def status(key):  # kB, from this process's own memory map (a fresh mm after exec, unlike ru_maxrss)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])


cfg = json.loads(sys.argv[1])
import torch
torch.set_num_threads(cfg.pop("threads"))
from dvml.extract import load_backbone, read_dataset
from dvml.extract.extractor import ExtractConfig, run
index = read_dataset("folder", cfg["root"])
backbone = load_backbone(cfg.pop("backbone_spec"), cfg["weights"])
setup_hwm, setup_rss = status("VmHWM"), status("VmRSS")
try:  # reset the high-water mark so VmHWM after the run is the peak *during* the run
    Path("/proc/self/clear_refs").write_text("5")
    reset = status("VmHWM") <= setup_hwm
except OSError:
    reset = False
t0 = time.perf_counter()
result = run(ExtractConfig(**cfg), index=index, backbone=backbone)
print(json.dumps({"setup_hwm_kb": setup_hwm, "setup_rss_kb": setup_rss, "run_hwm_kb": status("VmHWM"),
                  "reset": reset, "end_rss_kb": status("VmRSS"),
                  "workers_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "seconds": time.perf_counter() - t0, "n_train": result.n_train, "n_test": result.n_test}))
"""


def bench_rss(args, tmp: Path, folders: dict[int, Path]) -> None:
    print(f"peak RSS: {args.rss_views} view(s), crop {args.rss_crop or args.crop or 224}px, batch {args.batch_size}, "
          f"{args.workers} workers, device {args.device}, each size in a fresh subprocess")
    rows = []
    for n, folder in folders.items():
        cfg = {"dataset": "folder", "root": str(folder), "out": str(tmp / f"rss{n}.h5"), "weights": args.weights,
               "backbone": args.backbone.split(",")[0], "backbone_spec": args.backbone.split(",")[0],
               "views": args.rss_views, "batch_size": args.batch_size, "workers": args.workers,
               "device": args.device, "resize": args.rss_resize or args.resize, "crop": args.rss_crop or args.crop,
               "overwrite": True, "threads": args.threads}
        out = subprocess.run([sys.executable, "-c", _RSS_CHILD, json.dumps(cfg)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if out.returncode:
            sys.exit(f"RSS run for {n} images failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((n, r))
        mib = {k: v / 1024 for k, v in r.items() if k.endswith("_kb")}
        print(f"  {n:6d} images: after setup {mib['setup_rss_kb']:7.1f} MiB (peak {mib['setup_hwm_kb']:.1f}), "
              f"peak during the run {mib['run_hwm_kb']:7.1f} MiB{'' if r['reset'] else ' (peak not reset)'}, "
              f"at the end {mib['end_rss_kb']:.1f}; worker peak {mib['workers_kb']:.1f} MiB; {r['seconds']:.1f} s "
              f"({(r['n_train'] + r['n_test']) / r['seconds']:.1f} img/s)")
    if len(rows) >= 2:
        (n0, a), (n1, b) = rows[0], rows[-1]
        print(f"  peak RSS during the run, {n1} vs {n0} images: {b['run_hwm_kb'] / a['run_hwm_kb']:.3f} "
              f"(+{(b['run_hwm_kb'] - a['run_hwm_kb']) / 1024:.1f} MiB for a {n1 / n0:.0f}x larger dataset)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    ap.add_argument("--backbone", default="googlenet", help="comma-separated backbones (googlenet, resnet50, "
                    "timm:NAME, a TorchScript file, ...); the RSS part uses the first")
    ap.add_argument("--onnx", action="store_true", help="also ONNX Runtime vs torch on the CPU per backbone")
    ap.add_argument("--weights", default="none", help="none (no download needed), imagenet or a state dict path")
    ap.add_argument("--images", type=int, default=200, help="images in the throughput folder")
    ap.add_argument("--views", type=int, default=10, help="views per training image (throughput run)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--resize", type=int, default=None, help="default: the backbone's own (GoogLeNet 256)")
    ap.add_argument("--crop", type=int, default=None, help="default: the backbone's own (GoogLeNet 224)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rss-sizes", default="200,2000", help="comma-separated folder sizes for peak RSS ('' = skip)")
    ap.add_argument("--rss-views", type=int, default=1)
    ap.add_argument("--rss-resize", type=int, default=None, help="default: --resize")
    ap.add_argument("--rss-crop", type=int, default=None, help="default: --crop")
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    from dvml.devices import resolve_device
    from dvml.errors import DvmlError

    try:
        resolve_device(args.device)
    except (DvmlError, ValueError) as e:
        sys.exit(str(e))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores"
          + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""))
    rss_sizes = [int(s) for s in args.rss_sizes.split(",") if s]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        folder = make_folder(tmp / "throughput", args.images)
        rss_folders = {}
        if rss_sizes:
            big = make_folder(tmp / f"rss{max(rss_sizes)}", max(rss_sizes), seed=1)
            for n in rss_sizes:  # smaller sizes: the first n images of the big folder, hard-linked
                if n == max(rss_sizes):
                    rss_folders[n] = big
                    continue
                dst = tmp / f"rss{n}"
                for src in sorted(big.rglob("*.jpg"), key=lambda p: p.name)[:n]:
                    (dst / src.parent.name).mkdir(parents=True, exist_ok=True)
                    os.link(src, dst / src.parent.name / src.name)
                rss_folders[n] = dst
        print(f"generated {args.images} + {max(rss_sizes, default=0)} JPEGs (500x375) in "
              f"{time.perf_counter() - t0:.1f} s")
        rows, onnx_rows = [], []
        for spec in [b for b in args.backbone.split(",") if b]:
            rows.append(bench_throughput(args, folder, tmp, spec))
            if args.onnx:
                onnx_rows.append(bench_onnx(args, spec))
        print("summary (medians over reps):")
        for r in rows:
            print(f"  {r['backbone']:32s} {r['dim']:5d}-D {r['crop']:4d}px  forward {r['forward_img_s']:7.1f} img/s  "
                  f"extract {r['extract_img_s']:7.1f} img/s  ratio {r['ratio']:.3f}")
        for r in onnx_rows:
            print(f"  {r['backbone']:32s} torch {r['torch_img_s']:6.2f} img/s  onnxruntime {r['ort_img_s']:6.2f} "
                  f"img/s  speed-up {r['speedup']:.2f}x  max diff {r['diff']:.1e}")
        if rss_sizes:
            bench_rss(args, tmp, dict(sorted(rss_folders.items())))


if __name__ == "__main__":
    main()

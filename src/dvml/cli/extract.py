"""``dvml extract DATASET --root DIR --out FILE.h5``: DATASET any entry of :mod:`dvml.extract.registry` (cub, cars196,
sop, inshop, folder, or one registered before the command runs); see :mod:`dvml.extract`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer
from rich.table import Table

from dvml.cli.app import app, console, handle_errors, make_progress
from dvml.cli.datasets import dataset_choice, metavar
from dvml.cli.options import FeatureDtype, Interpolation, choice_value, panel
from dvml.extract.config import ExtractConfig
from dvml.extract.datasets import DatasetName
from dvml.extract.registry import dataset_names

PRE = "Preprocessing (default: the backbone's own)"  # --help panels
DATA = "Dataset and output"
_D = ExtractConfig(dataset=DatasetName.folder, root=Path("."), out=Path("out.h5"))


def parse_rgb(value: str | None, option: str) -> tuple[float, float, float] | None:
    """``"0.485,0.456,0.406"`` -> a 3-tuple; ValueError naming ``option`` otherwise."""
    if value is None:
        return None
    try:
        parts = tuple(float(v) for v in value.replace(" ", "").split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise ValueError(f"{option} needs three comma-separated numbers (R,G,B), got {value!r}")
    return parts


@app.command("extract")
@handle_errors
def extract_cmd(
    dataset: str = typer.Argument(..., callback=dataset_choice, metavar=metavar(dataset_names()),
                                  help="Dataset format of --root (any registered dataset: dvml.extract.registry)."),
    root: Path = typer.Option(..., "--root", help="Dataset directory (CUB_200_2011, the Cars196 directory with "
                              "cars_annos.mat, Stanford_Online_Products, or a <class>/<image> folder)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output HDF5 feature cache."),
    backbone: str = typer.Option(_D.backbone, help="googlenet (the paper's), any torchvision classification "
                                 "model (resnet50, efficientnet_b0, convnext_tiny, vit_b_16, ...), timm:NAME "
                                 "(pip install 'dvml\\[timm]'), or a model file: torch.export .pt2 or TorchScript .pt "
                                 "(images in, features out; a model file is code: use only files you trust)."),
    weights: str = typer.Option(_D.weights, help="'imagenet' (the model's default pretrained weights; must be in "
                                "the torch hub / Hugging Face cache offline), a torchvision weights name "
                                "(IMAGENET1K_V2), 'none' (seeded random init, for tests) or a path to a state "
                                "dict. Ignored for a TorchScript file."),
    views: int = typer.Option(_D.views, help="Views per training image: view 0 = centre crop, the rest "
                              "seeded random crop + horizontal flip."),
    test_flip: bool = typer.Option(_D.test_flip, help="Also store the flipped centre view of test images."),
    seed: int = typer.Option(_D.seed, help="Seed of the random views."),
    batch_size: int = typer.Option(_D.batch_size, help="Images per batch (each with all its views)."),
    workers: int = typer.Option(_D.workers, help="DataLoader worker processes decoding images (0 = main)."),
    device: str = typer.Option(_D.device, help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."),
    amp: bool = typer.Option(_D.amp, help="float16 autocast on CUDA and MPS."),
    resize: int = panel(PRE, typer.Option(None, help="Shorter side after resizing (default: the backbone's own, "
                                                     "e.g. 256).")),
    crop: int = panel(PRE, typer.Option(None, help="Crop size = network input size (default: the backbone's own, "
                                                   "e.g. 224).")),
    mean: str = panel(PRE, typer.Option(None, help="Per-channel mean R,G,B on \\[0, 1] pixels (default: the "
                                                   "backbone's own).")),
    std: str = panel(PRE, typer.Option(None, help="Per-channel std R,G,B (default: the backbone's own).")),
    interpolation: Interpolation = panel(PRE, typer.Option(None, help="Resize interpolation (default: the "
                                                                      "backbone's own).")),
    dtype: FeatureDtype = panel(DATA, typer.Option(_D.dtype, help="On-disk feature dtype.")),
    train_classes: int = panel(DATA, typer.Option(None, help="folder only: number of (sorted) classes in the train "
                                                             "split (default: half).")),
    transform_input: bool = panel(PRE, typer.Option(None, "--transform-input/--no-transform-input",
                                                    help="torchvision GoogLeNet input re-normalisation (default: on "
                                                         "for imagenet, off for none, for a file its stored value or "
                                                         "on).")),
    skip_bad: bool = panel(DATA, typer.Option(_D.skip_bad, help="Skip unreadable images (listed in the cache's "
                                                                "extra) instead of stopping.")),
    overwrite: bool = typer.Option(_D.overwrite, help="Replace an existing complete output."),
):
    """Run a frozen backbone (GoogLeNet by default) once over a dataset and write P views of its features per
    image to a cache; the cache records the backbone, its weights, feature dimension and preprocessing.

    Interrupted (Ctrl-C, kill)? Rerun the same command: it resumes where it stopped.

    Several processes: `torchrun --nproc-per-node N -m dvml extract ...` (gloo on CPU, one GPU per process on
    CUDA): each takes a disjoint block of the images, the last to finish merges the shards (OUT.parts/) into OUT;
    the cache is the single-process one, bit for bit. Resume with the same command and N.
    """
    cfg = ExtractConfig(dataset=dataset, root=root, out=out, backbone=backbone, weights=weights, views=views,
                        test_flip=test_flip, seed=seed, batch_size=batch_size, workers=workers, device=device, amp=amp,
                        resize=resize, crop=crop, mean=parse_rgb(mean, "--mean"), std=parse_rgb(std, "--std"),
                        interpolation=choice_value(interpolation), dtype=choice_value(dtype),
                        train_classes=train_classes, transform_input=transform_input, skip_bad=skip_bad,
                        overwrite=overwrite)
    from dvml.extract.extractor import run  # torch: after the arguments are checked
    from dvml.finetune import distributed as D

    ctx = D.init_distributed(cfg.device) if D.launched_by_torchrun() else D.DistContext()
    tasks: dict[str, int] = {}
    try:
        with make_progress("img") as progress:
            progress.disable = not ctx.is_main  # under torchrun rank 0 draws its own share's progress

            def on_progress(split: str, done: int, total: int) -> None:
                if split not in tasks:
                    tasks[split] = progress.add_task(split, total=total, completed=done, rate="")
                else:
                    progress.update(tasks[split], completed=done)

            result = run(replace(cfg, device=str(ctx.device)) if ctx.distributed else cfg, progress=on_progress)
    finally:
        D.shutdown(ctx)
    if not result.merged:
        return  # this rank's shard is written; the last rank to finish merges and prints the table
    table = Table(title=str(result.path), show_header=False)
    table.add_row("backbone", f"{result.backbone} ({result.weights}), {result.feature_dim}-D")
    pre = result.preprocess
    rgb = {k: ", ".join(f"{v:.4g}" for v in pre[k]) for k in ("mean", "std")}
    table.add_row("input", f"resize {pre['resize']} ({pre['interpolation']}), crop {pre['crop']}, "
                           f"mean ({rgb['mean']}), std ({rgb['std']})")
    table.add_row("train", f"{result.n_train} images x {cfg.views} views")
    table.add_row("test", f"{result.n_test} images x {1 + int(cfg.test_flip)} views")
    table.add_row("skipped", str(len(result.skipped)))
    for s in result.skipped[:10]:
        table.add_row("", f"{s['split']}: {s['path']}")
    table.add_row("time", f"{result.seconds:.1f} s ({result.images_processed / max(result.seconds, 1e-9):.1f} "
                          "img/s this run)")
    console.print(table)

"""``dvml extract DATASET --root DIR --out FILE.h5``: DATASET any entry of :mod:`dvml.extract.registry` (cub, cars196,
sop, inshop, folder, or one registered before the command runs); see :mod:`dvml.extract`."""

from __future__ import annotations

from dataclasses import replace

import typer
from rich.table import Table

from dvml.cli.app import app, console, handle_errors, make_progress
from dvml.cli.bind import bind, from_command_line
from dvml.cli.datasets import dataset_choice, metavar
from dvml.extract.config import ExtractConfig
from dvml.extract.registry import dataset_names

#: extract's options: every ExtractConfig field but the DATASET argument, in --help order.
EXTRACT_FIELDS = ("root", "out", "backbone", "weights", "views", "test_flip", "seed", "batch_size", "workers", "device",
                  "amp", "resize", "crop", "mean", "std", "interpolation", "dtype", "train_classes", "transform_input",
                  "skip_bad", "overwrite")


@app.command("extract")
@handle_errors
@bind(ExtractConfig, EXTRACT_FIELDS)
def extract_cmd(
    dataset: str = typer.Argument(..., callback=dataset_choice, metavar=metavar(dataset_names()),
                                  help="Dataset format of --root (any registered dataset: dvml.extract.registry)."),
    **fields,
):
    """Run a frozen backbone (GoogLeNet by default) once over a dataset and write P views of its features per
    image to a cache; the cache records the backbone, its weights, feature dimension and preprocessing.

    Interrupted (Ctrl-C, kill)? Rerun the same command: it resumes where it stopped.

    Several processes: `torchrun --nproc-per-node N -m dvml extract ...` (gloo on CPU, one GPU per process on
    CUDA): each takes a disjoint block of the images, the last to finish merges the shards (OUT.parts/) into OUT;
    the cache is the single-process one, bit for bit. Resume with the same command and N.
    """
    cfg = ExtractConfig(dataset=dataset, **from_command_line(ExtractConfig, fields))
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

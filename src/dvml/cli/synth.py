"""``dvml synth OUT.h5``: write a generated feature world (see :mod:`dvml.extract.synth`)."""

from __future__ import annotations

from pathlib import Path

import typer

from dvml.cli.app import app, console, handle_errors, make_progress
from dvml.extract.synth import SynthConfig, generate

_D = SynthConfig()


@app.command("synth")
@handle_errors
def synth_cmd(
    out: Path = typer.Argument(..., help="Output HDF5 cache file."),
    classes: int = typer.Option(_D.n_classes, help="Number of classes (first half train, second half test)."),
    images_per_class: int = typer.Option(_D.images_per_class, help="Images per class."),
    views: int = typer.Option(_D.views, help="Views per training image (view 0 = centre)."),
    test_views: int = typer.Option(_D.test_views, help="Views per test image: 1 (centre) or 2 (+flip)."),
    feature_dim: int = typer.Option(_D.feature_dim, help="Feature dimension D."),
    class_dim: int = typer.Option(_D.class_dim, help="Dimension of the class-centre latent."),
    variation_dim: int = typer.Option(_D.variation_dim, help="Dimension of the class-independent variation."),
    variation_strength: float = typer.Option(_D.variation_strength,
                                             help="Scale of the variation relative to class centres."),
    view_jitter: float = typer.Option(_D.view_jitter, help="Per-view jitter of the variation (augmentation)."),
    seed: int = typer.Option(_D.seed, help="Seed: same seed and parameters give an identical file."),
    dtype: str = typer.Option(_D.dtype, help="On-disk dtype: float16 or float32."),
    overwrite: bool = typer.Option(False, help="Replace an existing complete file."),
):
    """Generate a feature world under DVML's assumption (class centre + class-independent variation)."""
    cfg = SynthConfig(n_classes=classes, images_per_class=images_per_class, views=views,
                      test_views=test_views, feature_dim=feature_dim, class_dim=class_dim,
                      variation_dim=variation_dim, variation_strength=variation_strength,
                      view_jitter=view_jitter, seed=seed, dtype=dtype)
    with make_progress("class") as progress:
        task = progress.add_task("synth", total=cfg.n_classes, rate="")
        path = generate(cfg, out, overwrite=overwrite, progress=lambda n: progress.advance(task, n))
    console.print(f"wrote {path}")

"""``dvml synth OUT.h5``: write a generated feature world (see :mod:`dvml.extract.synth`)."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from dvml.cli.app import app, console, handle_errors, make_progress
from dvml.cli.options import FeatureDtype, choice_value
from dvml.errors import DvmlError
from dvml.extract.synth import SynthConfig, generate

_D = SynthConfig()

# SynthConfig field -> the option that sets it (the fields not listed have no option)
FIELD_OPTIONS = {
    "n_classes": "--classes", "images_per_class": "--images-per-class", "views": "--views",
    "test_views": "--test-views", "feature_dim": "--feature-dim", "class_dim": "--class-dim",
    "variation_dim": "--variation-dim", "variation_strength": "--variation-strength",
    "view_jitter": "--view-jitter", "seed": "--seed", "dtype": "--dtype",
}
_FIELD_NAME = re.compile(r"\b(" + "|".join(FIELD_OPTIONS) + r")\b")


def options_message(message: str) -> str:
    """A :class:`SynthConfig` validation message with its field names said as the options the user typed
    (``n_classes must be ...`` -> ``--classes must be ...``)."""
    return _FIELD_NAME.sub(lambda m: FIELD_OPTIONS[m.group(1)], message)


def make_config(**fields) -> SynthConfig:
    """``SynthConfig(**fields)``; a refused value is a :class:`DvmlError` naming its option."""
    try:
        return SynthConfig(**fields)
    except ValueError as e:
        raise DvmlError(options_message(str(e))) from None


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
    dtype: FeatureDtype = typer.Option(_D.dtype, help="On-disk dtype."),
    overwrite: bool = typer.Option(False, help="Replace an existing complete file."),
):
    """Generate a feature world under DVML's assumption (class centre + class-independent variation)."""
    cfg = make_config(n_classes=classes, images_per_class=images_per_class, views=views,
                      test_views=test_views, feature_dim=feature_dim, class_dim=class_dim,
                      variation_dim=variation_dim, variation_strength=variation_strength,
                      view_jitter=view_jitter, seed=seed, dtype=choice_value(dtype))
    with make_progress("class") as progress:
        task = progress.add_task("synth", total=cfg.n_classes, rate="")
        path = generate(cfg, out, overwrite=overwrite, progress=lambda n: progress.advance(task, n))
    console.print(f"wrote {path}")

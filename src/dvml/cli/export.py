"""``dvml export RUN_DIR -o FILE``: one model file from images to z_I (``.pt2``, TorchScript ``.pt`` or ONNX
``.onnx``)."""

from __future__ import annotations

from pathlib import Path

import typer

from dvml.cli.app import app, console, handle_errors
from dvml.serve.config import ExportConfig


@app.command("export")
@handle_errors
def export_cmd(
    target: Path = typer.Argument(..., help="A fit-heads or finetune run directory (or a cache: its raw backbone)."),
    out: Path = typer.Option(..., "--out", "-o", help="Model file: .pt2 (torch.export, "
                                          "recommended), .pt (TorchScript: a program, load only trusted ones) or "
                                          ".onnx (ONNX)."),
    weights: Path | None = typer.Option(None, help="The backbone's weights file, when the run's cache was "
                                                   "extracted from one (the cache keeps its name and digest only); "
                                                   "an error otherwise."),
    overwrite: bool = typer.Option(ExportConfig.overwrite, "--overwrite/--no-overwrite",
                                   help="Replace an existing file."),
):
    """Export backbone + embedding layer (images -> z_I) with its preprocessing; usable without dvml."""
    cfg = ExportConfig(target=target, out=out, weights=weights, overwrite=overwrite)
    from dvml.serve.export import run  # torch: after the arguments are checked

    result = run(cfg)
    m = result.meta
    pre = m["preprocess"]
    console.print(f"wrote {result.path} ({result.format.value}): uint8 RGB (B, 3, {pre['crop']}, {pre['crop']}) -> "
                  f"(B, {m['embedding_dim']}) z_I; resize {pre['resize']} ({pre['interpolation']}), centre crop "
                  f"{pre['crop']}, normalisation inside; self-check max |diff| {result.self_check_max_abs_diff:.2g}")

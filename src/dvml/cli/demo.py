"""``dvml demo``: a synth world and a small ablation, no download (see :mod:`dvml.experiments.demo`)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from dvml.cli.app import app, console, err_console, handle_errors
from dvml.cli.options import DeviceOption, device_option, fit_overrides
from dvml.cli.render import print_ablation_result, run_ablation
from dvml.experiments.demo import DemoConfig

_D = DemoConfig  # option defaults are the config dataclass defaults


@app.command("demo")
@handle_errors
def demo_cmd(
    out: Path = typer.Option(_D.out, "--out", "-o", help="Directory for the world, runs and tables."),
    quick: bool = typer.Option(_D.quick, "--quick/--full", help="A seconds-long smoke run (numbers mean little)."),
    device: DeviceOption = device_option(),
):
    """No download, no arguments: a synth world, triplet and N-pair with and without DVML, 2 seeds."""
    from dvml.experiments import demo

    cfg = demo.DemoConfig(out=out, quick=quick, fit=fit_overrides(device=device))
    s = cfg.size
    err_console.print(f"[bold]dvml demo[/]: synth world of {s.world.n_classes} classes x {s.world.images_per_class} "
                      f"images ({s.world.n_classes // 2} unseen test classes), losses {', '.join(s.losses)}, "
                      f"baseline vs DVML, {len(s.seeds)} seeds, {s.fit.get('epochs')} epochs; output in {out}")
    t0 = time.perf_counter()
    result = run_ablation(demo.run, cfg)
    print_ablation_result(result, title="dvml demo (unseen test classes)")
    raw = result["raw"]
    console.print(f"for reference, the raw features without training: R@1 {100 * raw['recall@1']:.1f}, "
                  f"MAP@R {100 * raw['map@r']:.1f}")
    from dvml.experiments.stacking import trainer_counts

    how = ", ".join(f"{n} {name}" for name, n in trainer_counts(result["rows"]).items())
    console.print(f"demo finished in {time.perf_counter() - t0:.0f}s (cells fitted: {how}); everything is in {out}")

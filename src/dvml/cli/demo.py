"""``dvml demo``: a synth world and a small ablation, no download (see :mod:`dvml.experiments.demo`)."""

from __future__ import annotations

import time

from dvml.cli.app import app, console, err_console, handle_errors
from dvml.cli.bind import bind, from_command_line
from dvml.cli.options import fit_overrides
from dvml.cli.render import print_ablation_result, run_ablation
from dvml.experiments.demo import DemoConfig
from dvml.heads.config import FitConfig


@app.command("demo")
@handle_errors
@bind(DemoConfig, ("out", "quick"))
@bind(FitConfig, ("device",), passthrough=True)
def demo_cmd(**fields):
    """No download, no arguments: a synth world, triplet and N-pair with and without DVML, 2 seeds.

    About a minute on an idle 2-core CPU. On a busy machine torch's threads spin-wait and it can take ten times
    as long: run it as `OMP_WAIT_POLICY=PASSIVE dvml demo` there (slower on an idle machine, hence not the
    default).
    """
    from dvml.experiments import demo

    out, quick = fields.pop("out"), fields.pop("quick")
    cfg = demo.DemoConfig(out=out, quick=quick, fit=fit_overrides(**from_command_line(FitConfig, fields)))
    s = cfg.size
    err_console.print(f"[bold]dvml demo{' --quick' if quick else ''}[/]: synth world of {s.world.n_classes} classes x "
                      f"{s.world.images_per_class} images ({s.world.n_classes // 2} unseen test classes), losses "
                      f"{', '.join(s.losses)}, baseline vs DVML, {len(s.seeds)} seeds, {s.fit.get('epochs')} epochs; "
                      f"output in {out}")
    t0 = time.perf_counter()
    result = run_ablation(demo.run, cfg)
    from dvml.experiments.stacking import trainer_counts

    how = ", ".join(f"{n} {name}" for name, n in trainer_counts(result["rows"]).items())
    if quick:  # 2 epochs on 12 classes: any difference is noise, so none is shown
        console.print(f"smoke run: world, {len(result['rows'])} fits and their evaluation ran end to end in "
                      f"{time.perf_counter() - t0:.0f}s (cells fitted: {how}). It is too small to compare the "
                      "methods, so no table is shown; `dvml demo` (about a minute) compares them.")
        console.print(f"everything is in {out}")
        return
    print_ablation_result(result, title="dvml demo (unseen test classes)")
    raw = result["raw"]
    console.print(f"for reference, the raw features without training: R@1 {100 * raw['recall@1']:.1f}, "
                  f"MAP@R {100 * raw['map@r']:.1f}")
    console.print(f"demo finished in {time.perf_counter() - t0:.0f}s (cells fitted: {how}); everything is in {out}")

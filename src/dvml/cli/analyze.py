"""``dvml analyze RUN_DIR``: the paper's Table 4 evidence (see :mod:`dvml.experiments.analyze`)."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.table import Table

from dvml.cli.app import app, console, err_console, handle_errors
from dvml.experiments.analyze import AnalyzeConfig

_D = AnalyzeConfig  # option defaults are the config dataclass defaults


@app.command("analyze")
@handle_errors
def analyze_cmd(
    target: Path = typer.Argument(..., help="Run directory (or a feature cache: raw features only)."),
    baseline: Path | None = typer.Option(None, "--baseline", "-b",
                                         help="Run directory to compare with (e.g. the same loss without DVML)."),
    raw: bool = typer.Option(_D.raw, "--raw/--no-raw", help="Also analyse the raw backbone features."),
    splits: str = typer.Option(",".join(_D.splits), help="Splits to analyse (centre view of each image)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output directory (default RUN_DIR/analysis)."),
    normalize: bool = typer.Option(_D.normalize, "--normalize/--no-normalize",
                                   help="L2-normalise embeddings first (retrieval compares them by cosine)."),
    min_class_size: int = typer.Option(_D.min_class_size,
                                      help="Classes with fewer samples are left out of the KS test."),
    plots: bool = typer.Option(_D.plots, "--plots/--no-plots", help="Write PCA/t-SNE/p-value PNGs."),
    tsne: bool = typer.Option(_D.tsne, "--tsne/--no-tsne", help="Include the t-SNE plots (the slow part)."),
    plot_classes: int = typer.Option(_D.plot_classes, help="Classes shown in the plots (seeded random choice)."),
    plot_points: int = typer.Option(_D.plot_points, help="At most this many points per plot (t-SNE is slow)."),
    tsne_iter: int = typer.Option(_D.tsne_iter, help="t-SNE iterations (>= 250)."),
    seed: int = typer.Option(_D.seed, help="Seed of the plot subsample and t-SNE."),
):
    """The paper's Table 4 evidence and how alive a run's variational branch is, and what its draws show over noise.

    Table 4: KS p-values of the central features and their average relative deviation, with plots. For a
    fit-heads run, the diagnostics of its variational branch and what its learned draws show over norm-matched
    isotropic noise (class consistency, hardness, gradient): a check passes only when the learned draws beat the
    noise by its stated margin (dvml.experiments.branch_report).
    """
    from dvml.experiments import analyze

    cfg = analyze.AnalyzeConfig(target=target, baseline=baseline, raw=raw,
                                splits=tuple(s.strip() for s in splits.split(",") if s.strip()), out=out,
                                normalize=normalize, min_class_size=min_class_size, plots=plots, tsne=tsne,
                                plot_classes=plot_classes, plot_points=plot_points, tsne_iter=tsne_iter, seed=seed)
    with err_console.status("analyzing") as status:
        result = analyze.run(cfg, progress=lambda msg: status.update(f"analyzing: {msg}"))
    t = Table(title="Table 4: central features (embedding minus its class mean)", title_justify="left",
              caption="KS p: per class, mean over dimensions of the KS p-value against a fitted normal; mean ± std "
                      "over classes. rel. dev.: mean over classes of mean ||z - m_c|| / ||m_c||. In %.",
              caption_justify="left")
    for col in ("split", "embedding", "KS p", "classes", "rel. dev."):
        t.add_column(col, justify="left" if col in ("split", "embedding") else "right")
    for split, per in result["splits"].items():
        for name, r in per.items():
            src = result["sources"].get(name, {})
            label = name if name == "raw" else f"{name}: {src.get('loss')}{'+DVML' if src.get('dvml') else ''}"
            ks, rd = r["ks"], r["relative_deviation"]
            std = "" if ks["std"] is None or math.isnan(ks["std"]) else f" ± {100 * ks['std']:.1f}"
            t.add_row(split, label, f"{100 * ks['mean']:.1f}{std}", str(ks["n_classes"]), f"{100 * rd['mean']:.1f}")
    console.print(t)
    for name, rep in result.get("dvml_branch", {}).items():
        console.print(_branch_table(name, rep))
    console.print(f"wrote {Path(result['out']) / analyze.ANALYSIS_FILE}" +
                  (f" and {len(result['plots'])} plots" if result["plots"] else ""))


def _fmt(v, pct=False) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{100 * v:.1f}%" if pct else f"{v:.4g}"


def _branch_table(name: str, rep: dict) -> Table:
    """The DVML branch diagnostics of one run (dvml.experiments.branch_report.run_report) as a rich table: the
    branch's statistics, then what the learned draws show over norm-matched noise, one check per figure."""
    f, tt = rep["final"], rep["train_time"]
    t = Table(title=f"{name}: DVML branch diagnostics ({'DVML' if rep['dvml'] else 'baseline'}; training classes, "
                    f"{rep['n_images']} images, final model; gradients: phase-2 means)", title_justify="left")
    t.add_column("diagnostic", justify="left")
    t.add_column("value", justify="right")
    t.add_column("check", justify="left")
    checks = rep.get("checks") or {}
    rows = [("active units (Var_x(mu_j) > 0.01)", "active_frac", True), ("KL per image (nats)", "kl_sum", False),
            ("mean sigma", "sigma_mean", False), ("||z_I||", "z_i_norm", False), ("||mu||", "mu_norm", False),
            ("||z_hat - z_I|| (z_I/||z_I|| on the sphere)", "z_v_norm", False), ("cos(z_hat, z_I)", "cos_syn", False),
            ("synthetic-to-source distance (normalised)", "syn_to_source", False),
            ("image-to-class-centre distance (normalised)", "img_to_centre", False),
            ("class consistency of z_hat (nearest centre, centres with the image)", "syn_consistency", True),
            ("class consistency of z_I (nearest centre, centres with the image)", "img_consistency", True)]
    for label, key, pct in rows:
        if key in f:
            c = checks.get(key)
            t.add_row(label, _fmt(f[key], pct), _check(c))
    t.add_row("Lm(z_hat) last epoch", _fmt(tt.get("metric_synthetic")), "")
    t.add_row("Lm(z_I) last epoch", _fmt(tt.get("metric_invariant")), "")
    vs = rep.get("vs_noise")
    if vs is not None:
        _noise_rows(t, vs, checks)
    for k in ("recon", "metric_synthetic", "metric_invariant"):
        if tt.get(f"grad_norm_{k}_phase2") is not None:
            t.add_row(f"grad norm on embedding layer: {k}", _fmt(tt[f"grad_norm_{k}_phase2"]), "")
    if tt.get("grad_ratio_other_phase2") is not None:
        t.add_row("||other terms' gradient|| / ||Lm(z_I)'s|| (cos < 0.95 needs > 0.31)",
                  _fmt(tt["grad_ratio_other_phase2"]), "")
    if tt.get("grad_cos_invariant_phase2") is not None:
        t.add_row("cos(total gradient, Lm(z_I) gradient), training", _fmt(tt["grad_cos_invariant_phase2"]), "")
    if tt.get("grad_cos_expected_phase2") is not None:
        t.add_row("  that cosine for the expectation over the z_V draws (draw noise removed)",
                  _fmt(tt["grad_cos_expected_phase2"]), "")
        t.add_row("  draw noise in the gradient / its expected norm", _fmt(tt["grad_noise_ratio_phase2"]), "")
    if tt.get("grad_cos_synthetic_phase2") is not None:
        t.add_row("  that cosine without the reconstruction's gradient (Lm(z_hat)'s part)",
                  _fmt(tt["grad_cos_synthetic_phase2"]), "")
    if tt.get("grad_ratio_synthetic_phase2") is not None:
        t.add_row("    its factors: ||Lm(z_hat)'s gradient|| / ||Lm(z_I)'s|| (after the lambdas)",
                  _fmt(tt["grad_ratio_synthetic_phase2"]), "")
        t.add_row("    and the direction: cos(Lm(z_hat)'s gradient, Lm(z_I)'s)",
                  _fmt(tt["grad_cos_syn_term_phase2"]), "")
    if tt.get("grad_cos_syn_term_expected_phase2") is not None:
        t.add_row("    that direction for the expectation over the z_V draws",
                  _fmt(tt["grad_cos_syn_term_expected_phase2"]), "")
    return t


def _noise_rows(t: Table, vs: dict, checks: dict) -> None:
    """The learned-vs-noise rows: each figure for z_I, the learned draws and norm-matched isotropic noise, and the
    check that the learned draws beat the noise by its stated margin."""
    c, h = vs["consistency"], vs["hardness"]
    t.add_section()
    t.add_row(f"[b]learned draws vs norm-matched isotropic noise[/] ({vs['n_images']} images x {vs['samples']} "
              "draws)", "", "")
    t.add_row("class consistency, leave-one-out centres over the training split: z_I / learned / noise",
              f"{_fmt(c['real'], True)} / {_fmt(c['learned'], True)} / {_fmt(c['noise'], True)}", "")
    k = checks.get("consistency_vs_noise", {})
    t.add_row("  learned - noise", _fmt(k.get("value")), _check(k))
    pairs = h.get("unit") == "logits"  # an N-pair run: its comparisons, in logits
    what = "comparison (logits" if pairs else f"triplet (margins, m = {vs['margin']:g}"
    t.add_row(f"violation per active {what}; {vs['batches']} batches): z_I / learned / noise",
              " / ".join(_fmt(h[n]["per_active"]) for n in ("real", "learned", "noise")), "")
    t.add_row(f"  share of {'comparisons' if pairs else 'triplets'} active: z_I / learned / noise",
              " / ".join(_fmt(h[n]["active"], True) for n in ("real", "learned", "noise")), "")
    k = checks.get("hardness_vs_noise", {})
    t.add_row("  learned / noise", _fmt(k.get("value")), _check(k))
    g = vs.get("grad")
    if g is not None:
        t.add_row(f"cos(gradient, baseline's gradient at these weights) ({g['batches']} batches): learned / noise",
                  f"{_fmt(g['cos_learned'])} / {_fmt(g['cos_noise'])}", "")
        halves = " / ".join(_fmt(h["cos_noise"] - h["cos_learned"]) for h in g.get("halves", []))
        t.add_row(f"  cos_noise - cos_learned: all ({_fmt(g['cos_noise'] - g['cos_learned'])}), halves ({halves})",
                  "", "")
        k = checks.get("grad_vs_noise", {})
        t.add_row("  cos_noise - cos_learned, the smaller half", _fmt(k.get("value")), _check(k))
    t.add_section()


def _check(c: dict | None) -> str:
    if not c or c.get("ok") is None:
        return ""
    return f"{'ok' if c['ok'] else 'FAIL'} ({c['op']} {c['threshold']:g})"

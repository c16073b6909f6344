"""``dvml ablate``: the paper's comparison table (loss × {baseline, DVML, noise control} × seeds), with error bars.

One **cell** is one fit: a metric loss, one method (:class:`Method`: ``base`` = the baseline, ``dvml``, or
``noise`` = DVML's training with z_V replaced by isotropic noise of the same scale, the control that tells what
the *learned* distribution adds), one seed. Cells live in ``OUT/runs/<loss>-<base|dvml|noise>-s<seed>/``
(ordinary run directories, evaluated with :mod:`dvml.evaluate`, so ``metrics.json`` sits beside ``heads.pt``).
The cache's features are loaded **once** and handed to every fit. A cell counts as finished when its ``metrics.json``
is complete (every metric present; it is written last and atomically by evaluate), so an interrupted ablation resumes
by running the same command: finished cells are read back, an unfinished cell's directory is cleared and the cell
refit from scratch.

Outputs in ``OUT``:

* ``results.csv``  one row per finished cell: loss, method, dvml (the DVML objective on: dvml and noise), seed,
  every metric, run_dir, fit/eval seconds (a file written before ``method`` existed reads back by ``dvml``);
* ``summary.json`` / ``summary.md``  per loss and metric: mean ± std over seeds for every method run, and
  the paired DVML − baseline and DVML − noise differences over the seeds both have, with a 95% t-interval
  (:mod:`dvml.experiments.stats`);
* ``per_class.csv``  one row per (finished cell, test class): loss, dvml, seed, class, count (queries),
  recall@1, map@r -- gathered from each cell's ``runs/<cell>/per_class.csv``;
* ``per_class_compare.csv``  per loss and class: Recall@1 of baseline and DVML (each the mean over its seeds)
  and their difference, so two methods can be compared class by class (rows by loss, largest loss first);
* ``ablation.png``  bar chart (Recall@1, NMI, MAP@R) with ±1 std error bars;
* ``ablation.json`` provenance: cache path and fingerprint, the config, the fit options, versions, cells.

Nothing here prints; progress goes to ``callback(event)`` (see :class:`AblateEvent`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from dvml import files
from dvml import runs as R
from dvml._lazy import lazy_function
from dvml.cache import CacheError, fingerprint, load_labels, load_split, read_info
from dvml.config_fields import option
from dvml.errors import DvmlError, FieldError
from dvml.evaluate import evaluate_target
from dvml.evaluate.labels import metric_label
from dvml.experiments.gridlog import GridWarnings
from dvml.experiments.stats import MeanStd, PairedDiff, mean_std, paired_difference
from dvml.heads.batch import fit_batch
from dvml.heads.config import FitConfig, config_fields
from dvml.heads.schedule import warn_schedule

fit = lazy_function("dvml.heads.train", "fit")  # torch on first fit, not for declaring the CLI

log = logging.getLogger(__name__)

RESULTS_FILE = "results.csv"
SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
PROVENANCE_FILE = "ablation.json"
CHART_FILE = "ablation.png"
CHART_METRICS = ("recall@1", "nmi", "map@r")
PER_CLASS_FILE = "per_class.csv"  # in each run directory and, gathered, in OUT
PER_CLASS_COMPARE_FILE = "per_class_compare.csv"
SCALE_PANEL = "Speed and many workers"  # the --help panel of the options that spread or stack the grid


class Method(str, Enum):
    """A method of the grid: its cell-name part; :data:`METHOD_TITLES` has the summary's names."""

    base = "base"  # the baseline: Lm(z_I) alone (fit-heads --no-dvml)
    dvml = "dvml"  # DVML: z_V from the learned posterior
    noise = "noise"  # the control: DVML's training, z_V isotropic noise at the same scale (variance_source=noise)


#: The methods' names in summaries (``summary.json`` keys; the first two as before the noise arm existed).
METHOD_TITLES = {Method.base: "baseline", Method.dvml: "DVML", Method.noise: "noise"}
#: The paired differences of the summary: key → (minuend, subtrahend).
DIFFS = {"diff": (Method.dvml, Method.base), "diff_noise": (Method.dvml, Method.noise)}


def parse_methods(methods: str | Sequence) -> tuple[Method, ...]:
    """``"base,dvml,noise"`` or a sequence of names / :class:`Method` (a bool: True = dvml, False = base) → the
    methods, duplicates dropped (a FieldError naming `methods` and the choices otherwise)."""
    items = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    names = [m if isinstance(m, bool | Method) else str(m).strip() for m in items]
    names = [m for m in names if m != ""]
    bad = [m for m in names if not isinstance(m, bool | Method) and m not in Method._value2member_map_]
    if not names or bad:
        shown = methods if isinstance(methods, str) else ",".join(str(getattr(m, "value", m)) for m in items)
        raise FieldError(f"`methods` must be a comma-separated subset of {', '.join(m.value for m in Method)}; "
                         f"got {shown!r}")
    return tuple(dict.fromkeys(Cell("", m, 0).method for m in names))


@dataclass(frozen=True)
class Cell:
    """One fit of the grid. ``method`` also takes a bool (True = dvml, False = base), as before ``noise``."""

    loss: str
    method: Method
    seed: int

    def __post_init__(self):
        m = self.method
        object.__setattr__(self, "method", (Method.dvml if m else Method.base) if isinstance(m, bool) else Method(m))

    @property
    def name(self) -> str:
        return f"{self.loss}-{self.method.value}-s{self.seed}"

    @property
    def dvml(self) -> bool:
        """Whether the DVML objective is on (dvml and the noise control)."""
        return self.method is not Method.base

    @property
    def title(self) -> str:
        return METHOD_TITLES[self.method]


@dataclass(frozen=True)
class AblateConfig:
    """An ablation grid.

    cache: HDF5 feature cache. out: output directory (created; reused to resume).
    losses: metric-loss names understood by fit-heads (e.g. ``triplet``, ``npair``, ``triplet-dws``, any
        regulariser variant the loss factory knows). seeds: the seeds of every (loss, method) pair.
    methods: which methods to run (:class:`Method`): ``(base, dvml)`` by default; ``noise`` adds the control.
    fit: extra :class:`dvml.heads.FitConfig` fields shared by every cell (epochs, lr, batch_size, device,
        ...); ``loss``, ``seed``, the DVML switch and the output directory are set per cell.
    ks / clustering / kmeans_runs: evaluation options (``ks=None``: the paper's K for the dataset).
    confidence: coverage of the paired interval.
    stack: train the cells that differ only in their seed together, as one stacked model
        (:mod:`dvml.experiments.stacking`); False = one fit after another. stack_size: most cells in one stack.
    """

    cache: Path
    out: Path
    losses: tuple[str, ...] = field(default=("triplet", "npair"), metadata=option(
        "Comma-separated metric losses (any fit-heads --loss)."))
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[Method, ...] = field(default=(Method.base, Method.dvml), metadata=option(
        "Comma-separated methods: base (--no-dvml), dvml, noise (the control: DVML's training with z_V replaced by "
        "isotropic noise of the same scale; the summary adds DVML − noise)."))
    fit: dict[str, Any] = field(default_factory=dict)
    ks: tuple[int, ...] | None = None
    clustering: bool = field(default=True, metadata=option("NMI/F1 (k-means) besides the retrieval metrics."))
    kmeans_runs: int = 1
    confidence: float = 0.95
    stack: bool = field(default=True, metadata=option(
        "Train the cells that differ only in their seed together, as one stacked model (same outputs, faster; "
        "losses triplet, npair, triplet-dws; other cells run one by one, the reason logged). --no-stack: one fit "
        "after another.", panel=SCALE_PANEL))
    stack_size: int = field(default=8, metadata=option("Most cells in one stack (bounds memory; at least 2).",
                                                       panel=SCALE_PANEL))

    def __post_init__(self):
        object.__setattr__(self, "cache", Path(self.cache))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "losses", tuple(dict.fromkeys(s.strip() for s in self.losses if s.strip())))
        object.__setattr__(self, "seeds", tuple(dict.fromkeys(int(s) for s in self.seeds)))
        object.__setattr__(self, "methods", parse_methods(self.methods))
        if not self.losses:
            raise FieldError("`losses` must name at least one metric loss")
        if not self.seeds:
            raise FieldError("`seeds` must contain at least one seed")
        if not 0 < self.confidence < 1:
            raise FieldError(f"`confidence` must be in (0, 1), got {self.confidence}")
        if self.stack_size < 2:
            raise FieldError(f"`stack_size` must be >= 2 (a stack of one is a one-by-one fit), got {self.stack_size}")
        reserved = {"cache", "out", "loss", "seed", "dvml", "variance_source", "resume", "overwrite"} & set(self.fit)
        if reserved:
            raise ValueError(f"fit options {sorted(reserved)} are set per cell by the ablation; remove them")

    def cells(self) -> list[Cell]:
        """Grid order: per loss, per seed, the methods in their given order (so pairs complete early)."""
        return [Cell(loss, m, seed) for loss in self.losses for seed in self.seeds for m in self.methods]


class AblateEventKind(str, Enum):
    """What an :class:`AblateEvent` reports."""

    start = "start"  # the grid is known: ``cells`` lists every cell
    cell_start = "cell_start"
    epoch = "epoch"  # fit progress: ``info`` is what the fit reported
    cell_done = "cell_done"  # ``row`` holds the metrics and seconds
    cell_skipped = "cell_skipped"  # finished before: ``row`` read back
    done = "done"  # ``summary`` set


@dataclass(frozen=True)
class AblateEvent:
    """What the ablation reports to its callback; ``kind``: :class:`AblateEventKind` (or its value)."""

    kind: AblateEventKind
    cell: Cell | None = None
    cells: tuple[Cell, ...] = ()
    row: dict | None = None
    info: dict | None = None
    summary: dict | None = None

    def __post_init__(self):
        object.__setattr__(self, "kind", AblateEventKind(self.kind))


AblateCallback = Callable[[AblateEvent], None]


# --------------------------------------------------------------------------------------------------
# cells


def run_dir(cfg: AblateConfig, cell: Cell) -> Path:
    return cfg.out / "runs" / cell.name


def read_finished(run: Path) -> dict | None:
    """The metrics of a finished cell, or None if ``run/metrics.json`` is absent or incomplete."""
    path = run / R.METRICS_FILE
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(metrics, dict) or "ablate" not in metrics:
        return None
    if not any(k.startswith("recall@") for k in metrics) or "map@r" not in metrics:
        return None
    if "checkpoint" in metrics and not R.metrics_current(run, metrics):
        return None  # it scored another checkpoint than the one now on disk
    return metrics


def metric_names(metrics: dict) -> list[str]:
    """The metric keys of a metrics.json in display order (recall@K by K, then the rest)."""
    recalls = sorted((k for k in metrics if k.startswith("recall@") and k[7:].isdigit()), key=lambda k: int(k[7:]))
    rest = [k for k in ("nmi", "f1", "precision", "recall", "map@r", "r_precision") if k in metrics]
    return recalls + rest


#: Diagnostics of the variational branch (dvml.heads.diagnostics) shown as columns: (row key, source, title).
DIAG_COLUMNS = (("diag_active_frac", "active_frac", "active units"), ("diag_kl_sum", "kl_sum", "KL (nats)"),
                ("diag_syn_consistency", "syn_consistency", "ẑ class consistency"),
                ("diag_hardness", "hardness", "Lm(ẑ) − Lm(z_I)"),
                ("diag_grad_cos", "grad_cos_phase2", "grad cos vs Lm(z_I), phase 2"),
                ("diag_grad_ratio", "grad_ratio_phase2", "‖other grads‖ / ‖Lm(z_I)'s‖, phase 2"),
                ("diag_grad_cos_expected", "grad_cos_expected_phase2", "grad cos, draw noise removed, phase 2"),
                ("diag_grad_cos_synthetic", "grad_cos_synthetic_phase2", "grad cos without recon, phase 2"),
                ("diag_grad_ratio_synthetic", "grad_ratio_synthetic_phase2", "‖Lm(ẑ)'s grad‖ / ‖Lm(z_I)'s‖, phase 2"),
                ("diag_grad_cos_syn_term", "grad_cos_syn_term_expected_phase2",
                 "cos(Lm(ẑ)'s expected grad, Lm(z_I)'s), phase 2"))


def run_diagnostics(run: Path) -> dict:
    """The ``diag_*`` columns of one run from its ``log.jsonl``: the last epoch's branch statistics and
    Lm(ẑ) − Lm(z_I), and the phase-2 means of the gradient cosines and ratio (None where not logged, e.g. the
    baseline or a run from before a statistic existed)."""
    from dvml.heads.diagnostics import phase2_mean
    from dvml.runs import read_log

    try:
        recs = read_log(run)
    except DvmlError:
        recs = []
    last = recs[-1] if recs else {}
    src = {k: last.get(k) for k in ("active_frac", "kl_sum", "syn_consistency")}
    src["hardness"] = (last["metric_synthetic"] - last["metric_invariant"]
                       if last.get("phase") and "metric_synthetic" in last else None)
    src["grad_cos_phase2"] = phase2_mean(recs, "grad_cos_invariant")
    src["grad_ratio_phase2"] = phase2_mean(recs, "grad_ratio_other")
    src["grad_cos_expected_phase2"] = phase2_mean(recs, "grad_cos_expected")
    for key in ("grad_cos_synthetic", "grad_ratio_synthetic", "grad_cos_syn_term_expected"):
        src[f"{key}_phase2"] = phase2_mean(recs, key)
    return {col: (None if src[key] is None else float(src[key])) for col, key, _ in DIAG_COLUMNS}


def _row(cell: Cell, metrics: dict, run: Path) -> dict:
    ab = metrics["ablate"]
    row = {"loss": cell.loss, "method": cell.method.value, "dvml": cell.dvml, "seed": cell.seed}
    row.update({k: float(metrics[k]) for k in metric_names(metrics)})
    row.update({"run_dir": str(run), "fit_seconds": ab.get("fit_seconds"), "eval_seconds": ab.get("eval_seconds")})
    row.update(run_diagnostics(run))
    return row


def _fit_config(cfg: AblateConfig, cell: Cell, run: Path) -> FitConfig:
    names = {f.name for f in config_fields(FitConfig)}
    unknown = set(cfg.fit) - names
    if unknown:
        raise DvmlError(f"unknown fit option(s) {sorted(unknown)}; FitConfig has {sorted(names)}")
    kw = dict(cfg.fit)
    kw.update(cache=cfg.cache, out=run, loss=cell.loss, seed=cell.seed, dvml=cell.dvml,
              variance_source="noise" if cell.method is Method.noise else "learned")
    return FitConfig(**kw)


def _run_cell(cfg: AblateConfig, cell: Cell, train, test, callback: AblateCallback, *, resume: bool = False) -> dict:
    """Fit and evaluate one cell; ``resume``: continue the fit from its checkpoint (a grid shared through a storage,
    see :mod:`dvml.experiments.grid_storage`, whose grid identity makes the checkpoint this cell's)."""
    run = run_dir(cfg, cell)
    if run.exists() and not resume:  # an unfinished cell: start it over (resuming a half-written fit would mix configs)
        log.info("%s: unfinished, refitting from scratch", cell.name)
        shutil.rmtree(run)
    files.make_dir(run.parent)
    fit_cfg = _fit_config(cfg, cell, run)
    if resume:
        fit_cfg = dataclasses.replace(fit_cfg, resume=True)

    def on_fit(ev) -> None:  # dvml.heads.FitEvent: forwarded as a plain dict
        if ev.kind in ("step", "epoch"):
            # epoch: 1-based number of the epoch running (step) or just finished (epoch)
            info = {"epoch": ev.epoch + 1 if ev.kind == "step" else ev.epoch, "epochs": ev.epochs,
                    "step": ev.step, "steps": ev.steps, "kind": ev.kind}
            if ev.record:
                info.update(ev.record)
            callback(AblateEvent("epoch", cell=cell, info=info))

    t0 = time.perf_counter()
    fit(fit_cfg, train=train, test=test, callback=on_fit)
    return _evaluate_cell(cfg, cell, run, time.perf_counter() - t0)


def _evaluate_cell(cfg: AblateConfig, cell: Cell, run: Path, fit_s: float) -> dict:
    """Evaluate a fitted cell; its metrics.json (written last) marks it finished; returns its row."""
    t0 = time.perf_counter()
    # metrics.json is written last (atomically): its presence marks the cell finished
    evaluate_target(run, ks=cfg.ks, clustering=cfg.clustering, kmeans_runs=cfg.kmeans_runs,
                    extra={"ablate": {"loss": cell.loss, "method": cell.method.value, "dvml": cell.dvml,
                                      "seed": cell.seed,
                                      "fit_seconds": float(f"{fit_s:.3f}"), "eval_seconds": None}},
                    per_class_csv=run / PER_CLASS_FILE)
    eval_s = time.perf_counter() - t0
    metrics = json.loads((run / R.METRICS_FILE).read_text())
    metrics["ablate"]["eval_seconds"] = float(f"{eval_s:.3f}")
    R.atomic_write_json(metrics, run / R.METRICS_FILE)
    return _row(cell, metrics, run)


# --------------------------------------------------------------------------------------------------
# summary


def row_method(row: dict) -> Method:
    """A results row's method: its ``method``, or (a row written before the noise arm) its ``dvml`` flag."""
    m = row.get("method")
    return Method(m) if m else (Method.dvml if row["dvml"] else Method.base)


def summarize(rows: Sequence[dict], *, confidence: float = 0.95) -> dict:
    """Per loss and metric: each method's mean ± std over seeds and the paired differences :data:`DIFFS`.

    Returns:
        ``{"losses": {loss: {"n_seeds": {"baseline": n, "DVML": n[, "noise": n]}, "paired_seeds": [..],
        "paired_seeds_noise": [..], "metrics": {metric: {"baseline": {mean, std, n}, "DVML": {...}[, "noise":
        {...}], "diff": {mean, std, low, high, p_value, n, confidence}, "diff_noise": {...}}}}}, "metrics":
        [metric names], "methods": [titles], "confidence": c}``: baseline and DVML always, noise when any row
        has it; a method with no runs has ``None`` in its place, and a difference is ``None`` unless both of
        its methods share a seed (``diff`` = DVML − baseline, ``diff_noise`` = DVML − noise).
    """
    metrics: list[str] = []
    for r in rows:
        for k in metric_names(r):
            if k not in metrics:
                metrics.append(k)
    metrics = metric_names(dict.fromkeys(metrics))
    methods = [Method.base, Method.dvml] + ([Method.noise] if any(row_method(r) is Method.noise for r in rows)
                                            else [])
    diffs = {k: v for k, v in DIFFS.items() if v[1] in methods}
    out: dict = {"losses": {}, "metrics": metrics, "methods": [METHOD_TITLES[m] for m in methods],
                 "confidence": confidence}
    for loss in dict.fromkeys(r["loss"] for r in rows):
        by = {m: {int(r["seed"]): r for r in rows if r["loss"] == loss and row_method(r) is m} for m in methods}
        pairs = {k: sorted(set(by[a]) & set(by[b])) for k, (a, b) in diffs.items()}
        entry: dict = {"n_seeds": {METHOD_TITLES[m]: len(by[m]) for m in methods}, "paired_seeds": pairs["diff"],
                       "metrics": {}}
        if "diff_noise" in pairs:
            entry["paired_seeds_noise"] = pairs["diff_noise"]
        for k in metrics:
            e = {}
            for m in methods:
                vals = [r[k] for _, r in sorted(by[m].items()) if k in r and r[k] is not None]
                e[METHOD_TITLES[m]] = dataclasses.asdict(mean_std(vals)) if vals else None
            for key, (a, b) in diffs.items():
                ok = [s for s in pairs[key] if by[a][s].get(k) is not None and by[b][s].get(k) is not None]
                e[key] = dataclasses.asdict(paired_difference([by[a][s][k] for s in ok], [by[b][s][k] for s in ok],
                                                              confidence=confidence)) if ok else None
            entry["metrics"][k] = e
        entry["diagnostics"] = {}
        for col, _, _ in DIAG_COLUMNS:
            e = {}
            for m in methods:
                vals = [r[col] for _, r in sorted(by[m].items()) if r.get(col) is not None]
                e[METHOD_TITLES[m]] = dataclasses.asdict(mean_std(vals)) if vals else None
            entry["diagnostics"][col] = e
        out["losses"][loss] = entry
    return out


def _fmt_ms(d: dict | None) -> str:
    if d is None:
        return "—"
    return MeanStd(**d).format()


def _fmt_diff(d: dict | None) -> str:
    if d is None:
        return "—"
    return PairedDiff(**d).format()


def _fmt_p(d: dict | None) -> str:
    if d is None or d["p_value"] is None or math.isnan(d["p_value"]):
        return "—"
    return f"{d['p_value']:.3f}"


def summary_markdown(summary: dict, *, title: str = "Ablation") -> str:
    """``summary.md``: one table per loss, metrics as rows, values in percent; the noise arm's columns and
    DVML − noise when the summary has them."""
    c = int(f"{summary['confidence'] * 100:.0f}")
    names = summary.get("methods", ["baseline", "DVML"])
    noise = "noise" in names
    lines = [f"# {title}", "",
             "Values in %: mean ± std over seeds (sample std). Δ = DVML − baseline"
             + (" and DVML − noise (the control: z_V replaced by isotropic noise of the same scale)" if noise else "")
             + f", paired by seed, with its {c}% t-interval across seeds and the paired t-test p-value.", ""]
    for loss, e in summary["losses"].items():
        n = e["n_seeds"]
        seeds = ", ".join(f"{k} {v}" for k, v in n.items())
        paired = f"paired {len(e['paired_seeds'])}" + (f" / {len(e.get('paired_seeds_noise', []))}" if noise else "")
        head = f"| metric | {' | '.join(names)} | Δ [{c}% CI] | p |" + (f" Δ vs noise [{c}% CI] | p |" if noise else "")
        lines += [f"## {loss}", "", f"seeds: {seeds}, {paired}", "", head,
                  "|---" * (len(names) + 3 + (2 if noise else 0)) + "|"]
        for k, m in e["metrics"].items():
            cells = " | ".join(_fmt_ms(m.get(name)) for name in names)
            line = f"| {metric_label(k)} | {cells} | {_fmt_diff(m['diff'])} | {_fmt_p(m['diff'])} |"
            if noise:
                line += f" {_fmt_diff(m.get('diff_noise'))} | {_fmt_p(m.get('diff_noise'))} |"
            lines.append(line)
        lines.append("")
        diag = {col: d for col, d in e.get("diagnostics", {}).items() if any(d.get(name) for name in names)}
        if diag:
            titles = {col: title for col, _, title in DIAG_COLUMNS}
            lines += ["DVML branch diagnostics (last epoch; gradient cosine: phase-2 mean), mean ± std over seeds:",
                      "", f"| diagnostic | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|"]
            for col, d in diag.items():
                lines.append(f"| {titles[col]} | {' | '.join(_fmt_raw(d.get(name)) for name in names)} |")
            lines.append("")
    return "\n".join(lines)


def gather_per_class(rows: Sequence[dict]) -> list[dict]:
    """Per-class rows of every finished cell (from ``run_dir/per_class.csv``; cells without one are skipped)."""
    out = []
    for row in rows:
        path = Path(row["run_dir"]) / PER_CLASS_FILE
        if not path.is_file():
            log.info("%s: no %s (evaluated by an older dvml); left out of the per-class files", row["run_dir"],
                     PER_CLASS_FILE)
            continue
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                out.append({"loss": row["loss"], "method": row_method(row).value, "dvml": row["dvml"],
                            "seed": row["seed"], "class": int(r["class"]),
                            "count": int(r["count"]), "recall@1": float(r["recall@1"]), "map@r": float(r["map@r"])})
    return out


def compare_per_class(per_class: Sequence[dict]) -> list[dict]:
    """Per loss and class: mean Recall@1 over the baseline seeds and over the DVML seeds, and DVML - baseline.

    Only (loss, class) pairs that both methods have appear; sorted by loss, then the difference (the
    classes DVML loses most on first), then class id.
    """
    acc: dict[tuple[str, int], dict[bool, list[float]]] = {}
    counts: dict[tuple[str, int], int] = {}
    for r in per_class:
        if row_method(r) is Method.noise:  # baseline against DVML only
            continue
        acc.setdefault((r["loss"], r["class"]), {True: [], False: []})[bool(r["dvml"])].append(r["recall@1"])
        counts[(r["loss"], r["class"])] = r["count"]
    out = []
    for (loss, cls), by in acc.items():
        if by[True] and by[False]:
            base, dvml = sum(by[False]) / len(by[False]), sum(by[True]) / len(by[True])
            out.append({"loss": loss, "class": cls, "count": counts[(loss, cls)], "recall@1_baseline": base,
                        "recall@1_dvml": dvml, "diff": dvml - base, "seeds_baseline": len(by[False]),
                        "seeds_dvml": len(by[True])})
    out.sort(key=lambda r: (r["loss"], r["diff"], r["class"]))
    return out


def _write_rows_csv(rows: Sequence[dict], path: Path) -> None:
    buf = io.StringIO(newline="")
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    files.write_text(buf.getvalue(), path)


def _fmt_raw(d: dict | None) -> str:
    if d is None:
        return "—"
    std = "" if d.get("std") is None or math.isnan(d["std"]) else f" ± {d['std']:.3f}"
    return f"{d['mean']:.3f}{std}"


def write_results_csv(rows: Sequence[dict], path: Path) -> None:
    metrics = summarize(rows)["metrics"] if rows else []
    cols = ["loss", "method", "dvml", "seed", *metrics, *(c for c, _, _ in DIAG_COLUMNS), "run_dir", "fit_seconds",
            "eval_seconds"]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in cols})
    files.write_text(buf.getvalue(), path)


def read_results_csv(path: Path) -> list[dict]:
    """Rows of a ``results.csv`` with numbers parsed (dvml as bool, seed as int, metrics as float; ``method`` as
    written, or from ``dvml`` in a file written before it existed)."""
    rows = []
    with Path(path).open(newline="") as f:
        for r in csv.DictReader(f):
            out: dict = {}
            for k, v in r.items():
                if k in ("loss", "run_dir", "method"):
                    out[k] = v
                elif k == "dvml":
                    out[k] = v == "True"
                elif k == "seed":
                    out[k] = int(v)
                else:
                    out[k] = float(v) if v not in ("", "None") else None
            if not out.get("method"):
                out["method"] = row_method({**out, "method": None}).value
            rows.append(out)
    return rows


def write_chart(summary: dict, path: Path, *, title: str) -> Path:
    from dvml.evaluate import plots

    losses = list(summary["losses"])
    panels = {}
    for k in CHART_METRICS:
        if k not in summary["metrics"]:
            continue
        series = {}
        for name in summary.get("methods", ("baseline", "DVML")):
            ms = [summary["losses"][loss]["metrics"][k][name] for loss in losses]
            if all(m is None for m in ms):
                continue
            series[name] = ([m["mean"] if m else math.nan for m in ms], [m["std"] if m else math.nan for m in ms])
        panels[k] = series
    return plots.grouped_bars(losses, panels, path, title=title)


def _nan_to_none(o):
    """NaN (undefined std/interval) as JSON null: strict JSON readers reject NaN."""
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_nan_to_none(v) for v in o]
    return o


def _jsonable(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple | list):
        return [_jsonable(v) for v in o]
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if hasattr(o, "value") and not isinstance(o, int | float | str | bool):
        return o.value  # enums
    return o


# --------------------------------------------------------------------------------------------------
# the stage


def finished_cells(out: Path) -> list[str]:
    """Names of the cells under ``OUT/runs`` whose metrics.json is complete."""
    runs = Path(out) / "runs"
    return sorted(p.name for p in runs.iterdir() if p.is_dir() and read_finished(p)) if runs.is_dir() else []


def _check_earlier_grid(cfg: AblateConfig, prov_path: Path, fp: str) -> None:
    """Resuming into ``cfg.out``: refuse a grid whose finished cells were made with another cache or other fit
    options (they would be mixed into one table). A grid with no finished cell is simply started over."""
    done = finished_cells(cfg.out)
    if not done:
        log.info("%s: no cell of the earlier ablation finished; starting over with these options", cfg.out)
        return
    try:
        old = json.loads(prov_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DvmlError(f"{prov_path}: unreadable ({e}) while {len(done)} cell(s) finished; use another `out`") \
            from None
    if old.get("cache_fingerprint") not in (None, fp):
        raise DvmlError(f"{cfg.out} holds an ablation of a different cache (fingerprint "
                        f"{old['cache_fingerprint']}, now {fp}) with {len(done)} finished cell(s); use another `out`")
    if old.get("fit") not in (None, _jsonable(cfg.fit)):
        raise DvmlError(f"{cfg.out} holds an ablation with other fit options ({old.get('fit')}) and {len(done)} "
                        f"finished cell(s); resuming with {_jsonable(cfg.fit)} would mix them in one table; use "
                        "another `out`")


def run(cfg: AblateConfig, *, callback: AblateCallback | None = None) -> dict:
    """Run (or resume) the grid; write results.csv, summary.md/json, ablation.png, ablation.json.

    Returns the summary dict (see :func:`summarize`) with ``"rows"`` (one per finished cell) and
    ``"out"`` added. Raises DvmlError for a bad cache or an unknown fit option before any fit runs.
    """
    cb = callback or (lambda _e: None)
    info, fp, cells = check_grid(cfg)
    with files.writer_lock(cfg.out), GridWarnings.quiet():  # one ablation at a time per --out
        return _run(cfg, cells, info, fp, cb)


def check_grid(cfg: AblateConfig):
    """Read the cache and check every cell's options; returns ``(cache info, fingerprint, cells)``. Writes nothing."""
    try:
        info = read_info(cfg.cache)
        fp = fingerprint(cfg.cache)
    except CacheError as e:
        raise DvmlError(str(e)) from None
    cells = cfg.cells()
    labels = load_labels(cfg.cache, "train")
    # Every cell is checked now (and nothing is written), not after hours of other cells: an unknown loss or
    # option, and a batch the training classes cannot fill (e.g. npair at --batch-size 8 needs 4 classes).
    grid = GridWarnings()  # the fits' warnings (batch fitted to the data, schedule) said once for the grid
    unfinished = {c.name for c in cells if read_finished(run_dir(cfg, c)) is None}
    for cell in cells:
        try:
            with grid.check(cell.name, runs=cell.name in unfinished):
                fitted, _ = fit_batch(_fit_config(cfg, cell, run_dir(cfg, cell)), labels,
                                      where=f"{cfg.cache} ({cell.name})", per_class_option="--set per-class={}")
                warn_schedule(fitted)
        except (ValueError, TypeError) as e:
            raise DvmlError(f"{cell.name}: {e}") from None
    grid.say(log, len(unfinished))
    return info, fp, cells


def provenance(cfg: AblateConfig, cells: list[Cell], info, fp: str) -> dict:
    """The ``ablation.json`` record of a grid as it starts."""
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {"cache": str(cfg.cache.resolve()), "cache_fingerprint": fp, "dataset": info.dataset,
            "backbone": info.backbone, "feature_dim": info.feature_dim,
            "config": _jsonable(dataclasses.asdict(cfg)), "fit": _jsonable(cfg.fit),
            "cells": [c.name for c in cells], "versions": R.versions(), "started": started, "finished": None}


def _run(cfg: AblateConfig, cells: list[Cell], info, fp: str, cb: AblateCallback) -> dict:
    prov_path = cfg.out / PROVENANCE_FILE
    if prov_path.exists():
        _check_earlier_grid(cfg, prov_path, fp)
    files.make_dir(cfg.out)
    prov = provenance(cfg, cells, info, fp)
    R.atomic_write_json(prov, prov_path)
    cb(AblateEvent("start", cells=tuple(cells)))

    rows: list[dict] = []
    todo = []
    for cell in cells:
        done = read_finished(run_dir(cfg, cell))
        if done is not None:
            row = _row(cell, done, run_dir(cfg, cell))
            rows.append(row)
            cb(AblateEvent("cell_skipped", cell=cell, row=row))
        else:
            todo.append(cell)
    if todo:
        t0 = time.perf_counter()
        train, test = load_split(cfg.cache, "train"), load_split(cfg.cache, "test")
        log.info("loaded %s once (%.1fs): %d train, %d test images; %d of %d cells to run", cfg.cache,
                 time.perf_counter() - t0, len(train.labels), len(test.labels), len(todo), len(cells))
        from dvml.experiments.stacking import run_cells

        for cell, row in run_cells(cfg, todo, train, test, cb, _run_cell):  # stacked where cells allow
            rows.append(row)
            rows.sort(key=lambda r: cells.index(Cell(r["loss"], row_method(r), r["seed"])))
            write_results_csv(rows, cfg.out / RESULTS_FILE)  # after every cell: partial results are usable
            cb(AblateEvent("cell_done", cell=cell, row=row))
    return write_summary(cfg, cells, rows, info, prov, cb)


def write_summary(cfg: AblateConfig, cells: list[Cell], rows: list[dict], info, prov: dict,
                  cb: AblateCallback) -> dict:
    """Write results.csv, summary.json/md, the chart, the per-class files and the finished ablation.json."""
    prov_path = cfg.out / PROVENANCE_FILE
    rows.sort(key=lambda r: cells.index(Cell(r["loss"], row_method(r), r["seed"])))
    write_results_csv(rows, cfg.out / RESULTS_FILE)
    summary = summarize(rows, confidence=cfg.confidence)
    title = f"{info.dataset}: {', '.join(cfg.losses)}; {len(cfg.seeds)} seed(s), error bars ±1 std over seeds"
    files.write_json(_nan_to_none(summary), cfg.out / SUMMARY_JSON)
    files.write_text(summary_markdown(summary, title=f"Ablation on {cfg.cache.name} ({title})"), cfg.out / SUMMARY_MD)
    write_chart(summary, cfg.out / CHART_FILE, title=title)
    per_class = gather_per_class(rows)
    _write_rows_csv(per_class, cfg.out / PER_CLASS_FILE)
    _write_rows_csv(compare_per_class(per_class), cfg.out / PER_CLASS_COMPARE_FILE)
    prov["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    prov["fit_seconds_total"] = float(f"{sum(r['fit_seconds'] or 0.0 for r in rows):.3f}")
    R.atomic_write_json(prov, prov_path)
    result = {**summary, "rows": rows, "out": str(cfg.out)}
    cb(AblateEvent("done", summary=result))
    return result

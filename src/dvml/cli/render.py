"""Rendering shared by several commands: result tables, loss-term lines, the live ablation table."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from rich.console import Group
from rich.live import Live
from rich.table import Table

from dvml.cli.app import console, err_console, make_progress
from dvml.evaluate.labels import fixed, metric_label


def results_table(result: dict, title: str | None = None) -> Table:
    """One-row rich table of a result dict, in percent like the paper's tables (NMI, F1, R@K, MAP@R, R-prec)."""
    table = Table(title=title, title_justify="left")
    keys = (["nmi", "f1"] if "nmi" in result else []) + [k for k in result if k.startswith("recall@")]
    keys += ["map@r", "r_precision"]
    for key in keys:
        table.add_column(metric_label(key), justify="right")
    table.add_row(*(fixed(100 * result[key], 2) for key in keys))
    return table


def worst_table(rows: list[dict], n: int) -> Table:
    """The ``n`` classes with the lowest Recall@1 (``dvml evaluate``'s per-class rows): class, queries, R@1,
    MAP@R (percent)."""
    from dvml.evaluate import worst_classes  # lazily: numpy and faiss are not needed to declare the commands

    table = Table(title=f"worst {min(n, len(rows))} of {len(rows):,} classes by Recall@1", title_justify="left")
    for name in ("class", "queries", "R@1", "MAP@R"):
        table.add_column(name, justify="right")
    for r in worst_classes(rows, n):
        table.add_row(str(r["class"]), str(r["count"]), fixed(100 * r["recall@1"], 2), fixed(100 * r["map@r"], 2))
    return table


def format_terms(record: dict) -> str:
    keys = (("total", "L"), ("kl", "kl"), ("recon", "rec"), ("metric_invariant", "Lm(zI)"),
            ("metric_synthetic", "Lm(ẑ)"))
    text = " ".join(f"{short} {record[k]:.4g}" for k, short in keys if k in record)
    for k in ("test_recall@1", "val_recall@1"):
        if k in record:
            text += f" {k.replace('_recall@1', ' R@1')} {record[k]:.3f}"
    return text


def _pct(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else fixed(100 * x)


class _AblationView:
    """State of a running ablation rendered as a rich table (one row per cell)."""

    def __init__(self):
        self.cells: list = []
        self.status: dict = {}
        self.rows: dict = {}
        self.started: dict = {}
        self.last_record: dict = {}

    def __call__(self, event) -> None:
        name = event.cell.name if event.cell is not None else None
        if event.kind == "start":
            self.cells = list(event.cells)
            self.status = {c.name: "[dim]queued[/]" for c in self.cells}
        elif event.kind == "cell_start":
            self.status[name] = "[yellow]fitting[/]"
            self.started[name] = time.perf_counter()
        elif event.kind == "epoch":
            info = event.info or {}
            ep, total = info.get("epoch"), info.get("epochs")
            text = "[yellow]fitting[/]"
            if ep is not None:
                text = f"[yellow]epoch {int(ep)}{f'/{total}' if total else ''}[/]"
            if info.get("kind") == "epoch":
                self.last_record[name] = info
            rec = self.last_record.get(name, {})
            if isinstance(rec.get("total"), int | float):
                text += f" loss {rec['total']:.3g}"
            if isinstance(rec.get("test_recall@1"), int | float):
                text += f" (watch: test R@1 {100 * rec['test_recall@1']:.1f})"
            self.status[name] = text
        elif event.kind in ("cell_done", "cell_skipped"):
            self.status[name] = "[green]done[/]" if event.kind == "cell_done" else "[cyan]done before[/]"
            self.rows[name] = event.row

    def table(self) -> Table:
        t = Table(title="ablation", title_justify="left")
        for col in ("run", "status", "R@1", "NMI", "MAP@R", "fit s"):
            t.add_column(col, justify="left" if col in ("run", "status") else "right")
        for c in self.cells:
            r = self.rows.get(c.name) or {}
            secs = r.get("fit_seconds")
            if secs is None and c.name in self.started and c.name not in self.rows:
                secs = time.perf_counter() - self.started[c.name]
            t.add_row(c.name, self.status.get(c.name, ""), _pct(r.get("recall@1")), _pct(r.get("nmi")),
                      _pct(r.get("map@r")), "" if secs is None else f"{secs:.1f}")
        return t


def summary_tables(summary: dict, *, title: str) -> list[Table]:
    """One table per loss: metric rows; each method (baseline, DVML, the noise control if run) as mean ± std (%)
    over seeds, and Δ = DVML − baseline (and DVML − noise) paired by seed with its t-interval (green/red when the
    interval excludes 0)."""
    metrics = [m for m in summary["metrics"] if m not in ("precision", "recall")]
    from dvml.experiments.stats import MeanStd, PairedDiff  # lazily: scipy is slow to import

    c = int(f"{summary['confidence'] * 100:.0f}")
    tables = []
    for loss, e in summary["losses"].items():
        n = e["n_seeds"]
        t = Table(title=f"{title}: {loss}", title_justify="left")
        t.add_column("metric (%)")
        names = summary.get("methods", ["baseline", "DVML"])
        diffs = [("diff", f"Δ DVML−base [{c}% CI]")] + ([("diff_noise", f"Δ DVML−noise [{c}% CI]")]
                                                          if "noise" in names else [])
        for k in names:
            t.add_column(f"{k} (n={n[k]})", justify="right")
        for _, head in diffs:
            t.add_column(head, justify="right")
        for m in metrics:
            row = e["metrics"][m]
            cells = [MeanStd(**row[k]).format() if row.get(k) else "—" for k in names]
            for key, _ in diffs:
                d = row.get(key)
                if d is None:
                    cells.append("—")
                    continue
                pd = PairedDiff(**d)
                style = ("green" if pd.mean > 0 else "red") if pd.significant else ""
                cells.append(f"[{style}]{pd.format()}[/]" if style else pd.format())
            t.add_row(metric_label(m), *cells)
        tables.append(t)
    return tables


def print_ablation_result(result: dict, title: str) -> None:
    for table in summary_tables(result, title=title):
        console.print(table)
    from dvml.experiments.ablate import CHART_FILE, RESULTS_FILE, SUMMARY_MD

    out = Path(result["out"])
    console.print(f"results: {out / RESULTS_FILE}  summary: {out / SUMMARY_MD}  chart: {out / CHART_FILE}")


class _GridProgress:
    """The overall bar of an ablation: cells to run (not those finished before), advanced by fit steps, ETA."""

    def __init__(self):
        self.progress = make_progress("cell")
        self.task = None
        self.done = 0

    def __call__(self, event) -> None:
        if event.kind == "start":
            self.total = len(event.cells)
        elif event.kind == "cell_skipped":
            self.total -= 1
        elif event.kind == "cell_start" and self.task is None:
            self.task = self.progress.add_task("grid", total=max(self.total, 1), rate="")
        elif event.kind == "epoch" and self.task is not None:
            info = event.info or {}
            ep, epochs, step, steps = (info.get(k) for k in ("epoch", "epochs", "step", "steps"))
            if epochs and steps:
                frac = (int(ep) - 1 + int(step) / int(steps)) / int(epochs) if info.get("kind") == "step" else \
                    int(ep) / int(epochs)
                self.progress.update(self.task, completed=self.done + min(frac, 1.0))
        elif event.kind == "cell_done" and self.task is not None:
            self.done += 1
            self.progress.update(self.task, completed=self.done)


def run_ablation(fn, *args, **kwargs) -> dict:
    # the live table shows each cell; the per-fit/per-evaluation INFO lines would only scroll it (kept with -v):
    # the root logger's handlers show warnings only while it runs, then get their levels back.
    root = logging.getLogger()
    handlers = list(root.handlers)
    saved = [h.level for h in handlers]
    if root.level > logging.DEBUG:
        for h in handlers:
            h.setLevel(max(h.level, logging.WARNING))
    view, bar = _AblationView(), _GridProgress()
    # the display starts with the grid's "start" event, i.e. after every check: a refused grid draws nothing
    live = Live(console=err_console, refresh_per_second=4, transient=False)
    try:
        last = [0.0]

        def render():
            return Group(view.table(), bar.progress) if bar.task is not None else view.table()

        def cb(event):
            view(event)
            bar(event)
            if event.kind == "start":
                live.start()
            now = time.perf_counter()
            # per-step events can come thousands of times a second on a GPU: redraw at most 10 times a second
            if event.kind != "epoch" or now - last[0] > 0.1:
                last[0] = now
                live.update(render(), refresh=True)

        return fn(*args, callback=cb, **kwargs)
    finally:
        live.stop()
        for h, level in zip(handlers, saved, strict=True):
            h.setLevel(level)

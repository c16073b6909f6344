"""Tables print no signed zero and one name per metric."""

from __future__ import annotations

import dataclasses

from rich.console import Console

from dvml.cli.render import results_table, summary_tables
from dvml.evaluate.labels import fixed, metric_label
from dvml.experiments.ablate import summary_markdown
from dvml.experiments.stats import MeanStd, PairedDiff


def _text(renderable) -> str:
    c = Console(width=200, record=True)
    c.print(renderable)
    return c.export_text()


def test_fixed_never_prints_a_signed_zero():
    assert [fixed(v) for v in (-0.0, -1e-9, -0.04, 0.04)] == ["0.0", "0.0", "0.0", "0.0"]
    assert [fixed(v, signed=True) for v in (-0.0, -0.04, 0.0, 0.06, -0.06)] == ["0.0", "0.0", "0.0", "+0.1", "-0.1"]
    assert f"{-0.0004 * 100:+.1f}" == "-0.0"  # the control: what plain formatting prints


def _summary(diff: PairedDiff, base: MeanStd, dvml: MeanStd) -> dict:
    row = {"baseline": dataclasses.asdict(base), "DVML": dataclasses.asdict(dvml), "diff": dataclasses.asdict(diff)}
    return {"confidence": 0.95, "metrics": ["recall@1", "map@r", "r_precision"],
            "losses": {"triplet": {"n_seeds": {"baseline": 2, "DVML": 2}, "paired_seeds": [0, 1],
                                   "metrics": {m: row for m in ("recall@1", "map@r", "r_precision")}}}}


def test_ablation_tables_and_summary_md_print_no_signed_zero_and_the_same_metric_names():
    tiny = -1e-6  # a difference that rounds to zero, from below
    s = _summary(PairedDiff(mean=tiny, std=0.0, low=tiny, high=tiny, p_value=float("nan"), n=2, confidence=0.95),
                 MeanStd(0.25, 0.029, 2), MeanStd(0.25, 0.029, 2))
    text = "".join(_text(t) for t in summary_tables(s, title="t"))
    md = summary_markdown(s)
    for out in (text, md):
        assert "-0.0" not in out and "0.0 [0.0, 0.0]" in out
        assert "R-prec" in out and "r_precision" not in out and "RP " not in out
    ev = _text(results_table({"recall@1": 0.5, "map@r": 0.25, "r_precision": 0.3}))
    assert "R-prec" in ev and "RP" not in ev.replace("R-prec", "")
    assert metric_label("r_precision") == "R-prec" and metric_label("recall@10") == "R@10"

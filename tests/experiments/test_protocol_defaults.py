"""The written protocol for fit-heads' defaults: the rule, the decision file written before the test check, and
a decision never changed by the test check."""

from __future__ import annotations

import json

import numpy as np

from dvml.experiments.protocols import defaults as P
from dvml.extract.synth import SynthConfig, generate


def test_rule_prefers_the_paper_unless_a_candidate_clearly_wins_everywhere():
    s = {"paper": {"a": 0.70, "b": 0.60}, "middle": {"a": 0.72, "b": 0.62}, "earlier-default": {"a": 0.80, "b": 0.585}}
    assert P.decide(s) == "middle"  # earlier-default scores highest but loses 0.015 on b
    s["middle"] = {"a": 0.704, "b": 0.604}  # within half a point of the paper
    assert P.decide(s) == "paper"
    assert P.decide({"paper": {"a": 0.5}, "middle": {"a": 0.52}}) == "middle"


def test_protocol_writes_its_decision_then_the_test_check(tmp_path):
    sets = []
    for i in range(3):
        path = generate(SynthConfig(n_classes=16, images_per_class=6, views=2, feature_dim=16, class_dim=8,
                                    variation_dim=4, hidden_dim=16, seed=i), tmp_path / f"w{i}.h5")
        sets += ["--set", f"w{i}={path}"]
    opts = [f"--set-option={k}={v}" for k, v in {"epochs": 2, "phase2_epoch": 1, "kl_warmup_epochs": 1,
                                                   "eval_every": 1, "embedding_size": 8, "decoder_hidden": 8,
                                                   "samples": 2, "batch_size": 8, "device": '"cpu"',
                                                   "diag_images": 0, "grad_every": 0}.items()]
    out = tmp_path / "proto"
    assert P.main([*sets, "--out", str(out), "--seeds", "2", "--schedules", "default", *opts]) == 0
    dec = json.loads((out / P.DECISION_FILE).read_text())
    assert dec["complete"] and dec["rule"] == P.RULE and len(dec["fits"]) == 3 * 3 * 2
    assert not (out / P.TEST_FILE).exists()  # the test split is not touched by the decision
    scores = {}
    for f in dec["fits"]:
        scores.setdefault(f["candidate"], {}).setdefault(f["set"], []).append(f["val_recall@1"])
        assert f["val_classes"] == 2 and 0 <= f["val_recall@1"] <= 1
    scores = {c: {k: float(np.mean(v)) for k, v in per.items()} for c, per in scores.items()}
    assert dec["choice"] == P.decide({c: {f"{k}/default": v for k, v in per.items()} for c, per in scores.items()})
    before = (out / P.DECISION_FILE).read_text()
    assert P.main([*sets, "--out", str(out), "--seeds", "2", "--schedules", "default", "--test-check", *opts]) == 0
    assert (out / P.DECISION_FILE).read_text() == before  # the test check never changes the decision
    check = json.loads((out / P.TEST_FILE).read_text())
    assert check["choice"] == dec["choice"] and set(check["sets"]) == {"w0", "w1", "w2"}
    assert all(len(v) == 2 for e in check["sets"].values() for v in e["test_recall@1"].values())


def test_protocol_in_parallel_workers_gives_the_same_decision(tmp_path):
    """``--jobs 2`` (one-thread worker processes) reproduces the one-process protocol's every validation number."""
    path = generate(SynthConfig(n_classes=12, images_per_class=6, views=2, feature_dim=16, class_dim=8,
                                variation_dim=4, hidden_dim=16, seed=5), tmp_path / "w.h5")
    opts = [f"--set-option={k}={v}" for k, v in {"epochs": 2, "phase2_epoch": 1, "kl_warmup_epochs": 1,
                                                   "eval_every": 1, "embedding_size": 8, "decoder_hidden": 8,
                                                   "samples": 2, "batch_size": 8, "device": '"cpu"',
                                                   "diag_images": 0, "grad_every": 0}.items()]
    decisions = []
    for jobs in (1, 2):
        out = tmp_path / f"proto{jobs}"
        assert P.main(["--set", f"w={path}", "--out", str(out), "--seeds", "1", "--schedules", "default",
                       "--jobs", str(jobs), *opts]) == 0
        decisions.append(json.loads((out / P.DECISION_FILE).read_text()))
    assert len(decisions[0]["fits"]) == 3
    assert decisions[0]["fits"] == decisions[1]["fits"] and decisions[0]["choice"] == decisions[1]["choice"]

"""fit-heads samples/s of two source trees side by side: ``PYTHONPATH=<tree>/src python bench/fit_heads_side_by_side.py
CACHE`` prints one JSON line (the tree, seconds and samples/s of epochs 2-3 of a default DVML + triplet fit, T 20,
E 512, diagnostics off). Alternate the two trees, rep after rep, so both see the same machine load, and compare the
medians per pair (new / old)."""

import json
import sys
import tempfile
from pathlib import Path

import dvml
from dvml.heads import FitConfig, fit

out = Path(tempfile.mkdtemp())
fit(FitConfig(cache=sys.argv[1], out=out / "r", epochs=3, eval_every=0, diag_images=0, grad_every=0, device="cpu"))
recs = [json.loads(line) for line in open(out / "r" / "log.jsonl")]
print(json.dumps({"src": dvml.__file__, "seconds": [r["seconds"] for r in recs[1:]],
                  "samples_per_s": [r["samples_per_s"] for r in recs[1:]]}))

"""Start-up time of the CLI: ``dvml --help`` and ``dvml fit-heads --help`` beside ``python -c "import typer,
rich"`` (the floor any typer + rich CLI pays), measured side by side in one run, interleaved, median of N.

    python bench/cli_startup.py [--runs 7] [--all]

``--all`` adds every command's ``--help``. Prints wall times (median, min) and the ratio to the floor.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

FLOOR = [sys.executable, "-c", "import typer, rich"]
DVML = [sys.executable, "-m", "dvml"]
COMMANDS = ["extract", "synth", "fit-heads", "evaluate", "finetune", "demo", "ablate", "tune", "analyze", "export",
            "index", "search", "show", "data", "cache"]


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--all", action="store_true", help="every command's --help too")
    args = ap.parse_args()
    cases = {'python -c "import typer, rich"': FLOOR, "dvml --help": [*DVML, "--help"],
             "dvml fit-heads --help": [*DVML, "fit-heads", "--help"]}
    if args.all:
        cases |= {f"dvml {c} --help": [*DVML, c, "--help"] for c in COMMANDS if c != "fit-heads"}
    for cmd in cases.values():  # warm the file-system cache once
        wall(cmd)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):  # interleaved: a load change hits every case alike
        for name, cmd in cases.items():
            times[name].append(wall(cmd))
    floor = statistics.median(next(iter(times.values())))
    print(f"{'command':34} {'median s':>9} {'min s':>7} {'x floor':>8}   ({args.runs} runs each, interleaved)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:34} {med:9.3f} {min(ts):7.3f} {med / floor:8.2f}")


if __name__ == "__main__":
    main()

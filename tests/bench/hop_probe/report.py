"""The hop probe's lines (``sitecustomize.py`` beside this) summed across processes per window of the run::

    python -m tests.bench.hop_probe.report [--window 20] [--dir var/bench/hops]

One row per phase, one column per window: the count-weighted mean of the processes' p50s and the highest p99, in
ms (``n`` the hops seen)."""

import argparse
import json
from collections import defaultdict
from pathlib import Path

from tests.bench.hop_probe.sitecustomize import OUT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--dir", type=Path, default=OUT)
    args = parser.parse_args()
    lines = [json.loads(line) for path in sorted(args.dir.glob("*.jsonl")) for line in path.open()]
    if not lines:
        raise SystemExit(f"no probe lines under {args.dir}")
    start = min(line["t"] for line in lines) - 5
    cells: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for line in lines:
        for phase, stats in line["phases"].items():
            cells[phase][int((line["t"] - start) // args.window)].append(stats)
    windows = sorted({window for by_window in cells.values() for window in by_window})
    print(f"{'phase (p50 / p99 ms, n)':>40}  " + "  ".join(f"{int(w * args.window):>6}s{'':>13}" for w in windows))
    for phase in sorted(cells):
        row = []
        for window in windows:
            stats = cells[phase].get(window)
            if not stats:
                row.append(f"{'':>20}")
                continue
            n = sum(s["n"] for s in stats)
            p50 = sum(s["p50"] * s["n"] for s in stats) / n
            row.append(f"{p50:>7.0f}/{max(s['p99'] for s in stats):>6.0f} {n:>5}")
        print(f"{phase:>40}  " + "  ".join(row))


if __name__ == "__main__":
    main()

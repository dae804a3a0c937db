"""Benchmark: taking and checking a fingerprint against the read floor of one checkpoint.

    python benchmarks/fingerprint_speed.py                  # the 1.1 GB pair of compare_speed.py
    python benchmarks/fingerprint_speed.py --gb 0.3         # a smaller pair
    python benchmarks/fingerprint_speed.py --chunk-mb 64    # chunks capped, as MaxText can

Uses the pairs `compare_speed.py` writes (reused under /tmp/ckptbench when present) and runs
every contender in its own process, alternating, `--repeat` times (median wall time, highest
peak RSS from wait4):

  floor        read and decode every array of A through tensorstore, all reads in flight
  fingerprint  `ckptparity fingerprint A -o A.json` (one pass over A: statistics + digests)
  check        `ckptparity A A.json` (fingerprint A again and compare with the file)

The ratio to the floor is what fingerprinting costs beyond reading. Figures go in
docs/fingerprints.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from compare_speed import FLOOR, run_once, write_pair  # noqa: E402 - the sibling benchmark's pairs and floor


def median_run(cmd: list[str], repeat: int, label: str) -> tuple[float, float, list[float]]:
    runs = []
    for _ in range(repeat):
        wall, rss, code = run_once(cmd)
        if code != 0:
            raise SystemExit(f"{label}: exit code {code}: {' '.join(cmd)}")
        runs.append((wall, rss))
    return statistics.median(w for w, _ in runs), max(r for _, r in runs), [w for w, _ in runs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.1, help="arrays per checkpoint, in GB (default 1.1)")
    p.add_argument("--chunk-mb", type=float, default=0, help="cap stored chunks at this many MiB (0: orbax default)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "ckptbench"))
    args = p.parse_args()
    a, _, desc = write_pair(Path(args.dir), args.gb, args.chunk_mb, False)
    print(f"pair: {desc}")
    py = sys.executable
    out = Path(args.dir) / f"fingerprint-{args.gb:g}gb-chunk{args.chunk_mb:g}.json"
    contenders = {
        "floor": ("floor (tensorstore, A only)", [py, "-c", FLOOR, a]),
        "fingerprint": ("ckptparity fingerprint A", [py, "-m", "pytest_ckptparity.cli", "fingerprint", a, "-o", str(out)]),
    }
    run_once(contenders["floor"][1])  # warm the page cache
    results = {}
    for key, (label, cmd) in contenders.items():
        results[key] = median_run(cmd, args.repeat, label)
    check = [py, "-m", "pytest_ckptparity.cli", a, str(out), "--color", "no"]
    results["check"] = median_run(check, args.repeat, "check")
    floor = results["floor"][0]
    for key, label in (("floor", "floor (tensorstore, A only)"), ("fingerprint", "ckptparity fingerprint A"), ("check", "ckptparity A A.json")):
        wall, rss, runs = results[key]
        ratio = f"{wall / floor:5.2f}x" if key != "floor" else "     "
        print(f"  {label:<30} {wall:7.2f} s  {ratio}  peak RSS {rss:7.0f} MB  (runs: {', '.join(f'{w:.2f}' for w in runs)})")
    print(f"  fingerprint file: {out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()

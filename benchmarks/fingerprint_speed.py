"""Benchmark: taking and checking a fingerprint, against the bounded read floor of one checkpoint.

    python benchmarks/fingerprint_speed.py                  # A of sharded_speed.py: 8 shards, 1.5 GB
    python benchmarks/fingerprint_speed.py --gb 4.5         # the same model at 3x (82 layers)
    python benchmarks/fingerprint_speed.py --one-chunk --gb 0.3   # compare_speed.py's one-chunk-per-array checkpoint

The checkpoint is A of `sharded_speed.py` (a MaxText-like TrainState written from 8 fake
devices, one stored chunk per shard; reused under /tmp/ckptbench-sharded when present), or
with `--one-chunk` A of `compare_speed.py`. Every contender runs in its own process, the
contenders alternate in each of `--repeat` rounds; reported are the median wall time
(min-max), the median CPU seconds (user + sys, less sensitive to other load) and the peak RSS:

  floor         every stored chunk of A read and decoded once by tensorstore, at most 256 MiB
                decoded in flight, with glibc's default malloc: the read floor of docs/performance.md
  floor-malloc  the same floor with the command line's malloc settings (like for like)
  fingerprint   `ckptparity fingerprint A -o A.json`: one pass, statistics + digests
  numpy         the same with CKPTPARITY_NATIVE=0: the numpy kernel instead of the C one
  check         `ckptparity A A.json`: fingerprint A again and compare with the file

The ratios to the floors are what fingerprinting costs beyond reading: to the plain floor
(what a program reading with tensorstore pays), and like for like (the same malloc settings
as the command). Figures go in docs/fingerprints.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import sharded_speed  # noqa: E402 - the sibling benchmark's checkpoints, floor and process runner


def compile_package() -> None:
    """Byte-compile the package first, as an installed one is: with PYTHONDONTWRITEBYTECODE
    set (as on the project machine) every run would otherwise compile its modules again,
    about 0.1 s per process that the floor, which imports only tensorstore, does not pay."""
    import compileall

    import pytest_ckptparity

    compileall.compile_dir(str(Path(pytest_ckptparity.__file__).parent), quiet=1)


def main() -> None:
    compile_package()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.5, help="arrays in the checkpoint, in GB (default 1.5)")
    p.add_argument("--one-chunk", action="store_true", help="compare_speed.py's checkpoint: one chunk per array, written from one device")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dir", default=None, help="where checkpoints are written (reused when present)")
    args = p.parse_args()
    if args.one_chunk:
        from compare_speed import write_pair

        a, _, desc = write_pair(Path(args.dir or "/tmp/ckptbench"), args.gb, 0, False)
        out = Path(args.dir or "/tmp/ckptbench") / f"fingerprint-{args.gb:g}gb.json"
    else:
        base = Path(args.dir or "/tmp/ckptbench-sharded")
        a, _, _ = sharded_speed.pair(base, args.gb, "identical")
        desc = f"{sharded_speed.layers_for(args.gb)} layers, {args.gb:g} GB, written from 8 devices (fsdp=4, tensor=2)"
        out = base / f"fingerprint-{args.gb:g}gb.json"
    print(f"checkpoint: {a} ({desc})")
    py = sys.executable
    cli = [py, "-m", "pytest_ckptparity.cli"]
    contenders = {
        "floor": ([py, "-c", sharded_speed.FLOOR, a], {}),
        "floor-malloc": ([py, "-c", sharded_speed.FLOOR, a], {"FLOOR_MALLOC": "reuse"}),
        "fingerprint": (cli + ["fingerprint", a, "-o", str(out)], {}),
        "numpy": (cli + ["fingerprint", a, "-o", str(out) + ".numpy.json"], {"CKPTPARITY_NATIVE": "0"}),
        "check": (cli + [a, str(out), "--color", "no"], {}),
    }
    sharded_speed.run_once(contenders["floor"][0])  # warm the page cache
    sharded_speed.run_once(contenders["fingerprint"][0])  # the file `check` reads
    load = os.getloadavg()[0]
    runs: dict[str, list] = {k: [] for k in contenders}
    for _ in range(args.repeat):
        for key, (cmd, env) in contenders.items():
            run = sharded_speed.run_once(cmd, env)
            if run[3] != 0:
                raise SystemExit(f"{key}: exit code {run[3]}: {' '.join(cmd)}")
            runs[key].append(run)
    floor = sharded_speed.summary(runs["floor"])
    like = sharded_speed.summary(runs["floor-malloc"])
    print(f"load average (1 min, 2 cores) before {load:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"  {'contender':<12} {'wall (min-max)':>22} {'CPU s':>7} {'peak RSS':>9} | x floor (wall, CPU) | like for like (wall, CPU)")
    for key in contenders:
        s = sharded_speed.summary(runs[key])
        print(f"  {key:<12} {s['wall']:7.2f} s ({s['wall_min']:.2f}-{s['wall_max']:.2f}) {s['cpu']:7.2f} {s['rss']:6.0f} MB"
              f" | {s['wall'] / floor['wall']:5.2f}x {s['cpu'] / floor['cpu']:5.2f}x | {s['wall'] / like['wall']:5.2f}x {s['cpu'] / like['cpu']:5.2f}x")
    print(f"  fingerprint file: {out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()

"""Benchmark: comparing two runs over many steps costs time per step, never memory per step.

    python benchmarks/steps_memory.py                 # 8 steps of about 48 MB per run and step
    python benchmarks/steps_memory.py --steps 16 --mb 96

Writes two CheckpointManager roots (Linen TrainStates: float32 params + Adam mu + nu, scanned
layers) of `--steps` steps each, B within tolerance of A but not bit-identical (so every
array is decoded and compared), then runs in a child process each:

  one step    `ckptparity A B --steps 0`
  all steps   `ckptparity A B --steps all`

and reports the median wall time (of `--repeat` runs) and the highest peak RSS (ru_maxrss of
the child, from wait4). Steps are compared one after another, so the peak RSS of all steps
should stay that of one step while the time grows with the number of steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WRITE = r'''
import sys, numpy as np
from pytest_ckptparity import examples as ex
root, steps, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def nudge(t):  # B: a recomputed model, 1e-7 relative off: within tolerance, so every array is decoded
    return {k: nudge(v) for k, v in t.items()} if isinstance(t, dict) else (t * np.float32(1 + 1e-7)).astype(np.float32)
for step in range(steps):
    params = ex.tiny_params(step, layers=layers, emb=256, heads=4, head_dim=64, mlp=1024, vocab=2000)
    ex.save(root + "/a", ex.linen_train_state(params, step=step), step=step)
    ex.save(root + "/b", ex.linen_train_state(nudge(params), step=step), step=step)
'''


def _child(argv: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS in bytes, exit code) of one child process."""
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t, usage.ru_maxrss * 1024, proc.returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--mb", type=float, default=48.0, help="about this many MB of arrays per run and step")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", help="where to write (default: a temp dir)")
    args = p.parse_args()
    per_layer = 12 * (4 * 256 * 4 * 64 + 3 * 256 * 1024 + 2 * 256)  # bytes: params + mu + nu
    fixed = 12 * (2 * 2000 * 256 + 256)
    layers = max(1, int((args.mb * 1e6 - fixed) / per_layer))
    root = args.dir or tempfile.mkdtemp(prefix="ckptparity-steps-")
    if not Path(root, "b").exists():
        print(f"writing 2 runs x {args.steps} steps x ~{(fixed + layers * per_layer) / 1e6:.0f} MB ({layers} layers) into {root} ...", flush=True)
        subprocess.run([sys.executable, "-c", WRITE, root, str(args.steps), str(layers)], check=True)
    cli = [sys.executable, "-m", "pytest_ckptparity", f"{root}/a", f"{root}/b", "--color", "no", "--progress", "no"]
    for label, extra in (("one step", ["--steps", "0"]), (f"all {args.steps} steps", ["--steps", "all"])):
        runs = [_child(cli + extra) for _ in range(args.repeat)]
        if any(code != 0 for _, _, code in runs):
            raise SystemExit(f"{label}: ckptparity did not pass (exit codes {[c for _, _, c in runs]})")
        wall = statistics.median(w for w, _, _ in runs)
        rss = max(r for _, r, _ in runs)
        print(f"{label:>14}: {wall:6.2f} s median wall, {rss / 2**20:7.1f} MiB peak RSS")


if __name__ == "__main__":
    main()

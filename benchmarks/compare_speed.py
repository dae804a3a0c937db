"""Benchmark: ckptparity vs the read floor vs restore-everything, side by side in one run.

    python benchmarks/compare_speed.py --gb 1.1 [--dir /tmp/ckptbench] [--structure-only]

Writes a pair of MaxText-layout checkpoints (float32 params + Adam mu + nu, scanned layers,
OCDBT, zstd) of about the given total size each, then runs, each in its own process:
  floor     read and decode every array of both through tensorstore, all reads in flight
  restore   orbax restore both whole, then numpy comparison leaf by leaf (today's way)
  ckptparity the `ckptparity A B` command line
and prints wall time, peak RSS and the ratios. Figures go in docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

FLOOR = r'''
import json, os, sys, tensorstore as ts
futs = []
for root in sys.argv[1:]:
    item = os.path.join(root, "0", "items")
    meta = json.load(open(os.path.join(item, "_METADATA")))
    for e in meta["tree_metadata"].values():
        if e["value_metadata"].get("skip_deserialize"): continue
        name = ".".join(k["key"] for k in e["key_metadata"])
        spec = {"driver": "zarr3" if meta.get("use_zarr3") else "zarr", "kvstore": {"driver": "ocdbt", "base": "file://" + item, "path": name}}
        futs.append(ts.open(spec, open=True, read=True))
arrays = [f.result() for f in futs]
reads = [a.read() for a in arrays]
total = sum(r.result().nbytes for r in reads)
print(total)
'''

RESTORE = r'''
import sys, numpy as np, jax, orbax.checkpoint as ocp
a = ocp.PyTreeCheckpointer().restore(sys.argv[1] + "/0/items")
b = ocp.PyTreeCheckpointer().restore(sys.argv[2] + "/0/items")
la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
print(all(np.allclose(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)))
'''


WRITE = r'''
import sys
from pathlib import Path
from pytest_ckptparity import examples as ex
root, gb = Path(sys.argv[1]), float(sys.argv[2])
layers, heads, head_dim, vocab = 8, 8, 128, 32000
def nbytes(emb):  # float32 params + mu + nu
    per_layer = 3 * emb * 4 * emb + 4 * emb * heads * head_dim + 2 * emb
    return 12 * (layers * per_layer + 2 * vocab * emb + emb)
emb = 128
while nbytes(emb + 128) <= gb * 1e9:
    emb += 128
params = ex.tiny_params(0, layers=layers, emb=emb, heads=heads, head_dim=head_dim, mlp=4 * emb, vocab=vocab)
for name in ("a", "b"):
    if not (root / name).exists():
        ex.save(root / name, ex.linen_train_state(params), step=0)
print(emb)
'''


def write_pair(root: Path, gb: float) -> tuple[str, str]:
    """Written in a child process, so this process stays small (ru_maxrss survives fork+exec)."""
    emb = subprocess.run([sys.executable, "-c", WRITE, str(root), str(gb)], check=True, capture_output=True, text=True).stdout.split()[-1]
    size = sum(f.stat().st_size for f in (root / "a").rglob("*") if f.is_file())
    print(f"pair written under {root}: {size / 1e9:.2f} GB each on disk (float32 params+mu+nu, emb={emb}, 8 layers)")
    return str(root / "a"), str(root / "b")


def measure(label: str, cmd: list[str]) -> tuple[float, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rss_mb = usage.ru_maxrss / 1024
    print(f"{label:<28} {wall:7.2f} s   peak RSS {rss_mb:8.0f} MB   exit {os.waitstatus_to_exitcode(status)}")
    return wall, rss_mb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.1, help="approximate size of each checkpoint")
    p.add_argument("--dir", default="/tmp/ckptbench", help="where the pair is written (reused when present)")
    p.add_argument("--skip-restore", action="store_true", help="skip the restore-everything baseline")
    args = p.parse_args()
    root = Path(args.dir) / f"{args.gb:g}gb"
    root.mkdir(parents=True, exist_ok=True)
    a, b = write_pair(root, args.gb)
    py = sys.executable
    cli = [py, "-m", "pytest_ckptparity.cli", a, b, "--color", "no"]
    measure("floor (tensorstore only)", [py, "-c", FLOOR, a, b])  # warm the page cache once
    floor, floor_rss = measure("floor (tensorstore only)", [py, "-c", FLOOR, a, b])
    if not args.skip_restore:
        restore, restore_rss = measure("restore-everything", [py, "-c", RESTORE, a, b])
    ours, ours_rss = measure("ckptparity A B", cli)
    structure, _ = measure("ckptparity --structure-only", cli + ["--structure-only"])
    print(f"\nckptparity / floor = {ours / floor:.2f}x (target <= 1.25x)")
    if not args.skip_restore:
        print(f"ckptparity / restore-everything = {ours / restore:.2f}x; RSS {ours_rss:.0f} MB vs {restore_rss:.0f} MB")
    print(f"structure-only: {structure:.2f} s (target < 1 s); peak RSS {ours_rss:.0f} MB (target <= 600 MB)")


if __name__ == "__main__":
    main()

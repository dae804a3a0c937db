"""Benchmark: ckptparity against the read floor and restore-everything, side by side.

    python benchmarks/compare_speed.py                      # the 1.1 GB pair, orbax's chunking
    python benchmarks/compare_speed.py --scale 3            # and a 3x pair: does RSS stay flat?
    python benchmarks/compare_speed.py --chunk-mb 64 --scale 3   # chunks capped, as MaxText can
    python benchmarks/compare_speed.py --perturb            # B within tolerance, not bit-identical
    python benchmarks/compare_speed.py --b-per-layer        # B unscanned (layers_N): stacked vs per-layer

Writes pairs of MaxText-layout Linen TrainStates (float32 params + Adam mu + nu, scanned
layers, OCDBT, zarr, zstd) holding about `--gb` GB of arrays each (depth is what grows), then
runs every contender in its own process, `--repeat` times (median wall time, highest RSS):

  floor        read and decode every array of both through tensorstore, all reads in flight
  restore      orbax restores both whole, then numpy compares leaf by leaf (today's way)
  ckptparity   the `ckptparity A B` command line
  structure    `ckptparity A B --structure-only`

and the import cost: `pytest --version` with the plugin against `-p no:ckptparity`.
Peak RSS is the child's ru_maxrss from wait4. Figures go in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
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
print(sum(r.result().nbytes for r in reads))
'''

RESTORE = r'''
import sys, numpy as np, jax, orbax.checkpoint as ocp
a = ocp.PyTreeCheckpointer().restore(sys.argv[1] + "/0/items")
b = ocp.PyTreeCheckpointer().restore(sys.argv[2] + "/0/items")
la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
print(all(np.allclose(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)))
'''

# The model: llama-like width, depth chosen to reach the size. 12 bytes per parameter
# (float32 params, mu and nu).
EMB, HEADS, HEAD_DIM, MLP, VOCAB = 512, 4, 128, 2048, 32000
PER_LAYER = 4 * EMB * HEADS * HEAD_DIM + 3 * EMB * MLP + 2 * EMB
FIXED = 2 * VOCAB * EMB + EMB

WRITE = r'''
import sys, numpy as np
from pathlib import Path
from pytest_ckptparity import examples as ex
root, layers, chunk_mb, perturb, per_layer = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1", sys.argv[5] == "1"
emb, heads, head_dim, mlp, vocab = (int(x) for x in sys.argv[6:11])
params = ex.tiny_params(0, layers=layers, emb=emb, heads=heads, head_dim=head_dim, mlp=mlp, vocab=vocab)
chunk = int(chunk_mb * 2**20) or None
ex.save(root / "a", ex.linen_train_state(params), step=0, chunk_byte_size=chunk)
if perturb:  # a few ulps: a recomputed model, within float32's default tolerance
    rng = np.random.default_rng(1)
    def nudge(x):
        return (x * (1 + rng.uniform(-2e-7, 2e-7, x.shape))).astype(x.dtype) if x.dtype == np.float32 else x
    def walk(t):
        return {k: walk(v) for k, v in t.items()} if isinstance(t, dict) else nudge(t)
    params = walk(params)
if per_layer:
    params = ex.unstack(params, "layers_N")
ex.save(root / "b", ex.linen_train_state(params), step=0, chunk_byte_size=chunk)
'''


def layers_for(gb: float) -> int:
    return max(1, round((gb * 1e9 / 12 - FIXED) / PER_LAYER))


def write_pair(base: Path, gb: float, chunk_mb: float, perturb: bool, per_layer: bool = False) -> tuple[str, str, str]:
    """Written in a child process, so this one stays small; reused when already there."""
    layers = layers_for(gb)
    root = base / f"{gb:g}gb-chunk{chunk_mb:g}mb{'-perturbed' if perturb else ''}{'-b-per-layer' if per_layer else ''}"
    if not (root / "b" / "0" / "commit_success.txt").exists():
        root.mkdir(parents=True, exist_ok=True)
        flags = ["1" if perturb else "0", "1" if per_layer else "0"]
        args = [str(root), str(layers), str(chunk_mb), *flags, *(str(x) for x in (EMB, HEADS, HEAD_DIM, MLP, VOCAB))]
        subprocess.run([sys.executable, "-c", WRITE, *args], check=True, capture_output=True, text=True)
    arrays = 12 * (FIXED + layers * PER_LAYER)
    disk = sum(f.stat().st_size for f in (root / "a").rglob("*") if f.is_file())
    largest = 4 * max(VOCAB * EMB, layers * EMB * MLP)
    desc = (f"{arrays / 1e9:.2f} GB of arrays each ({disk / 1e9:.2f} GB on disk), {layers} scanned layers, "
            f"largest array {largest / 2**20:.0f} MiB, chunks {'<= %g MiB' % chunk_mb if chunk_mb else 'one per array (orbax default)'}"
            f"{', B perturbed within tolerance' if perturb else ''}{', B unscanned (layers_N)' if per_layer else ''}")
    return str(root / "a"), str(root / "b"), desc


def run_once(cmd: list[str], cwd: str | None = None) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def report(label: str, runs: list[tuple[float, float, int]]) -> tuple[float, float]:
    wall = statistics.median(w for w, _, _ in runs)
    rss = max(r for _, r, _ in runs)
    spread = f"  (runs: {', '.join(f'{w:.2f}' for w, _, _ in runs)})" if len(runs) > 1 else ""
    print(f"  {label:<30} {wall:7.2f} s   peak RSS {rss:7.0f} MB{spread}")
    return wall, rss


def checked(label: str, cmd: list[str]) -> tuple[float, float, int]:
    run = run_once(cmd)
    if run[2] != 0:
        raise SystemExit(f"{label}: exit code {run[2]}: {' '.join(cmd)}")
    return run


def bench_pair(a: str, b: str, repeat: int, restore: bool) -> dict[str, tuple[float, float]]:
    """Floor and ckptparity runs alternate, so a drift in the machine's speed hits both."""
    py = sys.executable
    cli = [py, "-m", "pytest_ckptparity.cli", a, b, "--color", "no"]
    contenders = {"floor": ("floor (tensorstore only)", [py, "-c", FLOOR, a, b]), "ckptparity": ("ckptparity A B", cli)}
    run_once(contenders["floor"][1])  # warm the page cache: every contender then reads from memory
    runs: dict[str, list] = {k: [] for k in contenders}
    for _ in range(repeat):
        for key, (label, cmd) in contenders.items():
            runs[key].append(checked(label, cmd))
    out = {key: report(label, runs[key]) for key, (label, _) in contenders.items()}
    if restore:
        out["restore"] = report("restore-everything", [checked("restore", [py, "-c", RESTORE, a, b])])
    out["structure"] = report("ckptparity --structure-only", [checked("structure", cli + ["--structure-only"]) for _ in range(repeat)])
    return out


def import_cost(repeat: int) -> tuple[float, float]:
    """Median `pytest --version` wall time with the plugin and with it blocked, in an empty dir."""
    py = sys.executable
    with tempfile.TemporaryDirectory() as empty:
        with_plugin = [run_once([py, "-m", "pytest", "--version"], cwd=empty)[0] for _ in range(repeat)]
        without = [run_once([py, "-m", "pytest", "-p", "no:ckptparity", "--version"], cwd=empty)[0] for _ in range(repeat)]
    return statistics.median(with_plugin), statistics.median(without)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.1, help="arrays per checkpoint, in GB (default 1.1)")
    p.add_argument("--scale", type=float, default=0, help="also run a pair this many times larger and compare RSS")
    p.add_argument("--chunk-mb", type=float, default=0, help="cap stored chunks at this many MiB (0: orbax default, one chunk per array)")
    p.add_argument("--perturb", action="store_true", help="write B a few ulps off A (tolerance path, not the bitwise fast path)")
    p.add_argument("--b-per-layer", action="store_true", help="write B unscanned (one array per layer): the stacked vs per-layer case")
    p.add_argument("--repeat", type=int, default=5, help="runs per contender, floor and ckptparity alternating (median wall time)")
    p.add_argument("--skip-restore", action="store_true", help="skip the restore-everything baseline")
    p.add_argument("--dir", default="/tmp/ckptbench", help="where pairs are written (reused when present)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    base = Path(args.dir)
    results: dict = {"machine": f"{os.cpu_count()} cores, python {sys.version.split()[0]}"}

    a, b, desc = write_pair(base, args.gb, args.chunk_mb, args.perturb, args.b_per_layer)
    print(f"pair: {desc}")
    # restore-everything zips leaves in order: only meaningful when both sides share a layout.
    first = bench_pair(a, b, args.repeat, not (args.skip_restore or args.b_per_layer))
    results["pair"] = {"desc": desc, **first}
    ratio = first["ckptparity"][0] / first["floor"][0]
    print(f"\n  ckptparity / floor = {ratio:.2f}x (target <= 1.25x)")
    if "restore" in first:
        r = first["restore"]
        print(f"  ckptparity / restore-everything = {first['ckptparity'][0] / r[0]:.2f}x time, {first['ckptparity'][1] / r[1]:.2f}x RSS")
    print(f"  peak RSS {first['ckptparity'][1]:.0f} MB (target <= 600 MB); structure-only {first['structure'][0]:.2f} s (target < 1 s)")

    if args.scale:
        a3, b3, desc3 = write_pair(base, args.gb * args.scale, args.chunk_mb, args.perturb, args.b_per_layer)
        print(f"\npair x{args.scale:g}: {desc3}")
        big = bench_pair(a3, b3, args.repeat, False)
        results["scaled"] = {"desc": desc3, **big}
        growth = big["ckptparity"][1] / first["ckptparity"][1] - 1
        print(f"\n  RSS growth at x{args.scale:g}: {growth:+.1%} (target <= +10%); ckptparity / floor = {big['ckptparity'][0] / big['floor'][0]:.2f}x")

    with_plugin, without = import_cost(max(args.repeat, 7))
    results["pytest_version"] = {"with": with_plugin, "without": without}
    print(f"\npytest --version: {with_plugin * 1000:.0f} ms with the plugin, {without * 1000:.0f} ms with -p no:ckptparity: "
          f"+{(with_plugin - without) * 1000:.0f} ms (target <= 50 ms)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

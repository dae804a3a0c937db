"""Benchmark: ckptparity on checkpoints written sharded over 8 devices, against a bounded read floor.

    python benchmarks/sharded_speed.py --also values        # every variant at 1x (22 layers, 1.5 GB)
    python benchmarks/sharded_speed.py --gb 4.5 --variants other-mesh identical   # 3x (82 layers): is RSS flat?
    python benchmarks/sharded_speed.py --variants tolerance --also mallopt pytest  # malloc and xdist

Real training checkpoints are written from many devices, one stored chunk per shard. The writer
runs in a child process with 8 fake CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`,
in that process only) and writes a MaxText-like Linen TrainState (float32 params + Adam mu + nu,
scanned layers on axis 1, OCDBT, zarr, zstd) sharded on a (fsdp=4, tensor=2) mesh with
MaxText's logical axis rules (embed -> fsdp; mlp, heads, vocab -> tensor; layers unsharded).
A is always that checkpoint; the variants differ in B:

  identical    B written again from the same values (bit-identical, stored bytes equal)
  tolerance    B's every float within 1e-7 relative noise of A's (not bit-identical)
  other-mesh   B holds A's values, written from an 8-way tensor-parallel mesh (other chunks)
  unscanned    B holds A's values unscanned (`layers_N`), sharded the same way per layer
  bf16-cast    A is a bf16 decode checkpoint of B's params, compared with --dtype-policy cast

Contenders, each in its own process, alternated in one run (`--repeat` rounds):

  floor        every stored chunk of both checkpoints read and decoded once by tensorstore,
               at most 256 MiB decoded in flight, then discarded (no comparison at all); for
               the bf16 pair only B's params, the arrays compared
  ckptparity   the `ckptparity A B` command line
  floor-malloc the floor with the command line's malloc settings (like for like; drop it with
               --also no-floor-malloc)
  values       (--also values) the same comparison with stored bytes off: every chunk decoded
  mallopt      (--also mallopt) the command line with glibc's mmap threshold at 4 MiB instead
  numpy        (--also numpy) the command line with the numpy kernels (CKPTPARITY_NATIVE=0)
  slabs        (--also slabs) the command line with CKPTPARITY_IN_STEP=0: two chunk grids whose
               common block is too large read in slabs (chunks decoded more than once), not
               row by row in step
  pytest       (--also pytest) the plugin (`--ckpt-a/--ckpt-b`), serial and with `-n 2` (each worker
               its share of the cores, and each sized to every core with CKPTPARITY_THREADS)

Reported: median wall time with min-max, median CPU seconds (user + sys of the child and its
children; less sensitive than wall time to other load on the machine), peak RSS (highest
ru_maxrss: for xdist, the largest single process), and once per pair the chunk decodes per
chunk compared, counted by tensorstore plus the chunks read in step: with values only (above 1 when slabs cut chunks: the
extra decode factor) and with stored bytes first (below 1 when chunks are settled by bytes).
Figures go in docs/performance.md.
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

# The model: llama-like width (8 heads so an 8-way tensor mesh splits them), depth chosen
# for the size. 12 bytes per parameter (float32 params, mu and nu).
EMB, HEADS, HEAD_DIM, MLP, VOCAB = 512, 8, 64, 2048, 32000
PER_LAYER = 4 * EMB * HEADS * HEAD_DIM + 3 * EMB * MLP + 2 * EMB
FIXED = 2 * VOCAB * EMB + EMB
VARIANTS = ("identical", "tolerance", "other-mesh", "unscanned", "bf16-cast")

WRITE = r'''
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from pathlib import Path
from pytest_ckptparity import examples as ex

out, layers, kind, emb, heads, head_dim, mlp, vocab = sys.argv[1], int(sys.argv[2]), sys.argv[3], *(int(x) for x in sys.argv[4:9])
params = ex.tiny_params(0, layers=layers, emb=emb, heads=heads, head_dim=head_dim, mlp=mlp, vocab=vocab)
mesh_shape = (1, 8) if kind == "other-mesh" else (4, 2)
mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), ("fsdp", "tensor"))

# MaxText's logical axes per weight, stacked form (layers on axis 1); None: not sharded.
AXES = {
    "wi_0": ("fsdp", "layers", "tensor"), "wi_1": ("fsdp", "layers", "tensor"), "wo": ("tensor", "layers", "fsdp"),
    "query": ("fsdp", "layers", "tensor", None), "key": ("fsdp", "layers", "tensor", None),
    "value": ("fsdp", "layers", "tensor", None), "out": ("tensor", "layers", None, "fsdp"),
    "logits_dense": ("fsdp", "tensor"), "token_embedder": ("tensor", "fsdp"),
}

def spec(names, ndim):
    if len(names) > 1 and names[-1] == "value" and names[-2] in ("kernel", "scale", "embedding"):
        names = names[:-1]  # an NNX Variable wrapper (decode checkpoints), not the attention value
    for name in reversed(names):
        if name in AXES:
            axes = [a if a != "layers" else None for a in AXES[name]]
            if len(axes) == ndim + 1:  # a per-layer array: the layer axis is gone
                axes.pop(1)
            return P(*axes) if len(axes) == ndim else P()
    return P()

if kind == "tolerance":  # a recomputed model: every float a little off, within float32's default rtol
    rng = np.random.default_rng(1)
    params = ex._map(params, lambda x: (x * (1 + rng.uniform(-1e-7, 1e-7, x.shape))).astype(x.dtype))
if kind == "unscanned":
    params = ex.unstack(params, "layers_N")
tree = ex.decode_params(params) if kind == "bf16-decode" else ex.linen_train_state(params)

def place(path, x):
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    x = np.asarray(x)
    return jax.device_put(x, NamedSharding(mesh, spec(names, x.ndim)))

tree = jax.tree_util.tree_map_with_path(place, tree)
ex.save(out, tree, step=0)
'''

FLOOR = r'''
import json, math, os, sys, itertools, collections
if os.environ.get("FLOOR_MALLOC") == "reuse":  # the command line's malloc settings, for a like-for-like floor
    from pytest_ckptparity import cli
    cli._keep_freed_memory_for_reuse()
import tensorstore as ts
BUDGET = 256 << 20
ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
arrays = []
for arg in sys.argv[1:]:
    root, _, prefix = arg.partition("::")  # path::prefix reads only the arrays under prefix
    item = os.path.join(root, "0", "items")
    meta = json.load(open(os.path.join(item, "_METADATA")))
    for e in meta["tree_metadata"].values():
        if e["value_metadata"].get("skip_deserialize") or e["value_metadata"].get("value_type") == "string": continue
        name = ".".join(k["key"] for k in e["key_metadata"])
        if not name.startswith(prefix): continue
        kv = {"driver": "ocdbt", "base": "file://" + item, "path": name} if meta.get("use_ocdbt", True) else {"driver": "file", "path": os.path.join(item, name)}
        arrays.append(ts.open({"driver": "zarr3" if meta.get("use_zarr3") else "zarr", "kvstore": kv}, open=True, read=True, context=ctx))
arrays = [a.result() for a in arrays]
reads = []  # every stored chunk, one read each
for a in arrays:
    shape = [int(d) for d in a.shape]
    chunk = [int(c) for c in a.chunk_layout.read_chunk.shape] if shape else []
    for corner in itertools.product(*(range(0, n, c) for n, c in zip(shape, chunk))):
        region = tuple(slice(s, min(s + c, n)) for s, c, n in zip(corner, chunk, shape))
        reads.append((a, region, a.dtype.numpy_dtype.itemsize * math.prod(r.stop - r.start for r in region)))
inflight, held, total = collections.deque(), 0, 0
for a, region, n in reads:
    while inflight and held + n > BUDGET:
        fut, m = inflight.popleft(); total += fut.result().nbytes; held -= m
    inflight.append((a[region].read() if region else a.read(), n)); held += n
while inflight:
    fut, m = inflight.popleft(); total += fut.result().nbytes
print(len(reads), total)
'''

DECODES = r'''
import sys, tensorstore as ts
from pytest_ckptparity import compare_checkpoints
def decodes():
    m = ts.experimental_collect_matching_metrics("/tensorstore/cache/chunk_cache/reads")
    return sum(v["value"] for x in m for v in x["values"])
from pytest_ckptparity.api import Comparison
from pytest_ckptparity.diff import CompareOptions, scoped_paths
from pytest_ckptparity.sources import OrbaxCheckpoint
import math
opened = [0]  # chunks decoded from the front (read in step): not tensorstore's reads
chunk_rows = OrbaxCheckpoint.chunk_rows
OrbaxCheckpoint.chunk_rows = lambda *args: opened.__setitem__(0, opened[0] + 1) or chunk_rows(*args)
out = []
for stored_bytes in (False, True):
    c = Comparison(sys.argv[1], sys.argv[2], options=CompareOptions(dtype_policy=sys.argv[3], stored_bytes=stored_bytes))
    paths, _ = scoped_paths(*c.views, c.options)
    stored = 0
    for v in c.views:
        info = v.checkpoint.leaves()
        for leaf in (v.leaves[p] for p in paths):
            for raw in leaf.raw_paths:
                i = info[raw]
                if i.dtype != "str":
                    stored += math.prod(math.ceil(d / c) for d, c in zip(i.shape, i.chunk_shape or i.shape))
    before = decodes() + opened[0]
    assert c.run().passed
    out.append(decodes() + opened[0] - before)
print(out[0], out[1], stored)
'''


# ckptparity with stored bytes turned off: every chunk decoded and compared as values.
VALUES = r'''
import sys
from pytest_ckptparity import cli
from pytest_ckptparity.api import Comparison
from pytest_ckptparity.diff import CompareOptions
cli._keep_freed_memory_for_reuse()  # as the command line does
report = Comparison(sys.argv[1], sys.argv[2], options=CompareOptions(stored_bytes=False, dtype_policy=sys.argv[3])).run()
sys.exit(0 if report.passed else 1)
'''

# The command line with glibc's mmap threshold at 4 MiB instead (what it used to set).
MALLOPT = r'''
import ctypes, sys
ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)
from pytest_ckptparity import cli
cli._keep_freed_memory_for_reuse = lambda: None
sys.exit(cli.main(sys.argv[1:]))
'''


def layers_for(gb: float) -> int:
    return max(1, round((gb * 1e9 / 12 - FIXED) / PER_LAYER))


def write(path: Path, layers: int, kind: str) -> str:
    """One checkpoint, in a child process with 8 fake devices; reused when already there."""
    if not (path / "0" / "commit_success.txt").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        args = [str(path), str(layers), kind, *(str(x) for x in (EMB, HEADS, HEAD_DIM, MLP, VOCAB))]
        subprocess.run([sys.executable, "-c", WRITE, *args], check=True, capture_output=True, text=True)
    return str(path)


def pair(base: Path, gb: float, variant: str) -> tuple[str, str, list[str]]:
    """(A, B, extra ckptparity options) for a variant; A is shared between variants."""
    layers = layers_for(gb)
    root = base / f"{layers}layers"
    a = write(root / "a", layers, "a")
    if variant == "identical":
        return a, write(root / "b-identical", layers, "a"), []
    if variant == "tolerance":
        return a, write(root / "b-tolerance", layers, "tolerance"), []
    if variant == "other-mesh":
        return a, write(root / "b-other-mesh", layers, "other-mesh"), []
    if variant == "unscanned":
        return a, write(root / "b-unscanned", layers, "unscanned"), []
    if variant == "bf16-cast":  # the decode side holds parameters: only those are compared
        return write(root / "a-bf16-decode", layers, "bf16-decode"), a, ["--dtype-policy", "cast"]
    raise SystemExit(f"unknown variant {variant!r}; pick from {', '.join(VARIANTS)}")


EMPTY_DIR = tempfile.mkdtemp(prefix="ckptbench-cwd-")  # pytest collects nothing else from here


def run_once(cmd: list[str], env: dict | None = None) -> tuple[float, float, float, int]:
    """(wall s, CPU s = user + sys, peak RSS MB, exit code) of one child process and its
    children (xdist workers: CPU summed, RSS of the largest process)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=EMPTY_DIR,
                            env=None if env is None else {**os.environ, **env})
    _, status, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - t0, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def summary(runs: list[tuple[float, float, float, int]]) -> dict:
    walls = [r[0] for r in runs]
    return {"wall": statistics.median(walls), "wall_min": min(walls), "wall_max": max(walls),
            "cpu": statistics.median(r[1] for r in runs), "rss": max(r[2] for r in runs), "runs": walls}


ENV_ARGS = ("FLOOR_MALLOC=", "CKPTPARITY_NATIVE=", "CKPTPARITY_THREADS=", "CKPTPARITY_IN_STEP=")  # contender arguments that are environment variables


def bench(a: str, b: str, extra: list[str], repeat: int, more: list[str]) -> dict:
    """Every pair holds the same model within tolerance: every contender must exit 0."""
    py = sys.executable
    policy = "cast" if "cast" in extra else "strict"
    params_only = "cast" in extra  # the bf16 decode side: B's optimizer state is not compared
    contenders = {
        "floor": [py, "-c", FLOOR, a, b + ("::params." if params_only else "")],
        "ckptparity": [py, "-m", "pytest_ckptparity.cli", a, b, "--color", "no", *extra],
    }
    if "floor-malloc" in more or "no-floor-malloc" not in more:  # like for like with the command's malloc settings
        contenders["floor-malloc"] = contenders["floor"] + ["FLOOR_MALLOC=reuse"]
    if "values" in more:
        contenders["values"] = [py, "-c", VALUES, a, b, policy]
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--ckpt-a={a}", f"--ckpt-b={b}", *(["--ckpt-dtype-policy=cast"] if params_only else [])]
    if "pytest" in more:  # the plugin, one item per layer stack or leaf, serial and on 2 xdist workers
        contenders["pytest"] = pytest
        contenders["pytest-n2"] = pytest + ["-n", "2"]
        # each worker sized to every core, as before workers shared them (CKPTPARITY_THREADS)
        contenders["pytest-n2-all-cores"] = pytest + ["-n", "2", f"CKPTPARITY_THREADS={len(os.sched_getaffinity(0))}"]
    if "slabs" in more:  # two chunk grids read in slabs, as before rows were read in step
        contenders["slabs"] = contenders["ckptparity"] + ["CKPTPARITY_IN_STEP=0"]
    if "numpy" in more:  # the command with the numpy kernels instead of the native (C) ones
        contenders["numpy"] = contenders["ckptparity"] + ["CKPTPARITY_NATIVE=0"]
    if "mallopt" in more:
        contenders["mallopt"] = [py, "-c", MALLOPT, a, b, "--color", "no", *extra]
    run_once(contenders["floor"])  # warm the page cache: every contender then reads from memory
    load_before = os.getloadavg()[0]
    runs: dict[str, list] = {k: [] for k in contenders}
    for _ in range(repeat):
        for key, cmd in contenders.items():
            env = dict(x.split("=", 1) for x in cmd if x.startswith(ENV_ARGS))
            run = run_once([x for x in cmd if not x.startswith(ENV_ARGS)], env)
            if run[3] != 0:
                raise SystemExit(f"{key}: exit code {run[3]}: {' '.join(cmd)}")
            runs[key].append(run)
    out = {k: summary(v) for k, v in runs.items()}
    out["load"] = (load_before, os.getloadavg()[0])  # 1-minute load average (2 cores) before and after the rounds
    done = subprocess.run([py, "-c", DECODES, a, b, policy], check=True, capture_output=True, text=True)
    as_values, with_bytes, stored = (int(x) for x in done.stdout.split())
    out["decode_factor"] = as_values / stored  # values only: > 1 when slabs cut chunks
    out["decoded_share"] = with_bytes / stored  # stored bytes first: < 1 when chunks are settled by bytes
    out["chunks"] = stored
    return out


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
    p.add_argument("--gb", type=float, default=1.5, help="arrays per checkpoint, in GB (default 1.5: 22 layers)")
    p.add_argument("--scale", type=float, default=0, help="also run each variant this many times larger")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--repeat", type=int, default=5, help="rounds; in each, every contender runs once")
    p.add_argument("--also", nargs="*", default=[], choices=("values", "mallopt", "pytest", "floor-malloc", "no-floor-malloc", "numpy", "slabs"),
                   help="more contenders: 'values' (stored bytes off: every chunk decoded), 'mallopt' (the CLI with a "
                        "4 MiB mmap threshold), 'pytest' (the plugin serial and with -n 2); 'no-floor-malloc' drops the "
                        "floor with the command's malloc settings (run by default); 'numpy' (the CLI with CKPTPARITY_NATIVE=0); "
                        "'slabs' (the CLI with CKPTPARITY_IN_STEP=0: mismatched chunk grids in slabs, not rows in step)")
    p.add_argument("--dir", default="/tmp/ckptbench-sharded", help="where pairs are written (reused when present)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    results: dict = {}
    sizes = [args.gb] + ([args.gb * args.scale] if args.scale else [])
    for gb in sizes:
        for variant in args.variants:
            a, b, extra = pair(Path(args.dir), gb, variant)
            label = f"{variant} {layers_for(gb)} layers"
            r = bench(a, b, extra, args.repeat, args.also)
            results[label] = r
            f = r["floor"]
            print(f"{label}: {r['chunks']} chunks compared; chunk decodes / chunks: {r['decode_factor']:.2f} reading values, "
                  f"{r['decoded_share']:.2f} with stored bytes first; load {r['load'][0]:.1f} -> {r['load'][1]:.1f}")
            fm = r.get("floor-malloc")
            for key in (k for k in r if isinstance(r[k], dict)):
                c = r[key]
                like = f", {c['wall'] / fm['wall']:.2f}x wall, {c['cpu'] / fm['cpu']:.2f}x cpu of floor-malloc" if fm else ""
                print(f"  {key:<12} {c['wall']:6.2f} s ({c['wall_min']:.2f}-{c['wall_max']:.2f})  cpu {c['cpu']:6.2f} s  rss {c['rss']:5.0f} MB"
                      f"  | {c['wall'] / f['wall']:.2f}x wall, {c['cpu'] / f['cpu']:.2f}x cpu of the floor{like}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

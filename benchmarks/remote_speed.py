"""Benchmark: comparing checkpoints that live in an S3 store, against a read floor and local disk.

    python benchmarks/remote_speed.py                 # a ~1 GB pair (arrays per checkpoint)
    python benchmarks/remote_speed.py --gb 0.25       # smaller, when uploads into the emulator are slow

Writes a MaxText-layout Linen TrainState pair with `compare_speed.py`'s writer (float32
params + Adam mu + nu, scanned layers, OCDBT, zstd), starts moto's S3 server on 127.0.0.1
(a free port; stopped by its process id at the end), uploads both checkpoints with boto3, then
runs every contender in its own process, `--repeat` times (median wall time, highest RSS):

  remote floor   every array of both fetched from the emulator and decoded through tensorstore,
                 all reads in flight, the same request concurrency as ckptparity
  remote         `ckptparity s3://... s3://...`
  local floor    the same floor on the local copies (page cache warm)
  local          `ckptparity A B` on the local copies

Peak RSS is the child's ru_maxrss (the emulator's own memory is not counted). Linux carries a
parent's peak RSS into a child across fork+exec, so the uploads run in a child of their own
and this process stays small: otherwise every figure would read at least the uploader's size. The emulator
shares this machine's cores with the reader, so remote figures here are a lower bound on
what a real bucket's parallelism gives; the ratio to the floor is the figure that carries over.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from compare_speed import write_pair  # noqa: E402  (the same writer as the local benchmark)

from pytest_ckptparity.storage import DEFAULT_CONCURRENCY as CONCURRENCY  # noqa: E402  (the floor gets ckptparity's)

FLOOR = r'''
import json, os, sys, tensorstore as ts
endpoint, concurrency = sys.argv[1], int(sys.argv[2])
ctx = ts.Context({"s3_request_concurrency": {"limit": concurrency}, "cache_pool": {"total_bytes_limit": 0}})
futs = []
for root in sys.argv[3:]:
    if root.startswith("s3://"):
        bucket, _, path = root[5:].partition("/")
        base = {"driver": "s3", "bucket": bucket, "path": path + "/0/items/", "endpoint": endpoint, "aws_region": "us-east-1"}
        kv = ts.KvStore.open(base, context=ctx).result()
        meta = json.loads(kv.read("_METADATA").result().value)
    else:
        base = {"driver": "file", "path": os.path.join(root, "0", "items") + "/"}
        meta = json.load(open(os.path.join(root, "0", "items", "_METADATA")))
    for e in meta["tree_metadata"].values():
        if e["value_metadata"].get("skip_deserialize"): continue
        name = ".".join(k["key"] for k in e["key_metadata"])
        spec = {"driver": "zarr3" if meta.get("use_zarr3") else "zarr", "kvstore": {"driver": "ocdbt", "base": base, "path": name}}
        futs.append(ts.open(spec, open=True, read=True, context=ctx))
arrays = [f.result() for f in futs]
reads = [a.read() for a in arrays]
print(sum(r.result().nbytes for r in reads))
'''

UPLOAD = r'''
import sys, boto3
from pathlib import Path
client = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1")
client.create_bucket(Bucket="bench")
for side, folder in zip("ab", sys.argv[2:]):
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file():
            client.upload_file(str(f), "bench", f"{side}/{f.relative_to(folder).as_posix()}")
'''


def run_once(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0, help="arrays per checkpoint, in GB (default 1.0)")
    p.add_argument("--repeat", type=int, default=3, help="runs per contender, alternating (median wall time)")
    p.add_argument("--dir", default="/tmp/ckptbench", help="where the local pair is written (reused when present)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()

    from emulators import S3Emulator

    a, b, desc = write_pair(Path(args.dir), args.gb, 0, False)
    print(f"pair: {desc}")
    s3 = S3Emulator()
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", UPLOAD, s3.endpoint, a, b], check=True, env={**os.environ, **s3.env()})
        ua, ub = "s3://bench/a", "s3://bench/b"
        size = sum(f.stat().st_size for side in (a, b) for f in Path(side).rglob("*") if f.is_file())
        print(f"uploaded {size / 1e9:.2f} GB to moto on {s3.endpoint} in {time.perf_counter() - t0:.1f} s")
        env = {**os.environ, **s3.env()}
        py = sys.executable
        cli = [py, "-m", "pytest_ckptparity.cli", "--color", "no"]
        contenders = {
            "remote floor": [py, "-c", FLOOR, s3.endpoint, str(CONCURRENCY), ua, ub],
            "remote ckptparity": [*cli, ua, ub],
            "local floor": [py, "-c", FLOOR, s3.endpoint, str(CONCURRENCY), a, b],
            "local ckptparity": [*cli, a, b],
        }
        run_once(contenders["local floor"], env)  # warm the page cache and the emulator
        runs: dict[str, list] = {k: [] for k in contenders}
        for _ in range(args.repeat):
            for key, cmd in contenders.items():
                run = run_once(cmd, env)
                if run[2] != 0:
                    raise SystemExit(f"{key}: exit code {run[2]}: {' '.join(cmd)}")
                runs[key].append(run)
    finally:
        s3.stop()

    results = {"pair": desc, "concurrency": CONCURRENCY}
    for key, rs in runs.items():
        wall, rss = statistics.median(r[0] for r in rs), max(r[1] for r in rs)
        results[key] = {"wall_s": wall, "peak_rss_mb": rss}
        print(f"  {key:<20} {wall:7.2f} s   peak RSS {rss:7.0f} MB  (runs: {', '.join(f'{r[0]:.2f}' for r in rs)})")
    rf, rc = results["remote floor"]["wall_s"], results["remote ckptparity"]["wall_s"]
    print(f"\n  remote ckptparity / remote floor = {rc / rf:.2f}x; remote / local ckptparity = {rc / results['local ckptparity']['wall_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

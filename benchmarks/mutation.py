"""Mutation testing of the verdict-making modules (normalize, kernel, read_plan, diff, sources), in bounded time.

Two parts:

* `slips`: the one-line slips a reviewer would worry about most (first vs last matching
  tolerance glob, a step without commit marker taken as committed, ...), applied one at a
  time to a scratch copy; each must make the targeted tests fail.
* `mutmut`: mutmut 3 (`pip install mutmut`) generates every single-point mutant of the
  listed functions; a deterministic sample of them runs against the fast in-process tests
  that touch those modules, until all are done or the time budget is spent. Prints the
  score (killed / checked) and writes each surviving mutant's diff to `survivors.txt`.

Both work on a scratch copy (never the checkout), forked from a warmed-up pytest (mutmut's
forkserver, since jax and tensorstore are not fork-safe after they start threads).
Not part of CI: a number for docs/testing.md, refreshed when those modules change.

    python benchmarks/mutation.py                       # slips, then a 160-mutant sample
    python benchmarks/mutation.py --part mutmut --sample 0 --budget-min 240  # everything
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Fast, in-process tests that exercise normalize, diff and sources (no pytester or CLI
# subprocesses: mutmut only sees calls made in its own process, and those are slow).
TESTS = [
    "tests/test_diff.py", "tests/test_normalize.py", "tests/test_layouts.py", "tests/test_stored_bytes.py",
    "tests/test_sources.py", "tests/test_reading.py",
    "tests/test_step_item_selection.py", "tests/test_layer_stacks.py", "tests/test_tolerance_and_blocks.py",
    "tests/test_properties.py", "tests/test_bad_input.py", "tests/test_leaf_reading.py", "tests/test_layout_detection.py",
]
DESELECT = [
    "tests/test_bad_input.py::test_concurrent_workers_give_the_same_verdict",
    "tests/test_bad_input.py::test_read_only_guarantee",
    "tests/test_bad_input.py::test_permission_denied",
]

# The functions whose mistakes change a verdict, a located path or an error (mutmut names:
# `x_<function>` for module functions, `xǁ<Class>ǁ<method>` for methods).
FUNCTIONS = {
    "normalize": [
        "x__layer_key", "x__scan_axis", "x_canonical_path", "x__opt_state", "x_normalize", "x__canonical_chunk",
        "x__is_decode", "x__resolve_layout", "x__apply_renames", "xǁNormalizedViewǁread", "xǁTreeFactsǁ*",
        "x_strip_wrappers", "x__is_older_nnx", "x__is_nnx",
    ],
    "kernel": [
        "x__kind", "x_lower_precision", "x__pieces", "x__bitwise_equal", "x_compare_block",
        "x__exact_piece", "x__tolerant_piece", "x__fold_max_rel", "x__record_mismatches", "xǁ_Accumulatorǁ*",
    ],
    "read_plan": [
        "x_chunk_alignment", "x__blocks", "x__run_jobs", "x__block_bytes", "x__compare_values", "x__finish",
    ],
    "diff": [
        "x_resolve_tolerance", "x__counter", "x__structural", "x_scoped_paths", "x_diff_views",
        "x__layout_differs", "x_groups_left_out",
    ],
    "sources": [
        "x__is_committed_step", "x__item_subfolder", "x__refuse_if_code_file", "x__steps", "x__locate",
        "x__step_number", "x__uncommitted_newer", "x__parse_tree_metadata", "xǁOrbaxCheckpointǁ*",
        "x__is_plain_tree", "x__flatten_plain", "x__as_numpy_leaf", "xǁInMemoryCheckpointǁ*", "x_open_checkpoint",
    ],
}

# (file, exact text (or alternatives), replacement, what, tests that must fail): the slips
# named in the issue that asked for this script, plus the complex64 default.
SLIPS = [
    ("diff.py", "            break\n    return Tolerance(atol=atol, rtol=rtol)", "            pass\n    return Tolerance(atol=atol, rtol=rtol)",
     "last matching tolerance glob wins", ["tests/test_tolerance_and_blocks.py"]),
    ("sources.py", ('return _TMP_MARK not in d.name and (d / "commit_success.txt").is_file()',
                    'return _TMP_MARK not in d.name and d.exists("commit_success.txt")'), "return _TMP_MARK not in d.name",
     "a step without commit_success.txt counts as committed", ["tests/test_step_item_selection.py"]),
    ("sources.py", "    if len(items) == 1:\n        return items[0]", "    if len(items) >= 1:\n        return items[0]",
     "the first of several items is picked", ["tests/test_step_item_selection.py"]),
    ("normalize.py", r'_(?P<index>\d+)$")', r'_(?P<index>\d)$")',
     "layers_N accepts one digit only", ["tests/test_layer_stacks.py"]),
    ("normalize.py", r'_STACK_NAME = re.compile(r"^[A-Za-z_]*layers(?:_[a-z]+)*$")', r'_STACK_NAME = re.compile(r"^layers$")',
     "only a stack named `layers` is a stack", ["tests/test_layer_stacks.py"]),
    ("normalize.py", 'meta_axis = custom.get("param_scan_axis", custom.get("scan_axis"))', 'meta_axis = custom.get("scan_axis")',
     "param_scan_axis from the metadata is ignored", ["tests/test_layer_stacks.py"]),
    ("normalize.py", "        return NON_PARAM_SCAN_AXIS\n", "        return DEFAULT_SCAN_AXIS\n",
     "RNG state stacked on the weights' axis", ["tests/test_layer_stacks.py"]),
    ("report.py", '            key = (pair, leaf["path"])\n', '            key = (pair, leaf["path"], str(leaf.get("layer_range")))\n',
     "the summary counts rows, not distinct leaves", ["tests/test_summary_counts.py"]),
    ("read_plan.py", "        first = s.start - s.start % b", "        first = s.start - s.start % b + b",
     "block reads skip the first block of a split axis", ["tests/test_tolerance_and_blocks.py"]),
    ("read_plan.py", "min(x + b, s.stop)) for x in range(first, s.stop, b)]", "min(x + b, s.stop - 1)) for x in range(first, s.stop, b)]",
     "block reads stop one element short", ["tests/test_tolerance_and_blocks.py"]),
    ("diff.py", 'base = DEFAULT_TOLERANCES["float64" if component >= 8 else "float32"]', 'base = DEFAULT_TOLERANCES["float64"]',
     "complex64 gets float64's tolerance", ["tests/test_tolerance_and_blocks.py"]),
]


def scratch_copy(work: Path) -> None:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for name in ("pytest_ckptparity", "tests", "conftest.py", "pyproject.toml"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, work / name)


def run_slips(work: Path) -> int:
    """Apply each slip to a scratch copy, run its tests there; count the slips they catch."""
    scratch_copy(work)
    env = dict(os.environ, PYTHONPATH=str(work), JAX_PLATFORMS="cpu")
    pytest_cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
    every_test = sorted({t for *_, tests in SLIPS for t in tests})
    baseline = subprocess.run([*pytest_cmd, *every_test], cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    if baseline.returncode != 0:  # a slip only counts as caught if the unchanged copy passes
        print(baseline.stdout[-3000:])
        sys.exit("the targeted tests fail on the unchanged copy: fix that first")
    caught = 0
    for file, old, new, what, tests in SLIPS:
        target = work / "pytest_ckptparity" / file
        original = target.read_text()
        found = [o for o in ((old,) if isinstance(old, str) else old) if original.count(o) == 1]
        if not found:
            print(f"  ?  {what}: the line to change is not found once in {file} (the code moved: update SLIPS)")
            continue
        old = found[0]
        target.write_text(original.replace(old, new))
        t0 = time.perf_counter()
        proc = subprocess.run([*pytest_cmd, *tests], cwd=work, env=env, capture_output=True, text=True, timeout=900)
        target.write_text(original)
        ok = proc.returncode == 1
        caught += ok
        failed = [l.split(" ")[1] for l in proc.stdout.splitlines() if l.startswith("FAILED tests/")]
        print(f"  {'caught' if ok else 'MISSED'}  {what} ({time.perf_counter() - t0:.0f} s){': ' + failed[0] if failed else ''}")
    print(f"slips caught: {caught}/{len(SLIPS)}")
    return caught


def _setup_cfg(modules: list[str]) -> str:
    selection = [*TESTS, *(f"--deselect={d}" for d in DESELECT)]
    lines = [
        "[mutmut]",
        "source_paths = pytest_ckptparity",
        "only_mutate =\n" + "".join(f"    pytest_ckptparity/{m}.py\n" for m in modules),
        "also_copy =\n    conftest.py\n",
        "pytest_add_cli_args =\n    -p\n    no:xdist\n    -p\n    no:cacheprovider\n    -W\n    ignore\n",
        "pytest_add_cli_args_test_selection =\n" + "".join(f"    {s}\n" for s in selection),
        "process_isolation = forkserver",
        "timeout_multiplier = 4",
    ]
    return "\n".join(lines) + "\n"


def _mutmut(work: Path, names: list[str], max_children: int, deadline: float, log: Path) -> None:
    """Run `mutmut run NAMES`; past the deadline, interrupt it (mutmut keeps what it has)."""
    with open(log, "a") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *names],
            cwd=work, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
            start_new_session=True,
        )
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            print("  time budget spent: stopping mutmut (unchecked mutants are reported as such)")
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _results(work: Path, modules: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for m in modules:
        meta = work / "mutants" / "pytest_ckptparity" / f"{m}.py.meta"
        if meta.is_file():
            out.update(json.loads(meta.read_text())["exit_code_by_key"])
    return out


STATUS = {1: "killed", 3: "killed", 0: "survived", None: "not checked", 33: "no tests", 5: "no tests", 36: "timeout",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout"}


def run_mutmut(work: Path, modules: list[str], sample: int, seed: int, budget_s: float, max_children: int, reuse: bool = False, report_only: bool = False) -> None:
    try:
        import mutmut  # noqa: F401
    except ImportError:
        sys.exit("mutmut is not installed: pip install mutmut (3.x), then run this again.")
    t0 = time.time()
    deadline = t0 + budget_s
    log = work / "mutmut.log"
    wanted = [f"pytest_ckptparity.{m}.{f}__mutmut_*" for m in modules for f in FUNCTIONS[m]]
    if not ((reuse or report_only) and (work / "mutants" / "mutmut-stats.json").is_file()):
        scratch_copy(work)
        (work / "setup.cfg").write_text(_setup_cfg(modules))
        # 1. Generate every mutant and record which test reaches which function (mutmut's
        #    stats run), checking a single mutant so the run is short.
        _mutmut(work, ["pytest_ckptparity.diff.x__kind__mutmut_1"], max_children, deadline, log)
    candidates = sorted(k for k in _results(work, modules) if any(fnmatch.fnmatchcase(k, w) for w in wanted))
    everything = len(_results(work, modules))
    chosen = candidates if not sample or sample >= len(candidates) else sorted(random.Random(seed).sample(candidates, sample))
    print(f"mutants: {everything} in {', '.join(m + '.py' for m in modules)}; {len(candidates)} in the listed functions; "
          f"{len(chosen)} sampled (seed {seed}); set-up took {time.time() - t0:.0f} s")

    # 2. Run the sample, cheapest first (mutmut orders them), until done or out of time.
    if not report_only:
        _mutmut(work, chosen, max_children, deadline, log)
    summarize(work, modules, chosen, time.time() - t0, max_children)


def summarize(work: Path, modules: list[str], chosen: list[str], wall: float, max_children: int) -> None:
    """Score = killed / (killed + survived). Timeouts are listed apart: under a loaded
    machine a CPU-time limit can hit an equivalent mutant, so they are not counted as kills."""
    results = _results(work, modules)
    status = Counter(STATUS.get(results.get(n), "suspicious") for n in chosen)  # type: ignore[arg-type]
    print(f"statuses of the {len(chosen)} sampled: {dict(sorted(status.items()))}")
    decided = status["killed"] + status["survived"]
    if decided:
        print(f"mutation score: {status['killed']}/{decided} = {100.0 * status['killed'] / decided:.1f}% of checked mutants killed "
              f"(wall {wall:.0f} s, {max_children} workers)")
    report = work / "survivors.txt"
    survivors = [n for n in chosen if STATUS.get(results.get(n)) in ("survived", "timeout")]  # type: ignore[arg-type]
    with open(report, "w") as f:
        for name in survivors:
            diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=work, capture_output=True, text=True).stdout
            f.write(diff + "\n")
    by_function = Counter(n.split("__mutmut_")[0].split(".", 2)[2] for n in survivors)
    print(f"survived or timed out ({len(survivors)}), by function: {dict(by_function.most_common())}")
    print(f"their diffs: {report}")


def _apply_mutant(diff: str, text: str) -> str | None:
    """Apply a one-hunk `mutmut show` diff by its removed and added lines. Its line numbers
    count from the function, and a method's lines are shown one indent shallower."""
    lines = diff.splitlines()
    minus = [l[1:] for l in lines if l.startswith("-") and not l.startswith("---")]
    plus = [l[1:] for l in lines if l.startswith("+") and not l.startswith("+++")]
    for indent in ("", "    "):
        old = "\n".join(indent + l if l else l for l in minus) + "\n"
        new = "\n".join(indent + l if l else l for l in plus) + "\n"
        if text.count(old) == 1:
            return text.replace(old, new)
    return None


def verify(work: Path, names: list[str]) -> None:
    """Re-apply surviving mutants (their diffs from `survivors.txt`) to a fresh copy of the
    checkout, one at a time, and run the fast tests on each: after new tests were written,
    this shows which survivors they kill (mutmut's own cache predates those tests)."""
    if not names:
        text = (work / "survivors.txt").read_text()
        names = [line[2:].split(":")[0] for line in text.splitlines() if line.startswith("# pytest_ckptparity.")]
    diffs = {n: subprocess.run([sys.executable, "-m", "mutmut", "show", n], cwd=work, capture_output=True, text=True).stdout for n in names}
    copy = work.with_name(work.name + "-verify")
    scratch_copy(copy)
    env = dict(os.environ, PYTHONPATH=str(copy), JAX_PLATFORMS="cpu")
    deselect = [f"--deselect={d}" for d in DESELECT]
    newest_first = sorted(TESTS, key=lambda t: -(ROOT / t).stat().st_mtime)
    killed = 0
    for name in names:
        module = name.split(".")[1] + ".py"
        target = copy / "pytest_ckptparity" / module
        original = target.read_text()
        mutated = _apply_mutant(diffs[name], original)
        if mutated is None:
            print(f"  ?  {name}: its change is not found once in today's {module} (the code moved)")
            continue
        target.write_text(mutated)
        run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-W", "ignore", *newest_first, *deselect],
                             cwd=copy, env=env, capture_output=True, text=True, timeout=1800)
        target.write_text(original)
        failed = [l.split(" ")[1] for l in run.stdout.splitlines() if l.startswith("FAILED tests/")]
        killed += run.returncode != 0
        print(f"  {'killed' if run.returncode else 'SURVIVED'}  {name}{': ' + failed[0] if failed else ''}")
    print(f"killed now: {killed}/{len(names)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("all", "slips", "mutmut", "verify"), default="all")
    ap.add_argument("--names", default="", help="verify: comma-separated mutant names (default: every survivor)")
    ap.add_argument("--modules", default="normalize,kernel,read_plan,diff,sources", help="comma-separated modules of pytest_ckptparity")
    ap.add_argument("--sample", type=int, default=160, help="mutants to check (0: all of the listed functions)")
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--budget-min", type=float, default=35.0, help="wall-time budget of the mutmut part")
    ap.add_argument("--max-children", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/ckptparity-mutation", help="scratch copy (deleted and rewritten)")
    ap.add_argument("--reuse", action="store_true", help="keep the workdir's mutants and test stats from an earlier run")
    ap.add_argument("--report-only", action="store_true", help="only print the score of an earlier run in the workdir")
    args = ap.parse_args(argv)
    work = Path(args.workdir).resolve()
    modules = [m.strip() for m in args.modules.split(",") if m.strip()]
    unknown = [m for m in modules if m not in FUNCTIONS]
    if unknown:
        ap.error(f"unknown modules {unknown}; choose from {', '.join(FUNCTIONS)}")
    if args.part in ("all", "slips"):
        print("== slips ==")
        run_slips(work.with_name(work.name + "-slips"))
    if args.part in ("all", "mutmut"):
        print("== mutmut ==")
        run_mutmut(work, modules, args.sample, args.seed, args.budget_min * 60, args.max_children, args.reuse, args.report_only)
    if args.part == "verify":
        print("== verify ==")
        verify(work, [n for n in args.names.split(",") if n])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`ckptparity`: the same verdict and report as the helper, from a shell.

    ckptparity [compare] A B [options]  exit 0 on parity, 1 on mismatch, 2 on usage or read errors
    ckptparity inspect PATH             detected layout and the normalized tree, from metadata only
    ckptparity demo                     write example checkpoints to a temp dir; one pass, one failure
    ckptparity fingerprint CKPT -o FILE.json   write a fingerprint; `ckptparity A FILE.json` checks against it
    python -m pytest_ckptparity ...     the same

Paths stay strings from argv to the reader: `gs://bucket/run` is never turned into a Path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

EXIT_PARITY, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2
ROWS_DEFAULT, ROWS_VERBOSE = 20, 50  # mismatch rows shown: default, -v; -vv shows all
PROGRESS_MIN_BYTES = 512 << 20  # a progress bar only for comparisons that read more than this
MORE_HINT = "use -vv or --max-rows 0 to see all"


class _Version(argparse._VersionAction):
    """`--version` on one line, however wide the terminal (argparse's own wraps it)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: Optional[str] = None) -> None:
        print(self.version)
        parser.exit()


def _compare_parser() -> argparse.ArgumentParser:
    from pytest_ckptparity import __version__, _native, zarr_rows

    p = argparse.ArgumentParser(prog="ckptparity", description="Assert parity between two model checkpoints. Also: 'ckptparity compare A B' (the same), 'inspect PATH', 'demo', 'fingerprint CKPT -o FILE.json'. B may be a fingerprint file.")
    p.add_argument("--version", action=_Version, version=f"ckptparity {__version__} ({_native.status()}; {zarr_rows.status()})")
    p.add_argument("a", help="checkpoint A (orbax manager root, step, item or bare folder)")
    p.add_argument("b", help="checkpoint B, the reference: |a-b| <= atol + rtol*|b|")
    p.add_argument("--atol", type=float, help="absolute tolerance (default: per dtype)")
    p.add_argument("--rtol", type=float, help="relative tolerance (default: per dtype)")
    p.add_argument("--tolerance", action="append", default=[], metavar="'GLOB ATOL RTOL'", help="per-path tolerance (repeatable)")
    p.add_argument("--include", action="append", metavar="GLOB", help="compare only matching paths (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="leave out matching paths (repeatable)")
    p.add_argument("--step", type=int, help="step to open in manager roots (default: latest committed)")
    p.add_argument("--step-a", type=int, metavar="N", help="step of A's manager root (default: --step, else latest committed)")
    p.add_argument("--step-b", type=int, metavar="N", help="step of B's manager root (default: --step, else latest committed)")
    p.add_argument("--steps", metavar="all|common|N,M,...", help="compare two manager roots (training runs) step by step: every committed step (all), the steps both committed (common) or these steps")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE", help="a setting for gs:// or s3:// checkpoints, e.g. endpoint=http://127.0.0.1:9000 (repeatable)")
    p.add_argument("--structure-only", action="store_true", help="compare paths, shapes and dtypes; read no array data")
    p.add_argument("--dtype-policy", choices=("strict", "cast"), default="strict")
    p.add_argument("--format-a", metavar="LAYOUT", help="force A's layout")
    p.add_argument("--format-b", metavar="LAYOUT", help="force B's layout")
    p.add_argument("--scan-axis", metavar="AXIS[,AXIS_B]", help="the axis layer stacks are stored on, for both sides or per side (default: recorded in the checkpoint, else 1)")
    p.add_argument("--compare-rngs", action="store_true", help="also compare NNX RNG state")
    p.add_argument("--no-equal-nan", action="store_true", help="a NaN never equals a NaN")
    p.add_argument("--read-budget", type=float, metavar="MIB", help="decoded array data held at once, in MiB (default: 256; a larger stored chunk is still read whole)")
    p.add_argument("--report", metavar="PATH", help="write every leaf's result and the totals as JSON")
    p.add_argument("--html", metavar="PATH", help="write a self-contained HTML page: per-layer heatmap, worst leaves, mismatch table (needs pytest-ckptparity[html])")
    p.add_argument("--max-rows", type=_non_negative_int, metavar="N", help=f"mismatch rows shown before '... and K more' (default {ROWS_DEFAULT}, {ROWS_VERBOSE} with -v; 0: all)")
    p.add_argument("-v", "--verbose", action="count", default=0, help=f"more rows: -v shows {ROWS_VERBOSE}, -vv all")
    p.add_argument("--color", choices=("auto", "yes", "no"), default="auto")
    p.add_argument("--progress", choices=("auto", "yes", "no"), default="auto", help="a progress bar on stderr: auto shows it on a terminal, outside CI, when more than 512 MiB are read")
    return p


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def _max_rows(args: argparse.Namespace) -> Optional[int]:
    if args.max_rows is not None:
        return args.max_rows or None
    return ROWS_DEFAULT if args.verbose <= 0 else ROWS_VERBOSE if args.verbose == 1 else None


def _tolerances(lines: Sequence[str]) -> dict[str, dict[str, float]]:
    from pytest_ckptparity.errors import CkptParityUsageError

    out = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 3:
            raise CkptParityUsageError(f"--tolerance {line!r} must read 'GLOB ATOL RTOL', e.g. 'opt_state/** 1e-4 1e-3'.")
        try:
            out[parts[0]] = {"atol": float(parts[1]), "rtol": float(parts[2])}
        except ValueError:
            raise CkptParityUsageError(f"--tolerance {line!r}: ATOL and RTOL must be numbers.") from None
    return out


def _keep_freed_memory_for_reuse() -> None:
    """In this process only (the library leaves a host process's malloc alone): one glibc
    arena, no mmap for large blocks, and freed memory kept in the heap for the next block.
    Decoded chunks and stored chunk bytes then reuse warm pages instead of each being a fresh
    mapping faulted in page by page and unmapped again: about 20% less CPU on sharded
    checkpoints with 11 MB chunks, and half the time with 43 MB ones (glibc's mmap threshold
    cannot go above 32 MiB, so only turning mmap off reaches those); one arena also keeps
    peak RSS lower than one arena per tensorstore thread."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 1)  # M_ARENA_MAX, before tensorstore starts its threads
        libc.mallopt(-4, 0)  # M_MMAP_MAX: every block from the heap, whatever its size
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def _budget_bytes(mib: float) -> int:
    from pytest_ckptparity.errors import CkptParityUsageError

    if not (mib > 0 and mib * 2**20 >= 1 and mib != float("inf")):
        raise CkptParityUsageError(f"--read-budget must be a positive number of MiB, got {mib:g}.")
    return int(mib * 2**20)


def _color(choice: str) -> Optional[bool]:
    return None if choice == "auto" else choice == "yes"


def _want_progress(choice: str, nbytes: int, stream: Any = None, env: Optional[dict[str, str]] = None) -> bool:
    """A bar only where a person watches: a terminal, not CI, and a read long enough to wait on."""
    if choice != "auto":
        return choice == "yes"
    stream = stream or sys.stderr
    env = os.environ if env is None else env
    if env.get("CI") or env.get("TERM", "") == "dumb" or not getattr(stream, "isatty", lambda: False)():
        return False
    return nbytes > PROGRESS_MIN_BYTES


def run_with_progress(comparison: Any, console: Any = None) -> Any:
    """Run `comparison` group by group under a rich progress bar (bytes), on stderr; the
    merged report equals one whole run's (same leaves in the same order)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from pytest_ckptparity._model import ParityReport

    parts = comparison.split("group")
    sizes = [comparison.bytes_to_read_of(sel) for _, sel in parts]
    console = console or Console(stderr=True)
    reports = []
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("comparing", total=sum(sizes) or None)
        for (name, selection), size in zip(parts, sizes):
            bar.update(task, description=f"comparing {name}")
            reports.append(comparison.run(selection, notify=False))
            bar.advance(task, size)
    whole = comparison.run([], notify=False)  # the header: names, layouts, locations, notes, ignored
    results = sorted((r for rep in reports for r in rep.results), key=lambda r: r.path)
    merged = ParityReport(
        names=whole.names, layouts=whole.layouts, locations=whole.locations, steps=whole.steps, results=results,
        ignored=comparison.ignored_count(), values_compared=whole.values_compared, notes=whole.notes,
        rngs_ignored=whole.rngs_ignored, wall_time=sum(r.wall_time for r in reports),
    )
    comparison.notify(merged)
    return merged


def _out(text: str) -> None:
    """Print to stdout; a reader that went away (`| head`) ends the output quietly."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python would complain again when it flushes stdout at exit: point it at devnull.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def run_compare(argv: Sequence[str]) -> int:
    from pytest_ckptparity.api import Comparison, make_options, parse_key_values, parse_scan_axis
    from pytest_ckptparity.report import comparison_record, json_document, render

    args = _compare_parser().parse_args(argv)
    _check_report_option(args.report)
    _check_html_option(args.html)
    _keep_freed_memory_for_reuse()
    options = make_options(
        atol=args.atol, rtol=args.rtol, tolerances=_tolerances(args.tolerance),
        include=args.include, exclude=args.exclude, compare_values=not args.structure_only,
        equal_nan=not args.no_equal_nan, dtype_policy=args.dtype_policy,
        **({} if args.read_budget is None else {"read_budget": _budget_bytes(args.read_budget)}),
    )
    if args.steps is not None:
        return run_steps(args, options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        comparison = Comparison(
            args.a, args.b, step=args.step, step_a=args.step_a, step_b=args.step_b,
            storage_options=parse_key_values("--storage-option", args.storage_option) or None,
            format_a=args.format_a, format_b=args.format_b, ignore_rngs=not args.compare_rngs, options=options,
            scan_axis=None if args.scan_axis is None else parse_scan_axis("--scan-axis", args.scan_axis),
        )
    for w in caught:
        print(f"ckptparity: warning: {w.message}", file=sys.stderr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if options.compare_values and _want_progress(args.progress, comparison.bytes_to_read()):
            report = run_with_progress(comparison)
        else:
            report = comparison.run()
    for w in caught:  # what the report's header already says is not said twice
        if str(w.message) not in report.notes:
            print(f"ckptparity: warning: {w.message}", file=sys.stderr)
    _out(render(report, color=_color(args.color), max_rows=_max_rows(args), more_hint=MORE_HINT, layer_strips=True))
    if args.report:
        document = json_document([comparison_record(report)], tool="ckptparity")
        Path(args.report).write_text(json.dumps(document, indent=1, sort_keys=True))
    _write_html(args.html, [comparison_record(report)])
    return EXIT_PARITY if report.passed else EXIT_MISMATCH


def run_steps(args: argparse.Namespace, options: Any) -> int:
    """`--steps`: one comparison per step, one step at a time; the verdict over all steps at
    the bottom, naming the first step at which a leaf leaves tolerance (and its layers)."""
    from pytest_ckptparity.api import TrajectoryComparison, parse_key_values, parse_scan_axis
    from pytest_ckptparity.report import json_document
    from pytest_ckptparity.trajectory import parse_steps, render_trajectory, trajectory_fields

    taken = [f"--{k.replace('_', '-')} {v}" for k, v in (("step", args.step), ("step_a", args.step_a), ("step_b", args.step_b)) if v is not None]
    if taken:
        from pytest_ckptparity.errors import CkptParityUsageError

        raise CkptParityUsageError(f"--steps {args.steps} and {', '.join(taken)} exclude each other (--steps compares several steps, "
                                   f"--step, --step-a and --step-b pick one); pass only one of them.")
    trajectory = TrajectoryComparison(
        args.a, args.b, steps=parse_steps(args.steps, "--steps"), step=args.step, step_a=args.step_a, step_b=args.step_b,
        storage_options=parse_key_values("--storage-option", args.storage_option) or None,
        format_a=args.format_a, format_b=args.format_b, ignore_rngs=not args.compare_rngs, options=options,
        scan_axis=None if args.scan_axis is None else parse_scan_axis("--scan-axis", args.scan_axis),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = trajectory.run()
    said = {n for r in report.reports.values() for n in r.notes}
    for w in caught:  # what a step's header already says is not said twice
        if str(w.message) not in said:
            print(f"ckptparity: warning: {w.message}", file=sys.stderr)
    _out(render_trajectory(report, color=_color(args.color), max_rows=_max_rows(args), more_hint=MORE_HINT, summary_last=True))
    if args.report:
        records = report.records()
        document = {**json_document(records, tool="ckptparity"), "trajectory": trajectory_fields(records)}
        Path(args.report).write_text(json.dumps(document, indent=1, sort_keys=True))
    _write_html(args.html, report.records())
    return EXIT_PARITY if report.passed else EXIT_MISMATCH


def _check_report_option(path: Optional[str]) -> None:
    """--report: a writable place, before any checkpoint is read."""
    if path is not None:
        from pytest_ckptparity._outputs import check_output_file

        check_output_file(path, "--report", "report.json")


def _check_html_option(path: Optional[str]) -> None:
    """--html: plotly present and a writable place, before any checkpoint is read."""
    if path is not None:
        from pytest_ckptparity.drift_page import check_output_path, require_plotly

        check_output_path(path, "--html")
        require_plotly()


def _write_html(path: Optional[str], records: list[dict[str, Any]]) -> None:
    if path is not None:
        from pytest_ckptparity.drift_page import write_page
        from pytest_ckptparity.report import json_document

        write_page(json_document(records, tool="ckptparity"), path)
        print(f"HTML report: {path}", file=sys.stderr)


def run_inspect(argv: Sequence[str]) -> int:
    from pytest_ckptparity.api import normalized_view, open_checkpoint

    p = argparse.ArgumentParser(prog="ckptparity inspect", description="Show the detected layout and the normalized tree, from metadata only.")
    p.add_argument("path")
    p.add_argument("--step", type=int)
    p.add_argument("--format", metavar="LAYOUT", help="force a layout")
    p.add_argument("--compare-rngs", action="store_true", help="list RNG state among the leaves")
    args = p.parse_args(argv)
    view = normalized_view(open_checkpoint(args.path, step=args.step, name="checkpoint"), args.format, ignore_rngs=not args.compare_rngs)
    step = view.checkpoint.step
    print(f"{view.checkpoint.location}" + (f" (step {step})" if step is not None else ""))
    print(f"layout: {view.describe()} [{view.layout.name}]")
    width = max((len(p) for p in view.leaves), default=0)
    for path, leaf in view.leaves.items():
        layers = f"  {leaf.layers} layers x {leaf.layer_shape}" if leaf.layers is not None else ""
        print(f"  {path:<{width}}  {leaf.dtype:<9} {tuple(leaf.shape)}{layers}")
    if view.ignored:
        print(f"ignored by default ({len(view.ignored)}): " + ", ".join(list(view.ignored)[:6]) + (" ..." if len(view.ignored) > 6 else ""))
    return EXIT_PARITY


def run_demo(argv: Sequence[str]) -> int:
    """Write a Linen-style and an NNX-style checkpoint of one model, then compare them."""
    from pytest_ckptparity.api import compare_checkpoints
    from pytest_ckptparity.examples import write_examples
    from pytest_ckptparity.report import render

    p = argparse.ArgumentParser(prog="ckptparity demo", description=run_demo.__doc__)
    p.add_argument("--dir", help="where to write the example checkpoints (default: a temp dir)")
    p.add_argument("--color", choices=("auto", "yes", "no"), default="auto")
    args = p.parse_args(argv)
    root = args.dir or tempfile.mkdtemp(prefix="ckptparity-demo-")
    print(f"Writing example checkpoints with flax + orbax into {root} ...")
    paths = write_examples(root)
    color = _color(args.color)
    print(f"\n1) Linen TrainState (scanned layers) vs NNX state (layers/N), same model:\n   ckptparity {paths['linen']} {paths['nnx']}")
    ok = compare_checkpoints(paths["linen"], paths["nnx"], names=("linen", "nnx"))
    print(render(ok, color=color))
    print(f"\n2) The same Linen checkpoint vs an NNX one with one weight drifted in layer 1:\n   ckptparity {paths['linen']} {paths['nnx_drift']}")
    bad = compare_checkpoints(paths["linen"], paths["nnx_drift"], names=("linen", "nnx_drift"))
    print(render(bad, color=color, layer_strips=True))
    expected = ok.passed and not bad.passed
    _demo_page(Path(root) / "drift-report.html", [ok, bad])
    print("\nDemo finished: the first comparison passed and the second failed, as expected." if expected else "\nDemo did not behave as expected.")
    return EXIT_PARITY if expected else EXIT_MISMATCH


def _demo_page(path: Path, reports: list[Any]) -> None:
    """The demo's two comparisons as the HTML page `--html` writes, when plotly is there."""
    from pytest_ckptparity.report import comparison_record

    try:
        import plotly  # noqa: F401 - optional: the page needs it, the demo does not
    except ImportError:
        print("\n(Install pytest-ckptparity[html] and run the demo again to get the HTML drift report too.)")
        return
    from pytest_ckptparity.drift_page import write_page
    from pytest_ckptparity.report import json_document

    write_page(json_document([comparison_record(r) for r in reports], tool="ckptparity demo"), str(path))
    print(f"\n3) Both comparisons as one HTML page (heatmap of headroom by layer, worst leaves, mismatch table):\n   {path}")


def run_fingerprint(argv: Sequence[str]) -> int:
    """Write a checkpoint's fingerprint file (for `ckptparity A FILE.json` later)."""
    from pytest_ckptparity.api import take_fingerprint
    from pytest_ckptparity.fingerprint import write_fingerprint

    p = argparse.ArgumentParser(prog="ckptparity fingerprint", description="Write the fingerprint of a checkpoint: per-leaf (and per-layer) statistics and digests, as JSON.")
    p.add_argument("path", help="the checkpoint (orbax manager root, step, item or bare folder)")
    p.add_argument("-o", "--output", required=True, metavar="FILE.json", help="where to write the fingerprint")
    p.add_argument("--step", type=int)
    p.add_argument("--format", metavar="LAYOUT", help="force a layout")
    p.add_argument("--include", action="append", metavar="GLOB")
    p.add_argument("--exclude", action="append", metavar="GLOB")
    p.add_argument("--compare-rngs", action="store_true", help="include NNX RNG state")
    p.add_argument("--scan-axis", metavar="AXIS", help="the axis layer stacks are stored on (default: recorded in the checkpoint, else 1; NNX vmap stacks: 0)")
    p.add_argument("--read-budget", type=float, metavar="MIB", help="decoded array data held at once, in MiB (default: 256)")
    args = p.parse_args(argv)
    scan_axis = None
    if args.scan_axis is not None:
        if not args.scan_axis.strip().isdigit():
            from pytest_ckptparity.errors import CkptParityUsageError

            raise CkptParityUsageError(f"--scan-axis must be one axis (a fingerprint reads one checkpoint), e.g. --scan-axis 0; got {args.scan_axis!r}.")
        scan_axis = int(args.scan_axis)
    if not args.output.endswith(".json"):
        from pytest_ckptparity.errors import CkptParityUsageError

        raise CkptParityUsageError(f"--output {args.output!r} must end in .json (fingerprint files are found by that suffix).")
    from pytest_ckptparity._outputs import check_output_file

    check_output_file(args.output, "--output", "fingerprint.json")
    _keep_freed_memory_for_reuse()
    fp = take_fingerprint(
        args.path, step=args.step, format=args.format, include=args.include, exclude=args.exclude, ignore_rngs=not args.compare_rngs,
        scan_axis=scan_axis, **({} if args.read_budget is None else {"read_budget": _budget_bytes(args.read_budget)}),
    )
    out = write_fingerprint(fp, args.output)
    print(f"{out}: fingerprint of {len(fp.leaves)} leaves ({fp.layout}) from {fp.location}, {fp.bytes_read:,} bytes read in {fp.wall_time:.2f} s, {out.stat().st_size:,} bytes written")
    return EXIT_PARITY


def _quiet_blas_threads() -> None:
    """Nothing here multiplies matrices, but numpy's OpenBLAS starts a thread per core on
    import that spins after start-up: about 0.15 CPU-s per run on 2 cores, which a comparison
    pays in wall time. Only for this process, only before numpy loads, never over the user's
    own setting."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main(argv: Optional[Sequence[str]] = None) -> int:
    _quiet_blas_threads()
    from pytest_ckptparity.errors import CkptParityUsageError

    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"inspect": run_inspect, "demo": run_demo, "compare": run_compare, "fingerprint": run_fingerprint}
    try:
        from pytest_ckptparity import _native, _threads

        _native.check_environment()  # a misspelt CKPTPARITY_NATIVE, CKPTPARITY_IN_STEP or CKPTPARITY_THREADS: one sentence, before any read
        _threads.process_threads()
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        return run_compare(argv)
    except CkptParityUsageError as e:
        print(f"ckptparity: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # argparse: usage errors exit 2 already
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): nothing left to say
        _out("")
        return EXIT_PARITY
    except Exception as e:  # noqa: BLE001 - never a library traceback; CKPTPARITY_DEBUG=1 shows it
        if os.environ.get("CKPTPARITY_DEBUG"):
            raise
        print(f"ckptparity: error: unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (set CKPTPARITY_DEBUG=1 for the traceback and please report it).", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

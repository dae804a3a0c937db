"""Per-run state of the pytest plugin: settings from options and ini, opened checkpoints,
and the statistics of every comparison in the run (merged across xdist workers).

Kept in `config.stash` (never module globals), as plain data so xdist workers can ship their
statistics to the controller through `workeroutput`.
"""

from __future__ import annotations

import shlex
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import pytest

SUITE_NAME = "ckpt-parity"  # the generated items' parent: ckpt-parity::params/...


@contextmanager
def usage_errors() -> Iterator[None]:
    """A CkptParityUsageError inside becomes pytest's UsageError: its one sentence, exit 4,
    no traceback."""
    from pytest_ckptparity.errors import CkptParityUsageError

    try:
        yield
    except CkptParityUsageError as e:
        raise pytest.UsageError(str(e)) from None


@dataclass
class Settings:
    ckpt_a: Optional[str] = None
    ckpt_b: Optional[str] = None
    named: dict[str, str] = field(default_factory=dict)
    step: Optional[int] = None
    step_a: Optional[int] = None
    step_b: Optional[int] = None
    storage_options: dict[str, str] = field(default_factory=dict)
    generate: str = "auto"  # generated items: auto (only without test paths), yes, no
    split: str = "layer"
    report_path: Optional[str] = None
    format_a: Optional[str] = None
    format_b: Optional[str] = None
    ignore_rngs: bool = True
    steps: Any = None  # --ckpt-steps: "all", "common" or a tuple of steps (generated items per step)
    helper_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to assert_ckpt_parity


@dataclass
class RunStats:
    """Every comparison of the run as a JSON record (see `report.comparison_record`), with the
    test that ran it; mergeable across workers. The terminal summary and the JSON report are
    both made from these records."""

    records: list[dict[str, Any]] = field(default_factory=list)
    current_test: Optional[str] = None
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)  # xdist worker id -> what it did

    @property
    def comparisons(self) -> int:
        return len(self.records)

    def add_report(self, report: Any) -> None:
        from pytest_ckptparity.report import comparison_record

        self.records.append(comparison_record(report, test=self.current_test))

    def settle(self, nodeid: str, test_passed: bool) -> None:
        """A test that passed although its comparison failed expected that (`pytest.raises`,
        xfail): such a comparison is not a mismatch of the run."""
        for r in self.records:
            if r.get("test") == nodeid and not r.get("passed"):
                r["expected_failure"] = test_passed

    def to_dict(self) -> dict[str, Any]:
        return {"records": self.records}

    def merge(self, other: dict[str, Any], worker: Optional[str] = None) -> None:
        records = other.get("records", [])
        if worker is not None and records:
            bytes_read = sum(int(l.get("bytes_read") or 0) for r in records for l in r.get("leaves", []))
            self.workers[worker] = {"host": other.get("host", ""), "comparisons": len(records), "bytes_read": bytes_read}
        self.records.extend(records)

    def step_records(self) -> list[dict[str, Any]]:
        """The records of the generated per-step items (`ckpt-parity::step_N/...`)."""
        from pytest_ckptparity.trajectory import STEP_ITEM_PREFIX

        prefix = f"{SUITE_NAME}::{STEP_ITEM_PREFIX}"
        return [r for r in self.records if str(r.get("test") or "").startswith(prefix)]

    def step_summary_lines(self) -> list[tuple[str, bool]]:
        """Terminal lines of a run over steps: each step's outcome and the first step at which
        a leaf leaves tolerance (with its layers); none when no per-step item ran."""
        from pytest_ckptparity.trajectory import summary_lines

        records = self.step_records()
        return summary_lines(records) if records else []

    def step_document(self) -> dict[str, Any]:
        """The JSON report's `trajectory` object for a run over steps (empty otherwise)."""
        from pytest_ckptparity.trajectory import trajectory_fields

        records = self.step_records()
        return {"trajectory": trajectory_fields(records)} if records else {}

    def totals(self) -> dict[str, Any]:
        from pytest_ckptparity.report import run_totals

        totals = run_totals(self.records)
        totals["workers"] = dict(sorted(self.workers.items()))
        return totals


settings_key = pytest.StashKey[Settings]()
stats_key = pytest.StashKey[RunStats]()
cache_key = pytest.StashKey[dict]()


def _float_or_usage(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise pytest.UsageError(f"{name} must be a non-negative number, got {text!r}.") from None
    if not value >= 0 or value == float("inf"):
        raise pytest.UsageError(f"{name} must be a non-negative number, got {text!r}.")
    return value


def parse_tolerance_lines(lines: list[str]) -> dict[str, dict[str, float]]:
    """ini `ckpt_tolerances`: one `glob atol rtol` per line."""
    out: dict[str, dict[str, float]] = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = shlex.split(line)
        if len(parts) != 3:
            raise pytest.UsageError(f"ckpt_tolerances line {line!r} must read 'glob atol rtol', e.g. 'opt_state/** 1e-4 1e-3'.")
        glob, atol, rtol = parts
        out[glob] = {"atol": _float_or_usage(f"ckpt_tolerances atol for {glob!r}", atol), "rtol": _float_or_usage(f"ckpt_tolerances rtol for {glob!r}", rtol)}
    return out


def mib_to_bytes(source: str, text: str) -> int:
    """A positive size in MiB (fractions allowed), as bytes."""
    try:
        mib = float(text)
    except ValueError:
        mib = -1.0
    if not (mib > 0 and mib * 2**20 >= 1 and mib != float("inf")):
        raise pytest.UsageError(f"{source} must be a positive number of MiB, got {text!r}.")
    return int(mib * 2**20)


def parse_named(lines: list[str], source: str) -> dict[str, str]:
    """`name = path` (ini) or `name=path` (--ckpt)."""
    out: dict[str, str] = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, path = line.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise pytest.UsageError(f"{source} entry {line!r} must read 'NAME=PATH'.")
        out[name.strip()] = path.strip()
    return out


def build_settings(config: pytest.Config) -> Settings:
    """Command line beats ini beats defaults; bad values are usage errors with one sentence."""
    opt = config.option
    s = Settings()
    s.ckpt_a, s.ckpt_b = opt.ckpt_a, opt.ckpt_b
    if bool(s.ckpt_a) != bool(s.ckpt_b):
        given, missing = ("--ckpt-a", "--ckpt-b") if s.ckpt_a else ("--ckpt-b", "--ckpt-a")
        raise pytest.UsageError(f"{given} was given without {missing}; pass both checkpoints to compare.")
    s.named = parse_named(config.getini("ckpt_paths"), "ckpt_paths")
    s.named.update(parse_named(opt.ckpt_named or [], "--ckpt"))
    for flag, value in (("--ckpt-step", opt.ckpt_step), ("--ckpt-step-a", opt.ckpt_step_a), ("--ckpt-step-b", opt.ckpt_step_b)):
        if value is not None and value < 0:
            raise pytest.UsageError(f"{flag} must be a non-negative integer, got {value}.")
    s.step = opt.ckpt_step
    s.step_a = opt.ckpt_step_a if opt.ckpt_step_a is not None else opt.ckpt_step
    s.step_b = opt.ckpt_step_b if opt.ckpt_step_b is not None else opt.ckpt_step
    s.storage_options = parse_storage_options(opt.ckpt_storage_options or [])
    s.steps = _steps_option(config, s)
    generate = opt.ckpt_generate or (config.getini("ckpt_generate") or "auto").strip()
    if generate not in ("auto", "yes", "no"):
        raise pytest.UsageError(f"ckpt_generate must be auto, yes or no, got {generate!r}.")
    s.generate = generate
    s.split = opt.ckpt_split
    s.report_path = opt.ckpt_report
    s.format_a, s.format_b = opt.ckpt_format_a, opt.ckpt_format_b
    s.ignore_rngs = not opt.ckpt_compare_rngs

    atol, atol_source = _tolerance_option(config, "atol")
    rtol, rtol_source = _tolerance_option(config, "rtol")
    kwargs: dict[str, Any] = {
        "atol": _float_or_usage(atol_source, str(atol)) if atol is not None else None,
        "rtol": _float_or_usage(rtol_source, str(rtol)) if rtol is not None else None,
        "tolerances": parse_tolerance_lines(config.getini("ckpt_tolerances")),
        "include": tuple(opt.ckpt_include or ()),
        "exclude": tuple(opt.ckpt_exclude or ()),
        "compare_values": not opt.ckpt_structure_only,
        "dtype_policy": opt.ckpt_dtype_policy,
        "step": s.step,
        "storage_options": s.storage_options or None,
        "format_a": s.format_a,
        "format_b": s.format_b,
        "ignore_rngs": s.ignore_rngs,
        "scan_axis": _scan_axis_option(opt.ckpt_scan_axis),
    }
    budget = opt.ckpt_read_budget if opt.ckpt_read_budget is not None else (config.getini("ckpt_read_budget") or None)
    if budget is not None:
        source = "--ckpt-read-budget" if opt.ckpt_read_budget is not None else "ckpt_read_budget"
        kwargs["read_budget"] = mib_to_bytes(source, str(budget))
    s.helper_kwargs = kwargs
    return s


def _steps_option(config: pytest.Config, s: Settings) -> Any:
    """--ckpt-steps: checked here, before anything is opened; steps are then listed from the roots."""
    opt = config.option
    text = getattr(opt, "ckpt_steps", None)
    if text is None:
        return None
    from pytest_ckptparity.trajectory import parse_steps

    with usage_errors():
        spec = parse_steps(text, "--ckpt-steps")
    if not (s.ckpt_a and s.ckpt_b):
        raise pytest.UsageError("--ckpt-steps compares the --ckpt-a and --ckpt-b manager roots step by step; pass both.")
    single = [f for f, v in (("--ckpt-step", opt.ckpt_step), ("--ckpt-step-a", opt.ckpt_step_a), ("--ckpt-step-b", opt.ckpt_step_b)) if v is not None]
    if single:
        raise pytest.UsageError(f"--ckpt-steps and {', '.join(single)} exclude each other (--ckpt-steps compares several steps, --ckpt-step one); pass only one of them.")
    return spec


def open_trajectory(settings: Settings) -> Any:
    """The --ckpt-a/--ckpt-b roots over --ckpt-steps, every step opened (metadata only)."""
    from pytest_ckptparity.api import OPTION_NAMES, TrajectoryComparison, make_options

    kw = dict(settings.helper_kwargs)
    options = make_options(**{k: kw.pop(k) for k in OPTION_NAMES if k in kw})
    trajectory = TrajectoryComparison(
        settings.ckpt_a, settings.ckpt_b, steps=settings.steps, options=options, storage_options=settings.storage_options or None,
        **{k: kw[k] for k in ("format_a", "format_b", "ignore_rngs", "scan_axis")},
    )
    trajectory.open_all()
    return trajectory


def _scan_axis_option(text: Optional[str]) -> Any:
    if text is None:
        return None
    from pytest_ckptparity.api import parse_scan_axis

    with usage_errors():
        return parse_scan_axis("--ckpt-scan-axis", text)


def _tolerance_option(config: pytest.Config, which: str) -> tuple[Any, str]:
    """(value, where it came from): --atol beats --ckpt-atol beats the ini key."""
    opt = config.option
    short = getattr(opt, f"ckpt_{which}_short", None)
    if short is not None:
        return short, f"--{which}"
    long = getattr(opt, f"ckpt_{which}", None)
    if long is not None:
        return long, f"--ckpt-{which}"
    return (config.getini(f"ckpt_{which}") or None), f"ckpt_{which}"


def parse_storage_options(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise pytest.UsageError(f"--ckpt-storage-option {item!r} must read KEY=VALUE, e.g. endpoint=http://127.0.0.1:9000.")
        out[key.strip()] = value
    return out


def open_cached(config: pytest.Config, path: str, name: str, step: Optional[int] = None) -> Any:
    """Open each checkpoint once per process (metadata is read once, arrays never here).

    The path stays a string: `gs://bucket/run` must reach the reader as written.
    """
    from pytest_ckptparity.api import open_checkpoint

    settings = config.stash[settings_key]
    cache = config.stash.setdefault(cache_key, {})
    key = (str(path), step, name)
    if key not in cache:
        url = isinstance(path, str) and "://" in path
        extra = {"storage_options": settings.storage_options} if settings.storage_options and url else {}
        cache[key] = open_checkpoint(path, step=step, name=name, **extra)
    return cache[key]


def render_for(config: pytest.Config, report: Any) -> str:
    """The report as this run wants it: colour per --color, rows per verbosity, and the
    per-layer strip of each failing layer stack."""
    from pytest_ckptparity import _run_hooks
    from pytest_ckptparity.report import render_plain, render_rich

    color = config.get_terminal_writer().hasmarkup
    rows = _run_hooks.max_rows
    return render_rich(report, rows, color=True, layer_strips=True) if color else render_plain(report, rows, layer_strips=True)

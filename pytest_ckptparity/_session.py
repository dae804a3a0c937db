"""Per-run state of the pytest plugin: settings from options and ini, opened checkpoints,
and the statistics of every comparison in the run (merged across xdist workers).

Kept in `config.stash` (never module globals), as plain data so xdist workers can ship their
statistics to the controller through `workeroutput`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest


@dataclass
class Settings:
    ckpt_a: Optional[str] = None
    ckpt_b: Optional[str] = None
    named: dict[str, str] = field(default_factory=dict)
    step: Optional[int] = None
    split: str = "layer"
    report_path: Optional[str] = None
    format_a: Optional[str] = None
    format_b: Optional[str] = None
    ignore_rngs: bool = True
    helper_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to assert_ckpt_parity


@dataclass
class RunStats:
    """What the terminal summary and the JSON report show; mergeable across workers."""

    comparisons: int = 0
    leaves: list[dict[str, Any]] = field(default_factory=list)
    wall_time: float = 0.0
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)  # xdist worker id -> what it did

    def add_report(self, report: Any) -> None:
        self.comparisons += 1
        self.wall_time += report.wall_time
        self.leaves.extend(r.to_dict() for r in report.results)

    def to_dict(self) -> dict[str, Any]:
        return {"comparisons": self.comparisons, "leaves": self.leaves, "wall_time": self.wall_time}

    def merge(self, other: dict[str, Any], worker: Optional[str] = None) -> None:
        if worker is not None and other.get("comparisons"):
            bytes_read = sum(int(l.get("bytes_read") or 0) for l in other.get("leaves", []))
            self.workers[worker] = {"host": other.get("host", ""), "comparisons": int(other["comparisons"]), "bytes_read": bytes_read}
        self.comparisons += int(other.get("comparisons", 0))
        self.wall_time += float(other.get("wall_time", 0.0))
        self.leaves.extend(other.get("leaves", []))

    def totals(self) -> dict[str, Any]:
        bad = [l for l in self.leaves if not l.get("ok")]

        def score(l: dict[str, Any]) -> float:
            stats = l.get("stats") or {}
            v = stats.get("max_abs", 0.0)
            return float(v) if isinstance(v, (int, float)) else float("inf")

        worst = max(bad, key=score) if bad else None
        # A layered leaf split over per-layer items is one leaf: count distinct paths.
        return {
            "comparisons": self.comparisons,
            "leaves_compared": len({l["path"] for l in self.leaves}),
            "leaves_mismatched": len({l["path"] for l in bad}),
            "bytes_read": sum(int(l.get("bytes_read") or 0) for l in self.leaves),
            "wall_time_s": round(self.wall_time, 6),
            "worst_leaf": worst["path"] if worst else None,
            "worst_kind": worst["kind"] if worst else None,
            "workers": dict(sorted(self.workers.items())),
        }


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
    if opt.ckpt_step is not None and opt.ckpt_step < 0:
        raise pytest.UsageError(f"--ckpt-step must be a non-negative integer, got {opt.ckpt_step}.")
    s.step = opt.ckpt_step
    s.split = opt.ckpt_split
    s.report_path = opt.ckpt_report
    s.format_a, s.format_b = opt.ckpt_format_a, opt.ckpt_format_b
    s.ignore_rngs = not opt.ckpt_compare_rngs

    atol = opt.ckpt_atol if opt.ckpt_atol is not None else (config.getini("ckpt_atol") or None)
    rtol = opt.ckpt_rtol if opt.ckpt_rtol is not None else (config.getini("ckpt_rtol") or None)
    kwargs: dict[str, Any] = {
        "atol": _float_or_usage("--atol" if opt.ckpt_atol is not None else "ckpt_atol", str(atol)) if atol is not None else None,
        "rtol": _float_or_usage("--rtol" if opt.ckpt_rtol is not None else "ckpt_rtol", str(rtol)) if rtol is not None else None,
        "tolerances": parse_tolerance_lines(config.getini("ckpt_tolerances")),
        "include": tuple(opt.ckpt_include or ()),
        "exclude": tuple(opt.ckpt_exclude or ()),
        "compare_values": not opt.ckpt_structure_only,
        "dtype_policy": opt.ckpt_dtype_policy,
        "step": s.step,
        "format_a": s.format_a,
        "format_b": s.format_b,
        "ignore_rngs": s.ignore_rngs,
    }
    budget = opt.ckpt_read_budget if opt.ckpt_read_budget is not None else (config.getini("ckpt_read_budget") or None)
    if budget is not None:
        source = "--ckpt-read-budget" if opt.ckpt_read_budget is not None else "ckpt_read_budget"
        kwargs["read_budget"] = mib_to_bytes(source, str(budget))
    s.helper_kwargs = kwargs
    return s


def open_cached(config: pytest.Config, path: str, name: str) -> Any:
    """Open each checkpoint once per process (metadata is read once, arrays never here)."""
    from pytest_ckptparity.sources import open_checkpoint

    settings = config.stash[settings_key]
    cache = config.stash.setdefault(cache_key, {})
    key = (str(path), settings.step, name)
    if key not in cache:
        cache[key] = open_checkpoint(path, step=settings.step, name=name)
    return cache[key]

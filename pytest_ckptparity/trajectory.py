"""Run-vs-run trajectories: two CheckpointManager roots compared step by step.

Which steps (`all`, `common` or a list), the per-step reports, and the first step at which
each leaf leaves tolerance (with its layers), as data and as text. Figures come from the
JSON comparison records (`report.comparison_record`), so the API, the CLI and a pytest run
merged across xdist workers all name the same first step. Compares and reads nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from pytest_ckptparity._model import ParityReport
from pytest_ckptparity.errors import CkptParityUsageError

ALL, COMMON = "all", "common"
StepSpec = Union[str, tuple[int, ...]]  # "all", "common" or the steps asked for, sorted
STEP_ITEM_PREFIX = "step_"  # generated pytest items: `ckpt-parity::step_3/params/decoder`


# --------------------------------------------------------------------------------------
# Which steps
# --------------------------------------------------------------------------------------


def parse_steps(value: Any, source: str = "steps") -> StepSpec:
    """`"all"`, `"common"`, `"0,2,4"`, a list of ints or one int, as `ALL`, `COMMON` or a
    sorted tuple of distinct steps. Anything else is a usage error in one sentence."""
    def bad() -> CkptParityUsageError:
        return CkptParityUsageError(
            f"{source} must be 'all', 'common' or step numbers such as '0,2,4' (non-negative integers), got {value!r}.")

    if isinstance(value, str):
        text = value.strip().lower()
        if text in (ALL, COMMON):
            return text
        parts = [p.strip() for p in text.split(",")]
        if not all(p.isdigit() for p in parts):
            raise bad()
        return tuple(sorted({int(p) for p in parts}))
    if isinstance(value, bool):
        raise bad()
    if isinstance(value, int):
        value = (value,)
    try:
        steps = list(value)
    except TypeError:
        raise bad() from None
    if not steps or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps):
        raise bad()
    return tuple(sorted(set(steps)))


def describe_spec(spec: StepSpec) -> str:
    return spec if isinstance(spec, str) else ",".join(str(s) for s in spec)


def _listed(steps: Iterable[int]) -> str:
    return ", ".join(str(s) for s in steps) or "none"


def plan_steps(
    spec: StepSpec, committed: tuple[Sequence[int], Sequence[int]], names: tuple[str, str], roots: tuple[str, str],
    pending: tuple[Sequence[int], Sequence[int]] = ((), ()),
) -> tuple[tuple[int, ...], dict[int, int]]:
    """(steps both sides compare, {step: index of the only side that committed it}).

    `all`: every committed step of either side; one committed on one side only is returned
    as missing on the other (a failure of that step, not a usage error). `common`: the
    steps both committed; none in common is a usage error. A list: exactly those steps; one
    a side has not committed is a usage error naming the step and the side.
    """
    sa, sb = set(committed[0]), set(committed[1])
    if spec == ALL:
        missing = {s: (0 if s in sa else 1) for s in sorted(sa ^ sb)}
        return tuple(sorted(sa & sb)), missing
    if spec == COMMON:
        both = tuple(sorted(sa & sb))
        if not both:
            raise CkptParityUsageError(
                f"steps='common': {names[0]} and {names[1]} share no committed step ({names[0]}: {_listed(sorted(sa))}; "
                f"{names[1]}: {_listed(sorted(sb))}); check the two roots, or compare two different steps with step_a/step_b.")
        return both, {}
    for side, have in ((0, sa), (1, sb)):
        lacking = [s for s in spec if s not in have]
        if lacking:
            waiting = [s for s in lacking if s in pending[side]]
            why = f" (step {_listed(waiting)} is not committed yet, or was abandoned)" if waiting else ""
            raise CkptParityUsageError(
                f"step {_listed(lacking)} is not a committed step of {names[side]} ('{roots[side]}'){why}; its committed "
                f"steps are {_listed(sorted(have))}: pass steps both runs committed, or steps='common'.", path=roots[side])
    return tuple(spec), {}


def missing_sentence(step: int, holder: int, names: tuple[str, str], committed_other: Sequence[int], pending_other: Sequence[int] = ()) -> str:
    other = names[1 - holder]
    why = "is not committed there yet (still being written, or abandoned)" if step in pending_other else "does not exist there"
    return f"step {step} is committed in {names[holder]} only: {other}'s step {step} {why} ({other}'s committed steps: {_listed(committed_other)})"


def missing_step_record(step: int, holder: int, names: tuple[str, str], roots: tuple[str, str], sentence: str, *, test: Optional[str] = None) -> dict[str, Any]:
    """The JSON record of a step one side committed and the other did not: a failed
    comparison of that step with no leaves; `steps` holds null on the side that lacks it."""
    steps: list[Optional[int]] = [None, None]
    steps[holder] = step
    return {
        "names": list(names), "locations": list(roots), "steps": steps, "layouts": ["", ""], "notes": [sentence],
        "passed": False, "values_compared": True, "test": test, "expected_failure": False, "missing_step": step,
        "totals": {"leaves_compared": 0, "leaves_mismatched": 0, "leaves_ignored": 0, "bytes_read": 0, "wall_time_s": 0.0,
                   "worst_leaf": None, "worst_kind": None, "headroom": 0.0, "headroom_leaf": None, "headroom_index": None, "passed": False},
        "leaves": [],
    }


# --------------------------------------------------------------------------------------
# The first step each leaf leaves tolerance
# --------------------------------------------------------------------------------------


def _float(x: Any) -> float:
    try:
        return float(x)  # JSON carries infinity as "inf"
    except (TypeError, ValueError):
        return 0.0


@dataclass(frozen=True)
class FirstDrift:
    """The first compared step at which a leaf is out of tolerance (or differs in kind), the
    layers that are out at that step, and its figures there."""

    path: str
    step: int
    kind: str
    layers: tuple[int, ...] = ()
    max_abs: float = 0.0
    headroom: float = 0.0

    def where(self) -> str:
        """`params/.../kernel [layer 1]`."""
        if not self.layers:
            return self.path
        shown = ", ".join(str(i) for i in self.layers[:8]) + (", ..." if len(self.layers) > 8 else "")
        return f"{self.path} [layer{'s' if len(self.layers) > 1 else ''} {shown}]"

    def describe(self) -> str:
        figures = [self.kind]
        if self.kind == "values":
            figures.append(f"max abs diff {self.max_abs:.6g}")
            figures.append("headroom inf (exact leaf)" if math.isinf(self.headroom) else f"headroom {self.headroom:.3g}")
        return f"step {self.step}: {self.where()} ({', '.join(figures)})"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "step": self.step, "kind": self.kind, "layers": list(self.layers),
                "max_abs": self.max_abs, "headroom": "inf" if math.isinf(self.headroom) else self.headroom}


def record_step(record: Mapping[str, Any]) -> Optional[int]:
    """The step a comparison record is about: both sides at the same step (None otherwise)."""
    steps = list(record.get("steps") or ())
    if len(steps) == 2 and steps[0] is not None and steps[0] == steps[1]:
        return int(steps[0])
    return None


def _out_layers(leaf: Mapping[str, Any]) -> set[int]:
    stats = leaf.get("stats") or {}
    drift = stats.get("layer_drift") or []
    out = {int(d["layer"]) for d in drift if _float(d.get("headroom")) > 1.0}
    return out or {int(i) for i in stats.get("mismatched_layers") or ()}


def first_drifts(records: Iterable[Mapping[str, Any]]) -> list[FirstDrift]:
    """Per leaf path, the first step at which it mismatches, sorted by step then path.

    A leaf split over several records at one step (pytest items per layer) is merged: its
    layers are the union, its figures the largest. Records a test expected to fail and
    records of two different steps are left out."""
    found: dict[str, dict[str, Any]] = {}
    for r in records:
        step = record_step(r)
        if step is None or r.get("expected_failure"):
            continue
        for leaf in r.get("leaves", []):
            if leaf.get("ok"):
                continue
            path, stats = leaf["path"], leaf.get("stats") or {}
            cur = found.get(path)
            if cur is None or step < cur["step"]:
                cur = found[path] = {"step": step, "kind": leaf.get("kind") or "values", "layers": set(), "max_abs": 0.0, "headroom": 0.0}
            elif step > cur["step"]:
                continue
            cur["layers"] |= _out_layers(leaf)
            cur["max_abs"] = max(cur["max_abs"], _float(stats.get("max_abs")))
            cur["headroom"] = max(cur["headroom"], _float(stats.get("headroom")))
    return sorted(
        (FirstDrift(p, d["step"], d["kind"], tuple(sorted(d["layers"])), d["max_abs"], d["headroom"]) for p, d in found.items()),
        key=lambda d: (d.step, d.path),
    )


def step_outcomes(records: Iterable[Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per step: whether it passed, the leaves that differ, and whether a side lacks it."""
    out: dict[int, dict[str, Any]] = {}
    for r in records:
        if r.get("expected_failure"):
            continue
        missing = r.get("missing_step")
        step = int(missing) if missing is not None else record_step(r)
        if step is None:
            continue
        o = out.setdefault(step, {"passed": True, "differ": set(), "missing": missing is not None})
        o["passed"] = o["passed"] and bool(r.get("passed"))
        o["differ"] |= {l["path"] for l in r.get("leaves", []) if not l.get("ok")}
    return dict(sorted(out.items()))


def steps_line(records: Iterable[Mapping[str, Any]]) -> str:
    """`steps: 0 match, 1 match, 2 differ (1 leaf), 3 missing in B`."""
    parts = []
    for step, o in step_outcomes(records).items():
        if o["missing"]:
            parts.append(f"{step} on one side only")
        elif o["passed"]:
            parts.append(f"{step} match")
        else:
            n = len(o["differ"])
            parts.append(f"{step} differ ({n} lea{'f' if n == 1 else 'ves'})")
    return "steps: " + ", ".join(parts)


def drift_line(drifts: Sequence[FirstDrift]) -> str:
    """`first out of tolerance at step 2: params/.../kernel [layer 1] (values, ...)`."""
    if not drifts:
        return ""
    first = drifts[0].step
    at_first = [d for d in drifts if d.step == first]
    shown = "; ".join(d.describe().split(": ", 1)[1] for d in at_first[:3])
    more = f"; +{len(at_first) - 3} more" if len(at_first) > 3 else ""
    return f"first out of tolerance at step {first}: {shown}{more}"


def trajectory_fields(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The `trajectory` object of the JSON report: steps, outcomes and first drift per leaf."""
    outcomes = step_outcomes(records)
    return {
        "steps": list(outcomes),
        "steps_failed": [s for s, o in outcomes.items() if not o["passed"]],
        "steps_on_one_side_only": [s for s, o in outcomes.items() if o["missing"]],
        "first_drift": [d.to_dict() for d in first_drifts(records)],
    }


def summary_lines(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, bool]]:
    """The pytest terminal summary of a run over steps: (line, whether it reports a failure)."""
    if not step_outcomes(records):
        return []
    lines = [(steps_line(records), False)]
    drifts = first_drifts(records)
    if drifts:
        lines.append((drift_line(drifts), True))
    missing = [s for s, o in step_outcomes(records).items() if o["missing"]]
    if missing:
        lines.append((f"steps committed on one side only: {_listed(missing)}", True))
    return lines


# --------------------------------------------------------------------------------------
# The report of a run over steps
# --------------------------------------------------------------------------------------


@dataclass(repr=False)
class TrajectoryReport:
    """Two manager roots compared step by step. Truthy only when every step matches and no
    step was committed on one side only."""

    names: tuple[str, str] = ("A", "B")
    roots: tuple[str, str] = ("", "")
    spec: str = ALL
    reports: dict[int, ParityReport] = field(default_factory=dict)  # per compared step, in step order
    missing: dict[int, str] = field(default_factory=dict)  # step -> sentence: committed on one side only
    missing_holder: dict[int, int] = field(default_factory=dict)  # step -> index of the side that has it
    notes: list[str] = field(default_factory=list)

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.reports) | set(self.missing)))

    @property
    def passed(self) -> bool:
        return not self.missing and all(r.passed for r in self.reports.values())

    @property
    def failed_steps(self) -> tuple[int, ...]:
        return tuple(s for s in self.steps if s in self.missing or not self.reports[s].passed)

    def records(self) -> list[dict[str, Any]]:
        """One JSON comparison record per step, in step order (each with its `steps` pair)."""
        from pytest_ckptparity.report import comparison_record

        out = []
        for s in self.steps:
            if s in self.reports:
                out.append(comparison_record(self.reports[s]))
            else:
                out.append(missing_step_record(s, self.missing_holder[s], self.names, self.roots, self.missing[s]))
        return out

    @property
    def first_drift(self) -> list[FirstDrift]:
        """Per leaf that leaves tolerance: the first step at which it does, with its layers."""
        return first_drifts(self.records())

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "roots": list(self.roots), "spec": self.spec, "passed": self.passed,
                "notes": list(self.notes), **trajectory_fields(self.records()), "comparisons": self.records()}

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        state = "passed" if self.passed else f"failed at steps {_listed(self.failed_steps)}"
        return f"<TrajectoryReport {state}: steps {_listed(self.steps)} ({self.names[0]} vs {self.names[1]})>"


def summary_line(t: TrajectoryReport) -> str:
    na, nb = t.names
    over = f"checkpoint parity over steps {_listed(t.steps)} ({na} vs {nb})"
    if t.passed:
        room = max(((r.headroom()[0], s) for s, r in t.reports.items()), default=(0.0, None))
        where = f"; largest headroom {room[0]:.3g} at step {room[1]}" if room[0] else "; every value identical"
        return f"{over}: every step matches{where}"
    failed = t.failed_steps
    text = f"{over} failed at step{'s' if len(failed) > 1 else ''} {_listed(failed)}"
    line = drift_line(t.first_drift)
    if line:
        text += f"; {line}"
    if t.missing:
        text += "; " + "; ".join(t.missing[s] for s in sorted(t.missing))
    return text


def render_trajectory(
    t: TrajectoryReport, *, color: Optional[bool] = False, max_rows: Optional[int] = 20, more_hint: Optional[str] = None,
    summary_last: bool = False,
) -> str:
    """The verdict over steps, the first step of each drifting leaf, then every step: a
    passing step in one line, a failing one with its mismatch rows. `summary_last` puts the
    verdict at the bottom (a terminal) instead of the top (an exception message)."""
    from pytest_ckptparity.report import MORE_HINT, render

    hint = more_hint or MORE_HINT
    head = [summary_line(t), *t.notes]
    drifts = t.first_drift
    if drifts:
        head.append("first step at which each leaf leaves tolerance:")
        shown = drifts if max_rows is None else drifts[:max_rows]
        head.extend(f"  {d.describe()}" for d in shown)
        if len(shown) < len(drifts):
            head.append(f"  ... and {len(drifts) - len(shown)} more ({hint})")
    body = []
    for s in t.steps:
        if s in t.missing:
            body.append(f"step {s}: {t.missing[s]}")
            continue
        r = t.reports[s]
        text = render(r, color=color, max_rows=max_rows, more_hint=hint, layer_strips=True)
        body.append(f"step {s}: " + (text.splitlines()[0] if r.passed else text))
    return "\n".join([*body, *head] if summary_last else [*head, *body])

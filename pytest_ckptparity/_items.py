"""Generated test items: one per subtree of the `--ckpt-a` / `--ckpt-b` comparison (per step
and subtree with `--ckpt-steps`).

Items come from metadata only and are sorted, so every xdist worker collects the same list;
each item reads only the arrays of its own subtree when it runs.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest

from pytest_ckptparity.errors import CkptParityError, CkptParityUsageError

from pytest_ckptparity._session import SUITE_NAME, render_for, stats_key


class CkptParitySuite(pytest.Collector):
    """The parent of the generated items (ids read `ckpt-parity::params/decoder/layers[3]`)."""

    def collect(self) -> list[pytest.Item]:  # items are made by `make_items`, not collected
        return []

    def reportinfo(self) -> tuple[Any, Optional[int], str]:
        return self.config.rootpath / SUITE_NAME, None, SUITE_NAME


class CkptParityItem(pytest.Item):
    def __init__(self, *, comparison: Any, selection: list, **kw: Any) -> None:
        super().__init__(**kw)
        self.comparison = comparison
        self.selection = selection

    def runtest(self) -> None:
        import warnings

        # A generated item has no line of the user's: its warnings (a fingerprint's "not
        # bit-identical") carry the item's id as their location instead of pytest's runner.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = self.comparison.run(self.selection)
        for w in caught:
            warnings.warn_explicit(w.message, w.category, filename=self.nodeid, lineno=0)
        totals = report.totals()
        # The same properties on every item, pass or fail (JUnit XML; docs/pytest.md).
        self.user_properties.extend([
            ("ckpt_passed", totals["passed"]),
            ("ckpt_leaves", totals["leaves_compared"]),
            ("ckpt_mismatched", totals["leaves_mismatched"]),
            ("ckpt_bytes_read", totals["bytes_read"]),
            ("ckpt_wall_time_s", totals["wall_time_s"]),
            ("ckpt_max_abs_diff", max((r.stats.max_abs for r in report.results if r.stats is not None), default=0.0)),
            ("ckpt_headroom", totals["headroom"]),
            ("ckpt_headroom_leaf", totals["headroom_leaf"] or ""),
            ("ckpt_worst_leaf", totals["worst_leaf"] or ""),
        ])
        if not report.passed:
            from pytest_ckptparity.report import render_plain

            raise CkptParityError(render_plain(report, None), report)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, CkptParityError):
            return render_for(self.config, excinfo.value.report)
        if isinstance(excinfo.value, CkptParityUsageError):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self) -> tuple[Any, Optional[int], str]:
        # A path under rootdir makes pytest print the location as `ckpt-parity`.
        return self.config.rootpath / SUITE_NAME, None, f"{SUITE_NAME}::{self.name}"


class MissingStepItem(pytest.Item):
    """A step committed by one run only (`--ckpt-steps all`): it fails, naming the step."""

    def __init__(self, *, step: int, trajectory: Any, **kw: Any) -> None:
        super().__init__(**kw)
        self.step = step
        self.trajectory = trajectory

    def runtest(self) -> None:
        from pytest_ckptparity.trajectory import missing_step_record

        t, step = self.trajectory, self.step
        sentence = t.missing[step]
        stats = self.config.stash.get(stats_key, None)
        if stats is not None:  # a failed comparison of this step in the summary and the JSON report
            stats.records.append(missing_step_record(step, t.missing_holder[step], t.names, t.roots, sentence, test=self.nodeid))
        raise CkptParityError(sentence, None)  # type: ignore[arg-type]

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, CkptParityError):
            return f"checkpoint parity failed: {excinfo.value}"
        return super().repr_failure(excinfo, style)

    def reportinfo(self) -> tuple[Any, Optional[int], str]:
        return self.config.rootpath / SUITE_NAME, None, f"{SUITE_NAME}::{self.name}"


def _parts(comparison: Any, split: str) -> list[tuple[str, Any, Any, Optional[int]]]:
    """(item name, comparison, selection, None), or (name, trajectory, None, step) for a step
    one run lacks.

    Over steps (`--ckpt-steps`) every step's parts come in step order, named
    `step_<N>/<part>`, so the ids stay sorted and equal on every xdist worker."""
    opened = getattr(comparison, "open_all", None)
    if opened is None:
        return [(name, comparison, selection, None) for name, selection in comparison.split(split)]
    from pytest_ckptparity.trajectory import STEP_ITEM_PREFIX

    per_step = opened()
    out: list[tuple[str, Any, Any, Optional[int]]] = []
    for step in sorted(set(per_step) | set(comparison.missing)):
        if step in comparison.missing:
            out.append((f"{STEP_ITEM_PREFIX}{step}", comparison, None, step))
            continue
        out.extend((f"{STEP_ITEM_PREFIX}{step}/{name}", per_step[step], sel, None) for name, sel in per_step[step].split(split))
    return out


def make_items(session: pytest.Session, comparison: Any, split: str) -> list[pytest.Item]:
    suite = CkptParitySuite.from_parent(session, name=SUITE_NAME, nodeid=SUITE_NAME)
    items: list[pytest.Item] = []
    for name, owner, selection, missing_step in _parts(comparison, split):
        if missing_step is not None:
            item: pytest.Item = MissingStepItem.from_parent(suite, name=name, step=missing_step, trajectory=owner)
        else:
            item = CkptParityItem.from_parent(suite, name=name, comparison=owner, selection=selection)
        items.append(item)
        session.ihook.pytest_itemcollected(item=item)
    # The terminal reporter counts collected items from collect reports ("collected N items").
    session.ihook.pytest_collectreport(report=pytest.CollectReport(suite.nodeid, "passed", None, items))
    return items

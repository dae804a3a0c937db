"""What the report says: every location literal in every renderer, no clutter, headroom,
a short repr, and the JSON document."""

from __future__ import annotations

import re

import numpy as np
import pytest

from pytest_ckptparity import CkptParityUsageError, compare_checkpoints
from pytest_ckptparity.report import (
    comparison_record, describe_mismatch, json_document, kind_text, located_path, render, render_plain, render_rich,
    run_totals, summary_line,
)

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _failing_report(demo_ckpts):
    """Real checkpoints: a drifted layer 1 (a `[layer 1]` location), plus one-sided leaves."""
    return compare_checkpoints(demo_ckpts["linen"], demo_ckpts["nnx_drift"], names=("linen", "drift"), atol=0, rtol=0)


def test_rich_rendering_states_the_facts_of_the_plain_one(demo_ckpts):
    report = _failing_report(demo_ckpts)
    assert any("[layer 1]" in located_path(r) for r in report.mismatches)
    coloured = render_rich(report, None, color=True, width=2000)
    assert "\x1b[" in coloured
    text = ANSI.sub("", coloured)
    plain = render_plain(report, None)
    for line in plain.splitlines()[: len(plain.splitlines()) - len(report.mismatches)]:
        assert line in text  # summary and header lines
    for r in report.mismatches:  # every cell, brackets included, as literal text
        for cell in (located_path(r), kind_text(r, report.names), describe_mismatch(r, report.names)):
            assert cell in text, cell
            assert cell in plain
    assert render(report, color=False) == render_plain(report)


def test_no_clutter_in_value_rows():
    b = np.linspace(1, 2, 8, dtype=np.float32)
    everything = compare_checkpoints({"w": b + 1}, {"w": b})
    text = describe_mismatch(everything.results[0])
    assert text.startswith("8/8 (100%) elements differ; max abs diff 1") and "first at" not in text
    some = b.copy()
    some[[2, 5]] += 1
    text = describe_mismatch(compare_checkpoints({"w": some}, {"w": b}).results[0])
    assert "2/8 (25%) elements differ" in text and "first at index (2,), index (5,)" in text
    # NaN against a number: said so, never "max abs diff 0".
    nan = b.copy()
    nan[3] = np.nan
    text = describe_mismatch(compare_checkpoints({"w": nan}, {"w": b}).results[0])
    assert "1/8 (12.5%) elements differ; all of them NaN/inf against a different value; at index (3,): A=nan B=" in text
    assert "max abs diff" not in text
    # equal_nan=False: NaN against NaN is named as such, not as "a different value".
    both = compare_checkpoints({"w": nan}, {"w": nan.copy()}, equal_nan=False)
    text = describe_mismatch(both.results[0])
    assert "all of them NaN against NaN (equal_nan=False)" in text and "different value" not in text


def test_rng_sentence_only_when_rng_state_was_left_out(demo_ckpts):
    tree = {"params": {"w": np.ones(2, np.float32)}, "opt_state": {"m": np.zeros(2, np.float32)}}
    scoped = compare_checkpoints(tree, tree, exclude="opt_state")
    assert "1 leaf left out by scope or layout rules" in render_plain(scoped) and "RNG" not in render_plain(scoped)
    with_rngs = {**tree, "rngs": {"default": {"count": np.array(3, np.uint32)}}}
    report = compare_checkpoints(with_rngs, with_rngs)
    assert report.rngs_ignored and "left out by scope or layout rules (RNG state among them: it is left out by default; " in render_plain(report)


def test_one_sided_leaves_use_the_sides_names():
    a = {"params": {"w": np.ones(2), "extra": np.ones(1)}}
    report = compare_checkpoints(a, {"params": {"w": np.ones(2), "gone": np.ones(1)}}, names=("new", "old"))
    text = render_plain(report)
    assert "params/extra  [only in new]" in text and "params/gone  [only in old]" in text
    assert "params/extra (only in new), params/gone (only in old)" in summary_line(report)
    assert "[only in A]" not in text and "[only in B]" not in text


def test_report_repr_is_one_short_line(demo_ckpts):
    many = {"params": {f"l{i:02d}": np.zeros(4, np.float32) for i in range(60)}}
    failing = compare_checkpoints(many, {"params": {k: v + 1 for k, v in many["params"].items()}})
    assert repr(failing) == "<ParityReport failed: 60 of 60 leaves differ (A vs B), worst params/l00>"
    assert repr(compare_checkpoints(many, many)) == "<ParityReport passed: 60 leaves match (A vs B), headroom 0>"


def test_headroom_is_the_largest_share_of_the_allowance_used():
    b = np.zeros(8, np.float32)
    # Within atol everywhere (the kernel's fast path): 0.25 and 0.5 of atol.
    a = b + np.float32(0.25e-3)
    a[3] = np.float32(0.5e-3)
    report = compare_checkpoints({"params": {"w": a}}, {"params": {"w": b}}, atol=1e-3, rtol=0)
    s = report.results[0].stats
    assert s.headroom == pytest.approx(0.5, rel=1e-5) and s.headroom_index == (3,)
    assert summary_line(report) == "checkpoint parity: 1 leaf matches (A vs B); headroom 0.5 of the allowance at params/w index (3,)"
    # The largest |a - b| is not the largest share when |b| is large: rtol widens its allowance.
    b = np.zeros(8, np.float64)
    b[7] = 100.0
    a = b.copy()
    a[7] += 0.9e-3
    a[2] += 0.6e-3
    s = compare_checkpoints({"w": a}, {"w": b}, atol=1e-3, rtol=1e-2).results[0].stats
    assert s.headroom == pytest.approx(0.6, rel=1e-6) and s.headroom_index == (2,)
    # Beyond atol but within rtol (the full test): still below 1.
    a = b.copy()
    a[7] += 0.5
    s = compare_checkpoints({"w": a}, {"w": b}, atol=1e-3, rtol=1e-2).results[0].stats
    assert s.headroom == pytest.approx(0.5 / 1.001, rel=1e-6) and s.headroom_index == (7,)
    # Exact leaves: 0 when equal, beyond any allowance when not.
    ints = compare_checkpoints({"n": np.arange(4)}, {"n": np.arange(4)})
    assert ints.results[0].stats.headroom == 0.0 and "every value identical" in summary_line(ints)
    off = compare_checkpoints({"n": np.array([0, 1, 7, 3])}, {"n": np.arange(4)})
    assert off.results[0].stats.headroom == float("inf") and off.results[0].stats.headroom_index == (2,)


def test_headroom_names_the_layer(demo_ckpts):
    report = compare_checkpoints(demo_ckpts["linen"], demo_ckpts["nnx"], atol=1e-9, rtol=0)
    h, leaf, index = report.headroom()
    assert report.passed and h == 0.0 and leaf is None  # the same weights, bit for bit


def test_json_document_and_run_totals(demo_ckpts):
    failing = _failing_report(demo_ckpts)
    passing = compare_checkpoints(demo_ckpts["linen"], demo_ckpts["nnx"], names=("linen", "nnx"))
    records = [
        comparison_record(passing, test="t.py::test_ok"),
        comparison_record(failing, test="t.py::test_bad"),
        comparison_record(failing, test="t.py::test_raises", expected_failure=True),
    ]
    doc = json_document(records, tool="pytest")
    assert doc["schema"] == 1 and doc["comparisons"] == records
    first = records[0]
    assert first["names"] == ["linen", "nnx"] and first["steps"] == [7, 7]
    assert first["locations"][0].endswith("linen/checkpoints/7/items")
    assert first["layouts"][0].startswith("Linen TrainState") and first["passed"] is True
    assert {"headroom", "headroom_leaf", "headroom_index"} <= set(first["totals"])
    assert all("headroom" in leaf["stats"] for leaf in first["leaves"] if leaf["stats"])
    t = doc["totals"]
    assert (t["comparisons"], t["comparisons_passed"], t["comparisons_failed"], t["comparisons_expected_to_fail"]) == (3, 1, 1, 1)
    assert t["worst_test"] == "t.py::test_bad" and t["worst_leaf"] == failing.worst().path
    assert t["leaves_mismatched"] == len(failing.mismatches) and not t["passed"]
    # Only expected failures: nothing of the run mismatched.
    quiet = run_totals([records[0], records[2]])
    assert quiet["passed"] and quiet["leaves_mismatched"] == 0 and quiet["worst_leaf"] is None


def test_a_comparison_of_nothing_never_passes():
    with pytest.raises(CkptParityUsageError, match="nothing to compare: neither A or B holds a leaf"):
        compare_checkpoints({}, {})
    with pytest.raises(CkptParityUsageError, match=r"include glob 'parms' matches no leaf of A or B; the top-level groups are: params, step\."):
        compare_checkpoints({"params": {"w": np.ones(1)}, "step": 1}, {"params": {"w": np.ones(1)}, "step": 1}, include=["params", "parms"])
    with pytest.raises(CkptParityUsageError, match="matches only leaves left out by default or by ignore rules"):
        tree = {"params": {"w": np.ones(1)}, "opt_state": {"m": np.ones(1)}, "rngs": {"default": {"count": np.array(1, np.uint32)}}}
        compare_checkpoints(tree, tree, include="rngs")

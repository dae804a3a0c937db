"""The command line's conventions: version, the compare alias, python -m, rows, steps per side,
scope typos, storage options, URLs kept as written, a closed pipe, the progress bar, JSON."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from pytest_ckptparity import zarr_rows

from pytest_ckptparity import __version__
from pytest_ckptparity import examples as ex
from pytest_ckptparity.cli import _want_progress, main, run_with_progress


def cli(*args: str, module: str = "pytest_ckptparity") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def sixty_differ(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two bare orbax folders of 60 small leaves, every one of which differs."""
    root = tmp_path_factory.mktemp("sixty")
    tree = {f"l{i:02d}": np.zeros(2, np.float32) for i in range(60)}
    return ex.save(root / "a", {"params": tree}), ex.save(root / "b", {"params": {k: v + 1 for k, v in tree.items()}})


def test_version_alias_and_python_m(samples):
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"ckptparity {__version__} (native kernels: yes; {zarr_rows.status()})"
    plain = cli(samples["maxtext_decode_scan"], samples["maxtext_decode_unroll"], "--color", "no")
    alias = cli("compare", samples["maxtext_decode_scan"], samples["maxtext_decode_unroll"], "--color", "no", module="pytest_ckptparity.cli")
    assert plain.returncode == alias.returncode == 0
    assert plain.stdout == alias.stdout
    assert plain.stdout.startswith("checkpoint parity: 12 leaves match (A vs B); every value identical")
    # Where each side was read and which step, in the header.
    assert f"A: parameter-only decode checkpoint, scanned on axis 1, at {samples['maxtext_decode_scan']}/0/items (step 0)" in plain.stdout


def test_rows_follow_verbosity_and_max_rows_is_checked(sixty_differ, capsys):
    pair = [*sixty_differ, "--color", "no"]

    def rows(out: str) -> int:
        return sum(1 for line in out.splitlines() if line.startswith("  ") and not line.startswith("  ..."))

    assert main(pair) == 1
    out = capsys.readouterr().out
    assert rows(out) == 20 and "... and 40 more (use -vv or --max-rows 0 to see all)" in out
    assert main([*pair, "-v"]) == 1
    out = capsys.readouterr().out
    assert rows(out) == 50 and "... and 10 more (use -vv or --max-rows 0 to see all)" in out
    assert main([*pair, "-vv"]) == 1
    out = capsys.readouterr().out
    assert rows(out) == 60 and "more (use" not in out
    assert main([*pair, "--max-rows", "5"]) == 1
    assert "... and 55 more" in capsys.readouterr().out
    assert main([*pair, "--max-rows", "0"]) == 1
    assert rows(capsys.readouterr().out) == 60
    assert main([*pair, "--max-rows", "-1"]) == 2
    assert "argument --max-rows: must be a non-negative integer, got '-1'" in capsys.readouterr().err


def test_steps_per_side_and_uncommitted_newer_step(two_steps, tmp_path, capsys):
    assert main([two_steps, two_steps, "--step-a", "1", "--step-b", "5", "--color", "no"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^A: .*, at .*/run/1/items \(step 1\)$", out, re.M) and re.search(r"^B: .*, at .*/run/5/items \(step 5\)$", out, re.M)
    assert "worst at index (0,): A=1 B=2" in out
    report = tmp_path / "r.json"
    assert main([two_steps, two_steps, "--color", "no", "--report", str(report)]) == 0
    captured = capsys.readouterr()
    # The latest committed step was compared; the newer unfinished one is named, on stderr and in the header.
    warning = "newer step 9 is not committed (still being written, or abandoned)"
    assert f"ckptparity: warning: A: compared step 5 of {two_steps}, its latest committed step; {warning}" in captured.err
    assert warning in captured.out
    data = json.loads(report.read_text())
    (comparison,) = data["comparisons"]
    assert data["schema"] == 1 and data["tool"] == "ckptparity" and comparison["test"] is None
    assert comparison["steps"] == [5, 5] and comparison["locations"][0].endswith("/run/5/items")
    assert comparison["passed"] is True and comparison["totals"]["headroom"] == 0.0
    assert any(warning in note for note in comparison["notes"])
    # A step asked for by number is what the user wants: no warning.
    assert main([two_steps, two_steps, "--step", "1", "--color", "no"]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--include", "parms/**"], "include glob 'parms/**' matches no leaf of A or B; the top-level groups are: opt_state, params, step."),
    # A typo in one of several globs must not quietly shrink the comparison.
    (["--include", "params", "--include", "stpe"], "include glob 'stpe' matches no leaf of A or B; the top-level groups are: opt_state, params, step."),
    (["--exclude", "**"], "the scope (exclude=['**']) leaves no leaf of A or B to compare; the top-level groups are: opt_state, params, step."),
    (["--include", "step", "--exclude", "step"], "the scope (include=['step'], exclude=['step']) leaves no leaf of A or B to compare"),
])
def test_a_scope_that_matches_nothing_is_a_usage_error(samples, capsys, args, message):
    assert main([samples["maxtext_nnx_scan"], samples["maxtext_nnx_noscan"], *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ckptparity: error: ") and message in err


def test_an_exclude_glob_that_matches_nothing_is_noted(samples, capsys):
    assert main([samples["maxtext_decode_scan"], samples["maxtext_decode_unroll"], "--exclude", "opt_state", "--color", "no"]) == 0
    assert "exclude glob 'opt_state' matched nothing (top-level groups: params)" in capsys.readouterr().out


def test_urls_stay_strings_and_storage_options_reach_the_reader(monkeypatch, capsys):
    from pytest_ckptparity import api
    from pytest_ckptparity.errors import CkptParityUsageError

    seen = []

    def fake_open(obj, **kw):
        seen.append((obj, kw))
        raise CkptParityUsageError(f"stop after opening {obj}")

    monkeypatch.setattr(api, "open_checkpoint", fake_open)
    assert main(["gs://bucket/run/checkpoints", "s3://other/ckpt", "--storage-option", "endpoint=http://127.0.0.1:9", "--step-a", "3"]) == 2
    assert seen == [("gs://bucket/run/checkpoints", {"step": 3, "name": "A", "storage_options": {"endpoint": "http://127.0.0.1:9"}})]
    assert "stop after opening gs://bucket/run/checkpoints" in capsys.readouterr().err


def test_bad_storage_options(samples, capsys):
    pair = [samples["maxtext_decode_scan"], samples["maxtext_decode_unroll"]]
    assert main([*pair, "--storage-option", "endpoint"]) == 2
    assert "--storage-option 'endpoint' must read KEY=VALUE" in capsys.readouterr().err
    assert main([*pair, "--storage-option", "region=eu"]) == 2
    assert "storage options apply to object-store URLs (gs://, s3://), but neither checkpoint is one" in capsys.readouterr().err


def test_a_closed_stdout_pipe_ends_quietly(samples):
    """`ckptparity A B | head -0`: the reader is gone before the report is printed."""
    proc = subprocess.Popen([sys.executable, "-m", "pytest_ckptparity", samples["maxtext_nnx_scan"], samples["maxtext_nnx_noscan"], "--atol", "0", "--rtol", "0", "-vv"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=180) == 1  # the verdict stands
    assert err == ""


def test_progress_only_on_a_terminal_outside_ci(samples):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    big = 1 << 30
    assert _want_progress("auto", big, Tty(), {}) is True
    assert _want_progress("auto", 1 << 20, Tty(), {}) is False  # too quick to need one
    assert _want_progress("auto", big, io.StringIO(), {}) is False  # a pipe
    assert _want_progress("auto", big, Tty(), {"CI": "true"}) is False
    assert _want_progress("no", big, Tty(), {}) is False and _want_progress("yes", 0, io.StringIO(), {}) is True
    # On a pipe the CLI prints nothing on stderr.
    quiet = cli(samples["maxtext_nnx_scan"], samples["maxtext_nnx_noscan"], "--color", "no")
    assert quiet.returncode == 1 and quiet.stderr == ""


def test_progress_runs_give_the_same_report(demo_ckpts):
    from rich.console import Console

    from pytest_ckptparity import Comparison

    comparison = Comparison(demo_ckpts["linen"], demo_ckpts["nnx_drift"])
    whole = comparison.run()
    shown = io.StringIO()
    parted = run_with_progress(comparison, Console(file=shown, force_terminal=True, width=100))
    assert [r.to_dict() | {"bytes_read": 0} for r in parted.results] == [r.to_dict() | {"bytes_read": 0} for r in whole.results]
    assert parted.ignored == whole.ignored and parted.notes == whole.notes and parted.bytes_read == whole.bytes_read
    assert "comparing" in shown.getvalue()


def test_the_readme_demo_shows_a_pass_a_failure_its_layer_strip_and_the_page(tmp_path):
    """`ckptparity demo` is the README's first command: it must keep showing what it says."""
    proc = cli("demo", "--dir", str(tmp_path), "--color", "no")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "checkpoint parity: 39 leaves match (linen vs nnx)" in out
    assert "checkpoint parity failed: 2 of 39 leaves differ" in out
    assert "params/decoder/layers/mlp/wi_0/kernel [layer 1]" in out and "index (3, 5)" in out
    assert re.search(r"params/decoder/layers/mlp/wi_0/kernel\s+\|\.#\|\s+layers 0-1; worst layer 1", out), out
    page = tmp_path / "drift-report.html"
    assert "3) Both comparisons as one HTML page" in out and str(page) in out
    html = page.read_text()
    assert "nnx_drift" in html and "Plotly" in html and "params/decoder/layers/mlp/wi_0/kernel" in html
    assert out.rstrip().endswith("the first comparison passed and the second failed, as expected.")

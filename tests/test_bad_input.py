"""Bad input gets one sentence naming the path and what to do; never a verdict or a traceback."""

from __future__ import annotations

import json
import re
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pytest_ckptparity import CkptParityUsageError, assert_ckpt_parity
from pytest_ckptparity import examples as ex
from pytest_ckptparity.cli import main


def cli(*args: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "pytest_ckptparity.cli", *args], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr + proc.stdout
    return proc.returncode, proc.stderr.strip()


def damaged(copy_ckpt, samples, how):
    root = copy_ckpt(samples["maxtext_decode_scan"])
    item = root / "0" / "items"
    if how == "corrupt_metadata":
        (item / "_METADATA").write_text("{not json")
    elif how == "metadata_names_missing_array":
        meta = json.loads((item / "_METADATA").read_text())
        entry = next(iter(meta["tree_metadata"].values()))
        meta["tree_metadata"]["('ghost',)"] = {**entry, "key_metadata": [{"key": "ghost", "key_type": 2}]}
        (item / "_METADATA").write_text(json.dumps(meta))
    elif how == "corrupt_chunks":
        for f in (item / "ocdbt.process_0" / "d").iterdir():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    elif how == "unfinished_step":
        (root / "0" / "commit_success.txt").unlink()
        (item / "commit_success.txt").unlink()
        return root / "0"
    elif how == "tmp_step":
        (root / "0").rename(root / "0.orbax-checkpoint-tmp-1795")
    return root


CASES = [
    ("corrupt_metadata", "_METADATA' is not valid orbax metadata (_METADATA) (JSONDecodeError); the checkpoint is damaged"),
    ("metadata_names_missing_array", "array 'ghost' listed in"),
    ("corrupt_chunks", "could not read array"),
    ("unfinished_step", "is an unfinished orbax checkpoint (no commit_success.txt)"),
    ("tmp_step", "holds no committed step (only unfinished ones: 0.orbax-checkpoint-tmp-1795)"),
]


@pytest.mark.parametrize("how,fragment", CASES, ids=[c[0] for c in CASES])
def test_damaged_checkpoints(copy_ckpt, samples, how, fragment):
    path = damaged(copy_ckpt, samples, how)
    with pytest.raises(CkptParityUsageError) as info:
        assert_ckpt_parity(path, samples["maxtext_decode_scan"])
    assert fragment in str(info.value) and str(info.value).startswith("A: ")
    code, err = cli(str(path), samples["maxtext_decode_scan"])
    assert code == 2 and fragment in err and err.startswith("ckptparity: error: A: ")


def test_path_errors(tmp_path, samples):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notckpt").mkdir()
    (tmp_path / "notckpt" / "readme.txt").write_text("hi")
    (tmp_path / "file.txt").write_text("hi")
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(tmp_path / "file.txt"): "is a file, not a checkpoint folder",
        str(tmp_path / "empty"): "is an empty folder",
        str(tmp_path / "notckpt"): "is not an orbax checkpoint (no _METADATA, step folders or items found)",
    }
    for path, fragment in cases.items():
        with pytest.raises(CkptParityUsageError, match=re.escape(fragment)):
            assert_ckpt_parity(samples["maxtext_decode_scan"], path)
        assert main([samples["maxtext_decode_scan"], path]) == 2


def test_missing_step_and_step_on_a_single_checkpoint(samples):
    with pytest.raises(CkptParityUsageError, match=r"step 9 is not a committed step of .* \(committed steps: 0\)"):
        assert_ckpt_parity(samples["maxtext_decode_scan"], samples["maxtext_decode_scan"], step=9)
    with pytest.raises(CkptParityUsageError, match="drop the step or point at the root"):
        assert_ckpt_parity(samples["maxtext_decode_scan"] + "/0/items", samples["maxtext_decode_scan"], step=0)


def test_pickle_and_msgpack_are_refused_and_never_loaded(tmp_path):
    marker = tmp_path / "ran"

    class Boom:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "model.pkl"
    bad.write_bytes(pickle.dumps(Boom()))
    flax_dir = tmp_path / "flax_ckpt"
    flax_dir.mkdir()
    (flax_dir / "checkpoint").write_bytes(b"\x82\xa1a\x01")  # msgpack, as old flax writes it
    for path in (bad, flax_dir):
        with pytest.raises(CkptParityUsageError, match="pickle, msgpack and similar files can run code or are not orbax checkpoints, and are never loaded"):
            assert_ckpt_parity(path, {"a": np.ones(1)})
    assert not marker.exists()
    with pytest.raises(CkptParityUsageError, match="raw bytes are not a checkpoint"):
        assert_ckpt_parity(pickle.dumps(1), {"a": np.ones(1)})


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root bypasses permissions and setpriv is missing")
def test_permission_denied(tmp_path, samples):
    root = tmp_path / "locked"
    shutil.copytree(samples["maxtext_decode_scan"], root)
    os.chmod(root / "0" / "items", 0)
    try:
        cmd = [sys.executable, "-m", "pytest_ckptparity.cli", str(root), samples["maxtext_decode_scan"]]
        if os.geteuid() == 0:
            drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            # Probe what the CLI run below needs, not just the lazy package: the CLI module
            # and the libraries a comparison imports (numpy, tensorstore, ml_dtypes).
            needs = "import pytest_ckptparity.cli, pytest_ckptparity.api, numpy, ml_dtypes, tensorstore"
            probe = subprocess.run([*drop, sys.executable, "-c", needs], capture_output=True, text=True)
            if probe.returncode != 0:  # e.g. the clone or the virtualenv lives in a 0700 folder
                last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
                pytest.skip(f"an unprivileged user cannot import what the CLI needs from this checkout ({last})")
            cmd = [*drop, *cmd]
            os.chmod(tmp_path, 0o755)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "permission denied" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        os.chmod(root / "0" / "items", 0o755)


def test_unknown_layout_and_bad_cli_options(samples):
    code, err = cli(samples["maxtext_decode_scan"], samples["maxtext_decode_scan"], "--format-a", "nope")
    assert code == 2 and "A: unknown layout 'nope'; known layouts:" in err
    code, err = cli(samples["maxtext_decode_scan"], samples["maxtext_decode_scan"], "--atol", "-1")
    assert code == 2 and "atol must be a non-negative number, got -1.0." in err
    code, err = cli(samples["maxtext_decode_scan"], samples["maxtext_decode_scan"], "--dtype-policy", "loose")
    assert code == 2 and "invalid choice: 'loose'" in err
    code, err = cli(samples["maxtext_decode_scan"], samples["maxtext_decode_scan"], "--read-budget", "0")
    assert code == 2 and "--read-budget must be a positive number of MiB, got 0." in err
    # A budget far below one stored chunk still gives the verdict: the chunk is read whole.
    assert main([samples["maxtext_decode_scan"], samples["maxtext_decode_unroll"], "--read-budget", "0.001", "--color", "no"]) == 0


def test_cli_exit_codes_and_inspect(samples, tmp_path):
    report = tmp_path / "r.json"
    assert main([samples["maxtext_decode_scan"], samples["maxtext_decode_unroll"], "--report", str(report), "--color", "no"]) == 0
    assert json.loads(report.read_text())["totals"]["leaves_compared"] == 12
    assert main([samples["maxtext_nnx_scan"], samples["maxtext_nnx_noscan"], "--color", "no"]) == 1
    proc = subprocess.run([sys.executable, "-m", "pytest_ckptparity.cli", "inspect", samples["maxtext_decode_scan"]], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "layout: parameter-only decode checkpoint, scanned on axis 1 [decode]" in proc.stdout
    assert "params/decoder/layers/self_attention/value/kernel" in proc.stdout and "2 layers x (16, 2, 8)" in proc.stdout


def test_read_only_guarantee(pytester, copy_ckpt, samples):
    """Helper, CLI and pytest -n 2 leave every byte and modification time unchanged."""
    a, b = copy_ckpt(samples["maxtext_nnx_scan"], "a"), copy_ckpt(samples["maxtext_decode_scan"], "b")

    def snapshot():
        # Every file's bytes and mtime, and every folder's entries (a new lock file would show).
        return {p: (p.read_bytes() if p.is_file() else sorted(os.listdir(p)), p.stat().st_mtime_ns) for root in (a, b) for p in sorted(root.rglob("*"))}

    before = snapshot()
    assert_ckpt_parity(a, b, include="params", dtype_policy="cast")
    assert main([str(a), str(b), "--include", "params", "--dtype-policy", "cast", "--color", "no"]) == 0
    result = pytester.runpytest_subprocess(f"--ckpt-a={a}", f"--ckpt-b={b}", "--ckpt-include=params", "--ckpt-dtype-policy=cast", "-n", "2", "-p", "no:cacheprovider")
    assert result.ret == 0
    assert snapshot() == before


def test_concurrent_workers_give_the_same_verdict(pytester, demo_ckpts):
    args = (f"--ckpt-a={demo_ckpts['linen']}", f"--ckpt-b={demo_ckpts['nnx_drift']}", "-p", "no:cacheprovider", "-q")
    serial = pytester.runpytest_subprocess(*args)
    outcomes = serial.parseoutcomes()
    for _ in range(2):
        parallel = pytester.runpytest_subprocess(*args, "-n", "4")
        assert parallel.ret == serial.ret == 1 and parallel.parseoutcomes() == outcomes


@pytest.mark.parametrize("how,fragment", CASES, ids=[c[0] for c in CASES])
def test_damaged_checkpoints_as_side_b_name_side_b_and_the_path(copy_ckpt, samples, how, fragment):
    """The side prefix and the path come from the side that is damaged, whichever it is."""
    path = damaged(copy_ckpt, samples, how)
    with pytest.raises(CkptParityUsageError) as info:
        assert_ckpt_parity(samples["maxtext_decode_scan"], path, names=("linen", "nnx"))
    message = str(info.value)
    assert message.startswith("nnx: ") and fragment in message, message
    assert str(path) in message or str(path.parent) in message, message
    assert "None" not in message and "\n" not in message.strip()


def test_a_tolerance_glob_that_matches_nothing_is_a_typo_not_a_green_run(samples):
    """A misspelt tightening (`parms/** 0 0`) would otherwise leave the defaults in place."""
    with pytest.raises(CkptParityUsageError, match=r"tolerance glob 'parms/\*\*' matches no leaf of A or B, so its atol/rtol would apply nowhere; the top-level groups are: .*params"):
        assert_ckpt_parity(samples["maxtext_decode_scan"], samples["maxtext_decode_scan"], tolerances={"parms/**": {"atol": 0, "rtol": 0}})
    code, err = cli(samples["maxtext_decode_scan"], samples["maxtext_decode_scan"], "--tolerance", "parms/** 0 0")
    assert code == 2 and "tolerance glob 'parms/**' matches no leaf" in err
    assert assert_ckpt_parity(samples["maxtext_decode_scan"], samples["maxtext_decode_scan"], tolerances={"params/**": {"atol": 0, "rtol": 0}}).passed


def test_output_files_in_missing_folders_are_refused_before_any_read(samples, tmp_path):
    """--report and fingerprint -o: one sentence up front; no folder is ever created for a typo."""
    missing = tmp_path / "no_such_dir"
    code, err = cli(samples["maxtext_decode_scan"], samples["maxtext_decode_scan"], "--report", str(missing / "r.json"))
    assert code == 2 and err == f"ckptparity: error: --report '{missing / 'r.json'}': the directory '{missing}' does not exist; create it or write the file elsewhere."
    code, err = cli(samples["maxtext_decode_scan"], samples["maxtext_decode_scan"], "--report", str(tmp_path))
    assert code == 2 and "is a directory; give a file name such as" in err
    code, err = cli("fingerprint", samples["maxtext_decode_scan"], "-o", str(missing / "f.json"))
    assert code == 2 and f"--output '{missing / 'f.json'}': the directory '{missing}' does not exist" in err
    assert not missing.exists()


def test_pytest_report_path_is_checked_before_the_run(pytester, samples, tmp_path):
    missing = tmp_path / "no_such_dir" / "r.json"
    result = pytester.runpytest(f"--ckpt-a={samples['maxtext_decode_scan']}", f"--ckpt-b={samples['maxtext_decode_scan']}", f"--ckpt-report={missing}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--ckpt-report '{missing}': the directory '{missing.parent}' does not exist*"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


def test_steps_over_a_step_folder_or_a_fingerprint_name_the_way_out(tmp_path):
    runs = ex.write_drifting_runs(tmp_path / "runs", steps=2)
    linen = Path(runs["linen"])
    code, err = cli(str(linen / "1" / "items"), runs["nnx"], "--steps", "all")
    assert code == 2 and f"is a single checkpoint, not a CheckpointManager root; comparing over steps needs the folder that holds the step folders (e.g. '{linen}')" in err
    code, err = cli(str(linen / "1"), runs["nnx"], "--steps", "all")
    assert code == 2 and f"is a step folder, not a CheckpointManager root" in err and f"(e.g. '{linen}')" in err
    fp = tmp_path / "f.json"
    assert cli("fingerprint", runs["nnx"], "-o", str(fp))[0] == 0
    code, err = cli(runs["linen"], str(fp), "--steps", "all")
    assert code == 2 and f"B: '{fp}' is a fingerprint file, which holds one checkpoint; steps= compares two CheckpointManager roots" in err


def test_a_scan_axis_beyond_every_stacked_array_is_a_usage_error(demo_ckpts):
    """--scan-axis 5 on 3-D stacks was nine 'layer layout differs' rows: a typo, not a verdict."""
    with pytest.raises(CkptParityUsageError, match=r"^A: scan_axis 5 is beyond every array of the layer stacks of .* \(they have at most 4 axes, numbered from 0\)"):
        assert_ckpt_parity(demo_ckpts["linen"], demo_ckpts["nnx"], scan_axis=5)
    code, err = cli(demo_ckpts["linen"], demo_ckpts["nnx"], "--scan-axis", "5")
    assert code == 2 and "scan_axis 5 is beyond every array of the layer stacks" in err
    assert assert_ckpt_parity(demo_ckpts["linen"], demo_ckpts["nnx"], scan_axis=(1, 0)).passed


@pytest.mark.parametrize("option,message", [
    ("--ckpt-report=", "*--ckpt-report '': the path is empty; give the file a file name, such as 'report.json'.*"),
    ("--ckpt-html=", "*--ckpt-html '': the path is empty; give the page a file name, such as 'report.html'.*"),
])
def test_an_empty_output_option_in_pytest_is_a_usage_error(pytester, samples, option, message):
    """`--ckpt-html=` used to be skipped silently: an empty path is a typo too."""
    result = pytester.runpytest(f"--ckpt-a={samples['maxtext_decode_scan']}", f"--ckpt-b={samples['maxtext_decode_scan']}", option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])

"""Each process's share of the cores: all of them alone, cores / N in each of N xdist
workers, or CKPTPARITY_THREADS; tensorstore's decoding and the comparison pool follow it."""

from __future__ import annotations

import pytest

from pytest_ckptparity import CkptParityUsageError
from pytest_ckptparity import _threads


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("CKPTPARITY_THREADS", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    monkeypatch.setattr(_threads, "cores", lambda: 8)
    return monkeypatch


def test_one_process_uses_every_core_and_tensorstore_keeps_its_default(clean_env):
    assert _threads.process_threads() == 8
    assert _threads.tensorstore_context() == {}


@pytest.mark.parametrize("workers,share", [("2", 4), ("3", 2), ("8", 1), ("16", 1)])
def test_xdist_workers_share_the_cores(clean_env, workers, share):
    clean_env.setenv("PYTEST_XDIST_WORKER_COUNT", workers)
    assert _threads.process_threads() == share
    assert _threads.tensorstore_context() == {"data_copy_concurrency": {"limit": share}}


def test_the_environment_sets_it_for_every_process(clean_env):
    clean_env.setenv("PYTEST_XDIST_WORKER_COUNT", "4")
    clean_env.setenv("CKPTPARITY_THREADS", "6")
    assert _threads.process_threads() == 6


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_thread_count_is_one_sentence(clean_env, value):
    clean_env.setenv("CKPTPARITY_THREADS", value)
    with pytest.raises(CkptParityUsageError, match=r"^CKPTPARITY_THREADS must be a positive whole number of threads, got '.*'; unset it to use every core\.$"):
        _threads.process_threads()


def test_a_bad_thread_count_stops_the_command_line(tmp_path, samples):
    import os
    import subprocess
    import sys

    env = {**os.environ, "CKPTPARITY_THREADS": "many"}
    run = subprocess.run([sys.executable, "-m", "pytest_ckptparity", samples["maxtext_decode_scan"], samples["maxtext_decode_unroll"]],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == "ckptparity: error: CKPTPARITY_THREADS must be a positive whole number of threads, got 'many'; unset it to use every core."


def test_each_xdist_worker_takes_its_share(pytester):
    """Through a real -n 2 run: both workers see the same share, half of the cores (or one)."""
    pytester.makepyfile(test_share="""
        import os
        from pytest_ckptparity import _threads

        def test_share(record_property):
            assert os.environ["PYTEST_XDIST_WORKER_COUNT"] == "2"
            assert _threads.process_threads() == max(1, _threads.cores() // 2)
    """)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("name,value,message", [
    ("CKPTPARITY_THREADS", "lots", "ERROR: CKPTPARITY_THREADS must be a positive whole number of threads, got 'lots'; unset it to use every core."),
    ("CKPTPARITY_NATIVE", "maybe", "ERROR: CKPTPARITY_NATIVE must be 1 (use the C kernels when built) or 0 (numpy kernels), got 'maybe'."),
    ("CKPTPARITY_IN_STEP", "slab", "ERROR: CKPTPARITY_IN_STEP must be 1 (read mismatched chunk grids row by row in step) or 0 (in slabs), got 'slab'."),
])
def test_a_misspelt_environment_stops_pytest_before_any_test(pytester, monkeypatch, name, value, message):
    pytester.makepyfile(test_plain="def test_ok():\n    pass\n")
    monkeypatch.setenv(name, value)
    for xdist in ([], ["-n", "2"]):
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *xdist)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([message])
        assert "Traceback" not in result.stderr.str()

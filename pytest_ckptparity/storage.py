"""Where a checkpoint's bytes live: a local folder or an object store, behind one small protocol.

`sources` locates steps, items and metadata only through a `Storage`: read a key, list a
folder, ask what a location is, and hand tensorstore a kvstore spec for the arrays. Local
paths use the file system directly (with its permission rules and messages); URLs
(`gs://`, `s3://`, `file://` and whatever `tensorstore.KvStore.Spec(url)` accepts) go through
tensorstore's kvstore drivers, so reading a bucket needs no second storage stack.

Object stores have no folders: a "folder" is a key prefix. A prefix is listed once (all keys
under it) and later questions about anything beneath it are answered from that listing.
Requests are retried a bounded number of times with short delays (tensorstore's defaults
retry for minutes), and metadata requests wait at most `timeout` seconds, so a missing
bucket, a wrong endpoint or missing credentials end in one sentence within seconds.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any, Mapping, Optional

#: tensorstore drivers that talk to a cloud object store, with their context resource prefix.
_CLOUD = {"s3": "s3", "gcs": "gcs"}
DEFAULT_RETRIES = 5          # attempts after the first; delays 0.1, 0.2, 0.4, 0.8, 1.6 s
DEFAULT_CONCURRENCY = 32     # HTTP requests in flight per checkpoint (tensorstore's default)
DEFAULT_TIMEOUT_S = 60.0     # wall-clock bound on one metadata request (listing, small files)

# storage option -> what it sets. Values arrive as strings (command line, ini).
_COMMON_OPTIONS = {
    "request_retries": "retries after a failed request (default 5, short delays)",
    "request_concurrency": "HTTP requests in flight per checkpoint (default 32)",
    "timeout": "seconds to wait for one metadata request (default 60)",
}
_S3_OPTIONS = {
    "endpoint": "S3-compatible endpoint URL, e.g. http://127.0.0.1:9000 (MinIO, moto, on-prem)",
    "region": "bucket region (alias of aws_region)",
    "aws_region": "bucket region",
    "host_header": "Host header to send to the endpoint",
    "requester_pays": "true/false",
    "profile": "AWS profile name from ~/.aws/credentials",
}
_GCS_OPTIONS = {"user_project": "project billed for requester-pays buckets"}


class StorageError(Exception):
    """One sentence about a location that cannot be used (no side prefix: sources adds it)."""


def _bool(key: str, value: Any) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise StorageError(f"storage option {key}={value!r} must be true or false.")


def _number(key: str, value: Any, kind: type) -> Any:
    try:
        n = kind(value)
    except (TypeError, ValueError):
        n = -1
    if not n >= 0 or (key != "request_retries" and n == 0) or n == float("inf"):
        raise StorageError(f"storage option {key}={value!r} must be a positive number.")
    return n


class Storage:
    """A location that may hold a checkpoint: a folder, a file, or nothing.

    `url` is what messages show; `name` is the last path component.
    """

    url: str
    name: str
    timeout: Optional[float] = None  # seconds a metadata request may take (None: no bound, local)

    def child(self, *parts: str) -> "Storage":
        """The location `parts` below this one."""
        raise NotImplementedError

    @property
    def parent(self) -> "Storage":
        raise NotImplementedError

    def kind(self) -> str:
        """'folder', 'file' or 'missing'. Raises StorageError when the location cannot be used."""
        raise NotImplementedError

    def read(self, key: str) -> Optional[bytes]:
        """The bytes of the file `key` below this folder, or None when there is none."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        """True when the file `key` below this folder exists."""
        raise NotImplementedError

    def list(self) -> list[tuple[str, bool]]:
        """This folder's children as sorted (name, is_folder) pairs."""
        raise NotImplementedError

    def kvstore_spec(self, key: str = "") -> dict[str, Any]:
        """A tensorstore kvstore spec for the folder `key` below this one (this one for '')."""
        raise NotImplementedError

    def context_spec(self) -> dict[str, Any]:
        """tensorstore context resources the kvstore needs (retries, concurrency, billing)."""
        return {}

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"


# --------------------------------------------------------------------------------------
# Local folders
# --------------------------------------------------------------------------------------


class LocalStorage(Storage):
    """A path on this machine, read with the file system's own calls."""

    def __init__(self, path: os.PathLike | str) -> None:
        self.path = Path(path).expanduser()
        self.url = str(self.path)
        self.name = self.path.name

    def __fspath__(self) -> str:
        return str(self.path)

    def child(self, *parts: str) -> "LocalStorage":
        return LocalStorage(self.path.joinpath(*parts))

    @property
    def parent(self) -> "LocalStorage":
        return LocalStorage(self.path.parent)

    def kind(self) -> str:
        p = self.path
        if not p.exists():
            return "missing"
        if not os.access(p, os.R_OK):
            raise StorageError(f"permission denied reading '{p}'; make it readable for this user.")
        if p.is_file():
            return "file"
        if not os.access(p, os.X_OK):
            raise StorageError(f"permission denied entering folder '{p}'; make it readable (read and execute) for this user.")
        return "folder"

    def read(self, key: str) -> Optional[bytes]:
        f = self.path / key
        if not f.is_file():
            return None
        try:
            return f.read_bytes()
        except PermissionError:
            raise StorageError(f"permission denied reading '{f}'; make it readable for this user.") from None

    def exists(self, key: str) -> bool:
        return (self.path / key).is_file()

    def list(self) -> list[tuple[str, bool]]:
        p = self.path
        try:
            return [(c.name, c.is_dir()) for c in sorted(p.iterdir())]
        except PermissionError:
            raise StorageError(f"permission denied reading '{p}'; make it readable (read and execute) for this user.") from None
        except OSError as e:
            raise StorageError(f"cannot list '{p}' ({e.strerror}); check the path and the file system.") from None

    def kvstore_spec(self, key: str = "") -> dict[str, Any]:
        path = os.path.abspath(self.path / key) if key else os.path.abspath(self.path)
        return {"driver": "file", "path": path + "/"}


# --------------------------------------------------------------------------------------
# Object stores (and anything else tensorstore's kvstore drivers reach)
# --------------------------------------------------------------------------------------


def _short(err: BaseException) -> str:
    """The status and first words of a tensorstore error, without request ids and bodies."""
    text = re.sub(r"\s*\[[a-z_-]+='[^']*'\]", "", str(err)).split("[tensorstore_spec", 1)[0].strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


class _Store:
    """What every location in one bucket shares: the opened kvstore, settings, listings."""

    def __init__(self, base: dict[str, Any], context: dict[str, Any], root_url: str, timeout: float) -> None:
        self.base = base
        self.context = context
        self.root_url = root_url
        self.timeout = timeout
        self.listings: dict[str, frozenset[str]] = {}  # listed prefix (ending in '/') -> full keys
        self.files: dict[str, Optional[bytes]] = {}  # small files read while locating (asked several times)
        self._kv: Any = None
        self._lock = threading.Lock()

    def kv(self) -> Any:
        with self._lock:
            if self._kv is None:
                import tensorstore as ts

                self._kv = self.wait(ts.KvStore.open({**self.base, "path": ""}, context=ts.Context(self.context)), self.root_url)
            return self._kv

    def wait(self, future: Any, url: str) -> Any:
        try:
            return future.result(timeout=self.timeout)
        except TimeoutError:
            future.cancel()
            raise StorageError(f"'{url}' did not answer within {self.timeout:g} s; check the endpoint and the network (storage option timeout=SECONDS).") from None
        except Exception as e:  # tensorstore raises ValueError carrying a status
            raise StorageError(explain(e, url)) from None

    def listed(self, key: str) -> Optional[frozenset[str]]:
        """The listing that covers `key`, if one was made."""
        for prefix, keys in self.listings.items():
            if key.startswith(prefix):
                return keys
        return None


def explain(err: BaseException, url: str) -> str:
    """One sentence for a failed object-store request, chosen by tensorstore's status code."""
    text = str(err)
    status = re.match(r"\s*([A-Z_]+):", text)
    code = status.group(1) if status else ""
    short = _short(err)
    if "NoSuchBucket" in text:
        return f"'{url}' does not exist (no such bucket); check the bucket name."
    if code == "NOT_FOUND":
        return f"'{url}' does not exist; check the URL."
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED") or "credentials provider" in text or "AccessDenied" in text:
        return (f"access to '{url}' was denied ({short}); check the credentials: for gs:// application-default "
                f"credentials (gcloud auth application-default login), for s3:// AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile "
                f"(AWS_PROFILE, storage option profile=NAME).")
    if "CURL error" in text or "retry attempts failed" in text or code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return (f"could not reach the object store for '{url}' ({short}); check the endpoint "
                f"(AWS_ENDPOINT_URL or storage option endpoint=URL) and the network.")
    return f"could not read '{url}' ({short})."


def _profile_credentials(profile: str) -> dict[str, Any]:
    """tensorstore's profile provider needs both file paths spelled out; take them as the AWS tools do."""
    aws = os.path.join(os.path.expanduser("~"), ".aws")
    return {
        "type": "profile", "profile": profile,
        "credentials_file": os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(aws, "credentials"),
        "config_file": os.environ.get("AWS_CONFIG_FILE") or os.path.join(aws, "config"),
    }


class KvStorage(Storage):
    """A prefix in a tensorstore kvstore (gs://, s3://, file://, ...)."""

    def __init__(self, store: _Store, path: str) -> None:
        self.store = store
        self.path = path.strip("/") if store.base.get("driver") in _CLOUD else path.rstrip("/")
        self.url = store.root_url + self.path
        self.name = self.path.rsplit("/", 1)[-1]
        self.timeout = store.timeout

    def _key(self, key: str = "") -> str:
        return f"{self.path}/{key}" if key and self.path else (key or self.path)

    def child(self, *parts: str) -> "KvStorage":
        return KvStorage(self.store, "/".join([self.path, *parts]) if self.path else "/".join(parts))

    @property
    def parent(self) -> "KvStorage":
        return KvStorage(self.store, self.path.rsplit("/", 1)[0] if "/" in self.path.strip("/") else "")

    def _keys_below(self) -> frozenset[str]:
        prefix = self._key() + "/" if self.path else ""
        keys = self.store.listed(prefix)
        if keys is None:
            import tensorstore as ts

            rng = ts.KvStore.KeyRange(inclusive_min=prefix, exclusive_max=prefix[:-1] + "0") if prefix else None
            found = self.store.wait(self.store.kv().list(rng), self.url)
            keys = frozenset(k.decode("utf-8", "replace") for k in found)
            self.store.listings[prefix] = keys
        return frozenset(k for k in keys if k.startswith(prefix))

    def read(self, key: str) -> Optional[bytes]:
        full = self._key(key)
        if full in self.store.files:
            return self.store.files[full]
        listing = self.store.listed(full)
        if listing is not None and full not in listing:
            return None
        result = self.store.wait(self.store.kv().read(full), self.url)
        data = bytes(result.value) if result.state == "value" else None
        self.store.files[full] = data
        return data

    def exists(self, key: str) -> bool:
        full = self._key(key)
        listing = self.store.listed(full)
        if listing is not None:
            return full in listing
        return self.read(key) is not None

    def kind(self) -> str:
        if self.exists("_METADATA") or self.exists("_CHECKPOINT_METADATA") or self._keys_below():
            return "folder"
        return "file" if self.path and self.read("") is not None else "missing"

    def list(self) -> list[tuple[str, bool]]:
        prefix = self._key() + "/" if self.path else ""
        children: dict[str, bool] = {}
        for k in self._keys_below():
            name, sep, _ = k[len(prefix):].partition("/")
            if name:
                children[name] = children.get(name, False) or bool(sep)
        return sorted(children.items())

    def kvstore_spec(self, key: str = "") -> dict[str, Any]:
        path = self._key(key)
        return {**self.store.base, "path": path + "/" if path else ""}

    def context_spec(self) -> dict[str, Any]:
        return dict(self.store.context)


def _allowed(driver: str) -> dict[str, str]:
    extra = _S3_OPTIONS if driver == "s3" else _GCS_OPTIONS if driver == "gcs" else {}
    return {**extra, **_COMMON_OPTIONS}


def open_storage(location: os.PathLike | str, options: Optional[Mapping[str, Any]] = None) -> Storage:
    """A local path, or a URL any tensorstore kvstore driver accepts, as a Storage.

    `options` (storage options) tune object-store access; unknown keys are refused with the
    list of known ones. For s3:// the endpoint also comes from AWS_ENDPOINT_URL_S3 or
    AWS_ENDPOINT_URL (which tensorstore itself ignores).
    """
    text = os.fspath(location)
    if "://" not in str(text):
        if options:
            raise StorageError(f"storage options apply to object-store URLs (gs://, s3://), not to {text!r}; drop them or pass a URL.")
        return LocalStorage(text)
    url = str(text)
    import tensorstore as ts

    try:
        spec = ts.KvStore.Spec(url).to_json()
    except Exception as e:
        raise StorageError(f"'{url}' is not a storage URL this tool can read ({_short(e)}); use gs://BUCKET/PATH, s3://BUCKET/PATH or a local path.") from None
    driver = str(spec.get("driver", ""))
    path = str(spec.pop("path", ""))
    opts = {str(k): v for k, v in (options or {}).items()}
    allowed = _allowed(driver)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        known = ", ".join(sorted(allowed))
        raise StorageError(f"unknown storage option {', '.join(unknown)} for {driver} URLs like '{url}'; known options: {known}.")

    retries = _number("request_retries", opts.get("request_retries", DEFAULT_RETRIES), int)
    concurrency = _number("request_concurrency", opts.get("request_concurrency", DEFAULT_CONCURRENCY), int)
    timeout = _number("timeout", opts.get("timeout", DEFAULT_TIMEOUT_S), float)
    context: dict[str, Any] = {}
    if driver in _CLOUD:
        res = _CLOUD[driver]
        context[f"{res}_request_retries"] = {"max_retries": retries, "initial_delay": "100ms", "max_delay": "2s"}
        context[f"{res}_request_concurrency"] = {"limit": concurrency}
    if driver == "s3":
        endpoint = opts.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            spec["endpoint"] = str(endpoint)
        region = opts.get("aws_region") or opts.get("region") or (
            (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1") if endpoint else None)
        if region:
            spec["aws_region"] = str(region)
        if "host_header" in opts:
            spec["host_header"] = str(opts["host_header"])
        if "requester_pays" in opts:
            spec["requester_pays"] = _bool("requester_pays", opts["requester_pays"])
        # tensorstore's default chain reads the key variables but not AWS_PROFILE: pass the profile on.
        profile = opts.get("profile") or (None if os.environ.get("AWS_ACCESS_KEY_ID") else os.environ.get("AWS_PROFILE"))
        if profile:
            spec["aws_credentials"] = _profile_credentials(str(profile))
    if driver == "gcs" and "user_project" in opts:
        context["gcs_user_project"] = {"project_id": str(opts["user_project"])}
    try:
        ts.KvStore.Spec({**spec, "path": path})
    except Exception as e:
        raise StorageError(f"storage options for '{url}' are not valid ({_short(e)}); known options: {', '.join(sorted(allowed))}.") from None

    bucket = spec.get("bucket")
    scheme = url.split("://", 1)[0]
    root_url = f"{scheme}://{bucket}/" if bucket else f"{scheme}://"
    if driver == "file":
        root_url = "file://"
    return KvStorage(_Store(spec, context, root_url, timeout), path)


__all__ = ("Storage", "LocalStorage", "KvStorage", "StorageError", "open_storage", "explain")

"""The one place that talks to storage: a folder object over fsspec, rooted at a base URI.

Local paths, ``file://``, ``s3://`` (AWS or any S3-compatible endpoint) and ``memory://`` behave
the same through it. How storage is reached (fsspec options, credentials included, and the retry
policy) is one ``Storage`` value that every reader and writer takes. Three promises the rest of
the pipeline builds on:

* a write is whole or absent: bytes are buffered and sent in one put (S3; over 100 MB, s3fs's
  multipart upload, which no reader sees before it completes) or written to a temporary name and
  renamed (local), so a failure mid-write never leaves a partial object under the final name;
* a conditional write is one step: created only where nothing is (``create_exclusive``), or
  replaced only if it is still the version seen (``replace_if``), so of racing callers one wins;
* transient faults (connection resets, 5xx, throttling, time-outs) are retried with exponential
  backoff by one loop only (``with_retries``, under a ``RetryPolicy``): botocore and s3fs are set
  to a single attempt each, so a dead endpoint costs at most ``RetryPolicy.bound_s()`` per call
  instead of retries stacked on retries; anything else surfaces at once with the URI (and, on
  S3, the endpoint) in the message.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec
from fsspec.core import split_protocol

T = TypeVar("T")

_SCHEME_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*$")
# A bare status code in an error message, but not one that is part of a name or path
# ("photo_500.jpg", "/500/"), which would otherwise make a permanent error look transient.
_STATUS_5XX_RE = re.compile(r"(?<![\w/.\-])50[0234](?![\w/.\-])")


class StorageError(Exception):
    """A storage operation failed for good (after retries, or not retryable)."""


class UnsupportedURIError(StorageError):
    """The URI is malformed or names a scheme this run may not read."""


def scheme_of(uri: str) -> str:
    """The fsspec protocol of a URI; plain paths are ``file``."""
    protocol, _ = split_protocol(uri)
    return protocol or "file"


def check_uri(uri: object, allowed: tuple[str, ...] | list[str]) -> str:
    """Return ``uri`` as a string if it is well formed and its scheme is allowed, else raise."""
    if uri is None:
        raise UnsupportedURIError("URI is null")
    if not isinstance(uri, str):
        raise UnsupportedURIError(f"URI must be a string, got {type(uri).__name__}")
    if not uri.strip():
        raise UnsupportedURIError("URI is empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in uri):
        raise UnsupportedURIError(f"URI contains control characters: {uri!r}")
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        if not _SCHEME_RE.match(scheme):
            raise UnsupportedURIError(f"malformed URI scheme in {uri!r}")
    scheme = scheme_of(uri)
    if scheme not in allowed:
        raise UnsupportedURIError(
            f"URI scheme {scheme!r} is not allowed (allowed: {', '.join(allowed)}): {uri!r}"
        )
    if scheme == "s3":
        bucket = uri.split("://", 1)[1].split("/", 1)[0]
        if not bucket:
            raise UnsupportedURIError(f"S3 URI has no bucket: {uri!r}")
    return uri


def _is_transient(exc: BaseException) -> bool:
    """True for faults worth retrying: network trouble, server errors, throttling."""
    # StorageError is our own verdict (bad URI, object over the size limit): retrying cannot help.
    if isinstance(
        exc,
        (StorageError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError),
    ):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE):
        return True
    text = f"{type(exc).__name__}: {exc}"
    # s3fs turns a botocore ClientError into a bare OSError holding only the server's message
    # ("We encountered an internal error", errno EREMOTEIO or EBUSY): the error code and status
    # that say "transient" are on the ClientError it keeps as the cause.
    if exc.__cause__ is not None:
        text += f" | {type(exc.__cause__).__name__}: {exc.__cause__}"
    markers = (
        "ServerDisconnected", "ClientConnector", "ClientOSError", "ConnectTimeout",
        "ReadTimeout", "EndpointConnectionError", "Connection reset", "Connection refused",
        "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttl",
        "Broken pipe", "IncompleteRead", "ResponseStreamingError",
    )
    return any(m in text for m in markers) or _STATUS_5XX_RE.search(text) is not None


@dataclass(frozen=True)
class RetryPolicy:
    """How long one storage call may take: ``attempts`` tries, each bounded by the connect and
    read time-outs, with jittered exponential backoff between them."""

    attempts: int = 5
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 20.0
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0

    def delay(self, attempt: int) -> float:
        """The longest sleep after failed try ``attempt`` (1-based); the actual one is jittered
        to 50-100% of it."""
        return min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))

    def bound_s(self) -> float:
        """The longest one call can take against an endpoint that never answers."""
        per_try = self.connect_timeout_s + self.read_timeout_s
        return self.attempts * per_try + sum(self.delay(a) for a in range(1, self.attempts))


DEFAULT_POLICY = RetryPolicy()


@dataclass(frozen=True)
class Storage:
    """How storage is reached: the fsspec options (credentials, endpoint) and the retry policy,
    one value that every reader and writer takes and that crosses Ray with the job.

    ``options`` may hold credentials: it never shows in a repr, and nothing logs or writes it."""

    options: dict[str, Any] = field(default_factory=dict, repr=False, hash=False)
    policy: RetryPolicy = DEFAULT_POLICY

    def __post_init__(self) -> None:
        # A copy: a caller editing its dict afterwards must not change a value already handed out.
        object.__setattr__(self, "options", dict(self.options or {}))

    @classmethod
    def of(cls, options: dict[str, Any] | None = None, endpoint_url: str | None = None,
           policy: RetryPolicy = DEFAULT_POLICY) -> Storage:
        """``options`` with ``endpoint_url`` added (an endpoint in ``options`` wins)."""
        opts = dict(options or {})
        if endpoint_url:
            opts.setdefault("endpoint_url", endpoint_url)
        return cls(opts, policy)

    def fs_options(self, uri: str) -> dict[str, Any]:
        """The fsspec options for ``uri``: for S3 the policy's time-outs and a single botocore
        attempt (the user's own ``config_kwargs`` win); other schemes get ``options`` unchanged."""
        options = dict(self.options)
        if not _is_s3(uri):
            return options
        policy = self.policy
        config = {"connect_timeout": policy.connect_timeout_s, "read_timeout": policy.read_timeout_s,
                  "retries": {"mode": "standard", "total_max_attempts": 1}}
        return {**options, "config_kwargs": {**config, **(options.get("config_kwargs") or {})}}

    def open(self, uri: str) -> tuple[Any, str]:
        """The fsspec filesystem and path of ``uri``, set to the policy."""
        fs, path = fsspec.core.url_to_fs(uri, **self.fs_options(uri))
        if hasattr(fs, "retries") and type(fs).__module__.startswith("s3fs"):
            # s3fs retries read time-outs and dropped connections five times on its own (a class
            # attribute, not an option): once here, the policy's loop does the retrying.
            fs.retries = 1
        return fs, path

    def endpoint(self) -> str:
        """The S3 endpoint a call goes to, for error messages."""
        opts = self.options
        return opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url") or "the default AWS endpoint"

    def retry(self, fn: Callable[[], T], what: str, uri: str) -> T:
        """``with_retries`` under the policy; an error names ``uri`` and, on S3, the endpoint."""
        where = f" at {self.endpoint()}" if _is_s3(uri) else ""
        return with_retries(fn, f"{what} {uri}{where}", self.policy)


DEFAULT_STORAGE = Storage()


def _is_s3(uri: str) -> bool:
    return scheme_of(uri) in ("s3", "s3a")


def with_retries(fn: Callable[[], T], what: str, policy: RetryPolicy = DEFAULT_POLICY) -> T:
    """Call ``fn``, retrying transient faults with jittered exponential backoff."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised when not transient
            if not _is_transient(exc) or attempt == policy.attempts:
                if isinstance(exc, (FileNotFoundError, PermissionError, StorageError)):
                    raise
                tries = f" after {attempt} tries" if attempt > 1 else ""
                raise StorageError(f"{what}{tries}: {type(exc).__name__}: {exc}") from exc
            time.sleep(policy.delay(attempt) * (0.5 + random.random() / 2))
    raise AssertionError("unreachable")


class Folder:
    """A directory-like view of storage rooted at ``base``; every path is relative to it."""

    def __init__(self, base: str, storage: Storage = DEFAULT_STORAGE) -> None:
        self.base = _strip_trailing_slash(base)
        self.storage = storage
        self.fs, root = storage.open(self.base)
        self.root = root.rstrip("/")
        self.is_local = scheme_of(self.base) == "file"

    def __repr__(self) -> str:  # never shows storage options: they may hold credentials
        return f"Folder({self.base!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Re-create the filesystem on the receiving side (Ray workers) instead of pickling it.
        return (Folder, (self.base, self.storage))

    def path(self, rel: str) -> str:
        """The filesystem path of ``rel``; refuses anything that climbs out of the folder."""
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts):
            raise StorageError(f"path escapes the output folder: {rel!r}")
        return "/".join([self.root, *parts]) if parts else self.root

    def uri(self, rel: str) -> str:
        """The URI a user can open for ``rel``."""
        path = self.path(rel)
        if self.is_local:
            return os.path.abspath(path)
        protocol = scheme_of(self.base)
        return f"{protocol}://{path}"

    def rel_of(self, uri: str | None) -> str | None:
        """The path under this folder of a URI ``uri`` gave; None for anything else."""
        root = self.uri("") + "/"
        return uri[len(root):] if isinstance(uri, str) and uri.startswith(root) else None

    def sub(self, rel: str) -> Folder:
        return Folder(self.uri(rel), self.storage)

    def _retry(self, fn: Callable[[], T], what: str, rel: str) -> T:
        return self.storage.retry(fn, what, self.uri(rel))

    def exists(self, rel: str) -> bool:
        return self._retry(lambda: self.fs.exists(self.path(rel)), "exists", rel)

    def read_bytes(self, rel: str) -> bytes:
        return self._retry(lambda: self.fs.cat_file(self.path(rel)), "read", rel)

    def read_if_there(self, rel: str) -> bytes | None:
        """The object's bytes, or None where there is none."""
        try:
            return self.read_bytes(rel)
        except FileNotFoundError:
            return None

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_text(rel))

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write ``data`` whole under ``rel`` (replacing it) and return its URI."""
        path = self.path(rel)
        if self.is_local:
            self._retry(lambda: self._put_then_rename(path, data), "write", rel)
        else:
            # One put of the whole buffer: S3 never exposes a partial object under the key.
            self._retry(lambda: self.fs.pipe_file(path, data), "write", rel)
        return self.uri(rel)

    def _put_then_rename(self, path: str, data: bytes) -> None:
        """A local file written whole as S3 writes an object: under a name of its own in the same
        folder, then renamed over ``path``, so neither a reader nor a crash mid-write ever sees a
        part of it."""
        self.fs.makedirs(os.path.dirname(path), exist_ok=True)
        part = f"{path}.part-{os.getpid()}-{random.getrandbits(32):08x}"
        try:
            self.fs.pipe_file(part, data)
            self.fs.mv(part, path)
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.rm_file(part)
            raise

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write ``data`` under ``rel`` only where nothing is there yet, atomically: True when this
        call created it, False when something already was. Two callers racing for one name never
        both get True (a lock). Locally the file is created with ``O_CREAT | O_EXCL``; on S3 it is
        one conditional put (``If-None-Match: *``). ``data`` should be unique to the caller: a try
        whose answer was lost (the put applied, the reply reset) is retried, finds the object, and
        it is still this caller's when it holds the same bytes."""
        path = self.path(rel)

        def _create() -> None:
            if not self.is_local:
                self.fs.pipe_file(path, data, mode="create")
                return
            self.fs.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            except BaseException:
                os.unlink(path)  # created but not written (a full disk): nobody's
                raise

        return self._put_if(rel, data, _create, "create")

    def _put_if(self, rel: str, data: bytes, put: Callable[[], None], what: str) -> bool:
        """``put``, a conditional write of ``data`` under ``rel``, under the retry policy: True when
        it applied, False when its condition refused it (``FileExistsError``, or S3's 412 or 409).
        A try whose answer was lost applied all the same: the object then holds ``data``."""

        def _try() -> bool:
            try:
                put()
            except FileExistsError:
                return False
            except OSError as exc:
                if _already_exists(exc):
                    return False
                raise
            return True

        if self._retry(_try, what, rel):
            return True
        try:
            return self.read_bytes(rel) == data
        except FileNotFoundError:  # removed since: the caller may try again
            return False

    def stamp(self, rel: str) -> Stamp | None:
        """When ``rel`` was last written (by the storage's clock: the object's LastModified on S3,
        the file's mtime locally) and which version of it that is; None when there is nothing."""
        path = self.path(rel)

        def _stat() -> Stamp | None:
            self.fs.invalidate_cache(path)  # a cached listing would answer for an object long gone
            try:
                if self.is_local:
                    st = os.stat(path)
                    return Stamp(st.st_mtime, f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}")
                info = self.fs.info(path)
            except FileNotFoundError:
                return None
            return Stamp(info["LastModified"].timestamp(), str(info.get("ETag") or ""))

        return self._retry(_stat, "stat", rel)

    def modified(self, rel: str) -> float | None:
        """When ``rel`` was last written, in seconds since the epoch; None when there is nothing."""
        found = self.stamp(rel)
        return None if found is None else found.modified

    def replace_if(self, rel: str, data: bytes, seen: Stamp) -> bool:
        """Write ``data`` under ``rel`` only if what is there is still the version ``seen``: True
        when this call replaced it, False when it had changed or gone. Of callers racing to replace
        one version, one at most gets True (breaking a stale lock). On S3 one put with
        ``If-Match`` on the version's ETag; locally, under an advisory lock on the folder that
        every caller of this method takes, the version is moved away by an atomic rename, checked,
        and ``data`` created in its place with ``O_EXCL``."""
        path = self.path(rel)

        def _replace() -> None:
            if self.is_local:
                _replace_local(path, data, seen.version)
                return
            try:
                self.fs.pipe_file(path, data, IfMatch=seen.version)
            except FileNotFoundError as exc:  # gone: not the version seen either
                raise FileExistsError(path) from exc

        return self._put_if(rel, data, _replace, "replace")

    def read_columns(self, rel: str, columns: list[str]) -> Any:
        """Some columns of a Parquet object, reading only their byte ranges (a shard's keys
        without its images): a ``pyarrow.Table``."""
        import pyarrow.parquet as pq

        def _read() -> Any:
            with self.fs.open(self.path(rel), "rb") as f:
                return pq.read_table(f, columns=columns)

        return self._retry(_read, "read", rel)

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_text(rel, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def remove(self, rel: str, recursive: bool = False) -> None:
        path = self.path(rel)

        def _rm() -> None:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=recursive)
            self.fs.invalidate_cache()

        self._retry(_rm, "remove", rel)

    def list(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under ``rel``; empty when it does not exist."""
        path = self.path(rel)

        def _ls() -> list[str]:
            try:
                entries = self.fs.ls(path, detail=False, refresh=True)
            except FileNotFoundError:
                return []
            return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

        return self._retry(_ls, "list", rel)


@dataclass(frozen=True)
class Stamp:
    """An object's last write: when (seconds since the epoch, the storage's clock) and which
    version (the ETag on S3; inode, mtime and size locally)."""

    modified: float
    version: str


def _replace_local(path: str, data: bytes, version: str) -> None:
    """``Folder.replace_if`` on a local folder; ``FileExistsError`` where the version is no longer
    there. The advisory lock (``flock`` on the folder, released
    by the kernel if the process dies) makes the callers take turns, so two of them never both find
    the version they saw still there. The version leaves under a name of this call's own (an atomic
    rename) before its identity is checked: were it another by then (its holder released it and
    another run created its own, which takes no turn), that one is linked back, never replaced."""
    import fcntl

    folder = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        aside = f"{path}.broken-{os.getpid()}-{random.getrandbits(32):08x}"
        try:
            os.rename(path, aside)
        except FileNotFoundError as exc:
            raise FileExistsError(path) from exc
        st = os.stat(aside)
        if f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}" != version:
            with contextlib.suppress(FileExistsError):  # a third run's, created in the instant: it stays
                os.link(aside, path)
            os.unlink(aside)
            raise FileExistsError(path)
        os.unlink(aside)
        # Created meanwhile by a run that found no lock: FileExistsError, and that run holds it.
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    finally:
        os.close(folder)  # releases the flock


def _already_exists(exc: OSError) -> bool:
    """A conditional S3 put refused because the key exists: s3fs raises ``FileExistsError`` only
    when the error names its condition, and a plain ``OSError`` otherwise, keeping botocore's
    error as the cause. A 409 is a conditional put racing another on the same key: one of them
    wins, and it is not this one yet."""
    response = getattr(exc.__cause__, "response", None) or {}
    code = (response.get("Error") or {}).get("Code")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def _strip_trailing_slash(base: str) -> str:
    # Only the path part: "memory://" must not lose its "//" (it would turn into the local
    # relative path "memory:"), and "/" stays the root.
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{rest.rstrip('/')}"
    return base.rstrip("/") or base


def read_uri(uri: str, storage: Storage = DEFAULT_STORAGE, max_bytes: int | None = None) -> bytes:
    """Fetch a whole object by URI (retrying transient faults); refuse objects over ``max_bytes``."""
    fs, path = storage.open(uri)

    def _read() -> bytes:
        if max_bytes is not None:
            size = fs.size(path)
            if size is not None and size > max_bytes:
                raise StorageError(f"object is {size} bytes, over the {max_bytes}-byte limit: {uri}")
        return fs.cat_file(path)

    try:
        return storage.retry(_read, "read", uri)
    except (FileNotFoundError, PermissionError) as exc:
        # s3fs can say only "Forbidden" (a 403 on HEAD) or "The specified bucket does not
        # exist": name the object, as every other storage error does.
        if uri in str(exc) or path in str(exc):
            raise
        if isinstance(exc, FileNotFoundError):
            raise FileNotFoundError(errno.ENOENT, exc.strerror or str(exc) or "Not found", uri) from exc
        raise PermissionError(errno.EACCES, exc.strerror or str(exc) or "Permission denied", uri) from exc


def expand(pattern: str, storage: Storage = DEFAULT_STORAGE) -> Iterator[str]:
    """URIs of the files matching a glob, or every file under a prefix, in sorted order."""
    fs, path = storage.open(pattern)
    protocol = scheme_of(pattern)

    def _list() -> list[str]:
        # A fresh listing: a cached one (s3fs keeps them per process) would miss new uploads.
        fs.invalidate_cache()
        if any(c in path for c in "*?["):
            # Details come with the listing, so telling files from folders costs no extra
            # request per entry (a HEAD per object on S3).
            infos = fs.glob(path, detail=True)
        elif fs.isdir(path):
            infos = fs.find(path, detail=True)
        elif fs.exists(path):
            return [path]
        else:
            return []
        return [p for p, info in infos.items() if info.get("type") != "directory"]

    for p in sorted(with_retries(_list, f"list {pattern}", storage.policy)):
        yield os.path.abspath(p) if protocol == "file" else f"{protocol}://{p}"

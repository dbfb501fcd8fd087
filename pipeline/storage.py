"""The one place that talks to storage: a folder object over fsspec, rooted at a base URI.

Local paths, ``file://``, ``s3://`` (AWS or any S3-compatible endpoint) and ``memory://`` behave
the same through it. Two promises the rest of the pipeline builds on:

* a write is whole or absent: bytes are buffered and sent in one put (S3) or written to a
  temporary name and renamed (local), so a failure mid-write never leaves a partial object under
  the final name;
* transient faults (connection resets, 5xx, throttling) are retried with exponential backoff;
  anything else surfaces at once with the URI in the message.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import fsspec
from fsspec.core import split_protocol

T = TypeVar("T")

DEFAULT_SCHEMES = ("file", "s3")
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


def with_retries(
    fn: Callable[[], T],
    what: str,
    attempts: int = 5,
    base_delay: float = 0.2,
    max_delay: float = 5.0,
) -> T:
    """Call ``fn``, retrying transient faults with jittered exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised when not transient
            if not _is_transient(exc) or attempt == attempts:
                if isinstance(exc, (FileNotFoundError, PermissionError, StorageError)):
                    raise
                raise StorageError(f"{what}: {type(exc).__name__}: {exc}") from exc
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random())
            time.sleep(delay)
    raise AssertionError("unreachable")


class Folder:
    """A directory-like view of storage rooted at ``base``; every path is relative to it."""

    def __init__(self, base: str, storage_options: dict[str, Any] | None = None) -> None:
        self.base = _strip_trailing_slash(base)
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(self.base, **self.storage_options)
        self.root = root.rstrip("/")
        self.is_local = scheme_of(self.base) == "file"

    def __repr__(self) -> str:  # never shows storage options: they may hold credentials
        return f"Folder({self.base!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Re-create the filesystem on the receiving side (Ray workers) instead of pickling it.
        return (Folder, (self.base, self.storage_options))

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

    def sub(self, rel: str) -> Folder:
        return Folder(self.uri(rel), self.storage_options)

    def exists(self, rel: str) -> bool:
        return with_retries(lambda: self.fs.exists(self.path(rel)), f"exists {self.uri(rel)}")

    def read_bytes(self, rel: str) -> bytes:
        return with_retries(lambda: self.fs.cat_file(self.path(rel)), f"read {self.uri(rel)}")

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_text(rel))

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write ``data`` whole under ``rel`` (replacing it) and return its URI."""
        path = self.path(rel)
        if self.is_local:
            with_retries(lambda: _atomic_local_write(path, data), f"write {self.uri(rel)}")
        else:
            # One put of the whole buffer: S3 never exposes a partial object under the key.
            with_retries(lambda: self.fs.pipe_file(path, data), f"write {self.uri(rel)}")
        return self.uri(rel)

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

        with_retries(_rm, f"remove {self.uri(rel)}")

    def list(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under ``rel``; empty when it does not exist."""
        path = self.path(rel)

        def _ls() -> list[str]:
            try:
                entries = self.fs.ls(path, detail=False, refresh=True)
            except FileNotFoundError:
                return []
            return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

        return with_retries(_ls, f"list {self.uri(rel)}")


def _strip_trailing_slash(base: str) -> str:
    # Only the path part: "memory://" must not lose its "//" (it would turn into the local
    # relative path "memory:"), and "/" stays the root.
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{rest.rstrip('/')}"
    return base.rstrip("/") or base


def _atomic_local_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{random.getrandbits(32):08x}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_uri(uri: str, storage_options: dict[str, Any] | None = None, max_bytes: int | None = None) -> bytes:
    """Fetch a whole object by URI (retrying transient faults); refuse objects over ``max_bytes``."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))

    def _read() -> bytes:
        if max_bytes is not None:
            size = fs.size(path)
            if size is not None and size > max_bytes:
                raise StorageError(f"object is {size} bytes, over the {max_bytes}-byte limit: {uri}")
        return fs.cat_file(path)

    try:
        return with_retries(_read, f"read {uri}")
    except (FileNotFoundError, PermissionError) as exc:
        # s3fs can say only "Forbidden" (a 403 on HEAD) or "The specified bucket does not
        # exist": name the object, as every other storage error does.
        if uri in str(exc) or path in str(exc):
            raise
        if isinstance(exc, FileNotFoundError):
            raise FileNotFoundError(errno.ENOENT, exc.strerror or str(exc) or "Not found", uri) from exc
        raise PermissionError(errno.EACCES, exc.strerror or str(exc) or "Permission denied", uri) from exc


def expand(pattern: str, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """URIs of the files matching a glob, or every file under a prefix, in sorted order."""
    fs, path = fsspec.core.url_to_fs(pattern, **(storage_options or {}))
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

    for p in sorted(with_retries(_list, f"list {pattern}")):
        yield os.path.abspath(p) if protocol == "file" else f"{protocol}://{p}"

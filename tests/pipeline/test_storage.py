"""pipeline.storage against a local folder, fsspec's memory filesystem and a real S3 server (moto)."""

from __future__ import annotations

import errno
import os
import pickle
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline import storage
from pipeline.storage import (
    Folder,
    Storage,
    StorageError,
    UnsupportedURIError,
    check_uri,
    expand,
    read_uri,
)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Backoff delays that ``with_retries`` asked for; nothing actually sleeps."""
    delays: list[float] = []
    monkeypatch.setattr(storage, "time", SimpleNamespace(sleep=delays.append))
    return delays


@pytest.fixture(params=["local", "memory", "s3"])
def folder(request: pytest.FixtureRequest, tmp_path: Path) -> Folder:
    """An empty Folder on each backend."""
    if request.param == "local":
        return Folder(str(tmp_path / "out"))
    if request.param == "memory":
        return Folder(f"memory://test-{uuid.uuid4().hex}")
    bucket = request.getfixturevalue("s3_bucket")
    return Folder(f"s3://{bucket}/out", request.getfixturevalue("s3_storage"))


def test_round_trip(folder: Folder) -> None:
    uri = folder.write_bytes("a/b.bin", b"\x00\x01payload")
    assert uri == folder.uri("a/b.bin")
    assert folder.read_bytes("a/b.bin") == b"\x00\x01payload"
    assert read_uri(uri, folder.storage) == b"\x00\x01payload"

    folder.write_json("meta.json", {"size": [3, 4], "name": "x"})
    assert folder.read_json("meta.json") == {"size": [3, 4], "name": "x"}
    folder.write_text("note.txt", "héllo")
    assert folder.read_text("note.txt") == "héllo"

    assert folder.exists("a/b.bin")
    assert not folder.exists("a/missing.bin")
    assert folder.list() == ["a", "meta.json", "note.txt"]
    assert folder.list("a") == ["b.bin"]
    assert folder.list("nowhere") == []
    assert folder.sub("a").read_bytes("b.bin") == b"\x00\x01payload"

    folder.write_bytes("a/b.bin", b"replaced")
    assert folder.read_bytes("a/b.bin") == b"replaced"

    folder.remove("note.txt")
    assert not folder.exists("note.txt")
    folder.remove("note.txt")  # removing what is gone is not an error
    folder.remove("a", recursive=True)
    assert folder.list() == ["meta.json"]


def test_survives_pickling(folder: Folder) -> None:
    # Ray ships Folders to workers by pickling them.
    folder.write_bytes("x", b"1")
    clone = pickle.loads(pickle.dumps(folder))
    assert clone.read_bytes("x") == b"1"
    assert clone.uri("x") == folder.uri("x")


def test_uri_forms(tmp_path: Path) -> None:
    local = Folder(str(tmp_path / "out") + "/")
    assert local.uri("a/b.png") == str(tmp_path / "out" / "a" / "b.png")
    assert Folder(f"file://{tmp_path}/out").uri("a") == str(tmp_path / "out" / "a")
    assert Folder("s3://bucket/run/").uri("a/b.png") == "s3://bucket/run/a/b.png"
    assert Folder("s3://bucket").uri("a") == "s3://bucket/a"

    # "memory://" once lost its "//" and turned into a local folder named "memory:".
    mem = Folder("memory://")
    assert not mem.is_local
    assert mem.uri("a/b") == "memory:///a/b"


@pytest.mark.parametrize("rel", ["..", "../x", "a/../../x", "a/..", "./../x"])
def test_path_refuses_parent(tmp_path: Path, rel: str) -> None:
    with pytest.raises(StorageError, match="escapes"):
        Folder(str(tmp_path)).path(rel)


def test_path_normalises_harmless_parts(tmp_path: Path) -> None:
    folder = Folder(str(tmp_path))
    assert folder.path("./a//b/") == f"{tmp_path}/a/b"
    assert folder.path("") == str(tmp_path)


def test_local_write_leaves_no_temp_files(tmp_path: Path) -> None:
    folder = Folder(str(tmp_path))
    for i in range(3):
        folder.write_bytes("d/x.bin", bytes([i]) * 10)
        folder.write_json("d/y.json", {"i": i})
    assert sorted(os.listdir(tmp_path / "d")) == ["x.bin", "y.json"]


def _writes_fail(folder: Folder, match: str | None = None) -> None:
    """Writing ``new.bin`` and replacing ``old.bin`` both fail with a StorageError matching
    ``match`` (by default the object's name)."""
    for rel in ("new.bin", "old.bin"):
        with pytest.raises(StorageError, match=match or rel):
            folder.write_bytes(rel, b"x" * 1000)


def test_local_write_failing_midway_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = Folder(str(tmp_path))
    folder.write_bytes("old.bin", b"old content")

    class DiskFills:
        """A file that takes half the bytes, then fails as a full disk does."""

        def __init__(self, path: str, mode: str) -> None:
            self._f = open(path, mode)  # noqa: SIM115 - closed in __exit__

        def __enter__(self) -> DiskFills:
            return self

        def __exit__(self, *exc: object) -> None:
            self._f.close()

        def write(self, data: bytes) -> int:
            self._f.write(data[: len(data) // 2])
            self._f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    # A local write goes through the folder's filesystem: its files fill the disk.
    monkeypatch.setattr(folder.fs, "open", lambda path, mode, **_: DiskFills(path, mode))
    _writes_fail(folder, "No space left")

    assert sorted(os.listdir(tmp_path)) == ["old.bin"]
    assert (tmp_path / "old.bin").read_bytes() == b"old content"


def test_s3_failed_write_leaves_no_object(
    s3_bucket: str,
    s3_storage: Storage,
    s3_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    sleeps: list[float],
) -> None:
    folder = Folder(f"s3://{s3_bucket}", s3_storage)
    folder.write_bytes("old.bin", b"old content")
    real_call = folder.fs._call_s3
    puts = []

    async def connection_drops_on_put(method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "put_object":
            puts.append(kwargs["Key"])
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return await real_call(method, *args, **kwargs)

    monkeypatch.setattr(folder.fs, "_call_s3", connection_drops_on_put)
    _writes_fail(folder)
    monkeypatch.undo()

    assert puts == ["new.bin"] * 5 + ["old.bin"] * 5  # transient, so retried until given up
    assert len(sleeps) == 8
    # Asked through an independent client, so no s3fs cache can answer instead of the server.
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert keys == ["old.bin"]
    assert s3_client.get_object(Bucket=s3_bucket, Key="old.bin")["Body"].read() == b"old content"


FlakyRead = Callable[[list[BaseException]], tuple[Folder, list[str]]]


@pytest.fixture
def flaky_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FlakyRead:
    """``folder, calls = flaky_read(failures)``: a local Folder (holding ``x.bin``) whose reads
    raise ``failures`` one by one before they read for real; ``calls`` lists every read tried."""

    def make(failures: list[BaseException]) -> tuple[Folder, list[str]]:
        folder = Folder(str(tmp_path))
        folder.write_bytes("x.bin", b"data")
        real, calls = folder.fs.cat_file, []

        def call(path: str, *args: Any, **kwargs: Any) -> Any:
            calls.append(path)
            if failures:
                raise failures.pop(0)
            return real(path, *args, **kwargs)

        monkeypatch.setattr(folder.fs, "cat_file", call)
        return folder, calls

    return make


def test_transient_faults_are_retried(flaky_read: FlakyRead, sleeps: list[float]) -> None:
    folder, calls = flaky_read([ConnectionResetError(), ConnectionResetError()])
    assert folder.read_bytes("x.bin") == b"data"
    assert len(calls) == 3
    assert len(sleeps) == 2
    assert sleeps[1] > sleeps[0] * 0.5  # backs off (with jitter), never hammers


@pytest.mark.parametrize(
    ("error", "raised", "match"),
    [
        (FileNotFoundError(2, "gone", "x.bin"), FileNotFoundError, None),
        # Any other error surfaces as a StorageError naming the object.
        (ValueError("bad bytes in photo_500.jpg"), StorageError, "read {tmp_path}/x.bin: ValueError"),
    ],
    ids=["missing", "other"],
)
def test_permanent_errors_are_not_retried(
    flaky_read: FlakyRead, sleeps: list[float], tmp_path: Path, error: BaseException, raised: type, match: str | None
) -> None:
    folder, calls = flaky_read([error])
    with pytest.raises(raised, match=match and match.format(tmp_path=tmp_path)):
        folder.read_bytes("x.bin")
    assert len(calls) == 1
    assert sleeps == []


# Network trouble, server errors and throttling are retried ...
TRANSIENT = [
    ConnectionResetError(), TimeoutError(), OSError(errno.EPIPE, "Broken pipe"),
    OSError("503, message='Service Unavailable'"),
    OSError("An error occurred (SlowDown) when calling the PutObject operation"),
    RuntimeError("HTTP 500 Internal Server Error"),
]  # fmt: skip
# ... and nothing else: not a status code inside a name or path, nor our own verdicts.
PERMANENT = [
    FileNotFoundError("bucket/key"), PermissionError("Access Denied"),
    ValueError("cannot decode photo_500.jpg"), ValueError("cannot decode s3://b/503/x.png"),
    StorageError("object is 600 bytes, over the 500-byte limit"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("exc", "transient"), [(e, True) for e in TRANSIENT] + [(e, False) for e in PERMANENT]
)
def test_transient_classification(exc: BaseException, transient: bool) -> None:
    assert storage._is_transient(exc) is transient


def test_read_uri_size_limit_is_not_retried(tmp_path: Path, sleeps: list[float]) -> None:
    (tmp_path / "big.bin").write_bytes(b"x" * 600)
    with pytest.raises(StorageError, match="over the 500-byte limit"):
        read_uri(str(tmp_path / "big.bin"), max_bytes=500)
    assert sleeps == []
    assert read_uri(str(tmp_path / "big.bin"), max_bytes=600) == b"x" * 600


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (None, "null"),
        (42, "must be a string"),
        ("", "empty"),
        ("   ", "empty"),
        ("ftp://host/a.png", "scheme 'ftp' is not allowed"),
        ("memory://a.png", "scheme 'memory' is not allowed"),
        ("s3://", "no bucket"),
        ("s3:///key.png", "no bucket"),
        ("s3://bucket/a\nb.png", "control characters"),
        ("/tmp/a\x00.png", "control characters"),
        ("/tmp/a\x7f.png", "control characters"),
        ("3s://bucket/a.png", "malformed URI scheme"),
    ],
)
def test_check_uri_rejects(uri: object, message: str) -> None:
    with pytest.raises(UnsupportedURIError, match=message):
        check_uri(uri, ("file", "s3"))


@pytest.mark.parametrize("uri", ["s3://bucket/a.png", "/tmp/a.png", "file:///tmp/a.png", "a.png"])
def test_check_uri_accepts(uri: str) -> None:
    assert check_uri(uri, ("file", "s3")) == uri


def test_check_uri_allows_listed_schemes() -> None:
    assert check_uri("ftp://host/a.png", ("file", "s3", "ftp")) == "ftp://host/a.png"


def _make_tree(folder: Folder) -> None:
    for rel in ["photos/a.jpg", "photos/b.JPG", "photos/notes.txt", "photos/sub/c.jpg"]:
        folder.write_bytes(rel, b"x")
    # A folder whose name matches the glob must not be listed as a file.
    folder.write_bytes("photos/album.jpg/d.png", b"x")


def test_expand_local(tmp_path: Path) -> None:
    _make_tree(Folder(str(tmp_path)))
    photos = tmp_path / "photos"
    assert list(expand(f"{photos}/*.jpg")) == [f"{photos}/a.jpg"]
    assert list(expand(f"{photos}/**/*.jpg")) == [f"{photos}/a.jpg", f"{photos}/sub/c.jpg"]
    everything = [
        f"{photos}/{rel}" for rel in ["a.jpg", "album.jpg/d.png", "b.JPG", "notes.txt", "sub/c.jpg"]
    ]
    assert list(expand(str(photos))) == everything
    assert list(expand(f"{photos}/")) == everything
    assert list(expand(f"{photos}/a.jpg")) == [f"{photos}/a.jpg"]
    assert list(expand(str(tmp_path / "nothing-here"))) == []
    assert list(expand(f"{photos}/*.webp")) == []


def test_expand_relative_local_gives_absolute_uris(in_tmp_path: Path) -> None:
    _make_tree(Folder(str(in_tmp_path)))
    assert list(expand("photos/*.jpg")) == [f"{in_tmp_path}/photos/a.jpg"]


def test_expand_s3(s3_bucket: str, s3_storage: Storage, s3_client: Any) -> None:
    _make_tree(Folder(f"s3://{s3_bucket}", s3_storage))
    base = f"s3://{s3_bucket}/photos"
    assert list(expand(f"{base}/*.jpg", s3_storage)) == [f"{base}/a.jpg"]
    everything = [
        f"{base}/{rel}" for rel in ["a.jpg", "album.jpg/d.png", "b.JPG", "notes.txt", "sub/c.jpg"]
    ]
    assert list(expand(base, s3_storage)) == everything
    assert list(expand(f"{base}/", s3_storage)) == everything
    assert list(expand(f"s3://{s3_bucket}/nothing-here", s3_storage)) == []

    # Another client uploads after our listing: the next expand must see it, not a cached listing.
    s3_client.put_object(Bucket=s3_bucket, Key="photos/e.jpg", Body=b"x")
    assert list(expand(f"{base}/*.jpg", s3_storage)) == [f"{base}/a.jpg", f"{base}/e.jpg"]


def test_repr_hides_secrets(s3_storage_options: dict[str, Any]) -> None:
    options = {
        **s3_storage_options,
        "key": "AKIAEXAMPLEKEY",
        "secret": "t0p-s3cret",
        "token": "tok3n",
    }
    folder = Folder("s3://bucket/run", Storage(options))
    for text in (repr(folder), str(folder), f"{folder}", repr([folder])):
        assert "bucket/run" in text
    for text in (repr(folder.storage), str(folder.storage), repr([folder.storage])):
        for secret in ("AKIAEXAMPLEKEY", "t0p-s3cret", "tok3n"):
            assert secret not in text

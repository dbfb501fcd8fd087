"""pipeline.manifest: validation, id derivation, building from local and S3 listings, and the CLI."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.manifest import ManifestError, build_manifest, derive_id, load_manifest
from pipeline.storage import Folder, Storage

REPO_ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, table: pa.Table) -> str:
    pq.write_table(table, path)
    return str(path)


# --- derive_id ---------------------------------------------------------------------------------


def test_derive_id_format_and_stability() -> None:
    uri = "s3://bucket/photos/IMG 0001.JPG"
    digest = hashlib.sha256(uri.encode()).hexdigest()[:10]
    assert derive_id(uri) == f"IMG_0001-{digest}"


def test_derive_id_known_value() -> None:
    # Pinned, so a change in the scheme (which would orphan every earlier run's outputs) shows up.
    assert derive_id("s3://bucket/photos/cat.jpg") == "cat-22ae3f4561"
    assert derive_id("/data/cat.jpg") == "cat-3ec29df458"


def test_derive_id_same_basename_different_folders() -> None:
    a, b = derive_id("s3://bucket/a/cat.jpg"), derive_id("s3://bucket/b/cat.jpg")
    assert a != b
    assert a.startswith("cat-") and b.startswith("cat-")


@pytest.mark.parametrize(
    ("uri", "stem"),
    [
        ("/data/été photo (1).png", "_t__photo__1_"),
        ("https://host/img.jpg?x=1", "img"),
        ("/data/archive.tar.gz", "archive.tar"),
        ("/data/.hidden", ".hidden"),
        ("/data/noext", "noext"),
        ("s3://bucket/", "bucket"),
        ("/data/.jpg", ".jpg"),
        ("/data/" + "a" * 100 + ".png", "a" * 60),
    ],
)
def test_derive_id_stem(uri: str, stem: str) -> None:
    got = derive_id(uri)
    assert got.rsplit("-", 1)[0] == stem
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in got)


def test_derive_id_never_starts_with_a_dash() -> None:
    assert derive_id("/data/???.png").startswith("___-")
    assert derive_id("").startswith("image-")


# --- load_manifest -----------------------------------------------------------------------------


def test_load_adds_ids_and_keeps_other_columns(tmp_path: Path) -> None:
    table = pa.table(
        {
            "label": pa.array([1, 2, 3], pa.int16()),
            "uri": pa.array(["/d/a/cat.jpg", None, "/d/b/cat.jpg"], pa.large_string()),
            "scales": pa.array([[0.5, 2.0], None, [1.5]], pa.list_(pa.float32())),
        }
    )
    out = load_manifest(_write(tmp_path / "m.parquet", table))
    assert out.column_names == ["uri", "id", "label", "scales"]
    assert out.schema.field("uri").type == pa.string()
    assert out.schema.field("id").type == pa.string()
    assert out.column("uri").to_pylist() == ["/d/a/cat.jpg", None, "/d/b/cat.jpg"]
    assert out.column("id").to_pylist() == [
        derive_id("/d/a/cat.jpg"),
        "row-1",
        derive_id("/d/b/cat.jpg"),
    ]
    assert out.column("label").type == pa.int16()
    assert out.column("label").to_pylist() == [1, 2, 3]
    assert out.column("scales").to_pylist() == [[0.5, 2.0], None, [1.5]]


def test_load_keeps_given_ids_and_malformed_uris(tmp_path: Path) -> None:
    table = pa.table({"id": ["one", "two", "three"], "uri": ["ftp://x/a.png", "", "not a uri\n"]})
    out = load_manifest(_write(tmp_path / "m.parquet", table))
    assert out.column_names == ["uri", "id"]
    assert out.column("id").to_pylist() == ["one", "two", "three"]
    assert out.column("uri").to_pylist() == ["ftp://x/a.png", "", "not a uri\n"]


def test_load_from_memory_uri() -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"uri": ["memory:///a.png"]}), sink)
    Folder("memory://manifests").write_bytes("m.parquet", sink.getvalue().to_pybytes())
    assert load_manifest("memory:///manifests/m.parquet").num_rows == 1


def test_load_from_s3(s3_bucket: str, s3_storage: Storage) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"uri": [f"s3://{s3_bucket}/a.png"], "id": ["a"]}), sink)
    Folder(f"s3://{s3_bucket}", s3_storage).write_bytes(
        "m.parquet", sink.getvalue().to_pybytes()
    )
    out = load_manifest(f"s3://{s3_bucket}/m.parquet", s3_storage)
    assert out.to_pylist() == [{"uri": f"s3://{s3_bucket}/a.png", "id": "a"}]


@pytest.mark.parametrize("content", [b"", b"uri\n/a.png\n", b"PAR1 but not really PAR1"])
def test_load_rejects_non_parquet(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "m.parquet").write_bytes(content)
    with pytest.raises(ManifestError, match=r"m\.parquet is not a readable Parquet file"):
        load_manifest(str(tmp_path / "m.parquet"))


def test_load_rejects_truncated_parquet(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.parquet", pa.table({"uri": ["/a.png"] * 100}))
    (tmp_path / "m.parquet").write_bytes(Path(good).read_bytes()[:-20])
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        load_manifest(str(tmp_path / "m.parquet"))


def test_load_missing_file_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_manifest(str(tmp_path / "nope.parquet"))


def test_load_rejects_missing_uri_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.parquet", pa.table({"url": ["/a.png"], "id": ["a"]}))
    with pytest.raises(ManifestError, match=r"no 'uri' column \(columns: url, id\)"):
        load_manifest(path)


def test_load_rejects_repeated_columns(tmp_path: Path) -> None:
    table = pa.Table.from_arrays([pa.array(["/a"]), pa.array(["/b"])], names=["uri", "uri"])
    path = _write(tmp_path / "m.parquet", table)
    with pytest.raises(ManifestError, match="more than one column named uri"):
        load_manifest(path)


@pytest.mark.parametrize(
    ("column", "type_name"),
    [
        (pa.array([1, 2], pa.int64()), "int64"),
        (pa.array([b"/a", b"/b"], pa.binary()), "binary"),
        (pa.array(["/a", "/b"]).dictionary_encode(), "dictionary<values=string"),
        (pa.array([None, None], pa.null()), "null"),
    ],
)
def test_load_rejects_non_string_uri(tmp_path: Path, column: pa.Array, type_name: str) -> None:
    path = _write(tmp_path / "m.parquet", pa.table({"uri": column}))
    with pytest.raises(ManifestError, match=rf"column 'uri' must be string, got {type_name}"):
        load_manifest(path)


def test_load_rejects_empty_manifest(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.parquet", pa.table({"uri": pa.array([], pa.string())}))
    with pytest.raises(ManifestError, match="has no rows"):
        load_manifest(path)


def test_load_rejects_non_string_id(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.parquet", pa.table({"uri": ["/a", "/b"], "id": [1, 2]}))
    with pytest.raises(ManifestError, match="column 'id' must be string, got int64"):
        load_manifest(path)


def test_load_rejects_null_ids(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "m.parquet", pa.table({"uri": ["/a", "/b", "/c"], "id": ["a", None, None]})
    )
    with pytest.raises(ManifestError, match="column 'id' is null at rows 1, 2"):
        load_manifest(path)


def test_load_rejects_duplicate_ids(tmp_path: Path) -> None:
    ids = ["a", "b", "a", "c", "b", "a"] + [f"x{i}" for i in range(10)] * 2
    path = _write(
        tmp_path / "m.parquet", pa.table({"uri": [f"/{i}" for i in range(len(ids))], "id": ids})
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert "duplicate ids" in message
    assert "'a' at rows 0, 2, 5" in message
    assert "'b' at rows 1, 4" in message
    assert "and 7 more" in message  # 12 duplicated ids, the first 5 named


def test_load_rejects_duplicate_derived_ids(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.parquet", pa.table({"uri": ["/d/a.png", "/d/b.png", "/d/a.png"]}))
    with pytest.raises(
        ManifestError, match=r"duplicate ids \(derived from 'uri'\): 'a-[0-9a-f]{10}' at rows 0, 2"
    ):
        load_manifest(path)


@pytest.mark.parametrize("odd", ["", "a/b", "..", ".", "a\\b", "a\nb", "../../etc/passwd", "/abs"])
def test_load_accepts_any_string_id(tmp_path: Path, odd: str) -> None:
    # Ids never become paths directly (layout.item_key makes them safe), so none is refused.
    path = _write(tmp_path / "m.parquet", pa.table({"uri": ["/a", "/b"], "id": ["fine", odd]}))
    assert load_manifest(path).column("id").to_pylist() == ["fine", odd]


# --- build_manifest ----------------------------------------------------------------------------


def _photos(folder: Folder) -> None:
    for rel in [
        "a.jpg",
        "b.JPEG",
        "c.png",
        "notes.txt",
        "sub/d.webp",
        "sub/e.jpg",
        "sub/readme.md",
    ]:
        folder.write_bytes(f"photos/{rel}", b"x")


def test_build_from_local_glob(tmp_path: Path) -> None:
    _photos(Folder(str(tmp_path)))
    out = tmp_path / "out" / "m.parquet"
    assert build_manifest(f"{tmp_path}/photos/*", str(out)) == 3
    table = load_manifest(str(out))
    uris = [f"{tmp_path}/photos/{n}" for n in ["a.jpg", "b.JPEG", "c.png"]]
    assert table.column("uri").to_pylist() == uris
    assert table.column("id").to_pylist() == [derive_id(u) for u in uris]
    # The written file itself holds exactly uri and id, as strings.
    assert pq.read_schema(out) == pa.schema([("uri", pa.string()), ("id", pa.string())])


def test_build_from_local_prefix_and_relative_paths(in_tmp_path: Path) -> None:
    _photos(Folder(str(in_tmp_path)))
    assert build_manifest("photos", "m.parquet") == 5
    uris = load_manifest(str(in_tmp_path / "m.parquet")).column("uri").to_pylist()
    names = ["a.jpg", "b.JPEG", "c.png", "sub/d.webp", "sub/e.jpg"]
    assert uris == [f"{in_tmp_path}/photos/{n}" for n in names]  # absolute, so workers can open them


def test_build_with_own_extensions(tmp_path: Path) -> None:
    _photos(Folder(str(tmp_path)))
    out = str(tmp_path / "m.parquet")
    assert build_manifest(str(tmp_path / "photos"), out, extensions=(".JPG",)) == 2


def test_build_from_s3_glob(s3_bucket: str, s3_storage: Storage) -> None:
    _photos(Folder(f"s3://{s3_bucket}", s3_storage))
    out = f"s3://{s3_bucket}/manifests/photos.parquet"
    assert build_manifest(f"s3://{s3_bucket}/photos/*.jpg", out, s3_storage) == 1
    table = load_manifest(out, s3_storage)
    assert table.to_pylist() == [
        {"uri": f"s3://{s3_bucket}/photos/a.jpg", "id": derive_id(f"s3://{s3_bucket}/photos/a.jpg")}
    ]
    assert build_manifest(f"s3://{s3_bucket}/photos", out, s3_storage) == 5


def test_build_errors_when_nothing_matches(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"matched nothing"):
        build_manifest(f"{tmp_path}/*.jpg", str(tmp_path / "m.parquet"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ManifestError, match=r"matched 1 files, none of them images"):
        build_manifest(str(tmp_path), str(tmp_path / "m.parquet"))
    assert not (tmp_path / "m.parquet").exists()


def test_build_rejects_output_without_a_file_name() -> None:
    with pytest.raises(ManifestError, match="names no file"):
        build_manifest("memory:///nothing", "s3://just-a-bucket")


# --- CLI ---------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.manifest", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_build_and_check_on_s3(
    s3_endpoint: str, s3_bucket: str, s3_storage: Storage
) -> None:
    _photos(Folder(f"s3://{s3_bucket}", s3_storage))
    out = f"s3://{s3_bucket}/m.parquet"
    built = _cli("build", f"s3://{s3_bucket}/photos/*", out, "--endpoint-url", s3_endpoint)
    assert built.returncode == 0, built.stderr
    assert f"wrote 3 rows to {out}" in built.stdout

    checked = _cli("check", out, "--endpoint-url", s3_endpoint)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.splitlines() == ["rows: 3", "columns: uri (string), id (string)"]


def test_cli_expected_errors_exit_1_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    cases = [
        (("check", str(tmp_path / "bad.parquet")), "not a readable Parquet file"),
        (("check", str(tmp_path / "missing.parquet")), "FileNotFoundError"),
        (("build", f"{tmp_path}/*.jpg", str(tmp_path / "m.parquet")), "matched nothing"),
    ]
    for args, message in cases:
        result = _cli(*args)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr.startswith("error: ")
        assert message in result.stderr
        assert "Traceback" not in result.stderr


def test_cli_usage_errors_exit_2() -> None:
    result = _cli("build", "only-one-argument")
    assert result.returncode == 2
    assert "usage:" in result.stderr

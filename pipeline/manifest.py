"""The Parquet manifest: one row per image to process, with its ``uri`` and a stable ``id``.

The whole file is validated up front, so a bad manifest fails before any cluster time is spent.
Only problems with the table itself are errors here; a null or malformed URI is one image's
problem and becomes that row's failure record later, so such rows are kept.

CLI::

    python -m pipeline.manifest build 'GLOB_OR_PREFIX' OUT.parquet [--endpoint-url URL]
    python -m pipeline.manifest check MANIFEST [--endpoint-url URL]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.storage import (
    DEFAULT_STORAGE,
    Folder,
    Storage,
    StorageError,
    expand,
    read_uri,
    scheme_of,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
_UNSAFE_CHARS_RE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_STEM = 60
_SHOW = 5  # how many culprits an error message names


class ManifestError(ValueError):
    """The manifest cannot be used as a whole; the message names the column, row or field at fault."""


def derive_id(uri: str) -> str:
    """A readable id that is the same on every run and machine: ``{stem}-{sha256(uri)[:10]}``.

    The hash of the full URI keeps same-named files in different folders apart; the stem keeps
    outputs recognisable.
    """
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    # An empty stem would give an id starting with "-", which command lines read as an option.
    stem = _UNSAFE_CHARS_RE.sub("_", stem)[:_MAX_STEM] or "image"
    return f"{stem}-{hashlib.sha256(uri.encode('utf-8')).hexdigest()[:10]}"


def _is_string_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _rows(mask: pa.ChunkedArray | pa.Array) -> list[int]:
    return pc.indices_nonzero(mask).to_pylist()


def _shown(rows: list[int]) -> str:
    more = f" (and {len(rows) - _SHOW} more)" if len(rows) > _SHOW else ""
    return ", ".join(str(r) for r in rows[:_SHOW]) + more


def _check_ids(ids: pa.ChunkedArray, uri: str, derived: bool) -> None:
    origin = " (derived from 'uri')" if derived else ""
    nulls = _rows(pc.is_null(ids))
    if nulls:
        raise ManifestError(f"manifest {uri}: column 'id' is null at rows {_shown(nulls)}")
    # Any other string is a valid id: layout.item_key turns it into a safe, distinct folder name,
    # so one odd id never stops a whole run.
    counts = pc.value_counts(ids)
    dup_values = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(dup_values):
        details = []
        for value in dup_values[:_SHOW].to_pylist():
            details.append(f"{value!r} at rows {_shown(_rows(pc.equal(ids, value)))}")
        more = f"; and {len(dup_values) - _SHOW} more" if len(dup_values) > _SHOW else ""
        raise ManifestError(f"manifest {uri}: duplicate ids{origin}: {'; '.join(details)}{more}")


def load_manifest(uri: str, storage: Storage = DEFAULT_STORAGE) -> pa.Table:
    """Read and validate the manifest at ``uri``; returns it with ``uri`` and ``id`` first.

    ``id`` is derived from ``uri`` when the manifest has none (``row-{index}`` for a null URI).
    Other columns are carried through unchanged. Raises :class:`ManifestError` for a table that
    cannot be used, and storage errors (``FileNotFoundError``, ``StorageError``) for I/O.
    """
    data = read_uri(uri, storage)
    try:
        # ParquetFile, not read_table: the dataset layer behind read_table chokes on a repeated
        # column name with an unreadable message before we could name it.
        table = pq.ParquetFile(pa.BufferReader(data)).read()
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"manifest {uri} is not a readable Parquet file: {exc}") from exc

    repeated = sorted({n for n in table.column_names if table.column_names.count(n) > 1})
    if repeated:
        raise ManifestError(f"manifest {uri} has more than one column named {', '.join(repeated)}")
    if "uri" not in table.column_names:
        raise ManifestError(
            f"manifest {uri} has no 'uri' column (columns: {', '.join(table.column_names) or 'none'})"
        )
    uri_type = table.schema.field("uri").type
    if not _is_string_type(uri_type):
        raise ManifestError(f"manifest {uri}: column 'uri' must be string, got {uri_type}")
    if table.num_rows == 0:
        raise ManifestError(f"manifest {uri} has no rows")
    uris = table.column("uri").cast(pa.string())

    derived = "id" not in table.column_names
    if derived:
        ids = pa.chunked_array(
            [
                [
                    derive_id(u) if u is not None else f"row-{i}"
                    for i, u in enumerate(uris.to_pylist())
                ]
            ],
            type=pa.string(),
        )
    else:
        id_type = table.schema.field("id").type
        if not _is_string_type(id_type):
            raise ManifestError(f"manifest {uri}: column 'id' must be string, got {id_type}")
        ids = table.column("id").cast(pa.string())
    _check_ids(ids, uri, derived)

    rest = [name for name in table.column_names if name not in ("uri", "id")]
    return pa.Table.from_arrays(
        [uris, ids, *(table.column(name) for name in rest)],
        schema=pa.schema(
            [pa.field("uri", pa.string()), pa.field("id", pa.string())]
            + [table.schema.field(name) for name in rest],
            metadata=table.schema.metadata,
        ),
    )


def _split_uri(uri: str) -> tuple[str, str]:
    """``(folder URI, file name)`` of a file URI, so the file can be written through a Folder."""
    if scheme_of(uri) == "file":
        folder, name = os.path.split(os.path.abspath(uri.removeprefix("file://")))
        return folder, name
    scheme, rest = uri.split("://", 1)
    folder, _, name = rest.rstrip("/").rpartition("/")
    if not folder or not name:
        raise ManifestError(f"output {uri!r} names no file inside a bucket or folder")
    return f"{scheme}://{folder}", name


def build_manifest(
    pattern: str,
    out_uri: str,
    storage: Storage = DEFAULT_STORAGE,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> int:
    """Write a manifest (``uri``, ``id``) of the images matching a glob or under a prefix.

    Extensions match case-insensitively. Returns the number of rows written.
    """
    # Checked before listing, which can take long on a big bucket.
    folder, name = _split_uri(out_uri)
    suffixes = tuple(e.lower() for e in extensions)
    found = list(expand(pattern, storage))
    uris = [u for u in found if u.lower().endswith(suffixes)]
    if not uris:
        what = f"{len(found)} files, none of them images" if found else "nothing"
        raise ManifestError(f"{pattern!r} matched {what} (image extensions: {', '.join(suffixes)})")
    table = pa.table(
        {
            "uri": pa.array(uris, pa.string()),
            "id": pa.array([derive_id(u) for u in uris], pa.string()),
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    Folder(folder, storage).write_bytes(name, sink.getvalue().to_pybytes())
    return table.num_rows


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pipeline.manifest``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.manifest", description="Build or check a Parquet image manifest."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="list images into a new manifest")
    build.add_argument(
        "pattern", help="a glob ('s3://bucket/photos/*.jpg') or a prefix to list recursively"
    )
    build.add_argument("out", help="where to write the Parquet manifest")
    check = commands.add_parser("check", help="validate a manifest and describe it")
    check.add_argument("manifest", help="URI of the Parquet manifest")
    for sub in (build, check):
        sub.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, Ceph, ...)")
    args = parser.parse_args(argv)
    storage = Storage.of(endpoint_url=args.endpoint_url)

    try:
        if args.command == "build":
            count = build_manifest(args.pattern, args.out, storage)
            print(f"wrote {count} rows to {args.out}")
        else:
            table = load_manifest(args.manifest, storage)
            print(f"rows: {table.num_rows}")
            print("columns: " + ", ".join(f"{f.name} ({f.type})" for f in table.schema))
    except (ManifestError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # s3fs's FileNotFoundError carries only the bare key; name the argument and the kind.
        target = args.pattern if args.command == "build" else args.manifest
        print(f"error: {target}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

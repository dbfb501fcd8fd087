"""Helpers the tests share (pytest puts this folder on ``sys.path`` for its ``conftest.py``)."""

from __future__ import annotations

import contextlib
import io
import socket
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_main(argv: list[str]) -> tuple[int, str]:
    """``driver.main(argv)`` in this process; returns the exit code and the driver's log."""
    from pipeline import driver

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        code = driver.main(argv)
    return code, buf.getvalue()


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def output(rel: str, width: int, height: int, **metrics: float | None) -> dict[str, Any]:
    """An output entry of a task record."""
    names = ("completeness", "coherence", "swd", "resize_completeness", "resize_coherence", "resize_swd", "beats_resize")
    return {"width": width, "height": height, "ratio": width / height, "uri": f"/out/{rel}", "rel": rel,
            **{n: metrics.get(n) for n in names}}


def record(id_: str, status: str = "ok", **overrides: object) -> dict[str, Any]:
    """A task record as ``pipeline.task`` returns it."""
    rec: dict[str, Any] = {
        "id": id_, "uri": f"s3://bucket/{id_}.jpg", "status": status, "error": None, "error_kind": None,
        "outputs": [], "source_rel": None, "source_width": None, "source_height": None, "model_uri": None,
        "train_seconds": None, "total_seconds": None, "attempts": 1, "carried": {},
    }
    rec.update(overrides)
    return rec

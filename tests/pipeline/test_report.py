"""Tests for pipeline.report: results.parquet, summary.json and the HTML contact sheet."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import re
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support import output as _output
from support import record as _record

from pipeline.records import RESULT_SCHEMA_BASE, results_table
from pipeline.report import render_report, write_report
from pipeline.results import ResultStream
from pipeline.storage import Folder
from pipeline.summary import tally, write_summary

EVIL = "<script>alert(1)</script>"






def _write_jpeg(folder: Folder, rel: str, size: tuple[int, int], color: str = "red") -> None:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    folder.write_bytes(rel, buf.getvalue())


def write_results(folder: Folder, records: list[dict], carried_schema: pa.Schema | None) -> str:
    """Through the stream the driver writes with, as one run would."""
    stream = ResultStream(folder, carried_schema)
    for i, rec in enumerate(records):
        stream.add(i, rec)
    return stream.finish().uri


def _summarize(records: list[dict], **run: Any) -> dict[str, Any]:
    return tally(records).summary(**run)


@pytest.fixture
def folder(tmp_path) -> Folder:
    return Folder(str(tmp_path / "out"))


# --------------------------------------------------------------------------- results.parquet


def test_results_table_keeps_order_and_statuses() -> None:
    records = [
        _record("b"),
        _record("a", "failed", error="boom", error_kind="decode"),
        _record("c", "skipped"),
    ]
    table = results_table(records, None)
    assert table.num_rows == 3
    assert table.column("id").to_pylist() == ["b", "a", "c"]
    assert table.column("status").to_pylist() == ["ok", "failed", "skipped"]
    assert table.column("error_kind").to_pylist() == [None, "decode", None]
    assert table.schema.equals(RESULT_SCHEMA_BASE)
    assert "rel" not in table.schema.field("outputs").type.value_type.names
    assert "source_rel" not in table.column_names


def test_outputs_round_trip_through_parquet(folder: Folder) -> None:
    outputs = [
        _output("x/a.png", 64, 32, completeness=0.5, coherence=0.25, swd=1.5,
                resize_completeness=0.6, resize_coherence=0.3, resize_swd=1.75, beats_resize=True),
        _output("x/b.png", 32, 64),
    ]
    records = [
        _record("x", outputs=outputs, train_seconds=3.0, total_seconds=4.5, attempts=2),
        _record("y", "failed"),
    ]

    uri = write_results(folder, records, None)

    assert uri == folder.uri("results.parquet")
    table = pq.read_table(pa.BufferReader(folder.read_bytes("results.parquet")))
    assert table.schema.field("outputs").type == RESULT_SCHEMA_BASE.field("outputs").type
    got = table.column("outputs").to_pylist()
    expected_first = [{k: v for k, v in o.items() if k != "rel"} for o in outputs]
    assert got == [expected_first, []]
    assert table.column("attempts").to_pylist() == [2, 1]
    assert table.column("train_seconds").to_pylist() == [3.0, None]


def test_carried_columns_keep_their_manifest_types(folder: Folder) -> None:
    carried_schema = pa.schema(
        [("count", pa.int64()), ("taken", pa.timestamp("ms", tz="UTC")), ("label", pa.string())]
    )
    when = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC)
    records = [
        _record("a", carried={"count": 2**40, "taken": when, "label": "cat"}),
        _record("b", carried={"count": None, "taken": None, "label": None}),
    ]

    write_results(folder, records, carried_schema)

    table = pq.read_table(pa.BufferReader(folder.read_bytes("results.parquet")))
    assert table.column_names[-3:] == ["count", "taken", "label"]
    assert table.schema.field("count").type == pa.int64()
    assert table.schema.field("taken").type == pa.timestamp("ms", tz="UTC")
    assert table.column("count").to_pylist() == [2**40, None]
    assert table.column("taken").to_pylist()[0] == when


def test_carried_column_named_like_a_result_column_is_refused() -> None:
    with pytest.raises(ValueError, match="status"):
        results_table([_record("a")], pa.schema([("status", pa.string())]))


def test_empty_records_give_an_empty_table_with_the_full_schema(folder: Folder) -> None:
    carried_schema = pa.schema([("count", pa.int64())])
    write_results(folder, [], carried_schema)
    table = pq.read_table(pa.BufferReader(folder.read_bytes("results.parquet")))
    assert table.num_rows == 0
    assert table.schema.equals(pa.schema([*RESULT_SCHEMA_BASE, *carried_schema]))


# --------------------------------------------------------------------------- summary.json


def _summary_records() -> list[dict]:
    ok = [
        _record(
            f"ok{i}",
            total_seconds=float(i),
            train_seconds=float(i) / 2 if i <= 4 else None,
            outputs=[_output(f"ok{i}/a.png", 8, 8), _output(f"ok{i}/b.png", 8, 4)],
        )
        for i in range(1, 11)
    ]
    failed = [
        _record("f1", "failed", error="bad", error_kind="decode"),
        _record("f2", "failed", error="bad", error_kind="decode"),
        _record("f3", "failed", error="slow", error_kind="timeout"),
    ]
    return [*ok, *failed, _record("s1", "skipped")]


def test_summarize_counts_and_percentiles() -> None:
    summary = _summarize(
        _summary_records(),
        config={"steps": 10},
        started=100.0,
        finished=1900.0,
        versions={"torch": "2.13.0"},
    )
    assert summary["total"] == 14
    assert summary["status_counts"] == {"ok": 10, "skipped": 1, "failed": 3}
    assert summary["error_kinds"] == {"decode": 2, "timeout": 1}
    assert summary["outputs_written"] == 20
    # total_seconds 1..10: linear interpolation gives p50 5.5 and p95 1 + 0.95 * 9.
    assert summary["durations"]["total_seconds"] == pytest.approx({"p50": 5.5, "p95": 9.55})
    # train_seconds present only for 0.5, 1.0, 1.5, 2.0.
    assert summary["durations"]["train_seconds"] == pytest.approx({"p50": 1.25, "p95": 1.925})
    assert summary["wall_seconds"] == 1800.0
    assert summary["images_per_hour"] == pytest.approx(20.0)
    assert summary["versions"] == {"torch": "2.13.0"}
    assert summary["config"] == {"steps": 10}


def test_summarize_without_durations_gives_none() -> None:
    summary = _summarize([_record("s", "skipped")], config={}, started=5.0, finished=5.0, versions={}
    )
    assert summary["durations"]["total_seconds"] == {"p50": None, "p95": None}
    assert summary["durations"]["train_seconds"] == {"p50": None, "p95": None}
    assert summary["images_per_hour"] is None


def test_summarize_redacts_nested_secrets(folder: Folder) -> None:
    config = {
        "output": "s3://bucket/run",
        "storage_options": {
            "key": "AKIA123",
            "secret": "s3cr3t",
            "client_kwargs": {"endpoint_url": "http://x"},
        },
        "sinks": [{"name": "hook", "api_token": "tok"}],
        "db": {"Password": "pw", "credentials": {"user": "u"}},
    }
    summary = _summarize([], config=config, started=0.0, finished=1.0, versions={})
    redacted = summary["config"]
    assert redacted["storage_options"] == {
        "key": "***",
        "secret": "***",
        "client_kwargs": {"endpoint_url": "http://x"},
    }
    assert redacted["sinks"] == [{"name": "hook", "api_token": "***"}]
    assert redacted["db"] == {"Password": "***", "credentials": "***"}
    assert redacted["output"] == "s3://bucket/run"
    assert config["storage_options"]["secret"] == "s3cr3t", (
        "the caller's config must not be mutated"
    )

    write_summary(folder, summary)
    text = folder.read_text("summary.json")
    assert "s3cr3t" not in text and "AKIA123" not in text
    assert json.loads(text)["status_counts"] == {"ok": 0, "skipped": 0, "failed": 0}


# --------------------------------------------------------------------------- report.html


def _ok_record_with_images(folder: Folder) -> dict:
    _write_jpeg(folder, "img1/source.jpg", (400, 300))
    _write_jpeg(folder, "img1/out_200x300.jpg", (200, 300), "blue")
    return _record(
        "img1",
        source_rel="img1/source.jpg",
        source_width=400,
        source_height=300,
        outputs=[
            _output(
                "img1/out_200x300.jpg", 200, 300, completeness=0.123456, coherence=2.0, swd=12345.0
            )
        ],
        train_seconds=12.0,
        total_seconds=15.0,
    )


def test_report_escapes_user_text_of_a_failed_record(folder: Folder) -> None:
    record = _record(
        EVIL,
        "failed",
        uri=f"s3://b/{EVIL}",
        error=f"cannot decode {EVIL} & co",
        error_kind="decode",
        carried={EVIL: EVIL},
    )
    page = render_report(folder, [record], title=EVIL)
    assert EVIL not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "cannot decode &lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page
    assert "<script" not in page


def test_report_embeds_thumbnails_of_an_ok_record(folder: Folder) -> None:
    page = render_report(folder, [_ok_record_with_images(folder)], title="run", thumb_px=64)
    assert page.count('src="data:image/jpeg;base64,') == 2
    assert "400x300" in page and "200x300" in page
    assert "0.667" in page and "0.123" in page and "1.23e+04" in page
    assert "image unavailable" not in page
    # Self-contained: nothing fetched from elsewhere.
    assert "http://" not in page and "https://" not in page


def test_report_thumbnails_fit_thumb_px(folder: Folder) -> None:
    page = render_report(folder, [_ok_record_with_images(folder)], title="run", thumb_px=64)
    sizes = []
    for b64 in re.findall(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", page):
        with Image.open(io.BytesIO(base64.b64decode(b64))) as img:
            sizes.append(img.size)
    assert sizes == [(64, 48), (43, 64)]


def test_report_survives_a_missing_image(folder: Folder) -> None:
    record = _ok_record_with_images(folder)
    record["outputs"].append(_output("img1/gone.jpg", 100, 100))
    folder.write_bytes("img1/garbage.jpg", b"not an image")
    record["outputs"].append(_output("img1/garbage.jpg", 50, 100))

    page = render_report(folder, [record], title="run")

    assert page.count("image unavailable") == 2
    assert page.count('src="data:image/jpeg;base64,') == 2
    assert "100x100" in page and "50x100" in page


def test_report_notes_records_beyond_max_items(folder: Folder) -> None:
    records = [_record(f"id-{i}", total_seconds=1.0) for i in range(5)]
    records.append(_record("id-5", "failed", error="x", error_kind="oom"))

    uri = write_report(folder, records, title="run", max_items=2)

    page = folder.read_text("report.html")
    assert uri == folder.uri("report.html")
    assert "id-0" in page and "id-1" in page and "id-2" not in page
    assert "4 more records not shown" in page and "results.parquet" in page
    # The summary bar counts every record, not only the shown ones.
    assert "ok 5" in page and "failed 1" in page and "total 6" in page


def test_report_without_overflow_has_no_note(folder: Folder) -> None:
    page = render_report(folder, [_record("a")], title="run", max_items=1)
    assert "more record" not in page


# --------------------------------------------------------------------------- verdicts


def test_summarize_counts_verdicts() -> None:
    verdicts = [True, True, False, None]
    outputs = [_output(f"v/{i}.png", 32, 16, beats_resize=v) for i, v in enumerate(verdicts)]
    records = [_record("v", outputs=outputs), _record("w", "skipped", outputs=outputs[:1]), _record("f", "failed")]
    summary = _summarize(records, config={}, started=0.0, finished=1.0, versions={})
    assert summary["verdicts"] == {"beats_resize": 3, "loses_to_resize": 1, "unscored": 1}


def test_report_shows_the_resize_beside_each_scored_output(folder: Folder) -> None:
    record = _ok_record_with_images(folder)
    _write_jpeg(folder, "img1/out_800x300.jpg", (800, 300), "green")
    record["outputs"][0].update(resize_completeness=0.2, resize_coherence=3.0, resize_swd=2e4, beats_resize=True)
    record["outputs"].append(_output("img1/out_800x300.jpg", 800, 300, completeness=0.5, coherence=4.0, swd=3e4,
                                     resize_completeness=0.1, resize_coherence=1.0, resize_swd=1e4, beats_resize=False))
    record["outputs"].append(_output("img1/out_100x100.jpg", 100, 100))  # not scored: no resize shown
    _write_jpeg(folder, "img1/out_100x100.jpg", (100, 100), "red")
    page = render_report(folder, [record], title="run", thumb_px=64)
    # source, three outputs, and one resize for each of the two scored outputs
    thumbs = re.findall(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", page)
    assert len(thumbs) == 6
    sizes = []
    for b64 in thumbs:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as img:
            sizes.append(img.size)
    # Each resize has its output's shape, drawn from the source preview.
    assert sizes.count((43, 64)) == 2 and sizes.count((64, 24)) == 2
    assert page.count("<figcaption>bicubic resize") == 2
    assert page.count('class="pair wins"') == 1 and page.count('class="pair loses"') == 1
    assert "beats the resize" in page and "the resize wins" in page
    assert "2e+04" in page  # the resize's own SWD is printed under it


def test_report_prints_a_resize_identical_to_its_source_as_zero_distance(folder: Folder) -> None:
    record = _ok_record_with_images(folder)
    record["outputs"][0].update(resize_completeness=8.7e-10, resize_coherence=8.9e-10, resize_swd=0.0, beats_resize=False)
    page = render_report(folder, [record], title="run", thumb_px=64)
    assert "completeness 0 · coherence 0 · swd 0<" in page
    assert "e-10" not in page


# --------------------------------------------------------------------------- shapes


def _alpha_of(data_url_b64: str) -> Any:
    import numpy as np

    with Image.open(io.BytesIO(base64.b64decode(data_url_b64))) as img:
        assert img.mode == "RGBA"
        return np.asarray(img.getchannel("A"))


def test_report_shows_shaped_outputs_transparent_over_a_checkerboard(folder: Folder) -> None:
    import torch

    from ingan import images
    from ingan.retarget import retarget_mask

    record = _ok_record_with_images(folder)
    shifts = (0.4, -0.4)
    mask = retarget_mask((100, 200), shifts)
    pixels = torch.full((3, 100, 200), 200, dtype=torch.uint8)
    folder.write_bytes("img1/shaped.png", images.encode(pixels, "png", mask=mask))
    folder.write_bytes("img1/shaped.jpg", images.encode(pixels, "jpeg", mask=mask))
    folder.write_bytes("img1/shaped.mask.png", images.encode_mask(mask))
    record["outputs"] = [
        _output("img1/shaped.png", 200, 100, shift_left=0.4, shift_right=-0.4, completeness=1.0, coherence=1.0, swd=1.0,
                resize_completeness=2.0, resize_coherence=2.0, resize_swd=2.0, beats_resize=True),
        _output("img1/shaped.jpg", 200, 100, shift_left=0.4, shift_right=-0.4, mask_rel="img1/shaped.mask.png",
                mask_uri="/out/img1/shaped.mask.png", variant=3, scale=0.8),
    ]
    page = render_report(folder, [record], title="run", thumb_px=64)
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    # The PNG output, the JPEG output given its mask as alpha, and the resize in the same frame.
    assert len(pngs) == 3
    for b64 in pngs:
        alpha = _alpha_of(b64)
        assert alpha.shape == (32, 64)
        assert alpha[0, 0] == 0 and alpha[0, 32] == 255 and alpha[-1].min() > 127  # top corners out, the rest in
    assert page.count('class="output shaped"') == 2 and page.count('class="resize shaped"') == 1
    assert "repeating-conic-gradient" in page  # the checkerboard behind transparent pixels
    assert "corners +0.4 / -0.4" in page and "variant 3 scale 0.8" in page
    assert "bicubic resize, same frame" in page


def test_summarize_counts_shaped_and_variant_outputs() -> None:
    outputs = [_output("a.png", 32, 16), _output("b.png", 32, 16, shift_left=0.2),
               _output("c.png", 32, 16, variant=0, scale=1.0), _output("d.png", 32, 16, variant=1, shift_right=-0.1)]
    summary = _summarize([_record("v", outputs=outputs)], config={}, started=0.0, finished=1.0, versions={})
    assert (summary["outputs_written"], summary["shaped_outputs"], summary["variant_outputs"]) == (4, 2, 2)

"""``report.html``: a run's records as a self-contained HTML contact sheet (the stored table is
``records.results_table``, the counts ``summary.Tally``). Thumbnails are embedded as base64 JPEGs
(PNGs for shaped outputs, shown over a checkerboard where they are transparent) so the file opens
straight from a bucket or a download, with no other files and no network.

All IO goes through ``Folder`` so the writes are atomic and retried like every other output.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from ingan import images
from ingan.retarget import retarget_mask
from pipeline.layout import REPORT_NAME, RESULTS_NAME, source_preview_beside
from pipeline.storage import Folder
from pipeline.summary import Tally, tally

# Thumbnails are read concurrently: on object storage each read is a round trip, and a report
# of a few hundred rows with several outputs each would otherwise take minutes.
_THUMB_READERS = 8
_THUMB_QUALITY = 80

_METRICS = ("completeness", "coherence", "swd", "stretch")


# --------------------------------------------------------------------------- report.html


_CSS = """
:root { --ok: #1a7f37; --skipped: #6e7781; --failed: #cf222e; --line: #d0d7de; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
       color: #1f2328; background: #f6f8fa; }
header { position: sticky; top: 0; z-index: 1; background: #fff; padding: 12px 24px;
         border-bottom: 1px solid var(--line); }
h1 { margin: 0 0 8px; font-size: 20px; }
.bar { display: flex; flex-wrap: wrap; gap: 8px; }
.pill { padding: 2px 10px; border-radius: 999px; background: #eaeef2; font-weight: 600; }
.pill.ok { color: var(--ok); } .pill.skipped { color: var(--skipped); }
.pill.failed { color: var(--failed); }
main { padding: 16px 24px; display: flex; flex-direction: column; gap: 12px; }
.row { display: grid; grid-template-columns: minmax(200px, 280px) 1fr; gap: 16px;
       background: #fff; border: 1px solid var(--line); border-left: 4px solid var(--skipped);
       border-radius: 6px; padding: 12px; }
.row.ok { border-left-color: var(--ok); } .row.failed { border-left-color: var(--failed); }
.meta { min-width: 0; overflow-wrap: anywhere; }
.id { font-weight: 600; }
.uri, .timing, .carried { color: #59636e; font-size: 12px; }
.status { font-weight: 600; text-transform: uppercase; font-size: 12px; }
.status.ok { color: var(--ok); } .status.skipped { color: var(--skipped); }
.status.failed { color: var(--failed); }
.error { margin: 6px 0 0; padding: 6px 8px; background: #ffebe9; border-radius: 4px;
         white-space: pre-wrap; font: 12px/1.4 ui-monospace, monospace; }
.carried { margin: 6px 0 0; display: grid; grid-template-columns: auto 1fr; gap: 0 8px; }
.carried dt { font-weight: 600; } .carried dd { margin: 0; }
.images { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-end; }
figure { margin: 0; display: flex; flex-direction: column; align-items: center; }
figure.source { padding-right: 12px; border-right: 2px dashed var(--line); }
figure img { display: block; border: 1px solid var(--line); }
figure.shaped img { background: repeating-conic-gradient(#c8ccd0 0% 25%, #fff 0% 50%) 0 0 / 12px 12px; }
figcaption { font-size: 11px; color: #59636e; text-align: center; max-width: 200px; }
.placeholder { display: flex; align-items: center; justify-content: center; text-align: center;
               background: #eaeef2; color: #59636e; font-size: 11px; padding: 4px; }
.more { color: #59636e; font-style: italic; }
.runs { margin: 8px 0 0; padding-left: 18px; font-size: 12px; color: #59636e; }
.pair { display: flex; gap: 4px; align-items: flex-end; padding: 4px; border-radius: 6px; }
.pair.wins { background: #dafbe1; } .pair.loses { background: #eaeef2; }
.verdict { font-weight: 600; font-size: 11px; }
.wins .verdict { color: var(--ok); } .loses .verdict { color: #59636e; }
"""


def render_report(
    folder: Folder,
    records: Sequence[Mapping[str, Any]],
    *,
    title: str,
    max_items: int = 200,
    thumb_px: int = 160,
    counts: Tally | None = None,
    runs: Sequence[Mapping[str, Any]] = (),
) -> str:
    """A self-contained HTML contact sheet of the first ``max_items`` records, in manifest order.
    ``counts``: the whole table's, when ``records`` holds only the first ones; ``runs``: the runs
    whose rows the table holds (``results.describe``), each with its rows' statuses."""
    shown = records[:max_items]
    counts = counts or tally(records)
    thumbs = _thumbnails(folder, _image_rels(shown), thumb_px)
    thumbs.update(_resize_thumbnails(folder, shown, thumb_px))
    rows = [_record_html(r, thumbs, thumb_px) for r in shown]
    hidden = counts.total - len(shown)
    if hidden > 0:
        rows.append(
            f'<p class="more">{hidden} more record{"s" if hidden != 1 else ""} not shown; '
            f"all {counts.total} are in {RESULTS_NAME}.</p>"
        )
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>{_esc(title)}</h1>{_summary_bar(counts, len(shown))}{_runs_html(runs)}</header>\n"
        "<main>\n" + "\n".join(rows) + "\n</main>\n</body>\n</html>\n"
    )


def write_report(
    folder: Folder, records: Sequence[Mapping[str, Any]], *, title: str, max_items: int = 200,
    counts: Tally | None = None,
) -> str:
    """Write ``report.html`` and return its URI."""
    return folder.write_text(
        REPORT_NAME, render_report(folder, records, title=title, max_items=max_items, counts=counts)
    )


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _fmt_metric(value: float) -> str:
    # A resize to the source's own size is the source: its distances are float noise (1e-9).
    return "0" if abs(value) < 1e-6 else _fmt(value)


def _summary_bar(counts: Tally, shown: int) -> str:
    pills = [f'<span class="pill">total {counts.total}</span>']
    pills += [
        f'<span class="pill {_esc(s)}">{_esc(s)} {n}</span>'
        for s, n in counts.status_counts().items()
    ]
    if shown < counts.total:
        pills.append(f'<span class="pill">showing first {shown}</span>')
    return f'<div class="bar">{"".join(pills)}</div>'


def _runs_html(runs: Sequence[Mapping[str, Any]]) -> str:
    """Which run wrote which rows, where the table holds more than one run's."""
    if len(runs) < 2:
        return ""
    lines = "".join(
        f"<li><code>{_esc(r['run'])}</code>: {r['rows']} rows ("
        + ", ".join(f"{_esc(s)} {n}" for s, n in r["status_counts"].items() if n) + ")"
        + (f", {_esc(r['started_utc'])} to {_esc(r['finished_utc'])}" if r.get("started_utc") else "") + "</li>"
        for r in runs)
    return f'<ul class="runs">{lines}</ul>'


def stored_records(folder: Folder, records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Records read back from a results table, with the paths the contact sheet reads its images
    from (the table keeps URIs, not paths): each output's and mask's from its URI, the source
    preview's from beside the row's model."""
    out = []
    for r in records:
        model_rel = folder.rel_of(r.get("model_uri"))
        outputs = [{**o, "rel": folder.rel_of(o.get("uri")), "mask_rel": folder.rel_of(o.get("mask_uri"))}
                   for o in r.get("outputs") or []]
        out.append({**r, "outputs": outputs, "source_rel": source_preview_beside(model_rel) if model_rel else None})
    return out


def _image_rels(records: Iterable[Mapping[str, Any]]) -> dict[str, str | None]:
    """Every image path the shown rows need, each once, in display order, with the mask file
    that holds its frame (a shaped JPEG) or None."""
    rels: dict[str, str | None] = {}
    for r in records:
        if r.get("source_rel"):
            rels[r["source_rel"]] = None
        for o in r.get("outputs") or []:
            if o.get("rel"):
                rels[o["rel"]] = o.get("mask_rel")
    return rels


def _thumbnails(folder: Folder, rels: Mapping[str, str | None], thumb_px: int) -> dict[str, str | None]:
    """rel -> ``data:`` URI of its thumbnail, or None where it could not be read or decoded."""
    with ThreadPoolExecutor(max_workers=_THUMB_READERS) as pool:
        return dict(zip(rels, pool.map(lambda kv: _thumbnail(folder, kv[0], thumb_px, kv[1]), rels.items()), strict=True))


def _shifts(output: Mapping[str, Any]) -> tuple[float, float] | None:
    left, right = output.get("shift_left") or 0.0, output.get("shift_right") or 0.0
    return None if left == 0.0 and right == 0.0 else (float(left), float(right))


def _resize_key(source_rel: str, width: int, height: int, shifts: tuple[float, float] | None = None) -> str:
    return f"resize:{width}x{height}:{shifts}:{source_rel}"


def _resize_thumbnails(folder: Folder, records: Sequence[Mapping[str, Any]], thumb_px: int) -> dict[str, str | None]:
    """A bicubic resize of each source to each of its outputs' shapes (put through the same
    frame when shaped), drawn from the source preview: what a plain resize gives at that size, to
    look at beside the output."""
    Shape = tuple[int, int, tuple[float, float] | None]
    wanted: dict[str, set[Shape]] = {}
    for r in records:
        if r.get("source_rel"):
            shapes = {(o["width"], o["height"], _shifts(o)) for o in r.get("outputs") or [] if o.get("width") and o.get("height")}
            if shapes:
                wanted.setdefault(r["source_rel"], set()).update(shapes)

    def one(item: tuple[str, set[Shape]]) -> dict[str, str | None]:
        rel, shapes = item
        try:
            with Image.open(io.BytesIO(folder.read_bytes(rel))) as img:
                src = images.from_pil(img)
        except Exception:  # noqa: BLE001 - best effort, as for every thumbnail
            return {_resize_key(rel, w, h, sh): None for w, h, sh in shapes}
        out = {}
        for w, h, sh in shapes:
            scale = thumb_px / max(w, h)
            size = (max(8, round(h * scale)), max(8, round(w * scale)))
            small = images.shaped_resize(src, size, sh)
            mask = None if sh is None else retarget_mask(size, sh)
            fmt = images.FORMATS["png" if mask is not None else "jpeg"]
            out[_resize_key(rel, w, h, sh)] = _data_url(images.encode(small, fmt.name, _THUMB_QUALITY, mask=mask),
                                                        fmt.mime)
        return out

    result: dict[str, str | None] = {}
    with ThreadPoolExecutor(max_workers=_THUMB_READERS) as pool:
        for part in pool.map(one, wanted.items()):
            result.update(part)
    return result


def _thumbnail(folder: Folder, rel: str, thumb_px: int, mask_rel: str | None = None) -> str | None:
    try:
        with Image.open(io.BytesIO(folder.read_bytes(rel))) as img:
            if mask_rel:
                # A shaped JPEG: its frame comes from the mask file, so the preview shows the shape.
                with Image.open(io.BytesIO(folder.read_bytes(mask_rel))) as mask:
                    img = img.convert("RGB")
                    img.putalpha(mask.convert("L"))
            data, mime = images.thumbnail(img, thumb_px, _THUMB_QUALITY)
    except Exception:  # noqa: BLE001 - the report is best effort: one bad image must not sink it
        return None
    return _data_url(data, mime)


def _data_url(data: bytes, mime: str = "image/jpeg") -> str:
    """An image inlined in the page: the report is one self-contained file."""
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _record_html(record: Mapping[str, Any], thumbs: Mapping[str, str | None], thumb_px: int) -> str:
    status = str(record.get("status"))
    figures = [_source_figure(record, thumbs, thumb_px)]
    figures += [_output_figure(o, thumbs, thumb_px, record.get("source_rel")) for o in record.get("outputs") or []]
    return (
        f'<section class="row {_esc(status)}">'
        f'<div class="meta">{_meta_html(record, status)}</div>'
        f'<div class="images">{"".join(figures)}</div>'
        "</section>"
    )


def _meta_html(record: Mapping[str, Any], status: str) -> str:
    parts = [
        f'<div class="id">{_esc(record.get("id"))}</div>',
        f'<div class="uri">{_esc(record.get("uri") or "")}</div>',
        f'<div class="status {_esc(status)}">{_esc(status)}'
        + (f" · {_esc(record['error_kind'])}" if record.get("error_kind") else "")
        + "</div>",
    ]
    timing = _timing_text(record)
    if timing:
        parts.append(f'<div class="timing">{_esc(timing)}</div>')
    if status == "failed" and record.get("error"):
        parts.append(f'<pre class="error">{_esc(record["error"])}</pre>')
    carried = record.get("carried") or {}
    if carried:
        items = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in carried.items())
        parts.append(f'<dl class="carried">{items}</dl>')
    return "".join(parts)


def _timing_text(record: Mapping[str, Any]) -> str:
    bits = []
    if record.get("train_seconds") is not None:
        bits.append(f"train {_fmt(record['train_seconds'])} s")
    elif record.get("status") == "ok" and record.get("model_uri"):
        bits.append("model reused")
    if record.get("total_seconds") is not None:
        bits.append(f"total {_fmt(record['total_seconds'])} s")
    if (record.get("attempts") or 0) > 1:
        bits.append(f"{record['attempts']} attempts")
    return " · ".join(bits)


def _source_figure(
    record: Mapping[str, Any], thumbs: Mapping[str, str | None], thumb_px: int
) -> str:
    caption = ["source"]
    if record.get("source_width") and record.get("source_height"):
        caption.append(f"{record['source_width']}x{record['source_height']}")
    return _figure(record.get("source_rel"), thumbs, thumb_px, " ".join(caption), "source")


def _output_figure(
    output: Mapping[str, Any], thumbs: Mapping[str, str | None], thumb_px: int, source_rel: str | None = None
) -> str:
    shifts = _shifts(output)
    caption = [f"{output.get('width')}x{output.get('height')}"]
    if output.get("ratio") is not None:
        caption.append(f"ratio {_fmt(output['ratio'])}")
    if shifts is not None:
        caption.append(f"corners {shifts[0]:+g} / {shifts[1]:+g}")
    if output.get("variant") is not None:
        caption.append(f"variant {output['variant']}" + (f" scale {_fmt(output['scale'])}" if output.get("scale") else ""))
    caption += [f"{m} {_fmt_metric(output[m])}" for m in _METRICS if output.get(m) is not None]
    shaped = " shaped" if shifts is not None else ""
    figure = _figure(
        output.get("rel"), thumbs, thumb_px, " · ".join(caption), "output" + shaped, output.get("uri"),
        missing="in the shards only" if output.get("shard_key") else "no image",
    )
    verdict = output.get("beats_resize")
    if verdict is None or not source_rel:
        return figure
    resize_caption = ["bicubic resize" + (", same frame" if shifts is not None else "")]
    resize_caption += [f"{m} {_fmt_metric(output['resize_' + m])}" for m in _METRICS if output.get("resize_" + m) is not None]
    resize = _figure(_resize_key(source_rel, output["width"], output["height"], shifts), thumbs, thumb_px,
                     " · ".join(resize_caption), "resize" + shaped)
    label = "beats the resize" if verdict else "the resize wins"
    return (f'<div class="pair {"wins" if verdict else "loses"}">{figure}{resize}'
            f'<span class="verdict">{label}</span></div>')


def _figure(
    rel: str | None,
    thumbs: Mapping[str, str | None],
    thumb_px: int,
    caption: str,
    css_class: str,
    tooltip: str | None = None,
    missing: str = "no image",
) -> str:
    src = thumbs.get(rel) if rel else None
    if src:
        picture = f'<img src="{src}" alt="{_esc(caption)}">'
    else:
        reason = "image unavailable" if rel else missing
        picture = (
            f'<div class="placeholder" style="width:{thumb_px}px;height:{thumb_px // 2}px">'
            f"{reason}</div>"
        )
    title = f' title="{_esc(tooltip)}"' if tooltip else ""
    return f'<figure class="{css_class}"{title}>{picture}<figcaption>{_esc(caption)}</figcaption></figure>'

"""Hostile, broken and unusual inputs through real runs (``pipeline.driver.main`` on one local Ray
instance for the module): each bad row ends as its own specific failure row while the others
succeed, each odd-but-valid image is processed to the exact promised sizes, untrusted ids never
write outside the output folder, and credentials never reach a log or an output file.

Access denied is real, not simulated: tests run as root (a mode-000 file stays readable), so the
denied object lives on a private moto S3 server with IAM authentication switched on, read with the
keys of an IAM user that has no permissions.

Runs are tiny on purpose (``tiny`` preset, 2 iterations, no metrics, images of a few dozen
pixels). See docs/reliability_inputs.md for the table of every input tried.
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support import image_bytes as _encode
from support import parquet_bytes as _parquet_bytes
from support import run_main as _run_main
from support import s3_config

from pipeline import driver, executor, layout
from pipeline.config import RunConfig
from pipeline.storage import Folder, Storage
from pipeline.task import Item, Job

SIZE = (40, 30)  # the one explicit size every run asks for, besides ratio 1
BASE_FLAGS = ["--preset", "tiny", "--iterations", "2", "--seed", "3", "--no-metrics"]

# Distinctive credentials (moto without IAM accepts any): if either string shows up in the log,
# the results or any output object, a secret leaked.
ACCESS_KEY = "AKIAINPUTSTESTZ9Q4WK"
SECRET_KEY = "inputs-secret-Qx81vLm3Tz"


# --------------------------------------------------------------------------- image makers


def _photo(w: int = 48, h: int = 48, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: something with texture to train on."""
    y, x = np.mgrid[0:h, 0:w]
    rnd = np.random.RandomState(seed).randint(0, 60, (h, w, 3))
    arr = np.stack([x * 200 // max(w, 1), y * 200 // max(h, 1), (x + y) * 100 // max(w + h, 1)], -1)
    return Image.fromarray((arr + rnd).clip(0, 255).astype(np.uint8), "RGB")


def _png_declaring(w: int, h: int) -> bytes:
    """A real 8x8 PNG whose IHDR (and its CRC) is patched to declare ``w`` x ``h``."""
    data = _encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG")
    assert data[12:16] == b"IHDR"
    ihdr = struct.pack(">II", w, h) + data[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return data[:16] + ihdr + crc + data[33:]


RED, GREEN, BLUE = (220, 30, 30), (30, 200, 40), (30, 40, 220)


def _frames(fmt: str) -> bytes:
    frames = [Image.new("RGB", (48, 48), c) for c in (RED, GREEN, BLUE)]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:])


def _half_transparent(mode: str) -> Image.Image:
    """Left half opaque, right half fully transparent (black underneath)."""
    if mode == "RGBA":
        im = Image.new("RGBA", (48, 48), (0, 0, 0, 0))
        im.paste((30, 40, 220, 255), (0, 0, 24, 48))
    elif mode == "LA":
        im = Image.new("LA", (48, 48), (0, 0))
        im.paste((90, 255), (0, 0, 24, 48))
    else:  # P with a transparent palette index
        im = Image.new("P", (48, 48), 0)
        im.putpalette([0, 0, 0, 30, 200, 40] + [0, 0, 0] * 254)
        im.paste(1, (0, 0, 24, 48))
        im.info["transparency"] = 0
    return im


def _exif_rotated() -> bytes:
    """Stored 64x40, EXIF orientation 6 (rotate 90 CW to view): the upright image is 40x64."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(_photo(64, 40), "JPEG", exif=exif.tobytes())


def _sixteen_bit() -> bytes:
    ramp = np.linspace(0, 65535, 48 * 48).reshape(48, 48).astype(np.uint16)
    im = Image.fromarray(ramp)
    assert im.mode == "I;16"
    return _encode(im, "PNG")


# --------------------------------------------------------------------------- the cases

# A case is one manifest row: its id is the case name. ``data`` writes a file under the
# manifest's folder (uri relative to the manifest) unless ``uri`` is given.


@dataclass(frozen=True)
class Bad:
    kind: str
    phrases: tuple[str, ...]
    data: Callable[[], bytes] | None = None
    name: str = ""
    uri: str | None = None
    null_uri: bool = False


@dataclass(frozen=True)
class Odd:
    data: Callable[[], bytes]
    name: str
    source: tuple[int, int]  # (W, H) after decoding


BAD: dict[str, Bad] = {
    "zero_byte": Bad("decode", ("empty file (0 bytes)",), lambda: b"", "empty.png"),
    "truncated_jpeg": Bad(
        "decode",
        ("corrupt or truncated image",),
        lambda: _encode(_photo(), "JPEG")[:400],
        "cut.jpg",
    ),
    "truncated_png": Bad(
        "decode",
        ("corrupt or truncated image",),
        lambda: _encode(_photo(), "PNG")[:300],
        "cut.png",
    ),
    "html_named_jpg": Bad(
        "decode",
        ("not a recognised image format (looks like text/HTML)",),
        lambda: b"<!DOCTYPE html>\n<html><body><h1>403 Forbidden</h1></body></html>\n",
        "page.jpg",
    ),
    "bomb_30000x30000": Bad(
        # Far past any limit: refused from the header, before a pixel is decoded.
        "decode",
        ("declared size 30000x30000 (900,000,000 pixels) exceeds the 64,000,000-pixel limit", "decompression bomb"),
        lambda: _png_declaring(30000, 30000),
        "bomb.png",
    ),
    "bomb_10000x10000": Bad(
        # Between the run's 64 MP limit and Pillow's: refused by the run's own header check.
        "decode",
        ("declared size 10000x10000 (100,000,000 pixels) exceeds the 64,000,000-pixel limit",),
        lambda: _png_declaring(10000, 10000),
        "bomb2.png",
    ),
    "tiny_1x1": Bad(
        "too_small",
        ("image is 1x1: at least 24 px per side",),
        lambda: _encode(Image.new("RGB", (1, 1), RED), "PNG"),
        "dot.png",
    ),
    "tiny_8x8": Bad(
        "too_small",
        ("image is 8x8: at least 24 px per side",),
        lambda: _encode(_photo(8, 8), "PNG"),
        "speck.png",
    ),
    "extreme_4000x10": Bad(
        "too_small",
        ("image is 4000x10: at least 24 px per side",),
        lambda: _encode(_photo(4000, 10), "PNG"),
        "strip.png",
    ),
    "missing_file": Bad("not_found", ("object not found", "gone.png"), uri="gone.png"),
    "a_directory": Bad("storage", ("IsADirectoryError", "subdir"), uri="subdir"),
    "access_denied": Bad(
        "access_denied",
        ("access denied", "Forbidden", "s3://locked/secret.png"),
        uri="s3://locked/secret.png",
    ),
    "ftp_scheme": Bad(
        "uri", ("URI scheme 'ftp' is not allowed (allowed: file, s3)",), uri="ftp://host/a.png"
    ),
    "http_scheme": Bad(
        "uri", ("URI scheme 'http' is not allowed",), uri="http://169.254.169.254/latest/meta-data"
    ),
    # Schemes are matched as written: "S3" is not "s3" (fsspec would not know it either).
    "uppercase_scheme": Bad(
        "uri", ("URI scheme 'S3' is not allowed (allowed: file, s3)",), uri="S3://bucket/a.png"
    ),
    "s3_no_bucket": Bad("uri", ("S3 URI has no bucket",), uri="s3:///key.png"),
    "malformed_no_scheme": Bad("uri", ("malformed URI scheme in '://nope'",), uri="://nope"),
    # No "://": these are relative paths (relative to the manifest) that do not exist.
    "malformed_s3_one_slash": Bad("not_found", ("object not found", "s3:/x"), uri="s3:/x"),
    "malformed_http_no_colon": Bad("not_found", ("object not found", "http//x"), uri="http//x"),
    "control_chars": Bad("uri", ("URI contains control characters",), uri="a\tb\n.png"),
    "empty_uri": Bad("uri", ("URI is empty",), uri=""),
    "null_uri": Bad("uri", ("URI is null",), null_uri=True),
}

ODD: dict[str, Odd] = {
    "gray_L": Odd(lambda: _encode(_photo(56, 48).convert("L"), "PNG"), "gray.png", (56, 48)),
    "gray_alpha_LA": Odd(lambda: _encode(_half_transparent("LA"), "PNG"), "la.png", (48, 48)),
    "rgba": Odd(lambda: _encode(_half_transparent("RGBA"), "PNG"), "rgba.png", (48, 48)),
    "palette_P": Odd(lambda: _encode(_photo().quantize(16), "PNG"), "palette.png", (48, 48)),
    "palette_transparent": Odd(
        lambda: _encode(_half_transparent("P"), "PNG"), "ptrans.png", (48, 48)
    ),
    "cmyk_jpeg": Odd(
        lambda: _encode(Image.new("CMYK", (48, 48), (0, 255, 255, 0)), "JPEG"), "cmyk.jpg", (48, 48)
    ),
    "png_16bit": Odd(_sixteen_bit, "deep.png", (48, 48)),
    "exif_orientation_6": Odd(_exif_rotated, "rotated.jpg", (40, 64)),
    "animated_gif": Odd(lambda: _frames("GIF"), "anim.gif", (48, 48)),
    "multipage_tiff": Odd(lambda: _frames("TIFF"), "pages.tif", (48, 48)),
    "wide_2000x30": Odd(lambda: _encode(_photo(2000, 30), "PNG"), "wide.png", (2000, 30)),
    "panorama_200x24": Odd(lambda: _encode(_photo(200, 24), "PNG"), "pano.png", (200, 24)),
    "png_named_jpg": Odd(lambda: _encode(_photo(seed=4), "PNG"), "really-png.jpg", (48, 48)),
    "webp": Odd(lambda: _encode(_photo(seed=5), "WEBP"), "photo.webp", (48, 48)),
    "bmp": Odd(lambda: _encode(_photo(seed=6), "BMP"), "photo.bmp", (48, 48)),
    "good_png": Odd(lambda: _encode(_photo(seed=1), "PNG"), "good.png", (48, 48)),
    "good_jpeg": Odd(lambda: _encode(_photo(52, 48, seed=2), "JPEG"), "good.jpg", (52, 48)),
}


# --------------------------------------------------------------------------- fixtures








def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())


def _assert_no_leak(secrets: tuple[str, ...], blobs: dict[str, bytes]) -> None:
    for name, data in blobs.items():
        for secret in secrets:
            assert secret.encode() not in data, f"{secret!r} leaked into {name}"


@dataclass
class AuthS3:
    endpoint: str
    key: str
    secret: str


@pytest.fixture(scope="module")
def denying_s3(start_moto: Callable[[], str]) -> AuthS3:
    """A private moto S3 server with IAM authentication on, holding ``s3://locked/secret.png``,
    and the keys of an IAM user with no permissions: every read with them is a real 403."""
    import boto3

    url = start_moto()
    # Set up while authentication is still off (moto's default)...
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    s3.create_bucket(Bucket="locked")
    s3.put_object(Bucket="locked", Key="secret.png", Body=_encode(_photo(), "PNG"))
    iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1")
    iam.create_user(UserName="nobody")
    key = iam.create_access_key(UserName="nobody")["AccessKey"]
    # ...then enforce IAM for every request from now on.
    req = urllib.request.Request(
        f"{url}/moto-api/reset-auth",
        data=b"0",
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    urllib.request.urlopen(req, timeout=10).close()
    return AuthS3(url, key["AccessKeyId"], key["SecretAccessKey"])


@dataclass
class InputsRun:
    code: int
    log: str
    out: Path
    rows: dict[str, dict[str, Any]]
    order: list[str | None]
    ids: list[str]
    secrets: tuple[str, str]


@pytest.fixture(scope="module")
def inputs_run(
    local_ray: None, denying_s3: AuthS3, tmp_path_factory: pytest.TempPathFactory
) -> InputsRun:
    """ONE run over every broken and every odd-but-valid input: local manifest, local output."""
    work = tmp_path_factory.mktemp("inputs")
    data = work / "data"
    (data / "subdir").mkdir(parents=True)
    ids: list[str] = []
    uris: list[str | None] = []
    for case, bad in BAD.items():
        if bad.data is not None:
            (data / bad.name).write_bytes(bad.data())
        ids.append(case)
        uris.append(None if bad.null_uri else bad.uri if bad.uri is not None else bad.name)
    for case, odd in ODD.items():
        (data / odd.name).write_bytes(odd.data())
        ids.append(case)
        # One absolute path, the rest relative to the manifest.
        uris.append(str(data / odd.name) if case == "good_png" else odd.name)
    manifest = data / "manifest.parquet"
    pq.write_table(
        pa.table({"uri": pa.array(uris, pa.string()), "id": ids, "row": list(range(len(ids)))}),
        manifest,
    )
    config = s3_config(work / "run.yaml", denying_s3.key, denying_s3.secret, denying_s3.endpoint)
    out = work / "out"
    code, log = _run_main(
        [str(manifest), "--output", str(out), "--config", str(config), *BASE_FLAGS,
         "--ratios", "1", "--sizes", f"{SIZE[0]}x{SIZE[1]}"]
    )  # fmt: skip
    rows = {}
    if (out / "results.parquet").is_file():
        rows = {r["id"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}
    return InputsRun(code, log, out, rows, uris, ids, (denying_s3.key, denying_s3.secret))


def _preview(row: dict[str, Any]) -> np.ndarray:
    """The decoded source as the run saved it (``source.jpg`` beside the model)."""
    path = Path(row["model_uri"]).with_name("source.jpg")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64)


# --------------------------------------------------------------------------- 1. broken inputs


@pytest.mark.slow
def test_one_run_keeps_every_row_and_exits_1(inputs_run: InputsRun) -> None:
    run = inputs_run
    assert run.code == 1, run.log
    table = pq.read_table(run.out / "results.parquet")
    assert table.column("id").to_pylist() == run.ids  # every row, in manifest order
    assert table.column("row").to_pylist() == list(range(len(run.ids)))  # carried column
    statuses = {r["id"]: r["status"] for r in table.to_pylist()}
    assert statuses == {**dict.fromkeys(BAD, "failed"), **dict.fromkeys(ODD, "ok")}
    summary_kinds: dict[str, int] = {}
    for bad in BAD.values():
        summary_kinds[bad.kind] = summary_kinds.get(bad.kind, 0) + 1
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["error_kinds"] == summary_kinds
    assert summary["status_counts"] == {"ok": len(ODD), "skipped": 0, "failed": len(BAD)}
    assert f"ok={len(ODD)} skipped=0 failed={len(BAD)}" in run.log
    assert (
        "failed zero_byte: [decode] empty file (0 bytes)" in run.log
    )  # the first failures are logged


@pytest.mark.parametrize("case", list(BAD))
def test_broken_input_is_a_specific_failure_row(inputs_run: InputsRun, case: str) -> None:
    bad, row = BAD[case], inputs_run.rows[case]
    assert (row["status"], row["error_kind"]) == ("failed", bad.kind), row
    for phrase in bad.phrases:
        assert phrase in row["error"], row["error"]
    assert "Traceback" not in row["error"] and len(row["error"]) < 600
    assert row["outputs"] == [] and row["model_uri"] is None and row["train_seconds"] is None
    # Nothing was written for it: no folder under items/.
    assert not (inputs_run.out / "items" / layout.item_key(case)).exists()


def test_no_credentials_in_the_log_or_the_outputs(inputs_run: InputsRun) -> None:
    blobs = {str(p): p.read_bytes() for p in _all_files(inputs_run.out)}
    blobs["driver log"] = inputs_run.log.encode()
    assert len(blobs) > 20
    _assert_no_leak(inputs_run.secrets, blobs)


# --------------------------------------------------------------------------- 2. odd but valid


@pytest.mark.parametrize("case", list(ODD))
def test_odd_but_valid_input_is_processed_exactly(inputs_run: InputsRun, case: str) -> None:
    odd, row = ODD[case], inputs_run.rows[case]
    assert (row["status"], row["error"], row["error_kind"]) == ("ok", None, None), row
    assert (row["source_width"], row["source_height"]) == odd.source
    assert row["train_seconds"] is not None and row["train_seconds"] > 0
    w, h = odd.source
    expected = [(h, h), SIZE]  # ratio 1 keeps the height; then the explicit size
    assert [(o["width"], o["height"]) for o in row["outputs"]] == expected
    for o in row["outputs"]:
        path = Path(o["uri"])
        assert path.is_relative_to(inputs_run.out / "items" / layout.item_key(case))
        with Image.open(path) as im:
            assert im.size == (o["width"], o["height"]) and im.mode == "RGB"
    # The preview is the decoded source, at most 256 px on the longer side.
    preview = _preview(row)
    scale = min(1.0, 256 / max(w, h))
    assert abs(preview.shape[1] - w * scale) <= 1 and abs(preview.shape[0] - h * scale) <= 1


def _close(color: np.ndarray, expected: tuple[int, int, int], tol: float = 25) -> bool:
    return bool(np.all(np.abs(color - np.array(expected)) <= tol))


@pytest.mark.parametrize("case", ["animated_gif", "multipage_tiff"])
def test_multi_frame_input_uses_its_first_frame(inputs_run: InputsRun, case: str) -> None:
    mean = _preview(inputs_run.rows[case]).mean(axis=(0, 1))
    assert _close(mean, RED), f"{case}: preview mean {mean} is not frame 0's {RED}"


@pytest.mark.parametrize(
    ("case", "opaque"),
    [("rgba", BLUE), ("gray_alpha_LA", (90, 90, 90)), ("palette_transparent", GREEN)],
)
def test_transparency_is_composited_over_white(
    inputs_run: InputsRun, case: str, opaque: tuple[int, int, int]
) -> None:
    preview = _preview(inputs_run.rows[case])
    left, right = preview[:, 4:20].mean(axis=(0, 1)), preview[:, 28:44].mean(axis=(0, 1))
    assert _close(left, opaque), f"{case}: opaque half {left}, expected {opaque}"
    assert _close(right, (255, 255, 255), tol=12), f"{case}: transparent half {right}, not white"


def test_cmyk_becomes_the_right_rgb(inputs_run: InputsRun) -> None:
    mean = _preview(inputs_run.rows["cmyk_jpeg"]).mean(axis=(0, 1))
    assert _close(mean, (255, 0, 0), tol=30), mean


def test_sixteen_bit_is_scaled_not_clipped(inputs_run: InputsRun) -> None:
    preview = _preview(inputs_run.rows["png_16bit"])
    # A 0..65535 ramp scaled to 8 bits averages mid-grey; clipping would give almost all white.
    assert 115 < preview.mean() < 140, preview.mean()
    assert preview[:2].mean() < 20 and preview[-2:].mean() > 235  # dark top, bright bottom


def test_exif_rotation_is_applied(inputs_run: InputsRun) -> None:
    row = inputs_run.rows["exif_orientation_6"]
    assert (row["source_width"], row["source_height"]) == (40, 64)  # stored as 64x40
    assert _preview(row).shape[:2] == (64, 40)


# --------------------------------------------------------------------------- 4. untrusted ids

ODD_BUT_LEGAL_IDS = [
    "a_b",
    "a b",
    "x" * 2000,
    "ü-ñ-漢字",
    ".hidden",
    "-rf",
    "...",
    "a:b",
    "%2e%2e%2f",
    "CON",
    "a\u202eb",
    "🙂",
]
HOSTILE_IDS = ["../escape", "/abs/id", "a/b", "a_b", "x\n\ty", "..", "y" * 2000, "a\\b"]


def _listing(path: Path) -> set[str]:
    return set(os.listdir(path)) if path.is_dir() else set()


def _assert_contained(out: Path, ids: list[str], tag: str, before: dict[Path, set[str]]) -> None:
    root = out.resolve()
    files = _all_files(out)
    assert files
    for f in files:
        assert not f.is_symlink(), f
        assert f.resolve().is_relative_to(root), f
    for where, names in before.items():
        assert _listing(where) == names, f"new entries in {where}: {_listing(where) - names}"
    folders = sorted(os.listdir(out / "items"))
    assert len(folders) == len(ids)  # one distinct folder per id
    assert sorted(layout.item_key(i) for i in ids) == folders
    for item_id in ids:
        assert (out / layout.marker_path(item_id, tag)).is_file()


def _watch(*paths: Path) -> dict[Path, set[str]]:
    return {p: _listing(p) for p in paths}


@pytest.mark.parametrize("ids", [ODD_BUT_LEGAL_IDS, HOSTILE_IDS], ids=["odd", "hostile"])
def test_ids_through_a_real_run_stay_inside_the_output(local_ray: None, tmp_path: Path, ids: list[str]) -> None:
    src = tmp_path / "a.png"
    _photo(32, 32).save(src)
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"uri": ["a.png"] * len(ids), "id": ids}), manifest)
    out = tmp_path / "out"
    before = _watch(tmp_path.parent, tmp_path, Path("/"))
    code, log = _run_main([str(manifest), "--output", str(out), *BASE_FLAGS, "--ratios", "1"])
    assert code == 0, log
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert [r["id"] for r in rows] == ids  # kept exactly, in order
    assert all(r["status"] == "ok" for r in rows), rows
    before[tmp_path] |= {"out"}
    tag = json.loads((out / "config.json").read_text())["model_tag"]
    _assert_contained(out, ids, tag, before)
    assert not Path("/abs").exists()


def test_hostile_ids_handed_to_tasks_directly_cannot_escape_or_collide(
    local_ray: None, tmp_path: Path
) -> None:
    """The same through the executor alone: the layout, not the manifest, keeps them contained."""
    src = tmp_path / "a.png"
    _photo(32, 32).save(src)
    out = tmp_path / "deep" / "out"
    cfg = driver.absolute_output(
        RunConfig(output=str(out), preset="tiny", iterations=2, metrics=False, ratios=[1.0])
    )
    job = Job.of(cfg, "tiny")
    items = [Item(i, item_id, str(src), {}) for i, item_id in enumerate(HOSTILE_IDS)]
    before = _watch(tmp_path.parent, tmp_path, tmp_path / "deep", Path("/"))
    records: dict[str, dict[str, Any]] = {}
    executor.run_items(
        items,
        job,
        executor.Resources(1, 0, 4, 0, None),
        lambda item, rec: records.__setitem__(item.id, rec),
    )
    assert sorted(records) == sorted(HOSTILE_IDS)
    assert all(r["status"] == "ok" for r in records.values()), records
    before[tmp_path] |= {"deep"}
    before[tmp_path / "deep"] = {"out"}
    _assert_contained(out, HOSTILE_IDS, job.tag, before)
    assert not Path("/abs").exists()


# --------------------------------------------------------------------------- 6. secrets


def test_secrets_stay_out_of_logs_and_outputs_when_reads_fail(
    local_ray: None,
    s3_client: Any,
    s3_bucket: str,
    s3_endpoint: str,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    s3_client.put_object(Bucket=s3_bucket, Key="in/page.jpg", Body=b"<html>nope</html>")
    wrong_bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    uris = [
        f"s3://{wrong_bucket}/a.png",
        f"s3://{s3_bucket}/in/missing.png",
        f"s3://{s3_bucket}/in/page.jpg",
    ]
    s3_client.put_object(
        Bucket=s3_bucket, Key="in/manifest.parquet", Body=_parquet_bytes(pa.table({"uri": uris}))
    )
    config = s3_config(tmp_path / "run.yaml", ACCESS_KEY, SECRET_KEY, s3_endpoint)
    code = driver.main(
        [f"s3://{s3_bucket}/in/manifest.parquet", "--output", f"s3://{s3_bucket}/out",
         "--config", str(config), *BASE_FLAGS, "--ratios", "1"]
    )  # fmt: skip
    # The manifest itself unreadable (wrong bucket): the exit-2 path's message, too.
    code_manifest = driver.main(
        [f"s3://{wrong_bucket}/manifest.parquet", "--output", f"s3://{s3_bucket}/out2",
         "--config", str(config), *BASE_FLAGS]
    )  # fmt: skip
    time.sleep(0.5)  # let Ray forward what the workers printed
    captured = capfd.readouterr()
    assert code == 1, captured.err
    assert code_manifest == 2 and wrong_bucket in captured.err, captured.err
    data = s3_client.get_object(Bucket=s3_bucket, Key="out/results.parquet")["Body"].read()
    rows = pq.read_table(io.BytesIO(data)).to_pylist()
    assert [(r["status"], r["error_kind"]) for r in rows] == [
        ("failed", "not_found"),
        ("failed", "not_found"),
        ("failed", "decode"),
    ], rows
    assert wrong_bucket in rows[0]["error"] and "missing.png" in rows[1]["error"]
    blobs = {"stdout": captured.out.encode(), "stderr": captured.err.encode()}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix="out"):
        for obj in page.get("Contents", []):
            blobs[obj["Key"]] = s3_client.get_object(Bucket=s3_bucket, Key=obj["Key"])[
                "Body"
            ].read()
    assert {"out/results.parquet", "out/summary.json", "out/config.json", "out/report.html"} <= set(
        blobs
    )
    _assert_no_leak((ACCESS_KEY, SECRET_KEY), blobs)
    # Only the option names are kept, never their values.
    assert b'"key"' in blobs["out/config.json"] and b'"secret"' in blobs["out/config.json"]


def test_reprs_never_show_credentials() -> None:
    options = {"key": ACCESS_KEY, "secret": SECRET_KEY}
    cfg = RunConfig(output="s3://bucket/out", storage_options=options)
    job = Job.of(cfg, "tiny")
    texts = {
        "Folder repr": repr(Folder("/tmp/somewhere", Storage(options))),
        "RunConfig repr": repr(cfg),
        "RunConfig str": str(cfg),
        "Job repr": repr(job),
        "Storage repr": repr(cfg.storage()),
        "public_dict": str(cfg.public_dict()),
    }
    _assert_no_leak((ACCESS_KEY, SECRET_KEY), {k: v.encode() for k, v in texts.items()})
    assert cfg.storage().options["secret"] == SECRET_KEY  # still there for the filesystem


# --------------------------------------------------------------------------- 7. allowed schemes


def test_allowed_schemes_refuse_local_files(
    local_ray: None, s3_client: Any, s3_bucket: str, s3_endpoint: str, tmp_path: Path
) -> None:
    local = tmp_path / "local.png"
    _photo(32, 32).save(local)
    s3_client.put_object(Bucket=s3_bucket, Key="in/ok.png", Body=local.read_bytes())
    uris = [str(local), f"file://{local}", f"s3://{s3_bucket}/in/ok.png"]
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"uri": uris}), manifest)
    config = tmp_path / "run.yaml"
    config.write_text("allowed_schemes: [S3]\n")  # compared case-insensitively
    out = tmp_path / "out"
    code, log = _run_main(
        [
            str(manifest),
            "--output",
            str(out),
            "--config",
            str(config),
            "--endpoint-url",
            s3_endpoint,
            *BASE_FLAGS,
            "--ratios",
            "1",
        ]
    )
    assert code == 1, log
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert [(r["status"], r["error_kind"]) for r in rows] == [
        ("failed", "uri"),
        ("failed", "uri"),
        ("ok", None),
    ], rows
    for row in rows[:2]:
        assert "URI scheme 'file' is not allowed (allowed: s3)" in row["error"], row["error"]
        assert str(local) in row["error"]

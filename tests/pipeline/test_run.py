"""The whole pipeline end to end: ``pipeline.driver.main`` on a real local Ray instance against a
real S3-protocol server (moto on loopback), and ``run.py`` joining a separately started cluster.

Runs are tiny on purpose (48 px images, the ``tiny`` preset, two iterations): what is checked is
the orchestration (manifest order, resuming, reuse of saved models, determinism, failure rows,
secrets kept out of every artefact), not image quality.

One module-scoped Ray instance serves every in-process run; one module-scoped first run over
S3 (``trained``) is what the rerun tests build on. Each rerun test leaves the output in a state
the others accept, so they do not depend on their order.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support import free_port as _free_port
from support import parquet_bytes as _parquet_bytes
from support import run_main as _run_main
from support import run_refused, shrunk_photo

from ingan import metrics
from pipeline import layout

REPO = Path(__file__).resolve().parents[2]
IMAGES_DIR = Path(__file__).resolve().parents[1] / "data" / "images"
SOURCES = {"astronaut": "astronaut.png", "chelsea": "chelsea.png", "rocket": "rocket.jpg"}
SHORT_SIDE = 48

# Distinctive credentials, given only through the YAML config's storage_options (moto accepts
# any): if either string shows up in an artefact or the log, a secret leaked.
ACCESS_KEY = "AKIAPIPELINETEST7Q2X"
SECRET_KEY = "pipeline-secret-Vb93kQ1zR7"

RATIOS = (0.5, 1.0, 2.0)
TINY = ("--preset", "tiny", "--iterations", "2")  # every run here: tiny models, two iterations
SIZE = (40, 30)
ARTEFACTS = ("config.json", "summary.json", "report.html", "results.parquet")
RESULT_COLUMNS = (
    "id",
    "uri",
    "status",
    "error",
    "error_kind",
    "outputs",
    "train_seconds",
    "attempts",
)


# --------------------------------------------------------------------------- helpers


def _shrunk_images(out_dir: Path) -> dict[str, Path]:
    """id -> a copy of the example photo with its short side at SHORT_SIDE px."""
    for name in SOURCES.values():
        shrunk_photo(name, out_dir / name, SHORT_SIDE)
    return {item_id: out_dir / name for item_id, name in SOURCES.items()}


def _split_s3(uri: str) -> tuple[str, str]:
    assert uri.startswith("s3://"), uri
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    return bucket, key


def _get(client: Any, uri: str) -> bytes:
    bucket, key = _split_s3(uri)
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def _objects(client: Any, bucket: str, prefix: str) -> dict[str, tuple[str, Any]]:
    """key -> (ETag, LastModified) of every object under ``prefix``."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = (obj["ETag"], obj["LastModified"])
    return out


def _image_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        return img.size


# --------------------------------------------------------------------------- fixtures


@dataclass
class S3Run:
    client: Any
    endpoint: str
    bucket: str
    manifest_uri: str
    out_prefix: str
    config_path: Path
    ids: list[str]
    uris: list[str]  # as the results must show them: resolved against the manifest
    source_sizes: dict[str, tuple[int, int]]
    first_code: int = 0
    first_log: str = ""
    # What the first run left at the top of the output, read back at once: later tests rerun
    # into the same output and replace these.
    first_artefacts: dict[str, bytes] = field(default_factory=dict)
    finished_at: float = 0.0

    @property
    def out_uri(self) -> str:
        return f"s3://{self.bucket}/{self.out_prefix}"

    def argv(self, *extra: str, ratios: str = "0.5,1,2") -> list[str]:
        return [
            self.manifest_uri,
            "--output",
            self.out_uri,
            "--config",
            str(self.config_path),
            "--endpoint-url",
            self.endpoint,
            *TINY,
            "--seed",
            "7",
            "--ratios",
            ratios,
            "--sizes",
            f"{SIZE[0]}x{SIZE[1]}",
            *extra,
        ]

    def results(self) -> pa.Table:
        return pq.read_table(io.BytesIO(_get(self.client, f"{self.out_uri}/results.parquet")))

    def models(self) -> dict[str, tuple[str, Any]]:
        return {
            k: v
            for k, v in _objects(self.client, self.bucket, f"{self.out_prefix}/items/").items()
            if k.endswith("/model.pt")
        }

    def model_bytes(self) -> dict[str, bytes]:
        return {k: _get(self.client, f"s3://{self.bucket}/{k}") for k in self.models()}

    def rerun(self, *extra: str, ratios: str = "0.5,1,2") -> list[dict[str, Any]]:
        """The same run again into the same output, which must succeed; returns its rows."""
        code, log = _run_main(self.argv(*extra, ratios=ratios))
        self.finished_at = time.time()
        assert code == 0, log
        return self.results().to_pylist()


@pytest.fixture(scope="module")
def trained(
    local_ray: None, s3_client: Any, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> S3Run:
    """A first run: three images from an ``s3://`` manifest to an ``s3://`` output."""
    work = tmp_path_factory.mktemp("s3run")
    images = _shrunk_images(work / "images")
    bucket = "run-" + os.urandom(6).hex()
    s3_client.create_bucket(Bucket=bucket)
    for path in images.values():
        s3_client.put_object(Bucket=bucket, Key=f"data/images/{path.name}", Body=path.read_bytes())
    ids = list(SOURCES)
    # One relative URI: relative to the manifest's own folder, like a link.
    manifest_uris = [
        f"s3://{bucket}/data/images/{images['astronaut'].name}",
        f"images/{images['chelsea'].name}",
        f"s3://{bucket}/data/images/{images['rocket'].name}",
    ]
    table = pa.table({"uri": manifest_uris, "id": ids, "note": ["first", "second", "third"]})
    s3_client.put_object(Bucket=bucket, Key="data/manifest.parquet", Body=_parquet_bytes(table))
    config_path = work / "run.yaml"
    config_path.write_text(f"storage_options:\n  key: {ACCESS_KEY}\n  secret: {SECRET_KEY}\n")
    sizes = {}
    for item_id, path in images.items():
        with Image.open(path) as img:
            sizes[item_id] = img.size
    run = S3Run(
        client=s3_client,
        endpoint=s3_endpoint,
        bucket=bucket,
        manifest_uri=f"s3://{bucket}/data/manifest.parquet",
        out_prefix="out",
        config_path=config_path,
        ids=ids,
        uris=[f"s3://{bucket}/data/images/{images[i].name}" for i in ids],
        source_sizes=sizes,
    )
    run.first_code, run.first_log = _run_main(run.argv())
    run.finished_at = time.time()
    if run.first_code == 0:
        run.first_artefacts = {name: _get(s3_client, f"{run.out_uri}/{name}") for name in ARTEFACTS}
    return run


@pytest.fixture
def run(trained: S3Run) -> S3Run:
    """The first run, which every test here checks or builds on: it must have succeeded."""
    assert trained.first_code == 0, trained.first_log
    return trained


def _after_a_second(run: S3Run) -> None:
    """S3 LastModified has one-second resolution: let a second pass since the last write, so an
    object rewritten by the next run shows a new time."""
    time.sleep(max(0.0, 1.1 - (time.time() - run.finished_at)))


def _expected_size(ratio: float | None, src: tuple[int, int]) -> tuple[int, int]:
    if ratio is None:
        return SIZE
    return round(ratio * src[1]), src[1]  # keep_height


# --------------------------------------------------------------------------- 1. first run


@pytest.mark.slow
def test_s3_manifest_to_s3_outputs(run: S3Run) -> None:
    first = run.first_artefacts
    table = pq.read_table(io.BytesIO(first["results.parquet"]))
    for name in RESULT_COLUMNS:
        assert name in table.column_names
    out_type = table.schema.field("outputs").type
    assert pa.types.is_list(out_type)
    assert {"width", "height", "ratio", "uri"} <= {f.name for f in out_type.value_type}
    rows = table.to_pylist()

    assert [r["id"] for r in rows] == run.ids  # manifest order
    assert [r["uri"] for r in rows] == run.uris
    assert [r["note"] for r in rows] == ["first", "second", "third"]  # carried column
    for row in rows:
        src = run.source_sizes[row["id"]]
        assert row["status"] == "ok", row
        assert row["error"] is None and row["error_kind"] is None
        assert row["attempts"] == 1
        assert row["train_seconds"] is not None and row["train_seconds"] > 0
        assert (row["source_width"], row["source_height"]) == src
        assert row["model_uri"].startswith(f"{run.out_uri}/items/{layout.item_key(row['id'])}/")
        assert _get(run.client, row["model_uri"])  # the model exists
        assert [o["ratio"] for o in row["outputs"]] == [*RATIOS, None]
        for out in row["outputs"]:
            expected = _expected_size(out["ratio"], src)
            assert (out["width"], out["height"]) == expected
            assert out["uri"].startswith(f"{run.out_uri}/items/")
            assert _image_size(_get(run.client, out["uri"])) == expected, out["uri"]
            for metric in ("completeness", "coherence", "swd"):
                assert out[metric] is not None and out[metric] >= 0
                assert out["resize_" + metric] is not None and out["resize_" + metric] >= 0
            # The verdict follows from the scores as stored: objects kept at their own size
            # (stretch), and patches not far worse than the resize's.
            cc, resize_cc = out["completeness"] + out["coherence"], out["resize_completeness"] + out["resize_coherence"]
            wins = ((out["stretch"] is None or out["stretch"] <= metrics.STRETCH_KEPT)
                    and cc <= metrics.BROKEN_CC * resize_cc and out["swd"] <= metrics.BROKEN_SWD * out["resize_swd"])
            assert out["beats_resize"] is wins
            # Two training iterations cannot beat a resize: the verdict says so.
            assert out["beats_resize"] is False

    summary = json.loads(first["summary.json"])
    assert summary["total"] == 3
    assert summary["status_counts"] == {"ok": 3, "skipped": 0, "failed": 0}
    assert summary["outputs_written"] == 12
    assert summary["verdicts"] == {"beats_resize": 0, "loses_to_resize": 12, "unscored": 0}
    assert summary["error_kinds"] == {}

    report_html = first["report.html"].decode("utf-8")
    for item_id in run.ids:
        assert item_id in report_html

    config = json.loads(first["config.json"])
    assert config["preset_resolved"] == "tiny"
    assert config["storage_options"] == ["key", "secret"]  # names only
    assert config["model_tag"] in rows[0]["model_uri"]

    artefacts = {**first}
    artefacts["driver log"] = run.first_log.encode()
    for name, data in artefacts.items():
        for secret in (ACCESS_KEY, SECRET_KEY):
            assert secret.encode() not in data, f"{secret!r} leaked into {name}"


# --------------------------------------------------------------------------- 2-4. reruns


def test_rerun_trains_and_writes_nothing(run: S3Run) -> None:
    _after_a_second(run)
    before = _objects(run.client, run.bucket, f"{run.out_prefix}/items/")
    model_bytes = run.model_bytes()

    rows = run.rerun()
    assert [r["id"] for r in rows] == run.ids
    for row in rows:
        assert row["status"] == "skipped", row
        assert row["train_seconds"] is None
        # The skipped row still points at what the earlier run wrote.
        assert [o["ratio"] for o in row["outputs"]] == [*RATIOS, None]
        assert row["model_uri"] is not None
    # Nothing under items/ was rewritten: same objects, same ETags, same times.
    assert _objects(run.client, run.bucket, f"{run.out_prefix}/items/") == before
    assert run.model_bytes() == model_bytes
    summary = json.loads(_get(run.client, f"{run.out_uri}/summary.json"))
    assert summary["status_counts"] == {"ok": 0, "skipped": 3, "failed": 0}


def test_new_ratio_reuses_the_saved_models(run: S3Run) -> None:
    _after_a_second(run)
    models_before = run.models()
    assert len(models_before) == 3
    model_bytes = run.model_bytes()

    rows = run.rerun("--no-metrics", ratios="0.5,1,1.5,2")
    assert [r["id"] for r in rows] == run.ids
    for row in rows:
        src = run.source_sizes[row["id"]]
        assert row["status"] == "ok", row
        assert row["train_seconds"] is None  # the saved model was reused
        assert [o["ratio"] for o in row["outputs"]] == [0.5, 1.0, 1.5, 2.0, None]
        new = row["outputs"][2]
        assert (new["width"], new["height"]) == _expected_size(1.5, src)
        assert _image_size(_get(run.client, new["uri"])) == _expected_size(1.5, src)
    assert run.models() == models_before  # not rewritten: same ETags and LastModified
    assert run.model_bytes() == model_bytes


def test_overwrite_retrains_to_identical_bytes(run: S3Run) -> None:
    model_bytes = run.model_bytes()
    assert len(model_bytes) == 3

    for row in run.rerun("--no-metrics", "--resume", "overwrite"):
        assert row["status"] == "ok", row
        assert row["train_seconds"] is not None and row["train_seconds"] > 0  # retrained
    after = run.model_bytes()
    assert after.keys() == model_bytes.keys()
    for key, data in after.items():
        assert data == model_bytes[key], f"{key}: same seed and id, yet different bytes"


# --------------------------------------------------------------------------- 5. bad rows


def test_bad_rows_fail_alone(
    local_ray: None, s3_client: Any, s3_bucket: str, s3_endpoint: str, example_images: list[Path]
) -> None:
    good = example_images[:2]
    for path in good:
        s3_client.put_object(Bucket=s3_bucket, Key=f"in/{path.name}", Body=path.read_bytes())
    uris = [
        f"s3://{s3_bucket}/in/{good[0].name}",
        f"s3://{s3_bucket}/nope.png",
        f"s3://{s3_bucket}/in/{good[1].name}",
        None,
        "ftp://x/y.png",
    ]
    s3_client.put_object(
        Bucket=s3_bucket,
        Key="manifest.parquet",
        Body=_parquet_bytes(pa.table({"uri": pa.array(uris, pa.string())})),
    )
    code, log = _run_main(
        [f"s3://{s3_bucket}/manifest.parquet", "--output", f"s3://{s3_bucket}/out",
         "--endpoint-url", s3_endpoint, *TINY, "--ratios", "1", "--no-metrics"]
    )  # fmt: skip
    assert code == 1, log
    data = s3_client.get_object(Bucket=s3_bucket, Key="out/results.parquet")["Body"].read()
    rows = pq.read_table(io.BytesIO(data)).to_pylist()
    assert [r["uri"] for r in rows] == uris  # every row, in manifest order
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "failed", "failed"]
    assert [r["error_kind"] for r in rows] == [None, "not_found", None, "uri", "uri"]
    assert rows[3]["id"] == "row-3"  # a null URI still gets an id
    assert "nope.png" in rows[1]["error"]
    assert "null" in rows[3]["error"]
    assert "'ftp'" in rows[4]["error"] and "not allowed" in rows[4]["error"]
    for row in rows:
        if row["status"] == "failed":
            assert row["outputs"] == [] and row["model_uri"] is None
            assert row["error"].strip() and "Traceback" not in row["error"]
        else:
            assert len(row["outputs"]) == 1 and row["error"] is None
    summary = json.loads(
        s3_client.get_object(Bucket=s3_bucket, Key="out/summary.json")["Body"].read()
    )
    assert summary["status_counts"] == {"ok": 2, "skipped": 0, "failed": 3}
    assert summary["error_kinds"] == {"not_found": 1, "uri": 2}
    assert "[not_found]" in log and "[uri]" in log


# --------------------------------------------------------------------------- 7. nothing runs


@pytest.fixture
def local_manifest(tmp_path: Path, example_images: list[Path]) -> Path:
    """A local manifest beside its images, with relative URIs."""
    path = example_images[0].parent / "manifest.parquet"
    pq.write_table(pa.table({"uri": [p.name for p in example_images]}), path)
    return path


def test_dry_run_runs_and_writes_nothing(
    tmp_path: Path, local_manifest: Path, no_ray: None
) -> None:
    out = tmp_path / "out"
    code, log = _run_main(
        [str(local_manifest), "--output", str(out), "--preset", "tiny", "--dry-run"]
    )
    assert code == 0, log
    assert "dry run: 3 images" in log
    assert not out.exists()


def test_manifest_without_uri_column_is_refused(tmp_path: Path, no_ray: None) -> None:
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"path": ["a.png"], "id": ["a"]}), bad)
    run_refused([str(bad), "--output", str(tmp_path / "out")], ["'uri'", "path"])


def test_missing_manifest_is_refused(tmp_path: Path, no_ray: None) -> None:
    run_refused([str(tmp_path / "absent.parquet"), "--output", str(tmp_path / "out")], ["absent.parquet"])


@pytest.mark.parametrize(
    ("flags", "field_name"),
    [
        (["--preset", "enormous"], "preset"),
        (["--ratios", "0"], "ratios"),
        (["--ratios", "1,1"], "ratios"),
        (["--sizes", "3x3"], "sizes"),
        (["--sizes", "big"], "sizes"),
        (["--iterations", "0"], "iterations"),
    ],
)
def test_bad_settings_are_refused(
    tmp_path: Path, local_manifest: Path, no_ray: None, flags: list[str], field_name: str
) -> None:
    log = run_refused([str(local_manifest), "--output", str(tmp_path / "out"), *flags])
    assert re.search(rf"^\s*{field_name}(\.\d+)?: ", log, re.MULTILINE), log


# --------------------------------------------------------------------------- 6. a started cluster


def _wait_for_head(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "Ray runtime started" in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise RuntimeError(f"ray start did not come up:\n{log.read_text(errors='replace')[-3000:]}")


def _stop_head(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to our own ``ray start --block``: it shuts down the processes it started (and its
    reaper does if it cannot). Never ``ray stop``, which would kill every Ray on the machine."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session we started it in
        proc.wait()


@pytest.mark.slow
def test_run_py_joins_a_started_cluster(tmp_path: Path, example_images: list[Path]) -> None:
    # The data: a manifest with relative URIs, next to its images.
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for path in example_images[:2]:
        shutil.copy(path, data / "images" / path.name)
    pq.write_table(
        pa.table({"uri": [f"images/{p.name}" for p in example_images[:2]], "id": ["one", "two"]}),
        data / "manifest.parquet",
    )
    raylet_cwd = tmp_path / "head"
    driver_cwd = tmp_path / "elsewhere"
    raylet_cwd.mkdir()
    driver_cwd.mkdir()

    port = _free_port()
    # A short temp dir of our own (socket paths are limited to ~107 chars): its address file is
    # not the one a plain ray.init() looks for, so nothing else on the machine joins this cluster.
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray 2.60's `ray start` turns on token authentication by default; a loopback test cluster
    # needs none, and draining on SIGTERM would only add 30 s to the teardown.
    env.update(RAY_AUTH_MODE="disabled", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    head_log = tmp_path / "ray-start.log"
    with head_log.open("wb") as log_file:
        head = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ray.scripts.scripts",
                "start",
                "--head",
                "--block",
                f"--port={port}",
                "--num-cpus=2",
                "--include-dashboard=false",
                "--node-ip-address=127.0.0.1",
                f"--temp-dir={temp_dir}",
                "--disable-usage-stats",
                # Ports with fixed defaults, free ones here so a second Ray on the machine
                # (the in-process one, another test run) cannot clash.
                f"--ray-client-server-port={_free_port()}",
                f"--dashboard-agent-listen-port={_free_port()}",
            ],
            cwd=raylet_cwd,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_for_head(head, head_log, timeout=90)
        proc = subprocess.run(
            [sys.executable, str(REPO / "run.py"), os.path.relpath(data / "manifest.parquet", driver_cwd),
             "--output", "out", *TINY, "--ratios", "1,2", "--no-metrics"],
            cwd=driver_cwd,
            env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        _stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)

    assert proc.returncode == 0, proc.stderr[-4000:]
    connected = re.search(r"^connecting to Ray: (.*)$", proc.stderr, re.MULTILINE)
    assert connected, proc.stderr[-4000:]
    assert connected.group(1).endswith(f":{port}"), connected.group(1)

    out = driver_cwd / "out"
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert [r["id"] for r in rows] == ["one", "two"]
    assert [r["uri"] for r in rows] == [str(data / "images" / p.name) for p in example_images[:2]]
    for row in rows:
        assert row["status"] == "ok", row
        assert len(row["outputs"]) == 2
        for o in row["outputs"]:
            # Written where the driver's relative --output points, not where the workers run.
            assert o["uri"].startswith(str(out) + os.sep), o["uri"]
            with Image.open(o["uri"]) as img:
                assert img.size == (o["width"], o["height"])
    assert (out / "summary.json").is_file() and (out / "report.html").is_file()
    assert not (raylet_cwd / "out").exists()

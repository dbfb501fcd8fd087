"""Shared fixtures: a real S3-protocol server on loopback (moto's server mode) and small images.

The S3 server is a separate process speaking HTTP, so s3fs, boto3 and any subprocess the tests
start (the CLIs) go through the same code paths as against real object storage.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from support import free_port, shrunk_photo

# Small CC0 copies of scikit-image sample images, committed with their licences.
IMAGES_DIR = Path(__file__).resolve().parent / "data" / "images"
# RGB sources of different formats and aspect ratios.
EXAMPLE_IMAGES = ("astronaut.png", "chelsea.png", "rocket.jpg")
EXAMPLE_SIZE = 48

_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Never pick up a developer's real profile or config.
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_CONFIG_FILE": os.devnull,
}


@pytest.fixture(scope="session", autouse=True)
def fake_aws_credentials() -> Iterator[None]:
    """Dummy AWS credentials for the whole session, so no test can ever reach real AWS as someone.

    Autouse and in ``os.environ``: subprocesses (moto, the CLIs) and Ray workers inherit them.
    """
    with pytest.MonkeyPatch.context() as mp:
        for name, value in _FAKE_AWS_ENV.items():
            mp.setenv(name, value)
        mp.delenv("AWS_PROFILE", raising=False)
        # Loopback must bypass any proxy configured for the package registries.
        for name in ("NO_PROXY", "no_proxy"):
            mp.setenv(
                name, ",".join(filter(None, [os.environ.get(name), "127.0.0.1", "localhost"]))
            )
        yield


def _wait_until_answering(
    url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"moto server exited with {proc.returncode}:\n{log.read_text()[-2000:]}"
            )
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is serving
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(
        f"moto server did not answer on {url} within {timeout}s:\n{log.read_text()[-2000:]}"
    )


@pytest.fixture(scope="session")
def start_moto(
    fake_aws_credentials: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[], str]]:
    """Starts a moto S3 server on a free loopback port and returns its URL; every server started
    is stopped at the end of the session."""
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> str:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = tmp_path_factory.mktemp("moto") / "server.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        _wait_until_answering(url, proc, log, timeout=30)
        return url

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_endpoint(start_moto: Callable[[], str]) -> str:
    """URL of the session's shared moto S3 server on loopback."""
    return start_moto()


@pytest.fixture(scope="module")
def local_ray(fake_aws_credentials: None) -> Iterator[None]:
    """One local Ray instance for the module, started after the dummy AWS variables are set (its
    workers inherit them). ``address='local'`` never joins a cluster someone else started.

    Token authentication off (Ray 2.60 turns it on for a local instance by default), as for every
    Ray the tests start in this process: a process keeps its first instance's authentication
    settings, and a later cluster started with other ones (``test_faults.py``'s) then fails to
    start or loses its tasks' owner."""
    import ray

    started = not ray.is_initialized()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        if started:
            ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
        yield
        if started:
            ray.shutdown()


@pytest.fixture
def s3_storage_options(s3_endpoint: str) -> dict[str, Any]:
    """fsspec/s3fs options that point at the moto server with its dummy credentials.

    A fresh dict per test, so a test that edits it cannot leak into the next.
    """
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
    }


@pytest.fixture
def s3_storage(s3_storage_options: dict[str, Any]) -> Any:
    """``s3_storage_options`` as the ``pipeline.storage.Storage`` every reader and writer takes."""
    from pipeline.storage import Storage

    return Storage(s3_storage_options)


@pytest.fixture(scope="session")
def s3_client(s3_endpoint: str) -> Any:
    """A boto3 S3 client for the moto server: a second, independent client next to s3fs."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def s3_bucket(s3_client: Any) -> str:
    """A fresh, empty bucket on the moto server, named uniquely so tests never see each other's objects."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def folder(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """An output folder (``pipeline.storage.Folder``) on local disk, or in a fresh bucket on the
    moto server (modules with other backends define their own)."""
    from pipeline.storage import Folder

    if request.param == "local":
        return Folder(str(tmp_path / "out"))
    bucket = request.getfixturevalue("s3_bucket")
    return Folder(f"s3://{bucket}/out", request.getfixturevalue("s3_storage"))


@pytest.fixture
def example_images(tmp_path: Path) -> list[Path]:
    """A few real RGB photos shrunk to ``EXAMPLE_SIZE`` px on the short side, in their own formats.

    The short side, not the long one: multi-scale models need every side at least this big.
    """
    out_dir = tmp_path / "example_images"
    for name in EXAMPLE_IMAGES:
        shrunk_photo(name, out_dir / name, EXAMPLE_SIZE)
    return [out_dir / name for name in EXAMPLE_IMAGES]


@pytest.fixture
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path``, made the working directory for the test (relative paths resolve there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to reach Ray or run a task."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("nothing may run here")

    from pipeline import cluster, executor

    monkeypatch.setattr(cluster, "connect", refuse)
    monkeypatch.setattr(executor, "run_items", refuse)


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Run a module's torch work on one intra-op thread, restoring the caller's setting after.

    On small shared CPU machines a second OpenMP thread whose core is briefly taken away stalls
    every parallel op at its barrier (we measured 2-thread matmuls 30-80x slower than 1-thread
    ones at such moments), so tiny models train in a predictable time on one thread. Results
    are compared only within one process, so the thread count never changes what is asserted.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def brick40() -> torch.Tensor:
    """A real texture, 40 x 40 uint8 (3, H, W): small enough for a few tiny-preset iterations in
    about a second (crops of 39 px, 4 discriminator scales)."""
    from support import texture

    return texture("brick.png", 40)

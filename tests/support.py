"""Helpers the tests share (pytest puts this folder on ``sys.path`` for its ``conftest.py``)."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

IMAGES_DIR = Path(__file__).resolve().parent / "data" / "images"


def shrunk_photo(name: str, out: Path, short_side: int = 48) -> tuple[int, int]:
    """A copy of the committed test photo ``name`` at ``out``, its short side ``short_side`` px
    (the short side: multi-scale models need every side at least that big); returns (W, H)."""
    from PIL import Image

    with Image.open(IMAGES_DIR / name) as img:
        scale = short_side / min(img.size)
        small = img.convert("RGB").resize((round(img.width * scale), round(img.height * scale)),
                                          Image.Resampling.LANCZOS)
    out.parent.mkdir(parents=True, exist_ok=True)
    small.save(out)
    return small.size


@dataclass(frozen=True)
class Source:
    """A test photo copied beside a manifest: its id, file and (W, H)."""

    id: str
    path: Path
    size: tuple[int, int]


def photo_sources(folder: Path, names: Iterable[str], short_side: int) -> list[Source]:
    """The committed test photos ``names`` shrunk to ``short_side`` px on the short side, in ``folder``."""
    return [Source(Path(n).stem, folder / n, shrunk_photo(n, folder / n, short_side)) for n in names]


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


def run_refused(argv: list[str], phrases: list[str] | tuple[str, ...] = ()) -> str:
    """``driver.main(argv)`` refuses its input: exit code 2, every phrase in the log and no
    traceback, and nothing written under the ``--output`` folder (not even config.json). Returns
    the log."""
    code, log = run_main(argv)
    assert code == 2, log
    for phrase in phrases:
        assert phrase in log, log
    assert "Traceback" not in log, log
    assert not Path(argv[argv.index("--output") + 1]).exists()
    return log


def image_bytes(im: Any, fmt: str, **opts: Any) -> bytes:
    """A PIL image encoded as a file of format ``fmt`` (PNG, JPEG, ...) with Pillow's ``opts``."""
    with io.BytesIO() as buf:
        im.save(buf, format=fmt, **opts)
        return buf.getvalue()


def s3_config(path: Path, key: str, secret: str, endpoint: str) -> Path:
    """A run's YAML config at ``path`` holding S3 credentials and endpoint, as a user writes it."""
    path.write_text(f"storage_options:\n  key: {key}\n  secret: {secret}\n"
                    f"  client_kwargs:\n    endpoint_url: {endpoint}\n    region_name: us-east-1\n")
    return path


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def output(rel: str, width: int, height: int, **fields: Any) -> dict[str, Any]:
    """An output entry of a task record: a rectangle unless ``fields`` say otherwise."""
    from pipeline.records import UNSCORED

    return {"width": width, "height": height, "ratio": width / height, "uri": f"/out/{rel}", "rel": rel,
            "target": f"size:{width}x{height}", "shift_left": 0.0, "shift_right": 0.0, "mask_uri": None,
            "variant": None, "scale": None, "shard_key": None, "shard_night": None, **UNSCORED, **fields}


def record(id_: str, status: str = "ok", **overrides: object) -> dict[str, Any]:
    """A task record as ``pipeline.task`` returns it."""
    rec: dict[str, Any] = {
        "id": id_, "uri": f"s3://bucket/{id_}.jpg", "status": status, "error": None, "error_kind": None,
        "outputs": [], "source_rel": None, "source_width": None, "source_height": None, "model_uri": None,
        "train_seconds": None, "total_seconds": None, "attempts": 1, "carried": {},
    }
    rec.update(overrides)
    return rec


def assert_same_state(a: Any, b: Any) -> None:
    """Two modules (or two state dicts) hold the same tensors under the same names, bit for bit."""
    import torch

    sa = a.state_dict() if isinstance(a, torch.nn.Module) else a
    sb = b.state_dict() if isinstance(b, torch.nn.Module) else b
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


REPO = Path(__file__).resolve().parents[1]


def run_ingan(*args: str, ok: bool = False, timeout: float = 300) -> Any:
    """``python -m ingan ARGS`` in a subprocess from the repository root (a
    ``subprocess.CompletedProcess`` with text output); with ``ok`` it must have succeeded."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ingan", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def image_mode_and_size(path: Path) -> tuple[str, tuple[int, int]]:
    """The Pillow mode and (width, height) of the image file at ``path``."""
    from PIL import Image

    with Image.open(path) as im:
        return im.mode, im.size


def texture(name: str, side: int) -> Any:
    """The committed test image ``name`` downscaled to ``side`` x ``side``: a uint8 (3, H, W) tensor."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(IMAGES_DIR / name) as img:
        small = img.convert("RGB").resize((side, side), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1).contiguous()


def tiny_train_config(iterations: int, seed: int = 0, **overrides: Any) -> Any:
    """The tiny preset's TrainConfig for a short run. Its working size (96 px) is above the tests'
    small images, so they train as they are."""
    import dataclasses

    from ingan.config import get_preset

    return dataclasses.replace(get_preset("tiny").train, iterations=iterations, seed=seed, **overrides)


def processes() -> Iterator[tuple[int, int, str]]:
    """(pid, session id, command line) of every live process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp session ...
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            yield int(entry), int(fields[3]), cmd.strip()


def wait_for(ready: Callable[[], Any], what: str, timeout: float = 180, every: float = 0.05) -> Any:
    """Poll ``ready()`` until it returns something true, and return that. ``timeout`` only guards
    against a hang (the test fails naming ``what``); nothing is timed by it. ``ready`` may raise
    to fail at once (a process it waits on has ended)."""
    deadline = time.monotonic() + timeout
    while not (got := ready()):
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        time.sleep(every)
    return got


def session_members(sid: int) -> list[tuple[int, str]]:
    return [(pid, cmd) for pid, session, cmd in processes() if session == sid]


def released_together(commands: list[list[str]], ready: Path, go: Path, what: str, timeout: float = 300) -> list[Any]:
    """Start ``python COMMAND`` for each command, from the repository root; once each has created
    its file in the folder ``ready``, create the file ``go`` (each waits for it, so they race from
    one moment), and wait for them all to end. Returns the ended processes (their stderr piped);
    any still running when something fails is killed."""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, *c], cwd=REPO, stderr=subprocess.PIPE) for c in commands]
    try:
        def all_ready() -> bool:
            assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs if p.poll() is not None]
            return len(list(ready.iterdir())) == len(procs)

        wait_for(all_ready, what)
        go.touch()
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return procs

"""Writing a night's outputs to an S3 server as files against as shards: objects written, S3
requests and seconds of writing, for N real encoded outputs.

    python -m bench.shard_writes [--outputs 1000] [--threads 8]

The server is moto's (S3 protocol on loopback, started here), so the seconds are the client's and
the protocol's, not a network's. The outputs are PNGs of the benchmark photographs at the sizes
the tiny preset's runs write (random crops, 96 to 160 px a side). They are written the way a run
writes them: as files, one ``Folder.write_bytes`` each (what a task does per output), by one writer
and by ``--threads`` at once (tasks in parallel); as shards, through the driver's ``ShardWriter``
(WebDataset form, the default 1,000 samples per shard: the tar, its records, the night's index
and its lock). Requests are counted where s3fs makes every call (``S3FileSystem._call_s3``).
"""

from __future__ import annotations

import argparse
import io
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import boto3
import s3fs
from PIL import Image

from ingan.retarget import EncodedOutput
from pipeline import layout, shards
from pipeline.records import Item
from pipeline.storage import Folder, Storage

from .common import bench_images, machine, save

NIGHT = "bench"


def outputs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` PNGs: random crops of the benchmark photographs, 96 to 160 px a side."""
    rng = random.Random(seed)
    photos = [Image.open(p).convert("RGB") for p in bench_images()]
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = rng.randint(96, 160), rng.randint(96, 160)
        x, y = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
        buf = io.BytesIO()
        photo.crop((x, y, x + w, y + h)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@contextmanager
def moto_server() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x",
                              aws_secret_access_key="x")
        for _ in range(300):
            try:
                client.list_buckets()
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def counted_requests() -> Iterator[Counter[str]]:
    """The S3 calls made inside, by operation."""
    calls: Counter[str] = Counter()
    real = s3fs.S3FileSystem._call_s3

    async def call(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        calls[method] += 1
        return await real(self, method, *args, **kwargs)

    s3fs.S3FileSystem._call_s3 = call
    try:
        yield calls
    finally:
        s3fs.S3FileSystem._call_s3 = real


def as_files(folder: Folder, data: list[bytes], threads: int) -> None:
    def write(k: int) -> str:
        return folder.write_bytes(layout.output_path(f"img-{k // 8}", "tag", 128 + k % 8, 128, "png"), data[k])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, range(len(data))))


def as_shards(folder: Folder, data: list[bytes]) -> None:
    writer = shards.ShardWriter(folder, NIGHT, "webdataset", "bench-run", max_samples=1000, max_bytes=256 * 2**20,
                                lock_wait_s=60, stale_after_s=600, carried=None)
    for k, image in enumerate(data):
        item = Item(k, f"img-{k // 8}", f"s3://in/img-{k // 8}.png", {})
        output = {"target": f"variant:bench:{k % 8}", "width": 128, "height": 128,
                  "shard_key": layout.sample_key(item.id, "tag", f"variant:bench:{k % 8}"), "shard_night": NIGHT}
        writer.add([shards.sample(item, "tag", output, EncodedOutput("128x128", "png", image, None))])
    assert writer.flush() and writer.stats.samples == len(data)


def measure(url: str, bucket: str, what: Callable[[Folder], None]) -> dict[str, Any]:
    options = {"key": "x", "secret": "x", "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"}}
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x",
                 aws_secret_access_key="x").create_bucket(Bucket=bucket)
    folder = Folder(f"s3://{bucket}/out", Storage(options))
    folder.exists("warm-up")  # the client's own start is no write's
    with counted_requests() as calls:
        t0 = time.perf_counter()
        what(folder)
        seconds = time.perf_counter() - t0
    objects = len(folder.fs.find(folder.path("")))
    return {"objects": objects, "seconds": seconds, "requests": dict(calls), "puts": calls["put_object"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outputs", type=int, default=1000, help="outputs written each way")
    ap.add_argument("--threads", type=int, default=8, help="writers at once, for the files")
    args = ap.parse_args(argv)
    data = outputs(args.outputs)
    with moto_server() as url:
        runs = {"files, one writer": measure(url, "files-1", lambda f: as_files(f, data, 1)),
                f"files, {args.threads} writers": measure(url, "files-n", lambda f: as_files(f, data, args.threads)),
                "shards (WebDataset), the driver's writer": measure(url, "shards", lambda f: as_shards(f, data))}
    result = {"machine": machine(), "outputs": args.outputs, "bytes": sum(map(len, data)), "threads": args.threads,
              "runs": runs}
    for name, r in runs.items():
        print(f"{name}: {r['objects']} objects, {r['puts']} puts, {sum(r['requests'].values())} requests, "
              f"{r['seconds']:.2f} s")
    save("shard_writes", result)


if __name__ == "__main__":
    main()

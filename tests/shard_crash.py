"""``run.py`` that dies the way a killed driver does, half way through writing a shard: ``python
shard_crash.py RUN_ARGS...``. Its second shard's tar (``-00001.tar``, under its temporary name) gets
half its bytes, flushed and synced, and then the process SIGKILLs itself. Writes are caught where
every local write of fsspec goes (``LocalFileSystem._open``), whatever the pipeline calls."""

from __future__ import annotations

import os
import re
import signal
import sys
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from pipeline import driver

_real_open = LocalFileSystem._open


def _open(self: Any, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
    f = _real_open(self, path, mode, *args, **kwargs)
    if "w" in mode and re.search(r"-00001\.tar\.part-", os.path.basename(path)):
        write = f.write

        def torn(data: bytes) -> int:
            write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
            return 0

        f.write = torn
    return f


if __name__ == "__main__":
    LocalFileSystem._open = _open
    sys.exit(driver.main(sys.argv[1:]))

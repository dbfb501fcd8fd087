"""One process breaking a stale ``results.lock``, for the stale-lock race test: ``python
stale_lock_breaker.py BASE OPTIONS_JSON LOG READY_DIR GO NAME``.

The lock at BASE is stale when it starts. Once the process has judged it so and is about to break
it (``Folder.replace_if``), it creates ``READY_DIR/NAME`` and waits for the file ``GO``: every
breaker then breaks the same stale lock at the same moment. It appends ``enter NAME`` to LOG if it
took the lock (and ``exit NAME`` as it lets it go, a second later), or ``refused NAME``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import runs
from pipeline.storage import Folder, Storage

# A lock this old is stale. Above S3's whole-second LastModified: a lock taken a moment ago never
# looks older than this.
STALE_AFTER_S = 3.0


def main(base: str, options: str, log: str, ready_dir: str, go: str, name: str) -> None:
    real = Folder.replace_if

    def at_once(self: Folder, *args: Any) -> bool:
        Path(ready_dir, name).touch()
        while not os.path.exists(go):
            time.sleep(0.01)
        return real(self, *args)

    Folder.replace_if = at_once  # type: ignore[method-assign]
    folder = Folder(base, Storage(json.loads(options)))
    with runs.results_lock(folder, name, wait_s=0, stale_after_s=STALE_AFTER_S, poll_s=0.02) as held, open(log, "a") as out:
        out.write(f"{'enter' if held else 'refused'} {name}\n")
        out.flush()
        if held:
            time.sleep(1)  # held a while: a second holder, were there one, would enter meanwhile
            out.write(f"exit {name}\n")


if __name__ == "__main__":
    main(*sys.argv[1:])

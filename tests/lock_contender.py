"""One process racing others for ``results.lock`` (``pipeline.runs.results_lock``), for the lock
tests: ``python lock_contender.py BASE OPTIONS_JSON LOG READY_DIR GO NAME ROUNDS``.

Once its storage is set up it creates ``READY_DIR/NAME`` and waits for the file ``GO``, so that
every contender starts racing at the same moment. Then, ROUNDS times, it appends ``wait NAME K``
to LOG, takes the lock, appends ``enter NAME K``, holds it a moment, appends ``exit NAME K`` and
lets it go. Each line is one ``O_APPEND`` write, so lines from several processes never mix; were
two processes ever holding the lock at once, their enter and exit lines would interleave.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from pipeline import runs
from pipeline.storage import Folder, Storage


def main(base: str, options: str, log: str, ready_dir: str, go: str, name: str, rounds: str) -> None:
    folder = Folder(base, Storage(json.loads(options)))
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    Path(ready_dir, name).touch()
    while not os.path.exists(go):
        time.sleep(0.01)
    for k in range(int(rounds)):
        os.write(fd, f"wait {name} {k}\n".encode())
        with runs.results_lock(folder, f"{name}-{k}", wait_s=120, stale_after_s=600, poll_s=0.02) as held:
            if not held:
                sys.exit(f"{name}: the lock was not taken in round {k}")
            os.write(fd, f"enter {name} {k}\n".encode())
            time.sleep(0.02)  # held a moment: a second holder, were there one, would write in between
            os.write(fd, f"exit {name} {k}\n".encode())
    os.close(fd)


if __name__ == "__main__":
    main(*sys.argv[1:])

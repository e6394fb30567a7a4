"""Stage 05's bookkeeping: the wall time of each step, and the metrics the stage records."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def timed(timings: dict, step: str) -> Iterator[None]:
    """Record the wall time of a block in timings[step] (seconds), also when it fails."""
    started = time.monotonic()
    try:
        yield
    finally:
        timings[step] = round(time.monotonic() - started, 2)


def metrics(check: dict, report: dict, timings: dict, files: dict[str, Path], pushed: dict) -> dict:
    """The stage's metrics: merge check, per-file verification, tensor types, timings per step, push result."""
    return {"merge_check": check, "timings_s": timings, "files": {k: str(v) for k, v in files.items()},
            "verification": report, "flagged": report["flagged"], "push": pushed}

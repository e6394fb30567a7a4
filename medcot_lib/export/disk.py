"""Disk-space checks: refuse to start writing a checkpoint or GGUF file that the disk has no room for."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from ..errors import MedcotError

DISK_MARGIN = 1.1  # free space required beyond an estimated size


def check_disk(directory: str | Path, needed_bytes: int, what: str) -> None:
    """Refuse to start writing `what` when the disk holding `directory` lacks its estimated size (plus 10%)."""
    directory = Path(directory)
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes * DISK_MARGIN:
        raise MedcotError(f"{directory}: not enough disk space for the {what}: about {needed_bytes / 2**30:.2f} GiB needed "
                          f"(+10% margin), {free / 2**30:.2f} GiB free")


def checkpoint_parameters(hf_dir: str | Path) -> int:
    """Number of weights in a safetensors checkpoint, read from the file headers only."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    if not total:
        raise MedcotError(f"{hf_dir}: no *.safetensors weights (expected a transformers checkpoint)")
    return total

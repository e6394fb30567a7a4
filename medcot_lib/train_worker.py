"""One process of a launched stage 03 (`accelerate launch -m medcot_lib.train_worker RUN_DIR`; see distributed.py).

Reads the recipe the notebook's kernel left in RUN_DIR/.launch/, trains its share, and on rank 0 writes the metrics
and log history back there for the notebook to show.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from . import distributed, recipe, train
from .fileio import write_json


def main(argv: list[str]) -> int:
    run_dir = Path(argv[0])
    exchange = run_dir / distributed.LAUNCH_DIR
    cfg = recipe.validate(json.loads((exchange / distributed.PARAMS_FILE).read_text()), origin=str(exchange / distributed.PARAMS_FILE))
    metrics, history = train.train_in_process(cfg, run_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(exchange / distributed.RESULT_FILE, {"metrics": metrics, "log_history": history})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`medcot sweep SWEEP.yaml`: one base recipe, many overrides, each point a normal run directory, resumable.

spec reads and checks the sweep file, runner runs the points (`medcot run` subprocesses, N at a time) and keeps
results/sweeps/<name>/sweep.json, summary writes summary.md, summary.csv and the figures.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MedcotError
from .runner import FINISHED, State, eta_seconds, is_finished, run, slot_environments, stage_names
from .spec import Point, Sweep, load, point_name, value_text
from .summary import paired_rows, seed_groups, t_interval, write

__all__ = ["FINISHED", "Point", "State", "Sweep", "check", "eta_seconds", "is_finished", "load", "paired_rows",
           "point_name", "run", "run_sweep", "seed_groups", "slot_environments", "stage_names", "t_interval",
           "value_text", "write"]


def check(sweep: Sweep, notebooks_dir: Path, parallel: int = 1) -> str:
    """The plan of `medcot sweep --check`: each point, its run directory and whether it has finished."""
    from .runner import expected_hash, visible_gpus

    stages = stage_names(sweep, notebooks_dir)
    slots = slot_environments(parallel, visible_gpus(), os.cpu_count() or 1)
    lines = [f"sweep {sweep.name}: {len(sweep.points)} points of {sweep.recipe}, stages {' '.join(stages)}"
             + (" (smoke mode)" if sweep.smoke else ""), f"  results: {sweep.root}",
             f"  {parallel} at a time: " + "; ".join(", ".join(f"{k}={v}" for k, v in slot.items()) for slot in slots)]
    for point in sweep.points:
        finished = is_finished(point.run_dir, stages, expected_hash(sweep, point))
        lines.append(f"  {'finished' if finished else 'to run  '}  {point.name}  ->  {point.run_dir}")
    return "\n".join(lines)


def run_sweep(path: str | Path, results_root: Path, notebooks_dir: Path, *, parallel: int, smoke: bool = False,
              echo=print) -> State:
    """Check the sweep file, run the unfinished points, write the summary; return the final state."""
    sweep = load(path, results_root)
    sweep.smoke = sweep.smoke or smoke
    state = run(sweep, parallel=parallel, notebooks_dir=notebooks_dir, echo=echo)
    echo(f"summary: {write(sweep, state)}")
    if state.interrupted:
        raise MedcotError(f"sweep {sweep.name} interrupted; run the same command again to resume it")
    return state

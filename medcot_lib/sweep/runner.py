"""Running a sweep: each point is `medcot run` in a subprocess, N at a time, with its state in sweep.json.

A point whose run directory already holds its finished stages (with the same parameters) is skipped without a
subprocess; an interrupted one is started again and the runner resumes it after its last completed stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from .. import DISCLAIMER, pipeline, recipe, smoke
from ..errors import MedcotError
from ..fileio import write_json
from .spec import Point, Sweep

STATUSES = ("pending", "running", "done", "skipped", "failed")
FINISHED = ("done", "skipped")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def stage_names(sweep: Sweep, notebooks_dir: Path) -> list[str]:
    return [s.stem for s in pipeline.select_stages(pipeline.discover_stages(notebooks_dir), sweep.stages)]


def expected_hash(sweep: Sweep, point: Point) -> str:
    """The params_hash `medcot run` records for this point (after smoke mode's mapping, with absolute data paths)."""
    cfg = recipe.load(sweep.recipe, point.overrides)
    if sweep.smoke:
        cfg, _ = smoke.smoke(cfg)
    return pipeline.params_hash(recipe.to_parameters(pipeline.absolute_paths(cfg)))


def is_finished(run_dir: Path, stages: list[str], params_hash: str) -> bool:
    """Every selected stage is done (or skipped by its switch), with these parameters, in a readable manifest."""
    if not (run_dir / pipeline.MANIFEST).is_file():
        return False
    try:
        manifest = pipeline.read_manifest(run_dir)
    except MedcotError:
        return False  # `medcot run` explains what is wrong with it when the point runs
    done = all(manifest["stages"].get(stage, {}).get("status") in FINISHED for stage in stages)
    return done and manifest.get("params_hash") == params_hash and manifest.get("status") in ("finished", "partial")


def command(sweep: Sweep, point: Point) -> list[str]:
    """`python -m medcot_lib run RECIPE --run-dir DIR -p KEY VALUE ...`; JSON values are YAML, as -p reads them."""
    args = [sys.executable, "-m", "medcot_lib", "run", str(sweep.recipe), "--run-dir", str(point.run_dir)]
    for key, value in point.overrides.items():
        args += ["-p", key, json.dumps(value)]
    if sweep.stages:
        args += ["--stages", *sweep.stages]
    return args + (["--smoke"] if sweep.smoke else [])


def slot_environments(parallel: int, gpus: list[str], cpus: int) -> list[dict[str, str]]:
    """One environment per slot: its own GPU on a CUDA machine, else an equal share of the CPU cores."""
    if gpus:
        if parallel > len(gpus):
            raise MedcotError(f"--parallel {parallel}: this machine has {len(gpus)} CUDA GPU(s) ({', '.join(gpus)}); "
                              f"one point runs per GPU, so use --parallel {len(gpus)} or fewer")
        return [{"CUDA_VISIBLE_DEVICES": gpus[slot]} for slot in range(parallel)]
    threads = str(max(1, cpus // parallel))  # torch reads OMP_NUM_THREADS for its intra-op pool
    return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(parallel)]


def visible_gpus() -> list[str]:
    """The CUDA devices a subprocess may be given, as CUDA_VISIBLE_DEVICES entries."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


def eta_seconds(durations: list[float], remaining: int, parallel: int) -> float | None:
    """Mean time of the points finished in this invocation, times the points left, over the slots; None before one."""
    if not durations:
        return None
    return sum(durations) / len(durations) * remaining / parallel


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def last_error_line(log: Path) -> str:
    """The runner's last `medcot: error:` message (with its indented detail lines), else the log's last line that names
    an error, else its last line."""
    lines = [line.rstrip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("medcot: error:")]
    if starts:
        detail = [lines[starts[-1]]]
        for line in lines[starts[-1] + 1:]:
            if not line.startswith(" "):
                break
            detail.append(line.strip())
        return " ".join(detail)[:500]
    named = [line.strip() for line in lines if "Error" in line or "error" in line]
    return (named or lines or ["(empty log)"])[-1][:500]


class State:
    """sweep.json: every point's status, timings and error, rewritten atomically after each change."""

    def __init__(self, sweep: Sweep):
        self.sweep, self.path = sweep, sweep.root / "sweep.json"
        self.points = {p.name: {"name": p.name, "overrides": p.swept, "run_dir": str(p.run_dir),
                                "log": str(sweep.root / "logs" / f"{p.name}.log"), "status": "pending"}
                       for p in sweep.points}
        self.started = time.monotonic()
        self.durations: list[float] = []  # seconds of each point that succeeded in this invocation
        self.interrupted = False
        self.begun = _now()

    def update(self, point: Point, **fields) -> None:
        self.points[point.name].update(fields)
        write_json(self.path, {"sweep": self.sweep.name, "file": str(self.sweep.file), "recipe": str(self.sweep.recipe),
                               "stages": self.sweep.stages, "smoke": self.sweep.smoke, "started": self.begun, "updated": _now(),
                               "disclaimer": DISCLAIMER, "points": list(self.points.values())})

    def count(self, *statuses: str) -> int:
        return sum(p["status"] in statuses for p in self.points.values())

    def progress(self, parallel: int) -> str:
        left = self.count("pending", "running")
        return (f"done {self.count(*FINISHED)}, running {self.count('running')}, failed {self.count('failed')} of "
                f"{len(self.points)}; elapsed {_clock(time.monotonic() - self.started)}, "
                f"ETA {_clock(eta_seconds(self.durations, left, parallel))}")


def run(sweep: Sweep, *, parallel: int, notebooks_dir: Path, echo=print) -> State:
    """Run every point not yet finished, `parallel` at a time; failures are recorded and the others go on."""
    environments = slot_environments(parallel, visible_gpus(), os.cpu_count() or 1)
    stages = stage_names(sweep, notebooks_dir)
    state = State(sweep)
    todo = []
    for point in sweep.points:
        if is_finished(point.run_dir, stages, expected_hash(sweep, point)):
            state.update(point, status="skipped", why="finished before this invocation")
        else:
            todo.append(point)
    echo(f"sweep {sweep.name}: {len(sweep.points)} points, {len(sweep.points) - len(todo)} already finished "
         f"(skipped), {len(todo)} to run, {parallel} at a time -> {sweep.root}")
    running: dict[int, tuple[Point, subprocess.Popen, float]] = {}
    try:
        _schedule(sweep, state, todo, running, environments, echo)
    except KeyboardInterrupt:  # the points that were running resume from their last completed stage next time
        for point, process, _ in running.values():
            process.terminate()
            process.wait()
            state.update(point, status="pending", interrupted=_now())
        state.interrupted = True
        echo(f"interrupted | {state.progress(parallel)}")
    return state


def _schedule(sweep: Sweep, state: State, todo: list[Point], running: dict, environments: list[dict], echo) -> None:
    parallel = len(environments)
    while todo or running:
        for slot in [s for s in range(parallel) if s not in running]:
            if not todo:
                break
            point = todo.pop(0)
            log = Path(state.points[point.name]["log"])
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a", encoding="utf-8") as out:  # appended: an interrupted attempt's output is kept above
                out.write(f"=== {_now()} {' '.join(command(sweep, point))}\n")
                out.flush()
                process = subprocess.Popen(command(sweep, point), stdout=out, stderr=subprocess.STDOUT,
                                           env={**os.environ, **environments[slot]}, cwd=Path.cwd())
            running[slot] = (point, process, time.monotonic())
            state.update(point, status="running", started=_now(), environment=environments[slot])
            echo(f"start  {point.name} [{', '.join(f'{k}={v}' for k, v in environments[slot].items())}] | {state.progress(parallel)}")
        time.sleep(0.2)
        for slot, (point, process, t0) in list(running.items()):
            if process.poll() is None:
                continue
            del running[slot]
            seconds = round(time.monotonic() - t0, 1)
            if process.returncode == 0:
                state.durations.append(seconds)  # not a failure's: most fail within seconds, which would shrink the ETA
                state.update(point, status="done", finished=_now(), seconds=seconds)
                echo(f"done   {point.name} in {_clock(seconds)} | {state.progress(parallel)}")
            else:
                error = last_error_line(Path(state.points[point.name]["log"]))
                state.update(point, status="failed", finished=_now(), seconds=seconds, exit_code=process.returncode, error=error)
                echo(f"FAILED {point.name} (exit {process.returncode}): {error} | {state.progress(parallel)}")

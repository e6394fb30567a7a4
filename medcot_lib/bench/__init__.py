"""Benchmarks behind `medcot bench`: performance figures are measured, not asserted.

Shared machines are noisy, so a comparison runs all its sides in one process, in turn (A B A B ...),
`repeats` times after one discarded warm-up run of each, and reports the median with the min-max,
ratios of medians with the range of the per-repetition ratios, and whether each target was met.
Every benchmark writes results/bench/<name>.json (with the environment: versions, CPU/GPU, threads),
prints a small table and draws a PNG where a curve says more. `--quick` runs tiny sizes to check the
code paths; its numbers are marked `"quick": true` and never shown as the figures.

Shared modules: settings (recipe, targets, sizes), stats (the method), measure (time, memory), environment,
lengths (the real length distribution), trainside (timed training steps); one module per benchmark (train,
generate, export, pipeline, scaling, sweep, gpu_shapes for gpu); results (JSON, PNG, printed table) and readme (the README blocks).
This module runs the named benchmarks (`run`) and re-exports the names used as `bench.NAME`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MedcotError
from .environment import gpu
from .export import bench_export
from .generate import bench_generate
from .gpu_shapes import GPU_RECIPES, bench_gpu
from .lengths import REAL_MAX, REAL_MEDIAN, REAL_P5, REAL_P95, padding_share, real_lengths
from .pipeline import bench_pipeline
from .readme import (
    DEMO_END,
    DEMO_START,
    NOT_MEASURED,
    README_END,
    README_START,
    demo_section,
    readme_table,
    sweep_table,
    update_readme,
)
from .results import SCHEMA, finish, table
from .scaling import bench_scaling
from .settings import FULL, QUICK
from .stats import alternate, fit_power_law, ratio, summarize, summary, target
from .sweep import SWEEP_POINTS, _point_name, bench_sweep
from .train import bench_train

__all__ = [
    "ALL", "BENCHES", "GPU_RECIPES", "QUICK", "BENCHMARKS", "DEMO_END", "DEMO_START", "NOT_MEASURED", "README_END", "README_START", "REAL_MAX",
    "REAL_MEDIAN", "REAL_P5", "REAL_P95", "SCHEMA", "SWEEP_POINTS", "_point_name", "alternate", "command_line",
    "demo_section", "expand", "fit_power_law", "padding_share", "ratio", "readme_table", "real_lengths", "run",
    "summarize", "summary", "sweep_table", "target", "update_readme",
]

BENCHMARKS = ("train", "generate", "export", "pipeline", "scaling", "sweep", "gpu")
ALL = BENCHMARKS[:-1]  # `all` is the CPU demo's benchmarks; gpu (the seed recipes at their real shapes) is asked for by name
BENCHES = {"train": bench_train, "generate": bench_generate, "export": bench_export, "pipeline": bench_pipeline,
           "scaling": bench_scaling, "sweep": bench_sweep, "gpu": bench_gpu}


def command_line(names: list[str], repeats: int, quick: bool) -> str:
    return f"medcot bench {' '.join(names)} --repeats {repeats}" + (" --quick" if quick else "")


def expand(names: list[str] | None) -> list[str]:
    """Benchmark names in run order; 'all' (or nothing) is every benchmark."""
    names = names or ["all"]
    unknown = [n for n in names if n not in (*BENCHMARKS, "all")]
    if unknown:
        raise MedcotError(f"unknown benchmark(s) {unknown} (expected: {', '.join(BENCHMARKS)} or all)")
    return [n for n in BENCHMARKS if n in names or ("all" in names and n in ALL)]


def run(names: list[str] | None = None, *, repeats: int = 3, quick: bool = False, out_dir: str | Path | None = None,
        echo=print) -> dict[str, dict]:
    """Run the named benchmarks, write results/bench/<name>.json each, print their tables; return the results."""
    from .. import pipeline

    if repeats < 1:
        raise MedcotError("--repeats must be at least 1")
    names = expand(names)
    out_dir = Path(out_dir) if out_dir else pipeline.repo_root() / "results" / "bench"
    sizes, command = (QUICK if quick else FULL), command_line(names, repeats, quick)
    echo(f"{command}: {gpu().get('name') or gpu()['note']}")
    results = {}
    for name in names:
        echo(f"[bench] {name} ...")
        results[name] = finish(name, BENCHES[name](sizes, repeats), quick=quick, repeats=repeats, command=command, out_dir=out_dir)
        echo(table(results[name]) + f"\n\n-> {out_dir / (name + '.json')}\n")
    return results

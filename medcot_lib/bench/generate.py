"""`medcot bench generate`: batched HF and llama.cpp generation against the one-prompt-at-a-time loop, and its plot."""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Callable
from pathlib import Path

from .. import data, models, prompts, recipe
from ..errors import MedcotError
from .measure import PeakMemory, Stopwatch, guarded
from .settings import GENERATE_SPEEDUP, PARAMS, Sizes, _device, _recipe
from .stats import alternate, describe, ratio, target


@contextlib.contextmanager
def _quiet_llama():
    """llama-cpp-python prints llama.cpp's whole load log to sys.stderr; keep it out of the benchmark's output."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def _generate_side(generate_fn: Callable[[], list]) -> Callable[[], dict]:
    def run() -> dict:
        with PeakMemory() as memory, Stopwatch() as clock:
            generations = generate_fn()
        tokens = sum(g.new_tokens for g in generations)
        return {"seconds": clock.seconds, "new_tokens": tokens, "tokens_per_s": tokens / clock.seconds, **memory.figures()}

    return guarded(run)


def _base_gguf(cfg, directory: Path) -> tuple[Path | None, str]:
    """An F16 GGUF of the base model for the llama.cpp engine, or None and why (the gguf extra is optional)."""
    import importlib.util

    from .. import export

    if importlib.util.find_spec("llama_cpp") is None:
        return None, f"llama.cpp engine not measured: llama-cpp-python is not installed; {export.INSTALL_HINT}"
    try:
        with _quiet_llama():
            return export.to_gguf(export.base_checkpoint(cfg), directory / "base-F16.gguf", "f16"), ""
    except MedcotError as exc:
        return None, f"llama.cpp engine not measured: {exc}"


def bench_generate(sizes: Sizes, repeats: int) -> dict:
    """Batched, length-sorted HF and llama.cpp with parallel sequences vs the seeds' one-prompt-at-a-time HF loop."""
    from .. import generate

    cfg = _recipe()
    tokenizer = models.load_tokenizer(cfg.model_name_or_path)
    style = prompts.PromptStyle.from_recipe(cfg)
    medqa, _ = data.load_source(recipe.DatasetSource(path="bundled:medqa"))
    records = [medqa[i % len(medqa)] for i in range(sizes.gen_prompts)]
    model = models.load_model(cfg).to(_device())

    def decoding(batch_size: int):
        return generate.Decoding(sizes.gen_new_tokens, False, cfg.temperature, cfg.top_p, batch_size, cfg.seed)

    def hf(batch_size: int):
        return lambda: generate.generate(model, tokenizer, records, style, decoding(batch_size), progress=False)

    def llama(path: Path, batch_size: int):
        def run():
            with _quiet_llama():
                return generate.generate_gguf(path, tokenizer, records, style, decoding(batch_size), progress=False)
        return run

    with tempfile.TemporaryDirectory(prefix="medcot-bench-") as tmp:
        gguf, note = _base_gguf(cfg, Path(tmp))
        sides = {f"hf batch {b}": _generate_side(hf(b)) for b in sizes.gen_batch_sizes}
        if gguf:
            sides |= {f"llama.cpp F16 parallel {b}": _generate_side(llama(gguf, b)) for b in sizes.gen_batch_sizes}
        runs = alternate(sides, repeats)
    seed_loop = [r.get("tokens_per_s") for r in runs["hf batch 1"]]
    ratios = {f"{name} / hf batch 1": ratio([r.get("tokens_per_s") for r in side_runs], seed_loop)
              for name, side_runs in runs.items() if name != "hf batch 1"}
    best = max(ratios, key=lambda k: (ratios[k] or {}).get("median", 0), default="hf batch 1 / hf batch 1")
    rendered = [prompts.render(r, tokenizer, style, with_target=False) for r in records]
    prompt_lengths = [len(tokenizer(x.prompt, add_special_tokens=x.add_special_tokens)["input_ids"]) for x in rendered]
    reaching = [k.split(" / ")[0] for k, v in ratios.items() if v and v["median"] >= GENERATE_SPEEDUP]
    return {
        "settings": {"recipe": PARAMS, "prompts": len(records), "source": "bundled:medqa, rendered with the recipe's think style",
                     "prompt_tokens": describe(prompt_lengths), "prompt_tokens_per_run": sum(prompt_lengths),
                     "max_new_tokens": sizes.gen_new_tokens, "greedy": True,
                     "batch_sizes": list(sizes.gen_batch_sizes), "device": _device(),
                     "seed loop": "hf batch 1: one prompt at a time, as the seed notebooks do"},
        "notes": [note] if note else [], "sides": runs, "ratios": ratios,
        "answer": {"best": best.split(" / ")[0], "reaching_target": reaching},
        "targets": [target(f"generate: tokens/s, best ({best.split(' / ')[0]}) / one at a time", ratios.get(best), ">=",
                           GENERATE_SPEEDUP, "x")],
    }


def plot_generate(result: dict, path: Path) -> Path:
    """Generated tokens/s against batch size (parallel sequences), one line per engine, min-max as error bars."""
    import matplotlib.pyplot as plt

    from .. import plots

    fig, ax = plt.subplots(figsize=(6, 3.5))
    engines: dict[str, list] = {}
    for name, metrics in result["summary"].items():
        engine, size = name.rsplit(" ", 1)
        s = metrics.get("tokens_per_s")
        if s:
            engines.setdefault(engine, []).append((int(size), s))
    for engine, points in engines.items():
        points.sort()
        x, s = [p[0] for p in points], [p[1] for p in points]
        ax.errorbar(x, [v["median"] for v in s], yerr=[[v["median"] - v["min"] for v in s], [v["max"] - v["median"] for v in s]],
                    marker="o", capsize=3, label=engine)
    ax.set_xscale("log", base=2)
    sizes = sorted({size for points in engines.values() for size, _ in points})
    ax.set_xticks(sizes, [str(size) for size in sizes])
    ax.set_xlabel("batch size (parallel sequences)")
    ax.set_ylabel("generated tokens/s")
    ax.set_title(f"Generation throughput, {result['settings']['prompts']} MedQA prompts, greedy"
                 + (" (QUICK: not a figure)" if result["quick"] else ""), fontsize=9)
    ax.legend(fontsize=8)
    plots.save(fig, path)
    plt.close(fig)
    return path

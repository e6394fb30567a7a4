"""`medcot bench scaling`: training time against the number of examples and against max_length, with power-law fits."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .. import models, prompts, train
from .lengths import length_matched
from .settings import PARAMS, Sizes, _device, _recipe
from .stats import alternate, fit_power_law, summary
from .trainside import fitting, timed_side, train_side, with_batches

SCALING_X = {"examples": "examples", "length": "mean_length"}  # axis -> the work measure its fit uses as x


def bench_scaling(sizes: Sizes, repeats: int) -> dict:
    """Training time (default recipe) against the number of examples and against max_length, with power-law fits."""
    cfg, device = _recipe(), _device()
    tokenizer = models.load_tokenizer(cfg.model_name_or_path)
    style = prompts.PromptStyle.from_recipe(cfg)
    pool = length_matched(max(*sizes.scaling_examples, sizes.scaling_length_examples), tokenizer, style, cfg.seed)
    points = [("examples", f"n={n}", n, sizes.scaling_examples_length) for n in sizes.scaling_examples]
    points += [("length", f"max_length={m}", sizes.scaling_length_examples, m) for m in sizes.scaling_lengths]
    with tempfile.TemporaryDirectory(prefix="medcot-bench-scaling-") as tmp:
        trainer = train_side(cfg, pool[:1], tokenizer, sizes.train_batch, Path(tmp))
        swept, work = {}, {}
        for axis, name, n, max_length in points:
            rows = train.tokenize(pool[:n], tokenizer, style, max_length, cfg.completion_only_loss).rows
            swept[name] = with_batches(trainer, rows, sizes.train_batch)
            work[name] = {"axis": axis, "examples": n, "max_length": max_length, "tokens": swept[name].real_tokens,
                          "mean_length": swept[name].real_tokens / n}
        sides, memory = fitting([trainer.model], lambda: {name: timed_side(side) for name, side in swept.items()},
                                cfg.activation_checkpointing)
        runs = alternate(sides, repeats, warmup=False)
    fits = {}
    for axis, x in SCALING_X.items():
        measured = [(work[name][x], s["median"]) for name in runs
                    if work[name]["axis"] == axis and (s := summary(r.get("seconds") for r in runs[name]))]
        if len(measured) >= 2:
            fits[axis] = {"x": x, **fit_power_law(*zip(*measured, strict=True))}
    return {"settings": {"recipe": PARAMS, "batch_size": sizes.train_batch, "device": device,
                         "examples_axis": f"{list(sizes.scaling_examples)} examples at max_length {sizes.scaling_examples_length}",
                         "length_axis": f"max_length {list(sizes.scaling_lengths)} with {sizes.scaling_length_examples} examples; "
                                        "x is the mean tokens per sequence after truncation",
                         "data": "length-matched medical-o1 (as in the train benchmark)", "fit": "seconds = coefficient * x ** exponent",
                         "memory": memory},
            "work": work, "sides": runs, "fits": fits, "targets": []}


def plot_scaling(result: dict, path: Path) -> Path:
    """Seconds against examples and against mean sequence length, log-log, with each fitted power law."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import LogFormatter, NullFormatter

    from .. import plots

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, (axis, x_key) in zip(axes, SCALING_X.items(), strict=True):
        points = [(w[x_key], s) for name, w in result["work"].items()
                  if w["axis"] == axis and (s := result["summary"][name].get("seconds"))]
        if points:
            x, s = [p[0] for p in points], [p[1] for p in points]
            ax.errorbar(x, [v["median"] for v in s], yerr=[[v["median"] - v["min"] for v in s], [v["max"] - v["median"] for v in s]],
                        fmt="o", capsize=3, label="median, min-max")
        if fit := result["fits"].get(axis):
            grid = np.geomspace(min(x), max(x), 20)
            ax.plot(grid, fit["coefficient"] * grid ** fit["exponent"], "--", label=f"fit: exponent {fit['exponent']:.2f}")
        ax.set(xscale="log", yscale="log", xlabel=x_key.replace("_", " ") + (" (tokens)" if axis == "length" else ""),
               ylabel="training seconds")
        if points:
            ax.set_xticks(x, [f"{v:.0f}" for v in x])
        ax.xaxis.set_minor_formatter(NullFormatter())
        for formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # plain numbers, not 2x10^0
            formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.legend(fontsize=8)
    fig.suptitle("Training time scaling" + (" (QUICK: not a figure)" if result["quick"] else ""), fontsize=10)
    plots.save(fig, path)
    plt.close(fig)
    return path

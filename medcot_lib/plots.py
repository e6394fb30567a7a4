"""Figures shared by the stage notebooks. Each function saves a PNG and returns the figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from .fileio import atomic_path


def save(fig, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return Path(path)


def token_length_histogram(lengths: list[int], stats: dict, path: str | Path, title: str = "Formatted training sequences"):
    """Histogram of sequence lengths with median, p95, max and the configured max_length marked."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(lengths, bins=min(40, max(5, len(lengths) // 4)), color="#4c72b0", alpha=0.85)
    marks = [("median", stats["median"], "black", "-"), ("p95", stats["p95"], "#dd8452", "--"),
             ("max", stats["max"], "#c44e52", ":"), ("max_length", stats["max_length"], "#55a868", "-.")]
    for label, value, color, style in marks:
        ax.axvline(value, color=color, linestyle=style, label=f"{label} = {value:.0f}")
    ax.set_xlabel("tokens (prompt + target)")
    ax.set_ylabel("items")
    ax.set_title(f"{title} (n = {stats['n']})")
    ax.legend(fontsize=8)
    save(fig, path)
    return fig


def loss_curves(log_history: list[dict], path: str | Path, title: str | None = None):
    """Training loss per logged step and evaluation loss per evaluation."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="#4c72b0")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="#dd8452")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    if title:
        ax.set_title(title)
    ax.legend()
    save(fig, path)
    return fig


def memory_bars(rows: list[dict], path: str | Path):
    """Bar chart of model memory footprint per precision."""
    fig, ax = plt.subplots(figsize=(5, 3))
    bars = ax.bar([r["precision"] for r in rows], [r["bytes"] / 2**20 for r in rows], color=["#4c72b0", "#55a868", "#dd8452"][: len(rows)])
    ax.bar_label(bars, labels=[f"{r['bytes'] / 2**20:.0f} MiB" for r in rows], fontsize=8)
    ax.set_ylabel("MiB (weights + buffers)")
    ax.set_title("Model memory footprint")
    save(fig, path)
    return fig


def token_histogram(values: list[int], path: str | Path, xlabel: str, title: str):
    """Histogram of a token count (e.g. generated tokens per answer)."""
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(values, bins=min(30, max(5, len(values) // 2)), color="#4c72b0")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("items")
    ax.set_title(title)
    save(fig, path)
    return fig


def accuracy_bars(summary: dict, path: str | Path):
    """Headline metric per eval set, base beside fine-tuned, with 95% CI error bars."""
    import numpy as np

    names = list(summary)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names)), 3.5))
    x = np.arange(len(names))
    for offset, model, color in ((-0.2, "base", "#8c8c8c"), (0.2, "fine-tuned", "#4c72b0")):
        entries = [summary[n][model][summary[n]["headline"]] for n in names]
        values = np.array([e["value"] for e in entries])
        errors = np.array([[e["value"] - e["low"] for e in entries], [e["high"] - e["value"] for e in entries]])
        ax.bar(x + offset, values, width=0.4, yerr=errors, capsize=4, color=color, label=model)
    ax.set_xticks(x, [f"{n}\n{summary[n]['headline']} (n={summary[n]['n']})" for n in names], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (95% CI)")
    ax.legend()
    save(fig, path)
    return fig


def reasoning_length_histograms(rows: list[dict], path: str | Path):
    """Reasoning tokens per answer, base and fine-tuned overlaid (answers without reasoning are left out and counted)."""
    fig, ax = plt.subplots(figsize=(6, 3))
    for model, color in (("base", "#8c8c8c"), ("fine-tuned", "#4c72b0")):
        lengths = [r["reasoning_tokens"] for r in rows if r["model"] == model and r["reasoning_tokens"]]
        without = sum(1 for r in rows if r["model"] == model and not r["reasoning_tokens"])
        if lengths:
            ax.hist(lengths, bins=20, alpha=0.6, color=color, label=f"{model} (n={len(lengths)}, {without} without reasoning)")
        else:
            ax.plot([], [], color=color, label=f"{model}: no reasoning block in {without} answers")
    ax.set_xlabel("reasoning tokens")
    ax.set_ylabel("answers")
    ax.legend(fontsize=8)
    save(fig, path)
    return fig


def gguf_tradeoff(report: dict, path: str | Path):
    """GGUF file size against held-out perplexity, one point per file, the merged HF model as a reference line."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    rows = [r for r in report["files"] if r["perplexity"] is not None]
    ax.scatter([r["MB"] for r in rows], [r["perplexity"] for r in rows], color=["#c44e52" if r["flagged"] else "#4c72b0" for r in rows])
    for r in rows:
        ax.annotate(r["type"], (r["MB"], r["perplexity"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if report["reference"]["perplexity"]:
        ax.axhline(report["reference"]["perplexity"], color="black", linestyle="--", label="merged HF model (fp32)")
        ax.legend(fontsize=8)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel(f"perplexity ({report['held_out_tokens']} held-out tokens)")
    ax.set_title("GGUF size vs quality (red: flagged)")
    save(fig, path)
    return fig

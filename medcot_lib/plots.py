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


def loss_curves(log_history: list[dict], path: str | Path):
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

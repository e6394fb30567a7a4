"""A sweep's summary: one row per point with per-run CIs, seeds aggregated, paired differences, one figure per metric.

Per-run figures come from what stage 04 and stage 03 recorded (eval/metrics.json, metrics/03_qlora_train.json), and
the leaderboard's own reader (leaderboard.run_rows) gives the fine-tuned-vs-base columns. Written from whichever
points have finished, so a partial sweep has a summary too.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from .. import DISCLAIMER, leaderboard, metrics
from ..fileio import read_json, read_utf8, write_text
from .runner import FINISHED, State
from .spec import Sweep, value_text

SEED = "seed"
# Two-sided 95% Student t critical values by degrees of freedom; a df between two entries takes the smaller df's
# (larger, so conservative) value. From 120 on, 1.98 against the normal's 1.96.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def t_interval(values: list[float]) -> dict | None:
    """Mean with its 95% t-interval across runs (seeds), or None below two values."""
    if len(values) < 2:
        return None
    array = np.asarray(values, dtype=float)
    half = T_975[max(df for df in T_975 if df <= len(values) - 1)] * array.std(ddof=1) / math.sqrt(len(values))
    return {"value": float(array.mean()), "low": float(array.mean() - half), "high": float(array.mean() + half), "n": len(values)}


def point_metrics(run_dir: Path) -> dict[str, dict]:
    """The fine-tuned model's headline and format compliance per eval set (each with its CI), and stage 03's losses."""
    found = {}
    if (path := run_dir / "eval" / "metrics.json").is_file():
        for set_name, entry in read_json(path)["sets"].items():
            found[f"{set_name} {entry['headline']}"] = entry["fine-tuned"][entry["headline"]]
            found[f"{set_name} format_compliance"] = entry["fine-tuned"]["format_compliance"]
    if (path := run_dir / "metrics" / "03_qlora_train.json").is_file():
        trained = read_json(path)
        for key, name in (("train_loss", "train_loss"), ("eval_loss_last", "eval_loss")):
            if trained.get(key) is not None:
                found[name] = {"value": float(trained[key])}
    return found


def _cell(entry: dict | None) -> str:
    if entry is None:
        return ""
    return metrics.ci_text(entry) if "low" in entry else f"{entry['value']:.3f}"


def points_table(sweep: Sweep, state: State, found: dict[str, dict]) -> list[dict]:
    """One row per point: its swept values, status, each metric with its per-run CI, and fine-tuned minus base."""
    names = sorted({m for f in found.values() for m in f}, key=_metric_order)
    rows = []
    for point in sweep.points:
        status = state.points[point.name]["status"]
        row = {"point": point.name, "status": "done (earlier)" if status == "skipped" else status,
               **{key: value_text(point.swept[key]) if key in point.swept else "(recipe)" for key in sweep.swept_keys}}
        row.update({name: _cell(found.get(point.name, {}).get(name)) for name in names})
        for board in leaderboard.run_rows(point.run_dir) if point.name in found else []:
            row[f"{board['eval set']} {board['metric']} vs base"] = f"{board['difference']} (p {board['p']})"
        rows.append(row)
    return rows


def _metric_order(name: str) -> tuple:
    return ("loss" in name, "format" in name, name)


def seed_groups(sweep: Sweep, found: dict[str, dict]) -> list[dict]:
    """Points that differ only in seed, grouped: each metric's mean with its 95% t-interval across seeds (n >= 2)."""
    if SEED not in sweep.swept_keys:
        return []
    groups: dict[str, list] = {}
    for point in sweep.points:
        if point.name in found:
            others = ",".join(f"{k}={value_text(v)}" for k, v in point.swept.items() if k != SEED) or "(all)"
            groups.setdefault(others, []).append(found[point.name])
    rows = []
    for others, members in groups.items():
        row = {"group": others, "seeds (n)": len(members)}
        for name in sorted({m for f in members for m in f}, key=_metric_order):
            values = [f[name]["value"] for f in members if name in f]
            interval = t_interval(values)
            row[name] = (f"{metrics.ci_text(interval)} (n={len(values)})" if interval
                         else f"{values[0]:.3f} (n=1, no interval)" if values else "")
        rows.append(row)
    return rows


def _fine_tuned_items(run_dir: Path) -> dict[str, dict[str, dict]]:
    """Stage 04's per-item rows of the fine-tuned model: {eval set: {item id: row}}."""
    path = run_dir / "eval" / "generations.jsonl"
    items: dict[str, dict[str, dict]] = {}
    if path.is_file():
        for line in read_utf8(path).splitlines():
            row = json.loads(line)
            if row["model"] == "fine-tuned":
                items.setdefault(row["set"], {})[row["id"]] = row
    return items


def paired_rows(reference: dict, other: dict, point: str, resamples: int = metrics.DEFAULT_RESAMPLES) -> list[dict]:
    """The point minus the reference on the eval items both scored (same set, id and gold), per set, with paired CIs."""
    rows = []
    for set_name, ref_items in reference.items():
        items = other.get(set_name, {})
        shared = [i for i in ref_items if i in items and ref_items[i]["gold"] == items[i]["gold"]]
        base = {"point": point, "eval set": set_name, "shared items": f"{len(shared)} (of {len(ref_items)} / {len(items)})"}
        if not shared:
            rows.append({**base, "metric": "", "difference": "", "p": "",
                         "note": "skipped: no eval items in common with the reference (different eval data)"})
            continue
        ref, new = [ref_items[i] for i in shared], [items[i] for i in shared]
        note = "" if len(shared) == len(ref_items) == len(items) else "on the shared items only"
        if "correct" in ref[0]:
            tests = {"accuracy": metrics.paired_accuracy_difference([r["correct"] for r in ref], [r["correct"] for r in new],
                                                                    resamples=resamples)}
        else:
            tests = {"rouge_l": metrics.paired_bootstrap([r["rouge_l"] for r in ref], [r["rouge_l"] for r in new], resamples=resamples)}
        tests["format_compliance"] = metrics.paired_accuracy_difference([r["well_formed"] for r in ref],
                                                                        [r["well_formed"] for r in new], resamples=resamples)
        rows += [{**base, "metric": key, "difference": metrics.ci_text(test, signed=True),
                  "p": f"{test['p_value']:.3g} ({test['test']})", "note": note} for key, test in tests.items()]
    return rows


def paired_differences(sweep: Sweep, state: State) -> tuple[str, list[dict]]:
    """Every finished point against the sweep's first point (the grid's first values), on shared items."""
    reference = sweep.points[0]
    if state.points[reference.name]["status"] not in FINISHED:
        return f"skipped: the reference point {reference.name} has not finished", []
    ref_items = _fine_tuned_items(reference.run_dir)
    if not ref_items:
        return f"skipped: the reference point {reference.name} has no stage 04 generations (eval/generations.jsonl)", []
    rows = [row for point in sweep.points[1:] if state.points[point.name]["status"] in FINISHED
            for row in paired_rows(ref_items, _fine_tuned_items(point.run_dir), point.name)]
    return f"reference: {reference.name}", rows


def figures(sweep: Sweep, found: dict[str, dict], out_dir: Path) -> list[Path]:
    """One figure per metric: a panel per swept parameter, each finished point with its per-run CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .. import plots

    params = [k for k in sweep.swept_keys if k != SEED] or sweep.swept_keys
    seeds = list(dict.fromkeys(p.swept.get(SEED) for p in sweep.points))
    paths = []
    for name in sorted({m for f in found.values() for m in f}, key=_metric_order):
        fig, axes = plt.subplots(1, len(params), figsize=(4.5 * len(params), 3.2), squeeze=False)
        for ax, param in zip(axes[0], params, strict=True):
            ticks = list(dict.fromkeys(value_text(p.swept[param]) for p in sweep.points if param in p.swept))
            for point in sweep.points:
                entry = found.get(point.name, {}).get(name) if param in point.swept else None
                if entry is None:
                    continue
                x = ticks.index(value_text(point.swept[param])) + 0.08 * (seeds.index(point.swept.get(SEED)) - (len(seeds) - 1) / 2)
                error = [[entry["value"] - entry["low"]], [entry["high"] - entry["value"]]] if "low" in entry else None
                ax.errorbar([x], [entry["value"]], yerr=error, fmt="o", capsize=3, color=f"C{seeds.index(point.swept.get(SEED))}",
                            label=f"seed {point.swept[SEED]}" if SEED in point.swept else None)
            ax.set_xticks(range(len(ticks)), ticks, fontsize=8)
            ax.set_xlabel(param)
            ax.set_ylabel(name)
            handles, labels = ax.get_legend_handles_labels()
            if labels:
                ax.legend(dict(zip(labels, handles, strict=True)).values(), dict.fromkeys(labels), fontsize=7)
        fig.suptitle(f"{sweep.name}: {name}" + (" (95% CI per run)" if any("low" in f.get(name, {}) for f in found.values()) else ""))
        paths.append(plots.save(fig, out_dir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"))
        plt.close(fig)
    return paths


def _markdown(rows: list[dict]) -> str:
    import pandas as pd

    return pd.DataFrame(rows).to_markdown(index=False) if rows else "(none)"


def write(sweep: Sweep, state: State) -> Path:
    """summary.md, summary.csv and figures/ under results/sweeps/<name>/, from the points finished so far."""
    import pandas as pd

    found = {p.name: point_metrics(p.run_dir) for p in sweep.points if state.points[p.name]["status"] in FINISHED}
    table = points_table(sweep, state, found)
    write_text(sweep.root / "summary.csv", pd.DataFrame(table).to_csv(index=False))
    seeds = seed_groups(sweep, found)
    reference, pairs = paired_differences(sweep, state)
    pictures = figures(sweep, found, sweep.root / "figures")
    failed = [p for p in state.points.values() if p["status"] == "failed"]
    unfinished = state.count("pending", "running")
    text = [f"# Sweep {sweep.name}", "", f"> {DISCLAIMER}", "",
            f"Sweep file `{sweep.file}` on recipe `{sweep.recipe}`" + (f", stages {' '.join(sweep.stages)}" if sweep.stages else "")
            + (", smoke mode" if sweep.smoke else "") + ".",
            f"{state.count(*FINISHED)} of {len(sweep.points)} points finished, {len(failed)} failed"
            + (f", {unfinished} not run (a partial sweep: the figures cover finished points only)" if unfinished else "") + ".",
            "", "## Points", "", "Fine-tuned model per eval set, 95% bootstrap CI per run; `vs base`: fine-tuned minus base on "
            "the same items (the run's own paired test).", "", _markdown(table), ""]
    if seeds:
        text += ["## Across seeds", "", "Points differing only in seed: mean and 95% t-interval across seeds (n seeds).", "",
                 _markdown(seeds), ""]
    text += ["## Paired differences", "", f"Each point minus the reference on the eval items both scored, paired bootstrap "
             f"CI (McNemar's exact test for yes/no rates); {reference}.", "", _markdown(pairs), ""]
    if failed:
        text += ["## Failed points", "", _markdown([{k: p.get(k) for k in ("name", "exit_code", "error", "log")} for p in failed]), ""]
    text += ["## Figures", "", *(f"![{p.stem}](figures/{p.name})" for p in pictures), ""]
    return write_text(sweep.root / "summary.md", "\n".join(text))

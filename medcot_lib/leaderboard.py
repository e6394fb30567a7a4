"""The cross-run leaderboard: every evaluated run's headline metrics in one table.

Rebuilt from scratch out of results/<run>/eval/metrics.json and results/<run>/manifest.json, sorted
and written atomically, so rebuilding it twice gives byte-identical files.
"""

from __future__ import annotations

from pathlib import Path

from . import random_models
from .errors import MedcotError
from .fileio import read_json, write_text
from .metrics import ci_text

COLUMNS = ["run", "model", "method", "data", "date", "eval set", "metric", "n", "base", "fine-tuned", "difference", "p", "test",
           "failures (base / fine-tuned)"]


def method(parameters: dict) -> str:
    """LoRA, QLoRA, DoRA or QDoRA, with rank and alpha."""
    name = "DoRA" if parameters.get("use_dora") else "LoRA"
    name = ("Q" + name) if parameters.get("load_in_4bit") else name
    return f"{name} r{parameters.get('lora_r')}/a{parameters.get('lora_alpha'):g}"


def data_label(parameters: dict) -> str:
    sources = parameters.get("dataset_mixture") or []
    return " + ".join(f"{s.get('name') or s['path']}" + (f"×{s['weight']:g}" if s.get("weight", 1) != 1 else "") for s in sources)


def model_label(reference: str) -> str:
    """The model column; a random-weight model says so, since its accuracy means nothing."""
    return f"{reference} (RANDOM WEIGHTS)" if random_models.is_random(reference) else reference


def run_rows(run_dir: Path) -> list[dict]:
    """The headline rows of one run (one per eval set), or none when the run has no evaluation."""
    metrics_path, manifest_path = run_dir / "eval" / "metrics.json", run_dir / "manifest.json"
    if not metrics_path.is_file():
        return []
    if not manifest_path.is_file():
        raise MedcotError(f"{run_dir}: has eval/metrics.json but no manifest.json; was it written by `medcot run`?")
    manifest, evaluation = read_json(manifest_path), read_json(metrics_path)
    parameters = manifest.get("parameters", {})
    rows = []
    for set_name, entry in evaluation["sets"].items():
        key = entry["headline"]
        diff = entry["difference"][key]
        rows.append({
            "run": manifest.get("run_name", run_dir.name), "model": model_label(parameters.get("model_name_or_path", "?")),
            "method": method(parameters), "data": data_label(parameters), "date": manifest.get("created", "")[:10],
            "eval set": set_name, "metric": key, "n": entry["n"], "base": ci_text(entry["base"][key]),
            "fine-tuned": ci_text(entry["fine-tuned"][key]), "difference": ci_text(diff, signed=True),
            "p": f"{diff['p_value']:.3g}", "test": diff["test"],
            "failures (base / fine-tuned)": f"{entry['base']['extraction_failure_rate']['value']:.0%} / "
                                            f"{entry['fine-tuned']['extraction_failure_rate']['value']:.0%}",
        })
    return rows


def rebuild(results_root: str | Path):
    """Write results/leaderboard.csv and .md from every run under results_root; return the table."""
    import pandas as pd

    root = Path(results_root)
    rows = [row for run_dir in sorted(p for p in root.iterdir() if p.is_dir()) for row in run_rows(run_dir)]
    table = pd.DataFrame(rows, columns=COLUMNS).sort_values(["eval set", "run"], kind="stable").reset_index(drop=True)
    write_text(root / "leaderboard.csv", table.to_csv(index=False))
    header = "# medcot leaderboard\n\n> Educational and research use only; not for clinical use.\n\n" \
             "Headline metric per eval set with 95% bootstrap CIs; difference = fine-tuned - base on the same items.\n\n"
    write_text(root / "leaderboard.md", header + (table.to_markdown(index=False) if rows else "No evaluated runs yet.") + "\n")
    return table

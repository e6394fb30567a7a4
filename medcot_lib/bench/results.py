"""A benchmark's result: its JSON (method, environment, summaries, history), its PNG, and the table the command prints."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from ..fileio import read_json, write_json
from .environment import environment
from .generate import plot_generate
from .pipeline import plot_pipeline
from .scaling import plot_scaling
from .settings import GENERATE_SPEEDUP
from .stats import summarize

SCHEMA = 1  # bump when the JSON layout changes
HISTORY_KEEP = 10  # earlier headline results kept in each JSON, so a change's before/after stays on record
PLOTS = {"generate": plot_generate, "scaling": plot_scaling, "pipeline": plot_pipeline}


def _headline(result: dict) -> dict:
    return {k: result.get(k) for k in ("created", "quick", "command", "met", "targets")} | {"git": result.get("environment", {}).get("git")}


def finish(name: str, body: dict, *, quick: bool, repeats: int, command: str, out_dir: Path) -> dict:
    """Add the method and environment to a benchmark's body, keep the previous headline, write JSON (and PNG)."""
    path = out_dir / f"{name}.json"
    previous = read_json(path) if path.is_file() else None
    result = {"schema": SCHEMA, "benchmark": name, "quick": quick, "command": command,
              "created": datetime.now(UTC).isoformat(timespec="seconds"), "repeats": repeats,
              "method": "warm-up run of each side discarded, then the sides in turn (A B A B ...) `repeats` times; "
                        "median and min-max per metric; ratios: median / median, range over paired repetitions",
              "environment": environment(), **body}
    result["summary"] = {side: summarize(runs) for side, runs in body["sides"].items()}
    result["met"] = all(t["met"] for t in result["targets"]) if result["targets"] else None  # None: nothing to meet
    history = (previous.get("history", []) + [_headline(previous)]) if previous else []
    result["history"] = history[-HISTORY_KEEP:]
    write_json(path, result)
    if name in PLOTS:
        if figure := PLOTS[name](result, out_dir / f"{name}.png"):
            result["figure"] = str(figure)
            write_json(path, result)
    return result


def _spread(value, low=None, high=None, unit: str = "") -> str:
    """'1.23x (1.1–1.4)': a median with its min–max, three significant digits."""
    if value is None:
        return "n/a"
    text = f"{value:.3g}{unit}"
    return f"{text} ({low:.3g}–{high:.3g})" if low is not None and high is not None and low != high else text


def table(result: dict) -> str:
    """A markdown table of a benchmark: each side's metrics as median (min–max), then its targets."""
    import pandas as pd

    rows = [{"side": side, **{m: _spread(s["median"], s["min"], s["max"]) if s else "n/a" for m, s in metrics.items()}}
            for side, metrics in result["summary"].items()]
    errors = {side: runs[-1]["error"] for side, runs in result["sides"].items() if runs and "error" in runs[-1]}
    text = pd.DataFrame(rows).fillna("").to_markdown(index=False)
    if errors:
        text += "\n\n" + "\n".join(f"- {side}: {error}" for side, error in errors.items())
    if lines := _highlights(result):
        text += "\n\n" + "\n".join(f"- {line}" for line in lines)
    if result["targets"]:
        targets = pd.DataFrame([{"figure": t["figure"], "target": t["target"], "measured": _spread(t["value"], t["min"], t["max"], t["unit"]),
                                 "met": "yes" if t["met"] else "NO"} for t in result["targets"]])
        text += "\n\n" + targets.to_markdown(index=False)
    return f"### {result['benchmark']}" + (" (QUICK: checks the code path; not a figure)" if result["quick"] else "") + "\n\n" + text


def _highlights(result: dict) -> list[str]:
    """The figures of a benchmark that are not per-side metrics: fits, padding, QLoRA, the fastest engine, notes."""
    lines = [f"{axis} fit: seconds ∝ {f['x']}^{f['exponent']:.2f} (r² {f['r2']:.3f})" for axis, f in result.get("fits", {}).items()]
    if "padding_percent" in result:
        lines.append("padding % of computed tokens: " + ", ".join(f"{k} {v:.1f}" for k, v in result["padding_percent"].items()))
    if q := result.get("qlora"):
        step = q["ratios"]["step_s qlora / lora"]
        lines.append(f"QLoRA / LoRA ({q['lora_dtype']}): model footprint {q['model_footprint_gb']['qlora']:.2f} / "
                     f"{q['model_footprint_gb']['lora']:.2f} GB, step time x{_spread(*(step[k] for k in ('median', 'min', 'max'))) if step else 'n/a'}")
    if memory := result.get("settings", {}).get("memory"):
        lines.append(f"gradient checkpointing: {memory['gradient_checkpointing']}" + (f" ({memory['why']})" if "why" in memory else ""))
    if answer := result.get("answer"):
        lines.append(f"fastest: {answer['best']}; reaching {GENERATE_SPEEDUP:g}x: {', '.join(answer['reaching_target']) or 'none'}")
    return lines + result.get("notes", [])

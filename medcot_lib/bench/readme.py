"""The README's blocks: the Performance table and 'What the demo shows' (with the sweep's table), rewritten in place."""

from __future__ import annotations

from pathlib import Path

from ..errors import MedcotError
from ..fileio import read_json, write_text
from .results import SCHEMA, _spread
from .settings import _recipe
from .sweep import SWEEP_KNOBS, _point_name

README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
DEMO_START, DEMO_END = "<!-- demo:start -->", "<!-- demo:end -->"
NOT_MEASURED = "_Not measured yet._ Run `medcot bench all --update-readme` on the machine whose figures belong here."


def readme_table(out_dir: str | Path) -> str:
    """The README's Performance table, from the non-quick results in out_dir ('not measured yet' without any)."""
    import pandas as pd

    results = [r for p in sorted(Path(out_dir).glob("*.json")) if not (r := read_json(p)).get("quick") and r.get("schema") == SCHEMA]
    if not results:
        return NOT_MEASURED
    rows = [{"figure": t["figure"], "target": t["target"], "measured: median (min–max)": _spread(t["value"], t["min"], t["max"], t["unit"]),
             "met": "yes" if t["met"] else "**no**"} for r in results for t in r["targets"]]
    rows += [{"figure": f"{r['benchmark']}: training time ∝ {f['x'].replace('_', ' ')}^k", "target": "(reported)",
              "measured: median (min–max)": f"k = {f['exponent']:.2f} (r² {f['r2']:.3f})", "met": "–"}
             for r in results for f in r.get("fits", {}).values()]
    where = [f"- `{r['benchmark']}`: {r['created'][:10]}, {_machine(r['environment'])}, `{r['command']}`" for r in results]
    return pd.DataFrame(rows).to_markdown(index=False) + "\n\nMeasured (date, machine, command):\n" + "\n".join(where)


def _machine(env: dict) -> str:
    gpu_info = env["gpu"]
    device = gpu_info["name"] if gpu_info["present"] else "no GPU"
    return f"{env['cpu_model']} ({env['hardware']['cpu_count']} cores, {env['torch_threads']} torch threads), {device}"


def _measured(path: Path) -> dict | None:
    result = read_json(path) if path.is_file() else None
    return result if result and not result.get("quick") and result.get("schema") == SCHEMA else None


def _with_ci(entry: dict) -> str:
    return f"{entry['value']:.0%} [{entry['low']:.0%}, {entry['high']:.0%}]"


def _example(example: dict) -> str:
    def block(text: str) -> str:
        return "```text\n" + text.strip().replace("```", "` ` `") + "\n```"

    return "\n".join([f"**{example['set']}**: {example['question']}", "", f"Reference: {example['gold']}", "",
                      "<table><tr><th>base model</th><th>fine-tuned</th></tr><tr><td>", "", block(example["base"]), "",
                      "</td><td>", "", block(example["fine-tuned"]), "", "</td></tr></table>"])


def demo_section(out_dir: str | Path) -> str:
    """The README's 'What the demo shows' block, from results/bench/pipeline.json (and sweep.json where measured)."""
    import pandas as pd

    out_dir = Path(out_dir)
    pipeline_result = _measured(out_dir / "pipeline.json")
    runs = [r for r in (pipeline_result or {}).get("sides", {}).get("cpu-demo", []) if "demo" in r]
    if not runs:
        return "_Not measured yet._ Run `medcot bench pipeline --update-readme`."
    effect = runs[-1]["demo"]
    rows = []
    for name, entry in effect["sets"].items():
        fmt, diff = entry["format_compliance"], entry["format_difference"]
        head, head_diff = entry[entry["headline"]], entry["headline_difference"]
        p_text = f"{head_diff['p_value']:.2g}" if "p_value" in head_diff else "–"
        rows.append({"set": name, "n": entry["n"], "format: base": _with_ci(fmt["base"]),
                     "format: fine-tuned": _with_ci(fmt["fine-tuned"]), "format p (McNemar)": f"{diff['p_value']:.2g}",
                     entry["headline"].replace("_", "-") + ": base → fine-tuned":
                         f"{head['base']['value']:.2f} → {head['fine-tuned']['value']:.2f} (p {p_text})"})
    seconds = pipeline_result["summary"]["cpu-demo"]["seconds"]
    lines = [f"Measured by `{pipeline_result['command']}` on {pipeline_result['created'][:10]} "
             f"({_machine(pipeline_result['environment'])}): the whole pipeline took "
             f"{_spread(seconds['median'], seconds['min'], seconds['max'], ' s')} over {seconds['n']} runs, plus "
             f"{pipeline_result.get('settings', {}).get('materialisation_s', 0):.0f} s once per machine to build the embedded checkpoint. "
             "Format: a closed `<think>` block, then a final answer. 95% bootstrap CIs; McNemar's exact test on the same "
             "items. Accuracy is reported, not claimed: a 135M model trained for minutes learns the format, not medicine.",
             "", pd.DataFrame(rows).fillna("").to_markdown(index=False), "",
             "![Loss curves of the CPU demo](results/bench/pipeline.png)", ""]
    lines += [_example(example) + "\n" for example in effect["examples"]]
    if sweep := _measured(out_dir / "sweep.json"):
        sizes = sweep["settings"]["data"]
        lines += [f"Why the demo trains as it does (`{sweep['command']}`, {sweep['created'][:10]}: each setting trained once "
                  f"on the demo data as it was then, {sizes['train']} training and {sizes['val']} val items; format "
                  "compliance on the val split, never on an eval set; train s includes the evaluations):", "", sweep_table(sweep)]
    return "\n".join(lines)


def sweep_table(result: dict) -> str:
    """One row per sweep point: training time, eval loss, val format compliance, memory, adapter size."""
    import pandas as pd

    shipped = _point_name({k: getattr(_recipe(), k) for k in SWEEP_KNOBS})  # the recipe as it is now
    rows = []
    for point, runs in result["sides"].items():
        run = runs[-1]
        setting = point + (" (**the demo recipe**)" if point == shipped else "")
        if "error" in run:
            rows.append({"setting": setting, "train s": run["error"]})
            continue
        rows.append({"setting": setting, "train s": f"{run['train_s']:.0f}",
                     "eval loss first → last": f"{run['eval_loss_first']:.3f} → {run['eval_loss_last']:.3f}",
                     "val format compliance": f"{run['val_format_compliance']:.0%} (n={run['val_n']})",
                     "peak GB": f"{run['peak_memory_gb']:.1f}", "trainable params": f"{run['trainable_parameters'] / 1e6:.2f}M"})
    return pd.DataFrame(rows).fillna("").to_markdown(index=False)


def _replace_block(text: str, start: str, end: str, body: str, readme: Path) -> str:
    if start not in text or end not in text:
        raise MedcotError(f"{readme}: no {start} ... {end} block to rewrite")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"


def update_readme(readme: str | Path, out_dir: str | Path) -> Path:
    """Rewrite the README's Performance block and its 'What the demo shows' block from the files in out_dir, atomically."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    text = _replace_block(text, README_START, README_END, readme_table(out_dir), readme)
    text = _replace_block(text, DEMO_START, DEMO_END, demo_section(out_dir), readme)
    return write_text(readme, text)

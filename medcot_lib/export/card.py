"""The Hub model card (README.md): intended use, training, evaluation, GGUF files, and the base's license."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from .. import DISCLAIMER, models, prompts, random_models
from ..errors import MedcotError
from ..fileio import read_json, write_text
from ..recipe import DEFAULT_MODEL
from .inputs import base_checkpoint
from .paths import EXPORT_DIR


def _flat(obj, prefix: str = "", depth: int = 3) -> list[tuple[str, object]]:
    """Scalar leaves of nested metrics as (dotted key, value), for a generic table."""
    if isinstance(obj, dict) and depth:
        return [row for k, v in obj.items() for row in _flat(v, f"{prefix}{k}.", depth - 1)]
    if isinstance(obj, bool | int | float | str) or obj is None:
        return [(prefix.rstrip("."), obj)]
    return []


def _table(rows: list[tuple[str, object]], header: tuple[str, str]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return "\n".join(lines + [f"| {cell(k)} | {cell(v)} |" for k, v in rows])


def _license(cfg) -> str:
    reference = cfg.model_name_or_path
    if reference.startswith(models.EMBEDDED_PREFIX):
        return models.embedded_spec(reference).license.lower()
    if random_models.is_random(reference):  # untrained weights of medcot's making, and the embedded tokenizer
        return models.embedded_spec(DEFAULT_MODEL).license.lower()
    card = base_checkpoint(cfg) / "README.md"
    if card.is_file():
        match = re.search(r"^license:\s*(\S+)", card.read_text(encoding="utf-8"), re.MULTILINE)
        if match:
            return match.group(1)
    return "other"


def model_card(cfg, run_dir: str | Path, report: dict | None = None) -> str:
    """A Hub model card (README.md) from the run's training metrics, manifest, evaluation and GGUF verification."""
    run_dir = Path(run_dir)
    metrics_path, manifest_path = run_dir / "metrics" / "03_qlora_train.json", run_dir / "manifest.json"
    eval_path = run_dir / "eval" / "metrics.json"
    trained = read_json(metrics_path) if metrics_path.is_file() else {}
    manifest = read_json(manifest_path) if manifest_path.is_file() else {}
    if manifest.get("parameters"):  # the recipe that actually trained the adapter, when the runner recorded it
        from ..recipe import validate

        with contextlib.suppress(MedcotError):
            cfg = validate(manifest["parameters"], origin=str(manifest_path))
    method = ("QLoRA (4-bit NF4 base)" if cfg.load_in_4bit else "LoRA") + (" with DoRA" if cfg.use_dora else "")
    base_line = cfg.model_name_or_path
    front = ["---", f"license: {_license(cfg)}", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [medical, chain-of-thought, " + ("qlora" if cfg.load_in_4bit else "lora") + ", gguf, medcot]"]
    random = random_models.is_random(cfg.model_name_or_path)
    if not cfg.model_name_or_path.startswith(models.EMBEDDED_PREFIX) and not random and not Path(cfg.model_name_or_path).exists():
        front.append(f"base_model: {cfg.model_name_or_path}")
    else:
        spec = models.embedded_spec(cfg.model_name_or_path) if cfg.model_name_or_path.startswith(models.EMBEDDED_PREFIX) else None
        if spec:
            base_line += f" (SmolLM2-135M-Instruct, from the {spec.pip_spec} Q4_1 GGUF, dequantised)"
    front.append("---")
    training = [("base model", base_line), ("method", method), ("rank r / alpha", f"{cfg.lora_r} / {cfg.lora_alpha}"),
                ("target modules", cfg.lora_target_modules if isinstance(cfg.lora_target_modules, str) else ", ".join(cfg.lora_target_modules)),
                ("prompt style", cfg.prompt_style), ("max length (tokens)", cfg.max_length), ("learning rate", cfg.learning_rate),
                ("effective batch", cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps),
                ("data", ", ".join(s.label for s in cfg.dataset_mixture))]
    training += [(key.replace("_", " "), trained[key]) for key in ("global_step", "train_loss", "eval_loss_first", "eval_loss_last",
                                                                  "runtime_s", "tokens_per_s", "peak_memory_gb") if key in trained]
    training += [(f"{k} (trainable)", v) for k, v in trained.get("parameters", {}).items() if k == "percent"]
    if manifest:
        training += [("medcot", manifest.get("versions", {}).get("medcot")), ("git commit", manifest.get("git", {}).get("commit")),
                     ("hardware", manifest.get("hardware", {}).get("gpus"))]
    if eval_path.is_file():
        evaluation = _table(_flat(read_json(eval_path))[:60], ("metric", "value"))
    else:
        evaluation = "Not evaluated: stage 04 wrote no eval/metrics.json for this run."
    files = ["- `model.safetensors` (+ tokenizer, chat template, generation config): the adapter merged into the base",
             "- `adapter/`: the LoRA adapter alone (PEFT)"]
    if report:
        files.append("\n| GGUF | MB | bits/weight | perplexity (Δ vs merged) | same top token | flagged |\n|---|---|---|---|---|---|")
        for row in report["files"]:
            delta = f"{row['perplexity']:.3f} ({row['perplexity_delta']:+.3f})" if row["perplexity"] is not None else "-"
            same = f"{row['same_top_token']:.1%}" if row["same_top_token"] is not None else "-"
            files.append(f"| `{row['file']}` | {row['MB']} | {row['bits_per_weight']} | {delta} | {same} | "
                         f"{'yes: ' + '; '.join(row['causes']) if row['flagged'] else 'no'} |")
    title = cfg.hub_model_id or cfg.run_name
    body = f"""# {title}

> **Educational and research use only; not for clinical use.** Not medical advice: this model and its outputs
> must not inform the care of real patients.
{f"{chr(10)}> **{random_models.label(cfg.model_name_or_path)}.**{chr(10)}" if random else ""}
{cfg.model_name_or_path} fine-tuned for medical chain-of-thought answers with [medcot](https://github.com/medcot/medcot):
it reasons inside `<think>…</think>` and then answers.

## Intended use
Teaching and research on fine-tuning methods (LoRA, QLoRA, DoRA), chain-of-thought data and quantized deployment.
Not intended for diagnosis, treatment or any decision about real patients; outputs may be wrong, outdated or
unsafe, and the model has not been validated clinically.

## Training details
{_table(training, ("setting", "value"))}

## Evaluation
{evaluation}

## Files
{chr(10).join(files)}

## Use
With Ollama: `ollama create {cfg.run_name.lower()} -f Modelfile`. With llama.cpp: `llama-cli -m <file>.gguf -cnv`
(the chat template is embedded in each GGUF). With transformers, render prompts with the tokenizer's chat template
and the system prompt below, exactly as in training.

System prompt: {prompts.PromptStyle.from_recipe(cfg).system_prompt or "none"}

## Disclaimer
Educational and research use only; not for clinical use. {DISCLAIMER.split(". ", 1)[1]}
"""
    return "\n".join(front) + "\n\n" + body


def write_model_card(cfg, run_dir: str | Path, report: dict | None = None) -> Path:
    """run_dir/export/README.md (the dry run of a push writes only this)."""
    return write_text(Path(run_dir) / EXPORT_DIR / "README.md", model_card(cfg, run_dir, report))

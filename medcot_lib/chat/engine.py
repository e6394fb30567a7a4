"""The chat engine: both models, the template they share, the decoding rule, and what the page says about them."""

from __future__ import annotations

import importlib.metadata
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import __version__, evaluate, export, generate, models, pipeline, prompts, recipe
from ..data import Record
from ..errors import MedcotError
from ..fileio import read_json
from ..llamacpp import Sampling
from ..prompts import THINK_OPEN
from .backends import GGUFStreamer, HFStreamer, choose_backend, context_window, tuned_gguf

LABELS = ("base", "fine-tuned")
EVAL_EXAMPLES_PER_SET = 2  # eval items offered as examples, per eval set, beside the showcase questions


def run_recipe(run_dir: str | Path):
    """The recipe a run was made with, from its manifest (refused when another medcot version wrote it)."""
    run_path = Path(run_dir)
    if not (run_path / pipeline.MANIFEST).is_file():
        raise MedcotError(f"{run_path}: no {pipeline.MANIFEST}, so this is not a medcot run directory; train a model with "
                          f"`medcot run RECIPE --run-dir {run_path}` (stages 00 to 03 at least) first")
    return recipe.validate(pipeline.read_manifest(run_path)["parameters"], origin=str(run_path / pipeline.MANIFEST))



def examples(cfg, run_dir: str | Path) -> list[str]:
    """Clickable examples: the showcase questions, then the first eval items of each set, asked as stage 04 asks them."""
    sets = evaluate.load_eval_sets(cfg, run_dir)
    return list(prompts.SHOWCASE_QUESTIONS.values()) + [prompts.user_message(r) for s in sets
                                                         for r in s.records[:EVAL_EXAMPLES_PER_SET]]


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(cfg, run_dir: str | Path, backend: str, served: dict[str, str]) -> dict[str, str]:
    """What the page states: run, models and versions."""
    reference = cfg.model_name_or_path
    base = reference
    if reference.startswith(models.EMBEDDED_PREFIX):
        base += f" (from the {models.embedded_spec(reference).pip_spec} wheel)"
    trained = Path(run_dir) / "metrics" / "03_qlora_train.json"
    steps = read_json(trained).get("global_step") if trained.is_file() else None
    method = "DoRA" if cfg.use_dora else "QLoRA" if cfg.load_in_4bit else "LoRA"
    packages = ["torch", "transformers", "peft"] if backend == "hf" else ["llama_cpp_python"]
    return {"run": cfg.run_name, "medcot": __version__, "base model": base,
            "fine-tuned": f"{reference} + the run's {method} r{cfg.lora_r} adapter" + (f", {steps} steps" if steps else ""),
            "backend": backend, **{f"{label} weights": path for label, path in served.items()},
            "prompt style": cfg.prompt_style,
            "packages": ", ".join(f"{p} {_version(p)}" for p in [*packages, "gradio"] if _version(p))}


@dataclass(frozen=True)
class Output:
    text: str
    new_tokens: int
    finished: bool


@dataclass
class Chat:
    """Both models, the tokenizer and template they share, and the decoding rule; one generation at a time."""

    tokenizer: Any
    style: prompts.PromptStyle
    models: dict[str, Any]  # label -> a streamer
    context: int
    seed: int
    info: dict[str, str]
    log_path: Path | None = None  # None: nothing typed is written anywhere
    defaults: dict[str, float] = field(default_factory=dict)  # the recipe's decoding, for the page's controls
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def rendered(self, question: str) -> str:
        """The prompt text both models receive for a question: the training template, generation prompt included."""
        return prompts.render(_record(question), self.tokenizer, self.style, with_target=False).prompt

    @property
    def prefilled(self) -> bool:
        """Whether the template opens the think block itself (the output then holds only '</think>')."""
        return self.rendered("q").rstrip().endswith(THINK_OPEN)

    def _ids(self, question: str) -> list[int]:
        return generate.rendered_ids([_record(question)], self.tokenizer, self.style)[1][0]

    def prompt(self, question: str, max_new_tokens: int) -> tuple[str, list[int], str | None]:
        """(question as sent, its prompt's token ids, notice): a question too long for the context is cut, and said so."""
        budget = self.context - max_new_tokens
        ids = self._ids(question)
        if len(ids) <= budget:
            return question, ids, None
        words = self.tokenizer(question, add_special_tokens=False)["input_ids"]
        keep = len(words) - (len(ids) - budget)
        while keep > 0:
            cut = self.tokenizer.decode(words[:keep])
            ids = self._ids(cut)
            if len(ids) <= budget:
                return cut, ids, (f"**Question cut:** it is {len(words)} tokens long, and the {self.context}-token context "
                                  f"holds the template and {max_new_tokens} new tokens besides, so both models see only "
                                  f"its first {keep} tokens.")
            keep -= len(ids) - budget
        raise MedcotError(f"max_new_tokens={max_new_tokens} leaves no room for a question in the {self.context}-token context")

    def stream(self, ids: list[int], *, temperature: float, top_p: float, max_new_tokens: int) -> Iterator[dict[str, Output]]:
        """Both models' outputs so far, one new token of each per step; temperature 0 is greedy."""
        sampling = Sampling(temperature, top_p, self.seed) if temperature > 0 else None
        with self._lock:
            streams = {label: iter(model.stream(ids, max_new_tokens, sampling)) for label, model in self.models.items()}
            new: dict[str, list[int]] = {label: [] for label in streams}
            finished = dict.fromkeys(streams, False)
            while not all(finished.values()):
                for label, tokens in streams.items():
                    token = None if finished[label] else next(tokens, None)
                    if token is None:
                        finished[label] = True
                    else:
                        new[label].append(token)
                yield {label: Output(self.tokenizer.decode(new[label], skip_special_tokens=True), len(new[label]), finished[label])
                       for label in streams}

    def log(self, question: str, outputs: dict[str, Output], decoding: dict) -> None:
        """Append one exchange to the log file, when logging is on (it is off unless a log path was given)."""
        if self.log_path is None:
            return
        row = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "question": question, "decoding": decoding,
               **{label: output.text for label, output in outputs.items()}}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    def close(self) -> None:
        for model in self.models.values():
            model.close()


def _record(question: str) -> Record:
    return Record(id="chat", source="chat", question=question, answer="")


def open_chat(cfg, run_dir: str | Path, *, backend: str | None = None, log_path: str | Path | None = None) -> Chat:
    """Load both models of a run with the chosen backend (see `choose_backend`)."""
    run_path = Path(run_dir)
    chosen = choose_backend(cfg, run_path, backend)
    tokenizer = models.load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    context = context_window(cfg)
    if chosen == "llamacpp":
        paths = {"base": export.base_gguf(cfg, run_path), "fine-tuned": tuned_gguf(cfg, run_path)}
        streamers = {label: GGUFStreamer(path, context) for label, path in paths.items()}
    else:
        adapter = export.adapter_dir(run_path)
        evaluate.check_adapter_fits(cfg, adapter)
        model = evaluate.attach_adapter(models.load_model(cfg), adapter).eval()
        stop = generate.stop_ids(tokenizer, model.generation_config)
        streamers = {label: HFStreamer(model, adapter=label == "fine-tuned", stop=stop) for label in LABELS}
        paths = {"base": models.resolve(cfg.model_name_or_path), "fine-tuned": f"{models.resolve(cfg.model_name_or_path)} + {adapter}"}
    defaults = {"temperature": cfg.temperature if cfg.do_sample else 0.0, "top_p": cfg.top_p,
                "max_new_tokens": cfg.max_new_tokens}
    return Chat(tokenizer, prompts.PromptStyle.from_recipe(cfg), streamers, context, cfg.seed,
                describe(cfg, run_path, chosen, {k: str(v) for k, v in paths.items()}),
                Path(log_path) if log_path else None, defaults)


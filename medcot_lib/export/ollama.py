"""Ollama deployment files: the chat template in Ollama's Go template syntax, stop strings, the Modelfile."""

from __future__ import annotations

import os
from pathlib import Path

from .. import DISCLAIMER, __version__, prompts
from ..errors import MedcotError
from ..fileio import write_text
from ..generate import stop_ids
from .gguf_info import LOSSLESS_TYPES, gguf_metadata
from .merging import _saved_tokenizer
from .paths import EXPORT_DIR, merged_dir

_SENTINELS = {"system": "\u2063MEDCOT-SYSTEM\u2063", "user": "\u2063MEDCOT-USER\u2063",
              "assistant": "\u2063MEDCOT-ASSISTANT\u2063", "user2": "\u2063MEDCOT-USER-2\u2063"}


def _split(text: str, sentinel: str, what: str) -> tuple[str, str]:
    if text.count(sentinel) != 1:
        raise MedcotError(f"cannot derive an Ollama template: the chat template does not render the {what} message exactly once")
    before, after = text.split(sentinel)
    return before, after


def chat_segments(tokenizer, style: prompts.PromptStyle) -> dict[str, str | None]:
    """The literal text a chat template writes around each role's content, found by rendering sentinel messages.

    Turns are read from a conversation that ends with a user turn, as every Ollama prompt does, so a template that
    renders the last assistant turn its own way (Qwen3's empty think block) still yields its history turns. The end of
    an assistant turn is prompts.end_of_turn, the marker training appends. Templates whose other turns depend on their
    position (e.g. a system prompt folded into the first user turn) fail the consistency checks with a clear error.
    """
    s = _SENTINELS

    def render(messages, generation_prompt):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **style.template_kwargs)

    def prefix_of(longer, shorter, what):
        if not longer.startswith(shorter):
            raise MedcotError(f"cannot derive an Ollama template: adding {what} rewrites earlier turns of the chat template")
        return longer[len(shorter):]

    user = [{"role": "user", "content": s["user"]}]
    one = render(user, False)
    generation_prompt = prefix_of(render(user, True), one, "the generation prompt")
    three = render(user + [{"role": "assistant", "content": s["assistant"]}, {"role": "user", "content": s["user2"]}], False)
    head, rest = _split(three, s["user"], "user")
    between, rest = _split(rest, s["assistant"], "assistant")
    after_assistant, user_suffix = _split(rest, s["user2"], "second user")
    assistant_suffix = prompts.end_of_turn(tokenizer, style)
    if not between.startswith(user_suffix) or not after_assistant.startswith(assistant_suffix):
        raise MedcotError("cannot derive an Ollama template: the turns of a conversation do not follow one another in the "
                          "chat template")
    assistant_prefix, user_prefix = between[len(user_suffix):], after_assistant[len(assistant_suffix):]
    turn = user_prefix + s["user"] + user_suffix
    if not one.endswith(turn) or not head.endswith(user_prefix):
        raise MedcotError("cannot derive an Ollama template: the first user turn is rendered differently from later ones")
    segments = {"default_system": one[: -len(turn)], "generation_prompt": generation_prompt,
                "user_prefix": user_prefix, "user_suffix": user_suffix,
                "assistant_prefix": assistant_prefix, "assistant_suffix": assistant_suffix,
                "system_prefix": None, "system_suffix": None}
    try:
        with_system = render([{"role": "system", "content": s["system"]}] + user, False)
    except Exception:  # templates such as Gemma's reject a system role
        with_system = None
    if with_system is not None and with_system.endswith(turn):
        segments["system_prefix"], segments["system_suffix"] = _split(with_system[: -len(turn)], s["system"], "system")
    elif style.system_prompt:
        raise MedcotError("cannot derive an Ollama template: the chat template does not render a system message on its own, "
                          "but the prompt style has a system prompt")
    return segments


def _compose(segments: dict, messages: list[dict], generation_prompt: bool = True) -> str:
    """What the emitted Go template renders for these messages (used to check the derivation)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    text = (segments["system_prefix"] + system + segments["system_suffix"]) if system else segments["default_system"]
    for m in messages:
        if m["role"] in ("user", "assistant"):
            text += segments[f"{m['role']}_prefix"] + m["content"] + segments[f"{m['role']}_suffix"]
    return text + (segments["generation_prompt"] if generation_prompt else "")


def _go_literal(text: str) -> str:
    if "{{" in text or "}}" in text or '"""' in text:
        raise MedcotError(f"cannot write an Ollama template: the chat template's text {text!r} contains '{{{{', '}}}}' or '\"\"\"'")
    return text


def ollama_template(tokenizer, style: prompts.PromptStyle, *, strip_bos: bool = False) -> str:
    """The chat template in Ollama's Go template syntax (`.System`, `.Messages`, `.Role`, `.Content`, `.Prompt`).

    strip_bos: drop a BOS text the chat template writes itself, for runtimes that add BOS per the GGUF.
    """
    if style.name == "instruction":
        return _go_literal(f"{prompts.INSTRUCTION_HEADER}\n\n### Question:\n") + "{{ .Prompt }}" + "\n\n### Response:\n"
    seg = chat_segments(tokenizer, style)
    probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"},
             {"role": "user", "content": "V"}]
    for messages in (probe[1:2], probe[:2], probe, probe[1:]):
        if seg["system_prefix"] is None and messages[0]["role"] == "system":
            continue
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **style.template_kwargs)
        if _compose(seg, messages) != expected:
            raise MedcotError("cannot derive an Ollama template: this chat template's turns depend on their position; "
                              "write the Modelfile TEMPLATE by hand")
    bos = tokenizer.bos_token if strip_bos else None
    if bos:
        for key in ("default_system", "system_prefix"):
            if seg[key] and seg[key].startswith(bos):
                seg[key] = seg[key][len(bos):]
        if not seg["default_system"] and seg["user_prefix"].startswith(bos):
            raise MedcotError("cannot strip BOS: the chat template writes it inside every user turn")
    text = ""
    if seg["system_prefix"] is not None:
        text += "{{ if .System }}" + _go_literal(seg["system_prefix"]) + "{{ .System }}" + _go_literal(seg["system_suffix"])
        text += ("{{ else }}" + _go_literal(seg["default_system"]) if seg["default_system"] else "") + "{{ end }}"
    else:
        text += _go_literal(seg["default_system"])
    text += "{{ range .Messages }}"
    text += '{{ if eq .Role "user" }}' + _go_literal(seg["user_prefix"]) + "{{ .Content }}" + _go_literal(seg["user_suffix"])
    text += '{{ else if eq .Role "assistant" }}' + _go_literal(seg["assistant_prefix"]) + "{{ .Content }}" + _go_literal(seg["assistant_suffix"])
    text += "{{ end }}{{ end }}" + _go_literal(seg["generation_prompt"])
    return text


def stop_strings(tokenizer, style: prompts.PromptStyle, stop_ids: list[int]) -> list[str]:
    """Texts that end an answer: the stop tokens, and special tokens the template writes after an assistant turn."""
    texts = [tokenizer.convert_ids_to_tokens(i) for i in stop_ids]
    if style.name != "instruction":
        suffix = chat_segments(tokenizer, style)["assistant_suffix"]
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        texts += [tokenizer.convert_ids_to_tokens(i) for i in tokenizer(suffix, add_special_tokens=False)["input_ids"] if i in special]
    return list(dict.fromkeys(t for t in texts if t and t.strip()))


def modelfile(cfg, run_dir: str | Path, gguf_file: str | Path) -> str:
    """An Ollama Modelfile for one GGUF: FROM, TEMPLATE, SYSTEM, stop tokens, and the recipe's temperature and top_p."""
    from transformers import GenerationConfig

    merged = merged_dir(run_dir)
    tokenizer = _saved_tokenizer(cfg, merged)
    style = prompts.PromptStyle.from_recipe(cfg)
    meta = gguf_metadata(gguf_file)
    strip_bos = bool(meta["add_bos_token"]) and "bos_token" in (tokenizer.chat_template or "")
    generation = GenerationConfig.from_pretrained(merged) if (merged / "generation_config.json").is_file() else None
    relative = os.path.relpath(Path(gguf_file).resolve(), (Path(run_dir) / EXPORT_DIR).resolve())
    lines = [f"# Ollama Modelfile for {cfg.run_name}: {cfg.model_name_or_path} fine-tuned with medcot {__version__}.",
             f"# {DISCLAIMER}",
             f"#   ollama create {cfg.run_name.lower()} -f Modelfile && ollama run {cfg.run_name.lower()}",
             f"FROM ./{Path(relative).as_posix()}",
             f'TEMPLATE """{ollama_template(tokenizer, style, strip_bos=strip_bos)}"""']
    if style.system_prompt and style.name != "instruction":
        lines.append(f'SYSTEM """{_go_literal(style.system_prompt)}"""')
    lines += [f'PARAMETER stop "{text}"' for text in stop_strings(tokenizer, style, stop_ids(tokenizer, generation))]
    if not cfg.do_sample:
        lines.append("# The recipe decodes greedily (do_sample: false); these are its sampling settings for chat use.")
    lines += [f"PARAMETER temperature {cfg.temperature}", f"PARAMETER top_p {cfg.top_p}"]
    return "\n".join(lines) + "\n"


def write_modelfile(cfg, run_dir: str | Path, gguf_file: str | Path) -> Path:
    """run_dir/export/Modelfile for the given GGUF."""
    return write_text(Path(run_dir) / EXPORT_DIR / "Modelfile", modelfile(cfg, run_dir, gguf_file))


def default_gguf(files: dict[str, Path]) -> Path:
    """The file a Modelfile points at: the recipe's first quantization, else the unquantized file."""
    quantized = [path for gguf_type, path in files.items() if gguf_type not in LOSSLESS_TYPES]
    return (quantized or list(files.values()))[0]

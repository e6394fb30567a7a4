"""Stage 05 on the embedded model: merge (tied lm_head), GGUF conversion and quantization, verification, Modelfile, card.

No training: a small adapter on q_proj, v_proj and lm_head gets random LoRA B weights, so the merge is non-trivial
and the lm_head update would leak into the tied input embeddings if merged naively.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from medcot_lib import baseline, data, export, models, prompts, recipe, smoke, train
from medcot_lib.errors import MedcotError
from medcot_lib.export import merging as export_merging

N_TOKENS = 16  # greedy tokens compared per showcase prompt
HELD_OUT_TOKENS = 384  # perplexity budget: enough to separate F16 from Q4_K_M, cheap on 2 cores
SHOWCASE = baseline.SHOWCASE[:3]


def cfg_with(**overrides):
    return recipe.load("params/cpu-demo.yaml", {"run_name": "t", "report_to": [], "lora_r": 4, "gguf_agreement_tokens": N_TOKENS,
                                                "gguf_quant_types": ["Q4_K_M", "Q8_0"], **overrides})


def write_adapter(cfg, run_dir: Path, seed: int = 0) -> None:
    """A fresh adapter with random B matrices (a fresh LoRA adapter is a no-op: B starts at zero)."""
    model = train.add_adapter(cfg, models.load_model(cfg))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    model.save_pretrained(run_dir / "adapter")
    models.load_tokenizer(cfg.model_name_or_path).save_pretrained(run_dir / "adapter")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    cfg = cfg_with(lora_target_modules=["q_proj", "v_proj", "lm_head"])
    write_adapter(cfg, run_dir)
    data.save_prepared(data.prepare(cfg), run_dir)
    timings = {}
    with export.timed(timings, "merge"):
        merged = export.merge(cfg, run_dir)
    check = export.check_merge(cfg, run_dir)
    files = export.convert_all(cfg, run_dir, timings)
    with export.timed(timings, "verify"):
        report = export.verify(cfg, run_dir, files, data.load_prepared(run_dir)["test"], SHOWCASE, held_out_tokens=HELD_OUT_TOKENS)
    print("stage 05 timings (s):", timings)
    return {"cfg": cfg, "run_dir": run_dir, "merged": merged, "check": check, "files": files, "report": report}


def row(report, gguf_type):
    return next(r for r in report["files"] if r["type"] == gguf_type)


# --------------------------------------------------------------------------- merge


def test_merge_reproduces_base_plus_adapter_with_an_untied_lm_head(exported):
    check, merged = exported["check"], exported["merged"]
    assert check["ok"] and check["export_dtype"] == "float32"
    assert check["max_abs_diff"] < 1e-3 and check["top1_agreement"] == 1.0 and check["positions"] > 100
    # The lm_head update must not reach the input embeddings: the checkpoint stores both, untied.
    assert check["tied_embeddings"] is False
    with safe_open(merged / "model.safetensors", "pt") as f:
        assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(f.keys())
        base = models.resolve(models.DEFAULT_MODEL)
        with safe_open(Path(base) / "model.safetensors", "pt") as g:
            assert torch.equal(f.get_tensor("model.embed_tokens.weight"), g.get_tensor("model.embed_tokens.weight"))
            assert not torch.equal(f.get_tensor("lm_head.weight"), g.get_tensor("model.embed_tokens.weight"))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (merged / name).is_file(), name
    tokenizer = models.load_tokenizer(models.DEFAULT_MODEL)
    assert (merged / "chat_template.jinja").read_text() == tokenizer.chat_template


def test_a_naive_merge_into_tied_embeddings_fails_the_check(exported, tmp_path, monkeypatch):
    """Without untying, PEFT writes the lm_head update into the shared tensor; the check must catch it."""
    run_dir = tmp_path / "naive"
    shutil.copytree(exported["run_dir"] / "adapter", run_dir / "adapter")
    monkeypatch.setattr(export_merging, "_untie_embeddings", lambda model: False)
    export.merge(exported["cfg"], run_dir)
    check = export.check_merge(exported["cfg"], run_dir, records=SHOWCASE[:1])
    assert not check["ok"] and check["max_abs_diff"] > 0.1
    with pytest.raises(MedcotError, match=r"merged checkpoint's logits differ from base \+ adapter by up to .*tolerance for float32"):
        export.ensure_merge_ok(check)


def test_an_adapter_that_leaves_lm_head_alone_keeps_the_embeddings_tied(tmp_path):
    cfg = cfg_with(lora_target_modules=["q_proj"])
    write_adapter(cfg, tmp_path, seed=1)
    merged = export.merge(cfg, tmp_path)
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(merged / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    assert export.check_merge(cfg, tmp_path, records=SHOWCASE[:1])["ok"]


# --------------------------------------------------------------------------- GGUF files


def test_gguf_metadata_reads_back_architecture_template_and_tokenizer(exported):
    meta = export.gguf_metadata(exported["files"]["F16"])
    tokenizer = models.load_tokenizer(models.DEFAULT_MODEL)
    assert meta["architecture"] == "llama" and meta["name"] == "t"
    assert meta["chat_template"] == tokenizer.chat_template
    assert (meta["tokenizer_model"], meta["tokenizer_pre"], meta["vocab_size"]) == ("gpt2", "smollm", 49152)
    assert (meta["bos_token_id"], meta["eos_token_id"]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert meta["eos_token"] == "<|im_end|>" and meta["add_bos_token"] is False


def test_files_are_named_per_type_and_no_partial_files_remain(exported):
    gguf_dir = exported["run_dir"] / "export" / "gguf"
    assert sorted(p.name for p in gguf_dir.iterdir()) == ["t-F16.gguf", "t-Q4_K_M.gguf", "t-Q8_0.gguf"]


def test_tensor_types_written_show_the_k_quant_fallback_on_576_wide_rows(exported):
    files = exported["files"]
    f16, q8, q4 = (export.tensor_types(files[t], t) for t in ("F16", "Q8_0", "Q4_K_M"))
    assert set(f16["tensor_types"]) == {"F16", "F32"} and f16["bits_per_weight"] == pytest.approx(16, abs=0.1)
    assert set(q8["tensor_types"]) == {"Q8_0", "F32"} and not q8["fallback_tensors"]
    # SmolLM2's hidden size 576 is not a multiple of 256: those tensors cannot be Q4_K and fall back.
    assert q4["fallback_row_widths"] == [576] and sum(q4["fallback_tensors"].values()) > 100
    assert set(q4["fallback_tensors"]) <= {"Q5_0", "Q5_1", "Q8_0"} and "Q4_K" in q4["tensor_types"]
    assert q4["bytes"] < q8["bytes"] < f16["bytes"]
    table = export.tensor_type_table(files)
    assert list(table["type"]) == ["F16", "Q4_K_M", "Q8_0"] and table["K-quant fallbacks"].iloc[0] == "-"


# --------------------------------------------------------------------------- verification


def test_f16_and_q8_0_reproduce_the_merged_models_greedy_output(exported):
    report = exported["report"]
    assert report["agreement_tokens"] == N_TOKENS and report["showcase_prompts"] == len(SHOWCASE)
    f16, q8 = row(report, "F16"), row(report, "Q8_0")
    # F16: token for token over the first N greedy tokens of every showcase prompt.
    assert f16["greedy_identical"] == f16["prompts"], f16["per_prompt"]
    assert all(p["matching_prefix"] == N_TOKENS for p in f16["per_prompt"])
    # Q8_0: identical, except where the merged model itself hesitates between two tokens (a near-tie).
    assert q8["greedy_agree"] == q8["prompts"], q8["per_prompt"]
    for r in (f16, q8):
        assert not r["flagged"] and r["checks"]["problems"] == {} and r["checks"]["held_out_tokenizer_mismatches"] == 0


def test_perplexity_and_top_token_agreement_order_the_files_by_precision(exported):
    report = exported["report"]
    reference = report["reference"]["perplexity"]
    assert 300 <= report["held_out_tokens"] <= HELD_OUT_TOKENS and reference > 1
    f16, q8, q4 = (row(report, t) for t in ("F16", "Q8_0", "Q4_K_M"))
    assert abs(f16["perplexity_delta"]) < 0.01 * reference and f16["same_top_token"] > 0.99
    assert abs(q8["perplexity_delta"]) < 0.05 * reference
    assert q4["same_top_token"] < q8["same_top_token"] <= f16["same_top_token"]
    assert all(r["tokens_per_s"] > 0 and r["architecture"] == "llama" for r in report["files"])
    table = export.verification_table(report)
    assert list(table["file"]) == ["merged HF (fp32)", "t-F16.gguf", "t-Q4_K_M.gguf", "t-Q8_0.gguf"]
    export.ensure_usable(report)


def test_a_gguf_with_a_foreign_template_and_eos_is_flagged_and_refused(exported, tmp_path, capsys):
    bad = tmp_path / "t-Q8_0.gguf"
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(exported["files"]["Q8_0"]), str(bad),
                    "--chat-template", template, "--special-token-by-id", "eos", "0", "--force"], check=True, capture_output=True)
    cfg, run_dir = exported["cfg"].model_copy(update={"gguf_agreement_tokens": 4}), exported["run_dir"]
    report = export.verify(cfg, run_dir, {"Q8_0": bad}, data.load_prepared(run_dir)["test"][:1],
                           records=SHOWCASE[:1], held_out_tokens=64)
    (result,) = report["files"]
    assert result["flagged"] and report["flagged"] == ["t-Q8_0.gguf"]
    assert {"template", "EOS"} <= set(result["checks"]["problems"])
    assert "!! FLAGGED t-Q8_0.gguf" in capsys.readouterr().out
    with pytest.raises(MedcotError, match=r"t-Q8_0.gguf: template: the GGUF's chat template differs.*EOS: GGUF EOS is 0, HF EOS is 2"):
        export.ensure_usable(report)


# --------------------------------------------------------------------------- Ollama Modelfile

GO_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.S)


def render_go(template: str, values: dict) -> str:
    """A tiny renderer for the Go template subset the Modelfile uses: if/else if/else/end, range, eq, fields."""
    tokens, pos = [], 0
    for m in GO_ACTION.finditer(template):
        tokens.append(("text", template[pos:m.start()]))
        tokens.append(("action", m.group(1)))
        pos = m.end()
    tokens.append(("text", template[pos:]))

    def parse(i, stop):
        nodes = []
        while i < len(tokens):
            kind, value = tokens[i]
            if kind == "text":
                nodes.append(("text", value))
                i += 1
            elif value.split()[0] in stop or value == "else":
                return nodes, i
            elif value.startswith("if "):
                branches, i = [], i
                condition = value[3:]
                while True:
                    body, i = parse(i + 1, ("end", "else"))
                    branches.append((condition, body))
                    action = tokens[i][1]
                    if action == "end":
                        break
                    condition = action[8:] if action.startswith("else if ") else None
                nodes.append(("if", branches))
                i += 1
            elif value.startswith("range "):
                body, i = parse(i + 1, ("end",))
                nodes.append(("range", value[6:], body))
                i += 1
            else:
                nodes.append(("field", value))
                i += 1
        return nodes, i

    def lookup(expr, scope):
        assert expr.startswith("."), expr
        return scope[expr[1:]]

    def truth(condition, scope):
        if condition is None:
            return True
        if condition.startswith("eq "):
            left, right = condition[3:].split(" ", 1)
            return lookup(left, scope) == json.loads(right)
        return bool(lookup(condition, scope))

    def run(nodes, scope):
        out = ""
        for node in nodes:
            if node[0] == "text":
                out += node[1]
            elif node[0] == "field":
                out += lookup(node[1], scope)
            elif node[0] == "if":
                out += next((run(body, scope) for condition, body in node[1] if truth(condition, scope)), "")
            else:
                out += "".join(run(node[2], item) for item in lookup(node[1], scope))
        return out

    nodes, _ = parse(0, ())
    return run(nodes, values)


def ollama_values(messages):
    """What Ollama passes a template: system messages joined into .System, all messages in .Messages."""
    return {"System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"),
            "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}


def modelfile_parts(text):
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    params = re.findall(r"^PARAMETER (\w+) (.+)$", text, re.M)
    return template, system.group(1) if system else None, params


CONVERSATIONS = [
    [{"role": "user", "content": "What causes a macrocytic anemia?"}],
    [{"role": "system", "content": prompts.THINK_SYSTEM_PROMPT}, {"role": "user", "content": "Why check B12 before folate?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "MCV 114 fL?"},
     {"role": "assistant", "content": "<think>\nLarge cells.\n</think>\n\nMacrocytosis."}, {"role": "user", "content": "Causes?"}],
]


def test_modelfile_template_renders_exactly_like_the_chat_template(exported):
    cfg, run_dir = exported["cfg"], exported["run_dir"]
    path = export.write_modelfile(cfg, run_dir, export.default_gguf(exported["files"]))
    text = path.read_text()
    assert re.search(r"^FROM \./gguf/t-Q4_K_M\.gguf$", text, re.M) and (path.parent / "gguf" / "t-Q4_K_M.gguf").is_file()
    template, system, params = modelfile_parts(text)
    tokenizer = models.load_tokenizer(models.DEFAULT_MODEL)
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_go(template, ollama_values(messages)) == expected
    # The stage's own prompt, with the SYSTEM line as Ollama would pass it.
    record = baseline.SHOWCASE[0]
    style = prompts.PromptStyle.from_recipe(cfg)
    assert system == style.system_prompt == prompts.THINK_SYSTEM_PROMPT
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompts.user_message(record)}]
    assert render_go(template, ollama_values(messages)) == prompts.render(record, tokenizer, style, with_target=False).prompt
    assert ("stop", '"<|im_end|>"') in params and ("temperature", "0.6") in params and ("top_p", "0.95") in params
    assert "not for clinical use" in text


def test_ollama_template_strips_a_template_bos_and_refuses_position_dependent_templates():
    tokenizer = models.load_tokenizer(models.DEFAULT_MODEL)
    style = prompts.PromptStyle("native", None, {})
    tokenizer.chat_template = (  # Llama 3 style: the template itself writes BOS
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
        "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    template = export.ollama_template(tokenizer, style, strip_bos=True)
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_go(template, ollama_values(messages)) == expected.removeprefix(tokenizer.bos_token)
    tokenizer.chat_template = (  # Llama 2 style: the system prompt lives inside the first user turn
        "{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>{% elif m['role'] == 'user' %}"
        "{% if loop.index0 < 2 %}[INST] {% else %}<s>[INST] {% endif %}{{ m['content'] }} [/INST]{% else %} {{ m['content'] }} </s>"
        "{% endif %}{% endfor %}")
    with pytest.raises(MedcotError, match="cannot derive an Ollama template"):
        export.ollama_template(tokenizer, style)


def test_ollama_template_of_a_template_that_renders_the_last_assistant_turn_its_own_way():
    """Qwen3's format: the last assistant turn gets a think block, history turns drop theirs; prompts end with a user
    turn. Ollama passes a thinking model's history turns without their reasoning (it keeps that apart), as here."""
    from medcot_lib import random_models

    tokenizer = random_models.tokenizer("qwen3-8b")
    style = prompts.PromptStyle("native", None, {"enable_thinking": True})
    template = export.ollama_template(tokenizer, style)
    history = [{"role": "user", "content": "MCV 114 fL?"}, {"role": "assistant", "content": "Macrocytosis."},
               {"role": "user", "content": "Causes?"}]
    for messages in [*CONVERSATIONS[:2], history, [{"role": "system", "content": "Be brief."}, *history]]:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
        assert render_go(template, ollama_values(messages)) == expected


def test_instruction_style_template_uses_the_prompt(tokenizer):
    style = prompts.PromptStyle("instruction", None, {})
    record = baseline.SHOWCASE[1]
    template = export.ollama_template(tokenizer, style)
    assert render_go(template, {"Prompt": prompts.user_message(record)}) == prompts.render(record, tokenizer, style, with_target=False).prompt


# --------------------------------------------------------------------------- model card and hub


def test_model_card_dry_run_writes_the_card_and_touches_no_network(exported, tmp_path, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the dry run must not reach the Hub")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", no_network)
    run_dir = tmp_path / "run"
    shutil.copytree(exported["run_dir"] / "adapter", run_dir / "adapter")
    (run_dir / "metrics").mkdir()
    (run_dir / "metrics" / "03_qlora_train.json").write_text(json.dumps(
        {"global_step": 10, "train_loss": 1.234, "eval_loss_last": 1.5, "tokens_per_s": 321.0, "parameters": {"percent": 1.2}}))
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "metrics.json").write_text(json.dumps({"medqa": {"accuracy": {"base": 0.25, "fine-tuned": 0.375}}}))
    cfg = exported["cfg"]
    card = export.write_model_card(cfg, run_dir, exported["report"])
    assert card == run_dir / "export" / "README.md"
    text = card.read_text()
    assert text.startswith("---\nlicense: apache-2.0\n") and "educational and research use only; not for clinical use" in text.lower()
    assert "| global step | 10 |" in text and "| train loss | 1.234 |" in text and "| rank r / alpha | 4 / 32.0 |" in text
    assert "| medqa.accuracy.fine-tuned | 0.375 |" in text
    assert "| `t-Q4_K_M.gguf` |" in text and "## Intended use" in text
    result = export.push(cfg, run_dir, exported["files"])
    assert result == {"pushed": False, "dry_run": True, "card": str(card), "reason": "push_to_hub is false; nothing was uploaded"}


def test_push_needs_hf_token_from_the_environment_and_uploads_one_private_commit(exported, monkeypatch):
    import huggingface_hub

    cfg = exported["cfg"].model_copy(update={"push_to_hub": True, "hub_model_id": "someone/t"})
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(MedcotError, match="HF_TOKEN is not set in the environment"):
        export.push(cfg, exported["run_dir"], exported["files"])
    calls = {}

    class FakeApi:  # records what would be uploaded; nothing leaves the machine
        def __init__(self, token):
            calls["token"] = token

        def create_repo(self, repo_id, private, exist_ok):
            calls["repo"] = (repo_id, private)

        def create_commit(self, repo_id, operations, commit_message):
            calls["files"] = sorted(op.path_in_repo for op in operations)
            return type("Commit", (), {"commit_url": "https://example.invalid/commit"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    result = export.push(cfg, exported["run_dir"], exported["files"])
    assert result["pushed"] and calls["token"] == "hf_test" and calls["repo"] == ("someone/t", True)
    assert {"model.safetensors", "config.json", "adapter/adapter_config.json", "t-Q8_0.gguf", "t-F16.gguf"} <= set(calls["files"])


# --------------------------------------------------------------------------- bad input


def test_missing_adapter_says_to_run_stage_03(tmp_path):
    cfg = cfg_with()
    for call in (export.merge, export.preflight):
        with pytest.raises(MedcotError, match=r"adapter: no trained adapter \(adapter_config.json, adapter_model.safetensors missing\); run stage 03"):
            call(cfg, tmp_path)


def test_adapter_of_another_base_is_refused(exported, tmp_path):
    shutil.copytree(exported["run_dir"] / "adapter", tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B-Instruct"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MedcotError, match="was trained on meta-llama/Llama-3.2-1B-Instruct, but model_name_or_path resolves to"):
        export.merge(exported["cfg"], tmp_path)


def test_unsupported_architecture_lists_the_supported_ones(exported, tmp_path):
    checkpoint = tmp_path / "odd"
    checkpoint.mkdir()
    config = json.loads((exported["merged"] / "config.json").read_text())
    config["architectures"] = ["MedcotToyForCausalLM"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out" / "odd.gguf"
    with pytest.raises(MedcotError, match=r"architecture MedcotToyForCausalLM is not supported .*supported: .*LlamaForCausalLM.*Qwen3ForCausalLM"):
        export.to_gguf(checkpoint, out)
    assert not out.parent.exists() or not any(out.parent.iterdir())
    assert "LlamaForCausalLM" in export.supported_architectures()


def test_unknown_or_unusable_quant_types_list_the_valid_ones(exported, tmp_path):
    with pytest.raises(MedcotError, match=r"\['Q4_K_X'\] are not llama.cpp quantization types \(valid: .*Q4_K_M.*Q8_0"):
        export.check_quant_types(["Q4_K_X"])
    with pytest.raises(MedcotError, match=r"\['IQ2_XXS'\] need an importance matrix"):
        export.check_quant_types(["IQ2_XXS"])
    with pytest.raises(MedcotError, match="gguf_outtype: 'q8_0' is not one of f16, bf16"):
        export.to_gguf(exported["merged"], tmp_path / "x.gguf", "q8_0")
    with pytest.raises(MedcotError, match="not llama.cpp quantization types"):
        export.quantize(exported["files"]["F16"], tmp_path / "x.gguf", "Q4_K_X")
    assert not list(tmp_path.iterdir())


def test_a_failed_quantization_leaves_no_partial_file_and_shows_llama_cpp_s_reason(exported, tmp_path):
    # Q1_0 needs rows that are a multiple of 128 and has no fallback: llama.cpp gives up on SmolLM2's 576-wide rows.
    with pytest.raises(MedcotError, match=r"llama.cpp could not quantize t-F16.gguf to Q1_0 \(return code 1\)"):
        export.quantize(exported["files"]["F16"], tmp_path / "t-Q1_0.gguf", "Q1_0")
    assert not list(tmp_path.iterdir())


def test_disk_space_is_checked_against_the_estimate(tmp_path):
    with pytest.raises(MedcotError, match=r"not enough disk space for the F16 GGUF: about .* GiB needed"):
        export.check_disk(tmp_path / "not" / "yet", 2**62, "F16 GGUF")
    assert export.checkpoint_parameters(models.resolve(models.DEFAULT_MODEL)) == 134_515_008


def test_a_hub_base_missing_from_the_cache_is_a_clear_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MedcotError, match=r"'medcot-test/absent-model' is not in the local Hugging Face cache.*hf download"):
        export.base_checkpoint(cfg_with(model_name_or_path="medcot-test/absent-model"))


@pytest.mark.parametrize("overrides, message", [
    ({"gguf_quant_types": ["Q4_K_M", "q4_k_m"]}, r"gguf_quant_types: Value error, duplicate types"),
    ({"gguf_quant_types": ["F16"]}, r"F16 is not a quantization; the unquantized file's type is gguf_outtype"),
    ({"gguf_quant_types": ["Q4 K M"]}, r"'Q4 K M' is not a llama.cpp quantization type name"),
    ({"gguf_outtype": "q8_0"}, r"gguf_outtype: Input should be 'f16' or 'bf16'"),
    ({"push_to_hub": True}, r"hub_model_id: Value error, push_to_hub is true, so a model repository is needed"),
    ({"hub_model_id": "no-slash"}, r"'no-slash' is not a hub repository id"),
])
def test_export_recipe_fields_are_validated(overrides, message):
    with pytest.raises(MedcotError, match=message):
        cfg_with(**overrides)
    assert cfg_with(gguf_quant_types=["q5_k_m"]).gguf_quant_types == ["Q5_K_M"]


def test_smoke_mode_never_pushes_and_merges_in_fp32():
    cfg = cfg_with(push_to_hub=True, hub_model_id="someone/t", export_dtype="bfloat16")
    smoked, log = smoke.smoke(cfg)
    assert smoked.push_to_hub is False and smoked.export_dtype == "float32"
    assert "smoke: push_to_hub True -> False" in log

"""Random-weight models (`random:NAME[:tiny]`): real shapes, seeded weights, the Qwen3 template, labels everywhere."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from medcot_lib import leaderboard, pipeline, prompts, random_models, recipe, smoke
from medcot_lib.data import Record
from medcot_lib.errors import MedcotError

# Weights of the real models (their model cards and config.json arithmetic): the shapes must reproduce them exactly.
REAL_PARAMETERS = {
    "llama-3.2-1b": 1_235_814_400, "llama-3.1-8b": 8_030_261_248, "deepseek-r1-distill-llama-8b": 8_030_261_248,
    "qwen3-8b": 8_190_735_360, "qwen3-0.6b": 596_049_920,
}


def meta_model(reference: str):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(random_models.config(reference))


@pytest.mark.parametrize("name", sorted(REAL_PARAMETERS))
def test_full_shapes_have_the_real_models_weight_counts(name):
    model = meta_model(f"random:{name}")
    assert sum(p.numel() for p in model.parameters()) == REAL_PARAMETERS[name]


@pytest.mark.parametrize("name", sorted(REAL_PARAMETERS))
def test_tiny_shapes_keep_the_architecture(name):
    full, tiny = random_models.config(f"random:{name}"), random_models.config(f"random:{name}:tiny")
    assert type(tiny) is type(full) and tiny.tie_word_embeddings == full.tie_word_embeddings
    assert tiny.rope_parameters == full.rope_parameters
    group = full.num_attention_heads // full.num_key_value_heads
    assert tiny.num_attention_heads // tiny.num_key_value_heads == min(group, tiny.num_attention_heads)
    assert tiny.intermediate_size / tiny.hidden_size == pytest.approx(full.intermediate_size / full.hidden_size, rel=0.02)
    assert tiny.num_hidden_layers == 2 and tiny.vocab_size == random_models.TINY_VOCABULARY
    qk_norm = any("q_norm" in n for n, _ in meta_model(f"random:{name}:tiny").named_modules())
    assert qk_norm == (full.model_type == "qwen3")


def test_every_seed_recipes_model_has_a_shape():
    from pathlib import Path

    for path in Path("params").glob("*.yaml"):
        reference = recipe.load(path).model_name_or_path
        if not reference.startswith("embedded:"):
            assert random_models.shape_for(reference) in REAL_PARAMETERS, path
    with pytest.raises(MedcotError, match=r"no random-weight shape of 'org/other'.*qwen3-8b \(Qwen/Qwen3-8B\)"):
        random_models.shape_for("org/other")


@pytest.mark.parametrize("reference", ["random:qwen3-9b", "random:qwen3-8b:small", "random:"])
def test_unknown_references_name_the_shapes(reference):
    with pytest.raises(MedcotError, match=r"expected random:NAME or random:NAME:tiny with NAME one of .*llama-3.2-1b"):
        random_models.parse(reference)


def test_the_same_reference_builds_the_same_weights(tmp_path, monkeypatch):
    tensors = []
    for cache in ("a", "b"):
        monkeypatch.setenv("MEDCOT_CACHE", str(tmp_path / cache))
        with pytest.warns(random_models.RandomWeightsWarning, match="RANDOM WEIGHTS: random:llama-3.2-1b:tiny"):
            path = random_models.checkpoint("random:llama-3.2-1b:tiny")
        tensors.append(load_file(path / "model.safetensors"))
        assert json.loads((path / "medcot_random.json").read_text())["seed"] == random_models.SEED
    assert tensors[0].keys() == tensors[1].keys()
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])
    assert tensors[0]["model.layers.0.mlp.up_proj.weight"].std() > 0.01  # initialised, not zeros


def test_qwen3_template_matches_between_training_and_inference():
    tok = random_models.tokenizer("qwen3-8b")
    assert [len(tok(t, add_special_tokens=False)["input_ids"]) for t in random_models.THINK_TOKENS] == [1, 1]
    cfg = recipe.validate({"run_name": "r", "model_name_or_path": "random:qwen3-8b:tiny", "prompt_style": "native"})
    style = prompts.PromptStyle.from_recipe(cfg)
    record = Record(id="1", source="t", question="Which vitamin deficiency causes scurvy?", answer="Vitamin C.",
                    reasoning="Scurvy follows a lack of ascorbic acid, needed for collagen cross-linking.")
    rendered = prompts.render(record, tok, style)
    assert rendered.prompt.endswith("<|im_start|>user\nWhich vitamin deficiency causes scurvy?<|im_end|>\n<|im_start|>assistant\n")
    assert rendered.target.startswith("<think>\n") and rendered.target.endswith("</think>\n\nVitamin C.<|im_end|>\n")
    conversation = [{"role": "user", "content": prompts.user_message(record)},
                    {"role": "assistant", "content": prompts.assistant_message(record)}]
    assert rendered.text == tok.apply_chat_template(conversation, tokenize=False)
    no_thinking = tok.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert no_thinking.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_stage_metrics_the_leaderboard_and_smoke_mode_say_random_weights(tmp_path):
    cfg = recipe.validate({"run_name": "r", "model_name_or_path": "random:qwen3-8b"})
    written = json.loads(pipeline.write_metrics(tmp_path, "01_baseline", {"n": 1}, cfg).read_text())
    assert written["weights"].startswith("RANDOM WEIGHTS: random:qwen3-8b is an untrained") and written["n"] == 1
    plain = json.loads(pipeline.write_metrics(tmp_path, "01_baseline", {}, recipe.validate({"run_name": "r"})).read_text())
    assert plain["weights"] == "pretrained"
    assert leaderboard.model_label("random:qwen3-8b") == "random:qwen3-8b (RANDOM WEIGHTS)"
    smoked, log = smoke.smoke(cfg)
    assert smoked.model_name_or_path == "random:qwen3-8b:tiny"
    assert "smoke: model_name_or_path 'random:qwen3-8b' -> 'random:qwen3-8b:tiny'" in log


@pytest.mark.integration
def test_a_qwen3_shaped_random_model_runs_stages_00_to_05_with_its_native_template(tmp_path):
    """The Qwen3-8B recipe in smoke mode on random:qwen3-8b (mapped to its tiny shape): q/k norms, the thinking
    template, 4-bit loading, training, llama.cpp evaluation and GGUF export of the qwen3 architecture, all labelled."""
    import subprocess
    import sys

    from medcot_lib.export.gguf_info import gguf_metadata

    run_dir = tmp_path / "results" / "qwen3-random"
    result = subprocess.run([sys.executable, "-m", "medcot_lib", "run", "params/qwen3-8b-qlora.yaml", "--smoke",
                             "-p", "model_name_or_path", "random:qwen3-8b", "--run-dir", str(run_dir)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    label = "RANDOM WEIGHTS: random:qwen3-8b:tiny is an untrained"
    assert label in result.stdout and "smoke: model_name_or_path 'random:qwen3-8b' -> 'random:qwen3-8b:tiny'" in result.stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["weights"].startswith(label) and manifest["stages"]["00b_teacher_cot"]["status"] == "skipped"
    done = sorted(name for name, stage in manifest["stages"].items() if stage["status"] == "done")
    assert [name[:2] for name in done] == ["00", "01", "02", "03", "04", "05"]
    for stage in done:  # every stage's notebook shows the label, and its metrics record it
        assert label in (run_dir / f"{stage}.ipynb").read_text(), stage
        assert json.loads((run_dir / "metrics" / f"{stage}.json").read_text())["weights"].startswith(label), stage
    assert json.loads((run_dir / "eval" / "metrics.json").read_text())["settings"]["weights"].startswith(label)
    first = json.loads((run_dir / "generations" / "01_baseline.jsonl").read_text().splitlines()[0])
    assert first["prompt"].startswith("<|im_start|>user\n") and first["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n")
    base = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).name.startswith("random-qwen3-8b-tiny-seed0-")
    ggufs = sorted((run_dir / "export" / "gguf").glob("*.gguf"))
    assert len(ggufs) == 4 and all(gguf_metadata(g)["architecture"] == "qwen3" for g in ggufs)
    assert label in (run_dir / "export" / "README.md").read_text()
    table = leaderboard.rebuild(run_dir.parent)
    assert set(table["model"]) == {"random:qwen3-8b:tiny (RANDOM WEIGHTS)"}

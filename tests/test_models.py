"""Model references: the embedded model is materialised once; hub ids fail clearly offline."""

import json

import pytest

from medcot_lib import models
from medcot_lib.errors import MedcotError


def test_embedded_model_is_a_clean_cached_checkpoint(tokenizer):
    path = models.resolve(models.DEFAULT_MODEL)
    config = json.loads((path_ := __import__("pathlib").Path(path)).joinpath("config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (path_ / "model.safetensors").exists() and (path_ / "tokenizer.json").exists()
    assert models.resolve(models.DEFAULT_MODEL) == path  # reused, not rebuilt
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template


def test_embedded_model_generates_sensible_text():
    import torch
    from transformers import AutoModelForCausalLM

    path = models.resolve(models.DEFAULT_MODEL)
    tokenizer = models.load_tokenizer(models.DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


def test_unknown_embedded_name_lists_the_known_ones():
    with pytest.raises(MedcotError, match="unknown embedded model 'tiny'.*embedded:smollm2-135m-instruct"):
        models.resolve("embedded:tiny")


def test_hub_id_offline_says_how_to_use_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MedcotError, match=r"Hub is unreachable.*hf download Qwen/Qwen3-8B --local-dir.*model_name_or_path"):
        models.load_tokenizer("Qwen/Qwen3-8B")


def test_local_directory_errors(tmp_path):
    with pytest.raises(MedcotError, match="no such local directory"):
        models.resolve(str(tmp_path / "missing"))
    with pytest.raises(MedcotError, match="has no config.json"):
        models.resolve(str(tmp_path))


def test_hub_token_comes_from_the_environment_only(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert models.hub_token() is None
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert models.hub_token() == "hf_test"

"""Adapters on the embedded model: QLoRA layers, DoRA, lm_head targeting, bad targets, and real learning."""

import pytest

from medcot_lib import data, models, recipe, train
from medcot_lib.errors import MedcotError


def cfg_with(**overrides):
    return recipe.load("params/cpu-demo.yaml", {"report_to": [], **overrides})


def test_qlora_base_is_nf4_with_double_quantization_and_dora_on_lm_head():
    import bitsandbytes as bnb

    cfg = cfg_with(load_in_4bit=True, use_dora=True, lora_target_modules=["q_proj", "v_proj", "lm_head"])
    model = train.add_adapter(cfg, models.load_model(cfg))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_type == "nf4" and m.weight.quant_state.nested for m in layers)
    adapter = model.peft_config["default"]
    assert adapter.use_dora is True and set(adapter.target_modules) == {"q_proj", "v_proj", "lm_head"}
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head.lora_A" in n for n in names) and any("lora_magnitude_vector" in n for n in names)


def test_unknown_or_empty_targets_are_clear_errors():
    cfg = cfg_with(lora_target_modules=["q_proj", "qkv"])
    with pytest.raises(MedcotError, match=r"\['qkv'\] are not linear modules.*its linear modules: .*gate_proj.*q_proj"):
        train.add_adapter(cfg, models.load_model(cfg))
    with pytest.raises(MedcotError, match="lora_target_modules is empty"):
        train.peft_config(cfg_with(lora_target_modules=[]), None)


@pytest.mark.integration
def test_a_few_steps_lower_held_out_loss(tmp_path):
    cfg = cfg_with(max_steps=12, per_device_train_batch_size=2, per_device_eval_batch_size=4, max_length=384,
                   learning_rate=1e-3, warmup_steps=0, eval_steps=12, save_steps=12, lora_r=8, lora_alpha=16)
    prepared = data.prepare(cfg)
    splits = {"train": prepared.splits["train"], "val": prepared.splits["val"][:6]}
    tokenizer = models.load_tokenizer(cfg.model_name_or_path)
    model = train.add_adapter(cfg, models.load_model(cfg))
    trainer = train.build_trainer(cfg, model, tokenizer, splits, str(tmp_path))
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.05, (before, after)
    assert trainer.state.global_step == 12


def test_resume_refuses_incomplete_or_foreign_checkpoints(tmp_path):
    import json

    assert train.latest_checkpoint(tmp_path / "none", "base") is None
    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    with pytest.raises(MedcotError, match=r"checkpoint-5: incomplete checkpoint \(missing adapter_config.json, adapter_model.safetensors\)"):
        train.latest_checkpoint(tmp_path, "base")
    (checkpoint / "adapter_model.safetensors").write_bytes(b"")
    (checkpoint / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "other/model"}))
    with pytest.raises(MedcotError, match="checkpoint of another base model"):
        train.latest_checkpoint(tmp_path, "base")
    assert train.latest_checkpoint(tmp_path, "other/model") == str(checkpoint)
    assert train._checkpoint_step(str(checkpoint)) == 5

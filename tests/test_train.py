"""Adapters on the embedded model: QLoRA layers, DoRA, lm_head targeting, bad targets, and real learning."""

import pytest

from medcot_lib import data, models, recipe, train
from medcot_lib.errors import MedcotError


def cfg_with(**overrides):
    """The demo recipe with the adapter on every layer (the demo's upper-half choice has its own test)."""
    return recipe.load("params/cpu-demo.yaml", {"report_to": [], "layers_to_transform": None, **overrides})


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


def test_layers_to_transform_adapts_only_those_layers_and_must_exist():
    cfg = cfg_with(layers_to_transform=[28, 29])
    model = train.add_adapter(cfg, models.load_model(cfg))
    adapted = {int(n.split(".layers.")[1].split(".")[0]) for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {28, 29}
    with pytest.raises(MedcotError, match=r"layers_to_transform: \[30\] are not layers of this model \(it has 30: 0 to 29\)"):
        train.add_adapter(cfg_with(layers_to_transform=[29, 30]), models.load_model(cfg))


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


class _StopAfter:
    """A trainer callback that stops the run right after the checkpoint at `step` is written."""

    def __init__(self, step):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step == step:
                    raise KeyboardInterrupt(f"stopped after step {step}")

        self.callback = Stop()


@pytest.mark.integration
def test_stopped_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
    cfg = cfg_with(max_steps=4, save_steps=2, per_device_train_batch_size=2, max_length=256, learning_rate=1e-3,
                   warmup_steps=0, lora_r=4, lora_alpha=8, load_best_model_at_end=False)
    prepared = data.prepare(cfg)
    splits = {"train": prepared.splits["train"][:16]}
    tokenizer = models.load_tokenizer(cfg.model_name_or_path)

    def fresh_trainer(run_dir):
        model, _ = train.load_for_training(cfg)
        return train.build_trainer(cfg, model, tokenizer, splits, str(run_dir / "checkpoints"))

    whole = fresh_trainer(tmp_path / "whole")
    train.run(whole, cfg, tmp_path / "whole")

    first = fresh_trainer(tmp_path / "cut")
    first.add_callback(_StopAfter(2).callback)
    with pytest.raises(KeyboardInterrupt):
        train.run(first, cfg, tmp_path / "cut")
    assert not (tmp_path / "cut" / "adapter").exists()  # nothing half-written
    resumed = fresh_trainer(tmp_path / "cut")
    metrics = train.run(resumed, cfg, tmp_path / "cut")
    assert metrics["resumed_from"].endswith("checkpoint-2") and metrics["steps_this_run"] == 2
    assert resumed.state.global_step == whole.state.global_step == 4

    def last_loss(trainer):
        return [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]

    assert last_loss(resumed) == pytest.approx(last_loss(whole), abs=1e-4)
    assert [h["loss"] for h in first.state.log_history if "loss" in h] == [h["loss"] for h in whole.state.log_history if "loss" in h][:2]


def test_an_adapter_on_lm_head_is_actually_trained(tmp_path):
    from trl import SFTTrainer

    cfg = cfg_with(lora_target_modules=["q_proj", "lm_head"], max_steps=1, per_device_train_batch_size=1, max_length=200,
                   warmup_steps=0, save_steps=1, load_best_model_at_end=False)
    records = data.prepare(cfg).splits["train"][:2]
    model, tokenizer = train.load_for_training(cfg)
    trainer = train.build_trainer(cfg, model, tokenizer, {"train": records}, str(tmp_path))
    assert not isinstance(trainer, SFTTrainer)  # TRL's fused LM head would leave an lm_head adapter untrained
    lora_b = model.get_output_embeddings().lora_B["default"].weight
    assert lora_b.abs().sum() == 0  # LoRA's B starts at zero
    trainer.train()
    assert lora_b.abs().sum() > 0

"""Packed batches give exactly the logits and losses of unpacked ones; the loss mask covers the target only."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from medcot_lib import models, prompts, train
from medcot_lib.data import load_source
from medcot_lib.recipe import DatasetSource


class Cfg:
    prompt_style, system_prompt = "think", None


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(models.resolve(models.DEFAULT_MODEL), attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def rows(tokenizer):
    records, _ = load_source(DatasetSource(path="bundled:medical-o1"))
    style = prompts.PromptStyle.from_recipe(Cfg())
    return train.tokenize(records[:3], tokenizer, style, max_length=260, completion_only=True).rows


def test_labels_cover_exactly_the_target(tokenizer):
    records, _ = load_source(DatasetSource(path="bundled:medqa"))
    style = prompts.PromptStyle.from_recipe(Cfg())
    rendered = prompts.render(records[0], tokenizer, style)
    (row,) = train.tokenize(records[:1], tokenizer, style, max_length=4096, completion_only=True).rows
    kept = [t for t in row["labels"] if t != train.IGNORE_INDEX]
    assert tokenizer.decode(kept) == rendered.target
    assert row["labels"][: len(row["labels"]) - len(kept)] == [train.IGNORE_INDEX] * (len(row["labels"]) - len(kept))
    (full,) = train.tokenize(records[:1], tokenizer, style, max_length=4096, completion_only=False).rows
    assert full["labels"] == full["input_ids"]


def test_truncation_is_counted(tokenizer):
    records, _ = load_source(DatasetSource(path="bundled:medical-o1"))
    result = train.tokenize(records[:4], tokenizer, prompts.PromptStyle.from_recipe(Cfg()), max_length=64, completion_only=True)
    assert result.truncated == 4 and all(len(r["input_ids"]) == 64 for r in result.rows)


@pytest.fixture(scope="module")
def packed_model():
    model = AutoModelForCausalLM.from_pretrained(models.resolve(models.DEFAULT_MODEL), attn_implementation="sdpa").eval()
    assert train.use_packed_attention(model)
    return model


@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample-attention", "block-mask"])
def test_packed_logits_equal_unpacked_logits(model, packed_model, rows, per_sample):
    packed = train.PackingCollator(boundaries=per_sample)(rows)
    assert packed["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))  # no padding at all
    assert ("attention_mask" in packed) != per_sample and ("cu_seq_lens_q" in packed) == per_sample
    chosen = packed_model if per_sample else model
    with torch.no_grad():
        packed_logits = chosen(**{k: v for k, v in packed.items() if k != "labels"}).logits[0]
        start = 0
        for row in rows:
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            n = len(row["input_ids"])
            assert (packed_logits[start : start + n] - alone).abs().max() < 1e-3
            start += n


def test_positions_alone_would_leak_across_samples(model, rows):
    """Why the mask exists: without it, sdpa lets the second sample attend to the first."""
    packed = train.PackingCollator()(rows[:2])
    with torch.no_grad():
        leaky = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        alone = model(input_ids=torch.tensor([rows[1]["input_ids"]])).logits[0]
    assert (leaky[len(rows[0]["input_ids"]):] - alone).abs().max() > 1.0


def test_packed_loss_equals_padded_loss(packed_model, tokenizer, rows):
    packed = train.PackingCollator(boundaries=True)(rows)
    padded = train.PaddingCollator(tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        loss_packed = train.labelled_loss(packed_model, packed).loss
        loss_padded = train.labelled_loss(packed_model, padded).loss  # ordinary batches take plain sdpa with its padding mask
    assert torch.isclose(loss_packed, loss_padded, atol=1e-4)


@pytest.fixture(scope="module")
def adapted():
    """A LoRA model with the adapter on lm_head too, its B matrices nudged off zero so every path carries gradient."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(models.resolve(models.DEFAULT_MODEL), attn_implementation="sdpa")
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "down_proj", "lm_head"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_labelled_loss_equals_the_models_own_loss_and_gradients(adapted, tokenizer, rows, monkeypatch, layout):
    """Output layer only at labelled positions, tiled and recomputed in backward: same loss, same gradients."""
    monkeypatch.setattr(train, "LOSS_TILE", 100)  # several tiles, the last one partial
    collate = train.PackingCollator() if layout == "packed" else train.PaddingCollator(tokenizer.pad_token_id)
    batch = collate(rows)
    trainable = [p for p in adapted.parameters() if p.requires_grad]

    def loss_and_grads(compute):
        adapted.zero_grad()
        value = compute()
        value.backward()
        return value.detach(), [p.grad.clone() for p in trainable]

    own, own_grads = loss_and_grads(lambda: adapted(**batch).loss)
    result = train.labelled_loss(adapted, batch)
    ours, our_grads = loss_and_grads(lambda: train.labelled_loss(adapted, batch).loss)
    assert torch.isclose(own, ours, atol=1e-5)
    assert result.labelled == int((batch["labels"][:, 1:] != train.IGNORE_INDEX).sum()) > 2 * 100
    assert 0 < result.correct < result.labelled
    for a, b in zip(own_grads, our_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-3)
    assert any(g.abs().sum() > 0 for name, g in zip([n for n, p in adapted.named_parameters() if p.requires_grad], our_grads,
                                                   strict=True) if "lm_head" in name)


def test_labelled_loss_divides_by_the_accumulated_token_count(adapted, rows):
    batch = train.PackingCollator()(rows)
    with torch.no_grad():
        mean = train.labelled_loss(adapted, batch)
        summed = train.labelled_loss(adapted, batch, num_items_in_batch=1)
    assert torch.isclose(summed.loss, mean.loss * mean.labelled, rtol=1e-5)


def test_packed_attention_leaves_generation_alone(model, packed_model, tokenizer):
    ids = tokenizer(["The anemia of chronic disease", "A"], return_tensors="pt", padding=True, padding_side="left")
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    assert torch.equal(model.generate(**ids, **settings), packed_model.generate(**ids, **settings))


def test_a_batch_without_labelled_tokens_gives_a_zero_loss_that_backpropagates(adapted, rows):
    batch = train.PackingCollator()(rows)
    batch["labels"][:] = train.IGNORE_INDEX
    result = train.labelled_loss(adapted, batch)
    result.loss.backward()
    assert result.loss.item() == 0.0 and result.labelled == 0

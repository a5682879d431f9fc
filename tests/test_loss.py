from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from desktune.adapters import attach_lora
from desktune.config import LoraConfig
from desktune.data import collate
from desktune.data.encode import Example
from desktune.training import loss as loss_mod
from desktune.training.loss import target_ce_sum


def _batch():
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (12, 7, 10):
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        labels = [-100] * (n // 2) + ids[n // 2 :]
        examples.append(Example(input_ids=ids, labels=labels, source="t"))
    return collate(examples, pad_id=0)


def test_equals_transformers_loss_with_padding(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    b = _batch()
    total, n = target_ce_sum(model, b["input_ids"], b["labels"], b["attention_mask"])
    ref = model(**b).loss  # mean over shifted non-ignored labels
    assert n == int((b["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(total / n, ref, rtol=1e-5, atol=1e-5)


def test_chunked_gradients_equal_plain(tiny_model_dir, monkeypatch):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = attach_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    b = _batch()

    def grads(chunk: int):
        monkeypatch.setattr(loss_mod, "CHUNK_TOKENS", chunk)
        model.zero_grad()
        total, n = target_ce_sum(model, b["input_ids"], b["labels"], b["attention_mask"])
        (total / n).backward()
        return float(total.detach()), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    whole, g_whole = grads(10_000)
    chunked, g_chunked = grads(3)  # several checkpointed chunks
    assert abs(whole - chunked) < 1e-4
    assert g_whole and all(v.abs().sum() > 0 for v in g_whole.values())
    for k in g_whole:
        torch.testing.assert_close(g_chunked[k], g_whole[k], rtol=1e-4, atol=1e-6)


def test_full_logits_path_equals_chunked(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    b = _batch()
    full, n_full = target_ce_sum(model, b["input_ids"], b["labels"], b["attention_mask"], chunked=False)
    part, n_part = target_ce_sum(model, b["input_ids"], b["labels"], b["attention_mask"])
    assert n_full == n_part
    torch.testing.assert_close(full, part, rtol=1e-5, atol=1e-5)


def test_no_targets_gives_zero_with_graph(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7]])
    total, n = target_ce_sum(model, ids, torch.full_like(ids, -100))
    assert n == 0 and float(total.detach()) == 0.0

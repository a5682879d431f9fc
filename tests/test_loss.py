from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from desktune.adapters import attach_lora
from desktune.config import LoraConfig
from desktune.data import collate
from desktune.data.encode import Example
from desktune.memory.measure import PeakTracker
from desktune.scoring import ce as loss_mod
from desktune.scoring.ce import chunk_rows, head_ce_sum, target_ce_sum


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
        monkeypatch.setattr(loss_mod, "chunk_rows", lambda vocab: chunk)
        model.zero_grad()
        total, n = target_ce_sum(model, b["input_ids"], b["labels"], b["attention_mask"])
        (total / n).backward()
        return float(total.detach()), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    whole, g_whole = grads(10_000)
    chunked, g_chunked = grads(3)  # several chunks, each one's row gradients formed in forward
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


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_loss_equals_autograd(softcap, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(37, 16, generator=g) * 3).to(dtype).requires_grad_()
    weight = (torch.randn(500, 16, generator=g) * 2).to(dtype)
    bias = torch.randn(500, generator=g).to(dtype)
    targets = torch.randint(0, 500, (37,), generator=g)

    def plain():
        z = torch.nn.functional.linear(hidden, weight, bias).float()
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        return torch.nn.functional.cross_entropy(z, targets, reduction="sum")

    ref = plain()
    (ref * 0.5).backward()
    ref_grad, hidden.grad = hidden.grad.clone(), None
    got = head_ce_sum(hidden, weight, bias, targets, softcap, rows=8)  # 5 chunks, the last one short
    (got * 0.5).backward()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(hidden.grad.float(), ref_grad.float(), **tol)
    assert hidden.grad.dtype == dtype


def test_loss_memory_is_one_chunk_of_logits_at_a_128k_vocabulary():
    vocab, rows = 128_256, chunk_rows(128_256)
    assert rows * vocab * 4 <= loss_mod.LOSS_CHUNK_BYTES and rows >= 64
    hidden = torch.randn(1000, 32, requires_grad=True)
    weight = torch.randn(vocab, 32) * 0.1
    targets = torch.randint(0, vocab, (1000,))
    with PeakTracker("cpu", [hidden, weight, targets]) as tracker:
        head_ce_sum(hidden, weight, None, targets).backward()
    extra = tracker.peak_bytes - sum(t.numel() * t.element_size() for t in (hidden, weight, targets))
    full_logits = 1000 * vocab * 4
    assert extra < 1.2 * loss_mod.LOSS_CHUNK_BYTES < full_logits / 6  # one chunk of logits, worked on in place


def test_planner_and_loss_share_one_chunk_size():
    from desktune import constants
    from desktune.memory import estimate

    assert estimate.chunk_rows is loss_mod.chunk_rows is constants.chunk_rows  # one definition, no mirror
    assert loss_mod.LOSS_CHUNK_BYTES == constants.LOSS_CHUNK_BYTES
    assert [chunk_rows(v) for v in (300, 49_152, 128_256)] == [4096, 341, 130]

"""Padding-free packing: several samples per row, attention and loss never crossing a sample boundary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.integrations import sdpa_attention

from desktune.config import load_config
from desktune.data import IGNORE_INDEX, collate, micro_batches, pack
from desktune.data.encode import Example
from desktune.models.packed_attention import ATTENTION, segment_bounds, use_packed_attention
from desktune.scoring.ce import target_ce_sum
from desktune.training.loop import train
from tests.tiny import tiny_config


def _examples(lengths=(5, 17, 9, 30), seed=0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        out.append(Example(input_ids=ids, labels=[IGNORE_INDEX] * 2 + ids[2:], source=f"len{n}"))
    return out


def test_pack_layout():
    exs = _examples((3, 4))
    b = pack(exs)
    assert b["input_ids"].tolist() == [exs[0].input_ids + exs[1].input_ids]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    # a sample's first label is never a target: nothing predicts across the boundary
    assert b["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, exs[0].input_ids[2], IGNORE_INDEX, IGNORE_INDEX,
                                     exs[1].input_ids[2], exs[1].input_ids[3]]]
    assert "attention_mask" not in b
    assert segment_bounds(b["position_ids"]) == [(0, 3), (3, 7)]


def _per_position_ce(model, batch) -> torch.Tensor:
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    return F.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=IGNORE_INDEX, reduction="none")


@pytest.mark.parametrize("packed_attention", [True, False], ids=["desktune-attention", "transformers-mask"])
def test_packed_row_gives_each_sample_its_own_losses(tiny_model_dir, monkeypatch, packed_attention):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    exs = _examples()
    alone = [_per_position_ce(model, collate([e], pad_id=0)) for e in exs]
    calls = []
    real = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward",
                        lambda m, q, *a, **kw: calls.append(q.shape[2]) or real(m, q, *a, **kw))
    if packed_attention:
        assert use_packed_attention(model) == "sdpa" and model.config._attn_implementation == ATTENTION
    packed = _per_position_ce(model, pack(exs))
    start = 0
    for e, ref in zip(exs, alone, strict=True):
        n = len(e.input_ids)
        got = packed[start : start + n - 1]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        start += n
    if packed_attention:  # one causal SDPA per sample and layer, each only as long as its sample
        assert calls == [len(e.input_ids) for e in exs] * model.config.num_hidden_layers
    total, n = target_ce_sum(model, **{k: v for k, v in pack(exs).items() if k != "position_ids"},
                             position_ids=pack(exs)["position_ids"])
    assert n == sum(e.n_target for e in exs)
    torch.testing.assert_close(total, sum(r.sum() for r in alone), rtol=1e-5, atol=1e-4)


def test_packed_gradients_equal_unpacked(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    use_packed_attention(model)
    exs = _examples()
    grads = []
    for batch in (pack(exs), collate(exs, pad_id=0)):
        model.zero_grad()
        s, _ = target_ce_sum(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"),
                             position_ids=batch.get("position_ids"))
        s.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_length_grouping_pads_less_and_keeps_the_step_samples():
    exs = _examples((40, 3, 38, 5, 36, 4, 39, 6))
    plain = micro_batches(exs, 2, packing=False, pad_id=0, group_by_length=False)
    grouped = micro_batches(exs, 2, packing=False, pad_id=0, group_by_length=True)
    cells = lambda mbs: sum(b["input_ids"].numel() for _, b in mbs)  # noqa: E731
    assert sum(len(e.input_ids) for e in exs) == 171
    assert cells(grouped) < cells(plain)
    assert cells(grouped) == 2 * (4 + 6 + 38 + 40)
    assert sorted(id(e) for c, _ in grouped for e in c) == sorted(id(e) for e in exs)
    packed = micro_batches(exs, 2, packing=True, pad_id=0)
    assert cells(packed) == 171 and [len(c) for c, _ in packed] == [2, 2, 2, 2]


def test_packed_and_padded_training_give_the_same_adapter(tiny_model_dir, tmp_path):
    out = {}
    for name, data in {"packed": {"packing": True}, "padded": {"packing": False, "group_by_length": False},
                       "grouped": {"packing": False, "group_by_length": True}}.items():
        raw = tiny_config(tiny_model_dir, tmp_path, data=data, run_name=name,
                          train={"micro_batch_size": 3, "grad_accum": 2})
        result = train(load_config(raw), quiet=True)
        out[name] = (load_file(str(result.adapter_dir / "adapter_model.safetensors")), result)
    ref, ref_result = out["padded"]
    for name in ("packed", "grouped"):
        weights, result = out[name]
        for k in ref:
            torch.testing.assert_close(weights[k], ref[k], rtol=1e-4, atol=1e-6)
        assert result.train_losses == pytest.approx(ref_result.train_losses, rel=1e-5)
        assert result.val_losses[-1][1] == pytest.approx(ref_result.val_losses[-1][1], rel=1e-5)
    assert any("lora_B" in k and ref[k].abs().max() > 1e-3 for k in ref)


@pytest.mark.parametrize("unsupported", [False, True], ids=["eager-and-blocks", "fp32-sdpa"])
def test_bf16_packed_attention_on_the_cpu_keeps_probabilities_up_to_its_length_and_runs_blocks_beyond(
        tiny_model_dir, monkeypatch, unsupported):
    """On the CPU a bf16 sample runs the grouped eager attention when its probabilities are small enough to keep
    (here: up to 16 tokens), a longer one in blocks of query rows (here 8); where neither applies (attention
    dropout, say) SDPA in fp32 (faster there than in bf16, see _fp32_on_cpu). The result comes back in bf16 and
    matches the fp32 model's per-sample losses within bf16 rounding."""
    from desktune.models import packed_attention

    exs = _examples()  # 5, 17, 9 and 30 tokens
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    use_packed_attention(ref_model)
    ref = _per_position_ce(ref_model, pack(exs))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    use_packed_attention(model)
    monkeypatch.setattr(packed_attention, "cpu_eager_attention_len", lambda heads: 16)
    monkeypatch.setattr(packed_attention, "cpu_eager_attention_rows", lambda heads, n: 8)
    if unsupported:
        monkeypatch.setattr(packed_attention, "_EAGER_KWARGS", frozenset())
    seen: list[tuple[int, torch.dtype, bool]] = []
    eager: list[int] = []
    blocks: list[tuple[int, int]] = []
    real, real_eager, real_block = (sdpa_attention.sdpa_attention_forward, packed_attention.grouped_causal,
                                    packed_attention.blockwise_causal)

    def spy(m, q, *a, **kw):
        seen.append((q.shape[2], q.dtype, torch.is_autocast_enabled("cpu")))
        return real(m, q, *a, **kw)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)
    monkeypatch.setattr(packed_attention, "grouped_causal", lambda q, *a: eager.append(q.shape[2]) or real_eager(q, *a))
    monkeypatch.setattr(packed_attention, "blockwise_causal",
                        lambda q, k, v, s, rows: blocks.append((q.shape[2], rows)) or real_block(q, k, v, s, rows))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _per_position_ce(model, pack(exs))
    layers = model.config.num_hidden_layers
    if unsupported:
        assert sorted(seen) == sorted([(n, torch.float32, False) for n in (5, 17, 9, 30)] * layers)
        assert eager == blocks == []
    else:
        assert seen == []
        assert sorted(eager) == [5] * layers + [9] * layers
        assert sorted(blocks) == [(17, 8)] * layers + [(30, 8)] * layers
    torch.testing.assert_close(got.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("rows", [None, 8, 16], ids=["kept", "blocks-of-8", "blocks-of-16"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (6, 2)])
def test_cpu_bf16_attention_matches_float64_within_bf16_rounding(heads, kv_heads, rows):
    """grouped_causal (rows None) and blockwise_causal in blocks of `rows` query rows (37 tokens: 5 + 4 x 8,
    5 + 2 x 16): output and gradients."""
    from desktune.models.packed_attention import blockwise_causal, grouped_causal

    g = torch.Generator().manual_seed(0)
    n, d = 37, 16
    leaves = [torch.randn(1, h, n, d, generator=g).bfloat16() for h in (heads, kv_heads, kv_heads)]
    grad_out = torch.randn(1, n, heads, d, generator=g).bfloat16()

    def run(fn, dtype):
        q, k, v = (t.to(dtype).clone().requires_grad_() for t in leaves)
        out = fn(q, k, v)
        out.backward(grad_out.to(dtype))
        return [out, q.grad, k.grad, v.grad]

    def reference(q, k, v):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.3)
        return o.transpose(1, 2)

    want = run(reference, torch.float64)
    attention = grouped_causal if rows is None else lambda *a: blockwise_causal(*a, rows)
    got = run(lambda q, k, v: attention(q, k, v, 0.3), torch.bfloat16)
    eps = torch.finfo(torch.bfloat16).eps  # 2^-7: scores and probabilities are rounded to bf16 on the way
    for name, w, x in zip(("out", "dq", "dk", "dv"), want, got, strict=True):
        assert x.dtype == torch.bfloat16 and x.shape == w.shape, name
        assert (x.double() - w).abs().max() <= 2 * eps * w.abs().max(), name


@pytest.mark.parametrize("rows", [None, 8], ids=["kept", "blocks"])
def test_blockwise_attention_saves_no_probabilities_for_backward(rows):
    """What autograd keeps after the forward: the kept path a heads x n x n probability matrix, the blockwise
    path only its inputs (its blocks are recomputed in backward)."""
    from desktune.models.packed_attention import blockwise_causal, grouped_causal

    heads, kv, n, d = 4, 2, 40, 8
    q, k, v = (torch.randn(1, h, n, d).bfloat16().requires_grad_() for h in (heads, kv, kv))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = grouped_causal(q, k, v, None) if rows is None else blockwise_causal(q, k, v, None, rows)
    out.sum().backward()
    assert q.grad is not None and k.grad is not None
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    if rows is None:
        assert max(t.numel() for t in saved) >= heads * n * n
    else:
        assert saved and {t.untyped_storage().data_ptr() for t in saved} <= inputs


def test_blockwise_attention_inside_checkpointed_layers_gives_the_same_gradients(tiny_model_dir, monkeypatch):
    """bf16 packed rows whose samples run in blocks (themselves recomputed in backward) inside decoder layers that
    recompute in backward: the same loss and adapter gradients as without layer checkpointing."""
    from desktune.adapters import attach_lora, enable_checkpointing
    from desktune.config import LoraConfig
    from desktune.models import packed_attention

    monkeypatch.setattr(packed_attention, "cpu_eager_attention_len", lambda heads: 8)
    monkeypatch.setattr(packed_attention, "cpu_eager_attention_rows", lambda heads, n: 8)
    blocks = []
    real = packed_attention.blockwise_causal
    monkeypatch.setattr(packed_attention, "blockwise_causal", lambda *a: blocks.append(a[0].shape[2]) or real(*a))
    batch = pack(_examples())

    def loss_and_grads(checkpointing: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        enable_checkpointing(model, checkpointing)
        torch.manual_seed(0)
        peft = attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        peft.train()
        use_packed_attention(peft)
        s, n = target_ce_sum(peft, batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])
        (s / n).backward()
        return (s / n).detach(), torch.cat([p.grad.flatten() for p in peft.parameters() if p.requires_grad])

    ref = loss_and_grads(False)
    assert blocks
    got = loss_and_grads(True)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)

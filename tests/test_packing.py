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


def test_packed_attention_is_set_and_undone_through_a_peft_wrapper(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from desktune.models.packed_attention import restore_attention

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    configs = lambda: {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")}  # noqa: E731
    assert use_packed_attention(model) == "sdpa" and configs() == {ATTENTION}
    restore_attention(model, "sdpa")
    assert configs() == {"sdpa"}


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


def test_bf16_packed_attention_on_the_cpu_runs_in_fp32_and_matches(tiny_model_dir, monkeypatch):
    """On the CPU each sample's bf16 attention is computed in fp32 (faster there, see _fp32_on_cpu); the result
    comes back in bf16 and matches the fp32 model's per-sample losses within bf16 rounding."""
    exs = _examples()
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    use_packed_attention(ref_model)
    ref = _per_position_ce(ref_model, pack(exs))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    use_packed_attention(model)
    seen: list[tuple[torch.dtype, bool]] = []
    real = sdpa_attention.sdpa_attention_forward

    def spy(m, q, *a, **kw):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return real(m, q, *a, **kw)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _per_position_ce(model, pack(exs))
    assert seen == [(torch.float32, False)] * (len(exs) * model.config.num_hidden_layers)
    torch.testing.assert_close(got.float(), ref, rtol=0.05, atol=0.05)

"""`desktune export gguf`: the file read back by gguf's own reader and, independently, by transformers' GGUF loader.

The tiny tokenizer's check hash is registered as llama.cpp's 'gpt-2' by the `known_tiny` fixture (conftest.py), so
the writer can be tested on tiny models; the refusal of an unknown hash is tested without it. The embedded SmolLM2
(known hash, 'smollm') is exported and checked against its shipped GGUF in tests/test_export_llamacpp.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from desktune.errors import DesktuneError
from desktune.export import gguf as gguf_export
from desktune.export import gguf_arch, gguf_tokenizer
from desktune.export.gguf import MODEL_TYPES, export_gguf
from desktune.export.merge import merged_model
from desktune.runs.layout import CONFIG, RunDir
from tests.tiny import CHATML, lora_adapter, make_tokenizer

IDS = torch.tensor([[3, 17, 42, 99, 5, 8, 120, 7, 200, 33, 64, 1, 250, 12]])
# max |logits(GGUF read by transformers) - logits(merged model)| relative to max |logits|: f32 is the same numbers
# (only summation order may differ), f16 rounds every weight to 11 significant bits, bf16 to 8, q8_0 to 8-bit
# blocks of 32 with an f16 scale; q4_0 to 4 bits (measured on the tiny model: 0.0, 8e-4, 9e-3, 2.3e-2, 0.26).
REL_TOL = {"f32": 1e-5, "f16": 5e-3, "bf16": 3e-2, "q8_0": 6e-2, "q4_0": 0.5}


@pytest.fixture(scope="module")
def merged_logits(gguf_tiny) -> torch.Tensor:
    merged, _ = merged_model(gguf_tiny.adapter, dtype="fp32")
    with torch.no_grad():
        return merged(IDS).logits


def _gguf_logits(path: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(IDS).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    big = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
    return {k: (len(f.data) if k in big else f.contents()) for k, f in reader.fields.items()}


# ---------------------------------------------------------------- the model file


def test_unknown_pre_tokenizer_is_refused_and_nothing_written(gguf_tiny, tmp_path):
    with pytest.raises(DesktuneError, match="pre-tokenizer") as e:
        export_gguf(gguf_tiny.adapter, tmp_path / "m.gguf")
    assert "guess" in str(e.value) and list(tmp_path.iterdir()) == []


def test_metadata_tensors_and_tokenizer(gguf_tiny, tmp_path, known_tiny):
    result = export_gguf(gguf_tiny.adapter, tmp_path / "m.gguf", qtype="q8_0")
    assert result.bytes == (tmp_path / "m.gguf").stat().st_size and result.seconds > 0
    meta, tok = _fields(result.path), make_tokenizer()
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "model"
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    dims = ("llama.block_count", "llama.embedding_length", "llama.feed_forward_length")
    assert tuple(meta[k] for k in dims) == (2, 64, 128)
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (4, 2)
    assert meta["llama.vocab_size"] == len(tok) == meta["tokenizer.ggml.tokens"] == meta["tokenizer.ggml.token_type"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.merges"] == len(json.loads(tok.backend_tokenizer.to_str())["model"]["merges"])
    assert meta["tokenizer.ggml.eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert meta["tokenizer.chat_template"] == CHATML and meta["tokenizer.ggml.add_bos_token"] is False
    tensors = {t.name: (t.tensor_type.name, [int(n) for n in t.shape]) for t in gguf.GGUFReader(result.path).tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp uses token_embd as the head
    assert tensors["token_embd.weight"] == ("Q8_0", [64, len(tok)])  # GGUF lists dims innermost first
    assert tensors["blk.1.attn_k.weight"] == ("Q8_0", [64, 32]) and tensors["blk.0.attn_norm.weight"][0] == "F32"
    assert len(tensors) == 1 + 2 * 9 + 1


@pytest.mark.parametrize("qtype", MODEL_TYPES)
def test_transformers_reads_the_same_model(gguf_tiny, tmp_path, known_tiny, merged_logits, qtype):
    path = export_gguf(gguf_tiny.adapter, tmp_path / f"m-{qtype}.gguf", qtype=qtype).path
    logits = _gguf_logits(path)
    assert _rel(logits, merged_logits) < REL_TOL[qtype]
    if qtype in ("f32", "f16"):
        assert torch.equal(logits.argmax(-1), merged_logits.argmax(-1))


def test_a_broken_rotary_permutation_is_caught(gguf_tiny, tmp_path, known_tiny, merged_logits, monkeypatch):
    monkeypatch.setattr(gguf_export, "heads_to_permute", lambda arch, key: None)  # write q/k in HF's row order
    logits = _gguf_logits(export_gguf(gguf_tiny.adapter, tmp_path / "wrong.gguf", qtype="f32").path)
    assert _rel(logits, merged_logits) > 5 * REL_TOL["q8_0"]  # measured 0.67: far outside every tolerance


def test_qwen2_keeps_biases_and_its_own_rotary_layout(tmp_path, known_tiny):
    tok = make_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    for layer in model.model.layers:  # non-zero biases, so a wrong layout shows
        torch.nn.init.normal_(layer.self_attn.q_proj.bias, std=0.5)
        torch.nn.init.normal_(layer.self_attn.k_proj.bias, std=0.5)
    model.save_pretrained(tmp_path / "qwen")
    tok.save_pretrained(tmp_path / "qwen")
    path = export_gguf(tmp_path / "qwen", tmp_path / "q.gguf", qtype="f32").path
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias", "output.weight"} <= names
    assert _fields(path)["general.architecture"] == "qwen2"
    with torch.no_grad():
        ref = model(IDS).logits
    assert _rel(_gguf_logits(path), ref) < REL_TOL["f32"]


def test_a_qlora_run_exports_what_training_saw(tiny_model_dir, tmp_path, known_tiny):
    from desktune.config import load_config
    from desktune.training.loop import train
    from tests.tiny import tiny_config

    raw = tiny_config(tiny_model_dir, tmp_path, model={"quant": "nf4"}, lora={"target_modules": "all-linear"},
                      train={"max_steps": 4}, data={"val_fraction": 0.0})
    run = train(load_config(raw), quiet=True)
    got = {into: export_gguf(run.run_dir, tmp_path / f"{into}.gguf", qtype="f32", into=into)
           for into in (None, "original")}
    with torch.no_grad():
        want = {into: merged_model(run.adapter_dir, dtype="fp32", into=into)[0](IDS).logits
                for into in ("dequantized", "original")}
    assert _rel(_gguf_logits(got[None].path), want["dequantized"]) < REL_TOL["f32"]  # the default: NF4 + BA
    assert _rel(_gguf_logits(got["original"].path), want["original"]) < REL_TOL["f32"]
    assert _rel(want["original"], want["dequantized"]) > 100 * REL_TOL["f32"]  # the choice matters
    assert any("de-quantized nf4 weights" in n for n in got[None].notes)
    lora = export_gguf(run.run_dir, tmp_path / "lora.gguf", adapter_only=True)
    assert any("merge --into original" in n for n in lora.notes)


def test_end_of_turn_differs_from_eos(known_tiny):
    tok = make_tokenizer()
    tok.eos_token = "<|endoftext|>"  # a base whose eos is not the template's end of turn (Llama 3 base, Qwen2 base)
    meta = gguf_tokenizer.tokenizer_meta(tok, len(tok), CHATML)
    assert meta.special_ids["eos"] == tok.convert_tokens_to_ids("<|endoftext|>")
    assert meta.special_ids["eot"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert gguf_tokenizer.end_of_turn_token(tok, "{{ messages[0]['content'] }}") is None


@pytest.mark.parametrize(("config", "match"), [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"architectures": ["LlamaForCausalLM"], "hidden_act": "gelu"}, "gelu"),
])
def test_architectures_it_cannot_write_are_refused(config, match):
    raw = {"num_attention_heads": 4, "num_hidden_layers": 2, "hidden_act": "silu", **config}
    with pytest.raises(DesktuneError, match=match):
        gguf_arch.arch_of(SimpleNamespace(**raw))


# ---------------------------------------------------------------- the adapter file


def test_adapter_gguf_plus_base_gguf_is_the_merged_gguf(gguf_tiny, tmp_path, known_tiny):
    base = gguf.GGUFReader(export_gguf(gguf_tiny.base, tmp_path / "base.gguf", qtype="f32").path)
    merged = gguf.GGUFReader(export_gguf(gguf_tiny.adapter, tmp_path / "merged.gguf", qtype="f32").path)
    adapter_path = export_gguf(gguf_tiny.adapter, tmp_path / "a.gguf", qtype="f32", adapter_only=True).path
    meta, lora = _fields(adapter_path), {t.name: t.data for t in gguf.GGUFReader(adapter_path).tensors}
    assert (meta["general.type"], meta["adapter.type"], meta["adapter.lora.alpha"]) == ("adapter", "lora", 8.0)
    assert meta["general.architecture"] == "llama" and len(lora) == 2 * 7 * 2
    w_base = {t.name: np.array(t.data) for t in base.tensors}
    for t in merged.tensors:  # llama.cpp's rule: W + alpha / rank * B @ A, rank = rows of lora_a
        a, b = lora.get(f"{t.name}.lora_a"), lora.get(f"{t.name}.lora_b")
        expected = w_base[t.name] if a is None else w_base[t.name] + 8.0 / a.shape[0] * (b @ a)
        np.testing.assert_allclose(np.array(t.data), expected, rtol=1e-4, atol=1e-5, err_msg=t.name)


@pytest.mark.parametrize(("kw", "match"), [
    ({"use_dora": True, "target_modules": ["q_proj", "v_proj"]}, "DoRA"),
    ({"modules_to_save": ["lm_head"], "target_modules": ["q_proj"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 8}, "target_modules": ["q_proj", "v_proj"]}, "rank_pattern"),
    ({"target_modules": ["embed_tokens", "q_proj"]}, "embeddings"),
])
def test_adapters_llama_cpp_cannot_apply_are_refused(gguf_tiny, tmp_path, kw, match):
    adapter = lora_adapter(gguf_tiny.base, tmp_path / "adapter", **kw)
    with pytest.raises(DesktuneError, match=match):
        export_gguf(adapter, tmp_path / "a.gguf", adapter_only=True)
    assert not (tmp_path / "a.gguf").exists()


def test_rslora_alpha_is_folded_for_llama_cpp(gguf_tiny, tmp_path):
    adapter = lora_adapter(gguf_tiny.base, tmp_path / "adapter", use_rslora=True, target_modules=["q_proj"])
    path = export_gguf(adapter, tmp_path / "a.gguf", adapter_only=True).path
    assert _fields(path)["adapter.lora.alpha"] == pytest.approx(8.0 * 2)  # alpha * sqrt(r): alpha'/r = alpha/sqrt(r)


# ---------------------------------------------------------------- sources, outputs, errors


def test_a_run_folder_exports_its_final_adapter(gguf_tiny, tmp_path, known_tiny):
    run = RunDir(tmp_path / "my-run")
    shutil.copytree(gguf_tiny.adapter, run.adapter)
    run.config.write_text("{}")
    result = export_gguf(run.path, tmp_path / "run.gguf", adapter_only=True)
    assert _fields(result.path)["general.name"] == "my-run"
    shutil.rmtree(run.adapter)
    with pytest.raises(DesktuneError, match="no final adapter"):
        export_gguf(run.path, tmp_path / "again.gguf")
    assert CONFIG in {p.name for p in run.path.iterdir()}


def test_output_rules_and_a_full_disk(gguf_tiny, tmp_path, known_tiny, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    with pytest.raises(DesktuneError, match="exists"):
        export_gguf(gguf_tiny.adapter, out, adapter_only=True)
    with pytest.raises(DesktuneError, match="not written for an adapter"):
        export_gguf(gguf_tiny.adapter, tmp_path / "x.gguf", adapter_only=True, qtype="q4_0")

    def full(*args, **kwargs):
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(gguf_export.os, "replace", full)
    with pytest.raises(DesktuneError, match="No space left"):
        export_gguf(gguf_tiny.adapter, out, adapter_only=True, force=True)
    assert out.read_bytes() == b"mine" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temp file left


def test_cli_exports_and_errors_exit_2(gguf_tiny, tmp_path, known_tiny, monkeypatch, capsys):
    from tests.test_cli import run_main

    code, out, _ = run_main(monkeypatch, capsys, "export", "gguf", str(gguf_tiny.adapter), "--out",
                            str(tmp_path / "m.gguf"), "--type", "q8_0")
    assert code == 0 and "GGUF written" in out and (tmp_path / "m.gguf").is_file()
    code, out, err = run_main(monkeypatch, capsys, "export", "gguf", str(tmp_path), "--out", str(tmp_path / "x.gguf"))
    assert code == 2 and "not a run folder" in err and "Traceback" not in out + err


def test_cli_type_choices_are_the_writers():
    from desktune import cli

    assert tuple(t.value for t in cli.GgufType) == MODEL_TYPES

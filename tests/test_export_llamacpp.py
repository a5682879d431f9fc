"""Exported GGUF files read by llama.cpp itself (prebuilt, via node-llama-cpp): the same prompt tokens, the same
greedy answers as the merged model in transformers, answers that stop by themselves, and base + adapter GGUF
answering like the merged GGUF. On the tiny model (fast) and on the demo's run of the embedded SmolLM2 (slow).

Agreement rule: two greedy answers agree when their tokens are identical, or when at the first token where they
part the reference model's logits for the two tokens are within `gap` of each other (a near-tie that rounding the
weights can flip; after it the answers follow different words and are not compared). The `gap` of each file type
is stated beside its test with the numbers measured.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import gguf
import pytest
import torch

from desktune.export import gguf as gguf_export
from desktune.export.gguf import export_gguf
from desktune.export.merge import merged_model
from tests.conftest import register_tiny_hash
from tests.llama_cpp import Answer, need_llama_cpp, read_with_llama_cpp

TINY_PROMPTS = ["what is the capital of france?", "ahoy matey!", "how are you today"]


@dataclass(frozen=True)
class Reference:
    """The merged model's greedy answer in transformers."""

    prompt_ids: list[int]
    ids: list[int]  # without the stop token
    stop_id: int | None


@dataclass(frozen=True)
class Agreement:
    """How llama.cpp's answer compares with the reference's."""

    identical: bool
    shared: int  # tokens both answers share from the start (stop token included)
    gap: float  # reference logit of its token minus that of llama.cpp's token where they part (0 if identical)

    def within(self, gap: float) -> bool:
        return self.identical or self.gap <= gap


def rendered(tokenizer, user: str) -> str:
    """A one-message chat through the tokenizer's template, the assistant's turn opened."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=False)


@torch.no_grad()
def reference(model, tokenizer, text: str, stop_ids: list[int], max_tokens: int) -> Reference:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=stop_ids,
                         pad_token_id=stop_ids[0])[0, ids.shape[1]:].tolist()
    stop = out[-1] if out and out[-1] in stop_ids else None
    return Reference(ids[0].tolist(), out[:-1] if stop is not None else out, stop)


@torch.no_grad()
def agreement(model, ref: Reference, got: Answer) -> Agreement:
    """Compare two greedy answers, stop tokens included."""
    mine = ref.ids + ([ref.stop_id] if ref.stop_id is not None else [])
    theirs = got.ids + ([got.stop_id] if got.stop_id is not None else [])
    n = min(len(mine), len(theirs))
    shared = next((i for i in range(n) if mine[i] != theirs[i]), n)
    if mine == theirs:
        return Agreement(True, shared, 0.0)
    if shared == n:  # one is a prefix of the other: not a near-tie, a different token count
        return Agreement(False, shared, math.inf)
    logits = model(torch.tensor([ref.prompt_ids + mine[:shared]])).logits[0, -1].float()
    return Agreement(False, shared, float(logits[mine[shared]] - logits[theirs[shared]]))


def stop_ids(tokenizer) -> list[int]:
    """EOS and the template's end of turn: what the merged model's generation stops on."""
    return sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")})


# ---------------------------------------------------------------- the tiny model


@pytest.fixture(scope="module")
def tiny(gguf_tiny, tmp_path_factory) -> SimpleNamespace:
    """The tiny merged model, its f32 GGUF files (merged, base, adapter) and transformers' reference answers."""
    need_llama_cpp()
    root = tmp_path_factory.mktemp("llamacpp-tiny")
    with pytest.MonkeyPatch.context() as mp:
        register_tiny_hash(mp)
        files = {name: export_gguf(src, root / f"{name}.gguf", qtype="f32", adapter_only=name == "lora").path
                 for name, src in [("merged", gguf_tiny.adapter), ("base", gguf_tiny.base),
                                   ("lora", gguf_tiny.adapter)]}
    model, tok = merged_model(gguf_tiny.adapter, dtype="fp32")
    texts = [rendered(tok, p) for p in TINY_PROMPTS]
    refs = [reference(model, tok, t, stop_ids(tok), 12) for t in texts]
    return SimpleNamespace(root=root, files=files, model=model, tok=tok, texts=texts, refs=refs)


def _answers(tiny, model: Path, **kw) -> list[Answer]:
    return read_with_llama_cpp(model, prompts=tiny.texts, max_tokens=12, job_dir=tiny.root, **kw)[0]


def test_llama_cpp_tokenizes_and_answers_like_transformers(tiny):
    answers = _answers(tiny, tiny.files["merged"])
    for ref, got in zip(tiny.refs, answers, strict=True):
        assert got.prompt_ids == ref.prompt_ids  # tokenizer, pre-tokenizer and special tokens read alike
        assert agreement(tiny.model, ref, got).within(1e-4), (ref.ids, got.ids)  # f32: only summation order


def test_base_gguf_plus_adapter_gguf_answers_like_the_merged_gguf(tiny):
    merged = _answers(tiny, tiny.files["merged"])
    with_lora = _answers(tiny, tiny.files["base"], lora=[tiny.files["lora"]])
    assert [a.ids for a in with_lora] == [a.ids for a in merged]
    assert [a.ids for a in _answers(tiny, tiny.files["base"])] != [a.ids for a in merged]  # the adapter matters


def test_llama_cpp_sees_a_wrong_rotary_layout(tiny, gguf_tiny, monkeypatch):
    register_tiny_hash(monkeypatch)
    monkeypatch.setattr(gguf_export, "heads_to_permute", lambda arch, key: None)  # q/k left in HF's row order
    wrong = export_gguf(gguf_tiny.adapter, tiny.root / "wrong.gguf", qtype="f32").path
    found = [agreement(tiny.model, r, a) for r, a in zip(tiny.refs, _answers(tiny, wrong), strict=True)]
    assert not all(f.within(1e-4) for f in found)


# ---------------------------------------------------------------- the demo's run of the embedded SmolLM2

# f16 rounds the weights to 11 significant bits, q8_0 to 8-bit blocks; llama.cpp computes in f32 on the CPU and
# sums in another order. A flip is only accepted at a near-tie: reference logits within 0.25 (f16) or 1.0 (q8_0)
# of each other, where this model's logits span about 30. Measured on the demo run (2 Xeon cores, bf16 training):
# f16, q8_0 and base f16 + adapter f16 each gave answers token-identical to the merged model on 4 of 4 prompts,
# every one ended by <|im_end|> after 26-32 tokens.
GAP = {"f16": 0.25, "q8_0": 1.0}
MAX_TOKENS = 128  # the demo answers in under 64: an answer that reaches 128 did not stop


@pytest.fixture(scope="module")
def demo(demo_run, tmp_path_factory) -> SimpleNamespace:
    """The demo run exported (f16, q8_0, adapter) with its base (f16), and transformers' reference answers."""
    from desktune.demo_run import demo_prompts, examples_dir
    from desktune.models.gguf import embedded_model_dir

    need_llama_cpp()
    result = demo_run[0]
    root = tmp_path_factory.mktemp("llamacpp-demo")
    exports = {q: export_gguf(result.run_dir, root / f"demo-{q}.gguf", qtype=q) for q in ("f16", "q8_0")}
    exports["lora"] = export_gguf(result.run_dir, root / "demo-lora.gguf", adapter_only=True)
    exports["base"] = export_gguf(embedded_model_dir(), root / "base-f16.gguf")
    model, tok = merged_model(result.adapter_dir, dtype="fp32")
    prompts = demo_prompts(examples_dir())
    texts = [rendered(tok, p) for p in prompts]
    refs = [reference(model, tok, t, stop_ids(tok), MAX_TOKENS) for t in texts]
    return SimpleNamespace(root=root, exports=exports, model=model, tok=tok, prompts=prompts, texts=texts,
                           refs=refs, report={})


def _demo_answers(demo, file: str, **kw) -> list[Answer]:
    answers, _ = read_with_llama_cpp(demo.exports[file].path, prompts=demo.texts, max_tokens=MAX_TOKENS,
                                     job_dir=demo.root, **kw)
    return answers


def _record(demo, name: str, answers: list[Answer]) -> list[Agreement]:
    found = [agreement(demo.model, r, a) for r, a in zip(demo.refs, answers, strict=True)]
    lines = {"file": name, "per_prompt": [{"identical": f.identical, "shared": f.shared, "gap": round(f.gap, 4),
                                           "ref_tokens": len(r.ids), "tokens": len(a.ids), "stopped": a.stop_id}
                                          for f, r, a in zip(found, demo.refs, answers, strict=True)]}
    print(json.dumps(lines))  # the per-prompt agreement, for the record (pytest -s)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_demo_gguf_answers_like_the_merged_model_and_stops(demo, qtype):
    answers = _demo_answers(demo, qtype)
    found = _record(demo, qtype, answers)
    exported = demo.exports[qtype]
    print(json.dumps({"file": qtype, "bytes": exported.bytes, "seconds": round(exported.seconds, 1)}))
    assert all(a.prompt_ids == r.prompt_ids for a, r in zip(answers, demo.refs, strict=True))
    assert all(a.stop_id == demo.tok.convert_tokens_to_ids("<|im_end|>") for a in answers), answers
    assert all(f.within(GAP[qtype]) for f in found), found
    if qtype == "f16":
        assert sum(f.identical for f in found) >= len(found) - 1, found
        modelfile = exported.modelfile.read_text()  # the training template is SmolLM2's own: translated exactly
        assert modelfile.startswith("FROM ./demo-f16.gguf\nTEMPLATE ") and 'PARAMETER stop "<|im_end|>"' in modelfile


@pytest.mark.slow
def test_demo_base_gguf_plus_adapter_gguf_answers_like_the_merged_model(demo):
    answers = _demo_answers(demo, "base", lora=[demo.exports["lora"].path])
    found = _record(demo, "base f16 + adapter", answers)
    print(json.dumps({"file": "lora", "bytes": demo.exports["lora"].bytes,
                      "seconds": round(demo.exports["lora"].seconds, 1)}))
    assert all(a.stop_id is not None for a in answers) and all(f.within(GAP["f16"]) for f in found), found


@pytest.mark.slow
def test_demo_gguf_chats_through_its_own_template(demo):
    """What llama.cpp front ends do: the chat template read from the file, then generation until it stops."""
    _, chats = read_with_llama_cpp(demo.exports["f16"].path, chats=demo.prompts, max_tokens=MAX_TOKENS,
                                   job_dir=demo.root)
    tokens = _demo_answers(demo, "f16")
    assert [c.stop_reason for c in chats] == ["eogToken"] * len(chats)
    assert [c.text.strip() for c in chats] == [a.text.strip() for a in tokens]


def _fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}


@pytest.mark.slow
def test_demo_gguf_mirrors_the_shipped_gguf(demo):
    """The exported file says what the GGUF SmolLM2 ships as (llama.cpp's own converter wrote that one): the same
    hyperparameters, pre-tokenizer 'smollm', vocabulary, merges, special ids and tensor names; its own chat
    template is the one the adapter was trained with; transformers reads its tokenizer back identically."""
    from transformers import AutoTokenizer

    from desktune.models.gguf import embedded_gguf

    path = demo.exports["f16"].path
    mine, shipped = _fields(path), _fields(embedded_gguf())
    same = [k for k in shipped if k.startswith(("llama.", "tokenizer.ggml."))]
    assert {k: mine[k] for k in same} == {k: shipped[k] for k in same}
    assert mine["tokenizer.chat_template"] == demo.tok.chat_template
    names = {t.name for t in gguf.GGUFReader(embedded_gguf()).tensors}
    for qtype in ("f16", "q8_0"):
        assert {t.name for t in gguf.GGUFReader(demo.exports[qtype].path).tensors} == names, qtype
    text = "The capital of France is Paris. 12345 <|im_end|>"
    reread = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert reread(text)["input_ids"] == demo.tok(text)["input_ids"]


@pytest.mark.slow
def test_demo_adapter_gguf_holds_every_adapted_weight(demo):
    reader = gguf.GGUFReader(demo.exports["lora"].path)
    names = {t.name for t in reader.tensors}
    assert len(names) == 30 * 7 * 2 and "blk.29.ffn_down.weight.lora_b" in names  # all-linear: 7 per layer
    assert _fields(demo.exports["lora"].path)["adapter.lora.alpha"] == 32.0

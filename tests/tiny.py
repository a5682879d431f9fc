"""Tiny random models and tokenizers for fast tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france? paris is the capital of france.",
    "ahoy matey! fair winds to you, sailor.",
    "user assistant system hello world how are you today i am fine thank you",
    "0123456789 !?.,:;'\"()[]{}-_+=/\\ abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def make_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML special tokens and template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def make_model_dir(path: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0, init_std: float = 0.02) -> Path:
    """Save a tiny random Llama with the tiny tokenizer to `path` and return it."""
    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True, initializer_range=init_std,
    )
    model = LlamaForCausalLM(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_chat_data(path: Path, n: int = 24, *, seed: int = 0) -> Path:
    """A small messages-format JSONL teaching a fixed reply style."""
    import json
    import random

    rng = random.Random(seed)
    topics = ["the sea", "the fox", "paris", "the dog", "the world", "today", "you", "france"]
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            topic = rng.choice(topics)
            user = f"what is {topic}? {i}"
            answer = f"ahoy matey! {topic} is fine. fair winds!"
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


def tiny_config(model_dir: Path, tmp_path: Path, **sections: dict) -> dict:
    """A raw run config for the tiny model: fp32, no dropout, a few steps."""
    data = write_chat_data(tmp_path / "train.jsonl")
    cfg = {
        "model": {"name": str(model_dir), "dtype": "fp32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(data), "val_fraction": 0.2, "max_seq_len": 64, "replay": 0},
        "train": {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-2, "warmup_ratio": 0.0,
                  "threads": 1},
        "output_dir": str(tmp_path / "runs"),
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(name, {}).update(values)
        else:
            cfg[name] = values
    return cfg


def inject_fault(monkeypatch, fault) -> None:
    """Call `fault(step, micro_batch_size)` before every training micro-batch, from outside the loop."""
    from desktune.training import step as step_mod

    real = step_mod.forward_backward

    def with_fault(tr, batch, normaliser):
        fault(tr.step, tr.micro)
        return real(tr, batch, normaliser)

    monkeypatch.setattr(step_mod, "forward_backward", with_fault)


def crash_at(monkeypatch, at_step: int) -> None:
    """A 'power cut' (RuntimeError) when the loop reaches optimizer step `at_step`."""

    def crash(step: int, micro: int) -> None:
        if step == at_step:
            raise RuntimeError("power cut")

    inject_fault(monkeypatch, crash)


def lora_adapter(model_dir: Path, out: Path, **kw) -> Path:
    """A random (not zero-initialised) PEFT LoRA adapter on `model_dir`, with the training chat template."""
    import peft
    from transformers import AutoModelForCausalLM

    from desktune.runs.layout import CHAT_TEMPLATE

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "task_type": "CAUSAL_LM",
                             "init_lora_weights": False, **kw})
    peft.get_peft_model(base, cfg).save_pretrained(out)
    (out / CHAT_TEMPLATE).write_text(CHATML, encoding="utf-8")
    return out


def packed_bf16_step_peak(arch, seq: int = 384, rows: int = 2) -> int:
    """Peak live-tensor bytes of one packed bf16 LoRA step (q,k,v,o r8, no dropout) of a random Llama of `arch`
    (a memory.catalog.ArchSpec), `rows` samples of `seq` tokens in one row, as desktune's step computes it."""
    from desktune.adapters import attach_lora
    from desktune.config import LoraConfig
    from desktune.data import IGNORE_INDEX, pack
    from desktune.data.encode import Example
    from desktune.memory import PeakTracker, model_tensors
    from desktune.models.packed_attention import restore_attention, use_packed_attention
    from desktune.scoring.ce import target_ce_sum
    from desktune.training.speed import adapters_in

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=arch.vocab, hidden_size=arch.hidden, intermediate_size=arch.intermediate,
        num_hidden_layers=arch.layers, num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads,
        head_dim=arch.head_dim, tie_word_embeddings=True, attn_implementation="sdpa")).to(torch.bfloat16)
    model.requires_grad_(False)
    model = attach_lora(model, LoraConfig(r=8, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    previous = use_packed_attention(model)
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, arch.vocab, (seq,), generator=g).tolist() for _ in range(rows)]
    batch = pack([Example(input_ids=ids, labels=[IGNORE_INDEX, *ids[1:]], source="s") for ids in samples])
    with PeakTracker("cpu", model_tensors(model)) as tr, adapters_in(model, torch.device("cpu"), torch.bfloat16):
        loss, n = target_ce_sum(model, batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])
        (loss / n).backward()
    restore_attention(model, previous)
    return tr.peak_bytes

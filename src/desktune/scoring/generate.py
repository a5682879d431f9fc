"""Greedy answers of a model to many conversations: the demo's and evaluation's base vs tuned answers."""

from __future__ import annotations

from typing import Any

import torch

# greedy decoding of a small model loops without it; the same for base and tuned answers (demo, eval)
ANSWER_REPETITION_PENALTY = 1.15


@torch.no_grad()
def replies(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], *, max_new_tokens: int = 96,
            batch_size: int = 8, repetition_penalty: float = 1.0) -> list[str]:
    """Greedy answers to several conversations, generated in left-padded batches (much faster on a CPU)."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        for i in range(0, len(conversations), batch_size):
            texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                     for c in conversations[i : i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id,
                                 repetition_penalty=repetition_penalty)
            width = enc["input_ids"].shape[1]
            answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    finally:
        tokenizer.padding_side = side
    return answers

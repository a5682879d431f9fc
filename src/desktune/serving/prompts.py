"""Request bodies to prompt token ids: the chat template for conversations, plain tokens for completions."""

from __future__ import annotations

from typing import Any

from desktune.serving.errors import ApiError
from desktune.serving.schemas import ChatMessage


def _text(message: ChatMessage) -> str:
    content = message.content
    return content if isinstance(content, str) else "".join(part.text for part in content)


def chat_prompt(tokenizer: Any, messages: list[ChatMessage], template: str | None) -> list[int]:
    """The conversation through the chat template (with the assistant's turn opened) as token ids."""
    import jinja2

    if not template:
        raise ApiError(400, "this model has no chat template; use /v1/completions", code="no_chat_template")
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m)} for m in messages]
    try:
        enc = tokenizer.apply_chat_template(turns, chat_template=template, add_generation_prompt=True,
                                            tokenize=True, return_dict=True)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ApiError(400, f"the chat template refused these messages: {detail}", param="messages") from e
    ids = list(enc["input_ids"])
    if not ids:
        raise ApiError(400, "the messages make an empty prompt", param="messages")
    return [int(i) for i in ids]


def completion_prompt(tokenizer: Any, prompt: str | list[str]) -> list[int]:
    """A raw prompt's token ids (the tokenizer's own special tokens, such as BOS, included)."""
    if isinstance(prompt, list):  # one prompt: the schema allows no more
        prompt = prompt[0]
    try:
        ids = list(tokenizer(prompt)["input_ids"])
    except (TypeError, ValueError) as e:  # text the tokenizer cannot take (lone surrogates when not strict JSON)
        detail = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ApiError(400, f"the tokenizer refused the prompt: {detail}", param="prompt") from e
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    return [int(i) for i in ids]

"""Generation and chat with or without an adapter, streaming text as it is produced."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from desktune.adapters import check_adapter, load_adapter
from desktune.config import ModelConfig
from desktune.constants import EMBEDDED_MODEL
from desktune.hardware import detect
from desktune.models.loading import LoadedModel, load_model
from desktune.runs.layout import CHAT_TEMPLATE
from desktune.scoring.generate import replies

__all__ = ["conversation", "load_for_inference", "private_rng", "replies", "reply"]


def load_for_inference(model: str | None = None, adapter: str | Path | None = None, *, dtype: str = "auto",
                       device: str = "auto", quant: str = "none") -> LoadedModel:
    """Load a base (by default the adapter's own base, else the embedded model) and put the adapter on it."""
    if adapter is not None:  # a bad adapter folder is reported before a base model is loaded
        trained_on = check_adapter(adapter).get("base_model_name_or_path")
        model = model or trained_on or EMBEDDED_MODEL
    loaded = load_model(ModelConfig(name=model or EMBEDDED_MODEL, dtype=dtype, quant=quant), detect(device, dtype))
    if adapter is not None:
        loaded.model = load_adapter(loaded.model, adapter)
        template = Path(adapter) / CHAT_TEMPLATE
        if template.is_file():
            loaded.tokenizer.chat_template = template.read_text(encoding="utf-8")
    loaded.model.eval()
    return loaded


def conversation(prompt: str | None, system: str | None = None) -> list[dict[str, str]]:
    """Messages for an optional system message and an optional first user message."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + ([{"role": "user", "content": prompt}] if prompt is not None else [])


def _streamer(tokenizer: Any, on_text: Callable[[str], None]) -> Any:
    from transformers import TextStreamer

    class _Callback(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return _Callback(tokenizer, skip_prompt=True, skip_special_tokens=True)


@contextlib.contextmanager
def private_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed sampling without touching the global RNG: inside, the CPU generator (and the model's accelerator's)
    start from `seed`; on exit (errors included) their states are put back, so training resumes exactly."""
    accelerated = device.type != "cpu"
    index = device.index if device.index is not None else torch.cuda.current_device() if device.type == "cuda" else 0
    forked = [index] if accelerated else []
    with torch.random.fork_rng(devices=forked, device_type=device.type if accelerated else None):
        torch.random.default_generator.manual_seed(seed)  # not torch.manual_seed: that reseeds every device
        if device.type == "cuda":
            torch.cuda.default_generators[index].manual_seed(seed)
        elif accelerated:
            torch.get_device_module(device.type).manual_seed(seed)
        yield


@torch.no_grad()
def reply(model: Any, tokenizer: Any, messages: list[dict[str, str]], *, max_new_tokens: int = 128,
          temperature: float = 0.0, top_p: float = 0.9, on_text: Callable[[str], None] | None = None,
          seed: int = 0) -> str:
    """The assistant's next message for a conversation (greedy when temperature is 0)."""
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if on_text is not None:
        kwargs["streamer"] = _streamer(tokenizer, on_text)
    with private_rng(seed, device):  # greedy too: a model left in train mode draws dropout masks
        out = model.generate(**enc, **kwargs)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()

"""One base model with its adapters: every name the server answers as, and the lock that shares the model."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from desktune.adapters import check_adapter, load_adapter, load_more_adapter
from desktune.constants import EMBEDDED_MODEL
from desktune.errors import DesktuneError
from desktune.inference import load_for_inference
from desktune.runs.layout import CHAT_TEMPLATE
from desktune.serving.settings import model_name

# end-of-turn markers of common chat templates: generation also stops on each one the template writes
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


@dataclass(frozen=True)
class Served:
    """A name in /v1/models: the base (adapter None) or the peft adapter it switches to, and its chat template."""

    name: str
    adapter: str | None
    chat_template: str | None
    stop_ids: tuple[int, ...]


class Registry:
    """The shared model; `using(name)` holds the lock with that adapter active (the base: adapters off)."""

    def __init__(self, model: Any, tokenizer: Any, served: list[Served]) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.served = {s.name: s for s in served}
        self.created = int(time.time())
        self.context = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 0) or None
        self.device = next(model.parameters()).device
        self._lock = threading.Lock()

    def get(self, name: str) -> Served | None:
        """The served model of that name, if any."""
        return self.served.get(name)

    @contextlib.contextmanager
    def using(self, served: Served) -> Iterator[Any]:
        """Hold the model with `served`'s adapter active (one generation at a time: the model is shared)."""
        with self._lock:
            if served.adapter is not None:
                self.model.set_adapter(served.adapter)
                yield self.model
            elif hasattr(self.model, "disable_adapter"):
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model


def stop_ids(model: Any, tokenizer: Any, template: str | None) -> tuple[int, ...]:
    """The ids that end an answer: eos (tokenizer and generation config) and the template's end-of-turn markers."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= {int(i) for i in (eos if isinstance(eos, list | tuple) else [eos]) if i is not None}
    vocab = tokenizer.get_vocab()
    ids |= {vocab[m] for m in END_OF_TURN_MARKERS if template and m in template and m in vocab}
    return tuple(sorted(ids))


def _attach(model: Any, path: Path, index: int) -> tuple[Any, str]:
    """Put one more adapter on the model; returns the model and the adapter's peft name."""
    if index == 0:
        return load_adapter(model, path), "default"
    peft_name = f"adapter-{index}"
    load_more_adapter(model, path, peft_name)
    return model, peft_name


def _template(path: Path, fallback: str | None) -> str | None:
    file = path / CHAT_TEMPLATE
    return file.read_text(encoding="utf-8") if file.is_file() else fallback


def load_registry(model: str | None, adapters: dict[str, Path], *, dtype: str = "auto", device: str = "auto",
                  quant: str = "none") -> Registry:
    """Load the base (default: the first adapter's own base, else the embedded model) and every adapter."""
    if model is None and adapters:
        model = check_adapter(next(iter(adapters.values()))).get("base_model_name_or_path")
    model = model or EMBEDDED_MODEL
    loaded = load_for_inference(model, None, dtype=dtype, device=device, quant=quant)
    tok, net = loaded.tokenizer, loaded.model
    base = model_name(model)
    if base in adapters:
        raise DesktuneError(f"an adapter is named like the base model ({base!r})", where="--adapter",
                            fix="name it otherwise: --adapter NAME=PATH")
    templates = [(base, None, tok.chat_template)]
    for i, (name, path) in enumerate(adapters.items()):
        net, peft_name = _attach(net, path, i)
        templates.append((name, peft_name, _template(path, tok.chat_template)))
    net.eval()
    served = [Served(name, adapter, tmpl, stop_ids(net, tok, tmpl)) for name, adapter, tmpl in templates]
    return Registry(net, tok, served)

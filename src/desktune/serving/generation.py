"""One generation on the shared model: prompt ids, greedy or sampled tokens, text deltas, token counts."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from desktune.inference import private_rng
from desktune.serving.registry import Registry, Served

GREEDY_BELOW = 1e-5  # a temperature this close to 0 is greedy (dividing by it would overflow the logits)


@dataclass(frozen=True)
class Params:
    """How to generate: the token limit, sampling (temperature 0 = greedy), seed and stop strings."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    strip: bool = False  # chat answers: no leading or trailing whitespace (as `desktune generate`)


@dataclass(frozen=True)
class Outcome:
    """The whole answer, its token counts and why it ended ("stop" or "length")."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class Assembler:
    """Turns generated ids into text deltas: whole characters only, stop strings cut (and held back until they
    cannot start one), whitespace stripped at both ends when asked."""

    def __init__(self, tokenizer: Any, params: Params) -> None:
        self.tokenizer, self.params = tokenizer, params
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already handed out
        self.text = ""  # the text handed out so far
        self.stopped = False  # a stop string was found
        self.hold = max((len(s) for s in params.stop), default=1) - 1

    def _text(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        text = text.lstrip() if self.params.strip else text
        for s in self.params.stop:
            cut = text.find(s)
            if cut >= 0:
                text, self.stopped = text[:cut], True
        return text

    def feed(self, ids: list[int]) -> str:
        """Add tokens; the text that can be handed out now."""
        self.ids += ids
        text = self._text()
        if not self.stopped:
            text = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for its next byte
            text = text[: max(len(text) - self.hold, self.sent)]
            text = text.rstrip() if self.params.strip else text
        return self._emit(text)

    def finish(self) -> str:
        """The rest of the text at the end."""
        text = self._text()
        return self._emit(text.rstrip() if self.params.strip else text)

    def _emit(self, text: str) -> str:
        delta = text[self.sent :] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        self.text += delta
        return delta


class _Feed:
    """A transformers streamer: every new token goes to `on_ids` (the prompt, put first, is skipped)."""

    def __init__(self, on_ids: Callable[[list[int]], None]) -> None:
        self.on_ids, self.prompt_seen = on_ids, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.on_ids(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class _Stop:
    """A stopping criterion that ends generation once `event` is set (stop string found, client gone)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _kwargs(params: Params, served: Served, tokenizer: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"max_new_tokens": params.max_tokens, "eos_token_id": list(served.stop_ids),
                              "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                              else served.stop_ids[0] if served.stop_ids else None}
    if params.temperature > GREEDY_BELOW:
        kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


@torch.no_grad()
def generate(registry: Registry, served: Served, prompt: list[int], params: Params,
             on_text: Callable[[str], None] | None = None, cancel: threading.Event | None = None) -> Outcome:
    """Generate an answer to `prompt` (token ids) as `served`; text deltas go to `on_text` as they are made."""
    from transformers import StoppingCriteriaList

    cancel = cancel or threading.Event()
    text = Assembler(registry.tokenizer, params)

    def on_ids(ids: list[int]) -> None:
        delta = text.feed(ids)
        if text.stopped:
            cancel.set()
        if delta and on_text is not None:
            on_text(delta)

    ids = torch.tensor([prompt], device=registry.device)
    kwargs = _kwargs(params, served, registry.tokenizer)
    with registry.using(served) as model, private_rng(params.seed, registry.device):
        if not cancel.is_set():  # the client may have left while this waited for the model
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=_Feed(on_ids),
                           stopping_criteria=StoppingCriteriaList([_Stop(cancel)]), **kwargs)
    rest = text.finish()
    if rest and on_text is not None:
        on_text(rest)
    ended = text.stopped or bool(text.ids and text.ids[-1] in served.stop_ids) or len(text.ids) < params.max_tokens
    return Outcome(text.text, len(prompt), len(text.ids), "stop" if ended else "length")


def stream(registry: Registry, served: Served, prompt: list[int], params: Params,
           cancel: threading.Event | None = None) -> Iterator[str | Outcome]:
    """Text deltas as they are made, then the Outcome; setting `cancel` or closing the iterator early stops the
    generation at its next token."""
    items: queue.Queue[str | Outcome | BaseException] = queue.Queue()
    cancel = cancel or threading.Event()

    def work() -> None:
        try:
            items.put(generate(registry, served, prompt, params, on_text=items.put, cancel=cancel))
        except BaseException as e:  # handed to the reader, which raises it
            items.put(e)

    threading.Thread(target=work, name="desktune-generate", daemon=True).start()
    try:
        while True:
            item = items.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Outcome):
                return
    finally:
        cancel.set()

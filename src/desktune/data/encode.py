"""Samples -> token ids and labels: loss on assistant turns (or everything), for any chat template."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from desktune.constants import IGNORE_INDEX
from desktune.data.formats import Sample
from desktune.data.sources import BadRows, bad_row
from desktune.errors import DesktuneError

TrainOn = Literal["assistant", "all"]
_TEMPLATE_FIX = (
    "set model.chat_template to a built-in (chatml, llama3, mistral, zephyr) or a working Jinja template"
)


@dataclass
class Example:
    """One tokenized training sample; labels are IGNORE_INDEX where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    source: str

    @property
    def n_target(self) -> int:
        """Tokens the loss is computed on (never position 0: nothing comes before it)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass
class Encoded:
    """The result of encoding many samples."""

    examples: list[Example] = field(default_factory=list)
    n_truncated: int = 0
    dropped: list[str] = field(default_factory=list)  # where each sample left with no trained token came from

    @property
    def n_dropped(self) -> int:
        return len(self.dropped)


# ---------------------------------------------------------------- rendering


def _eos(tokenizer: Any) -> tuple[str, int]:
    eos, eos_id = getattr(tokenizer, "eos_token", None), getattr(tokenizer, "eos_token_id", None)
    if not eos or eos_id is None:
        raise DesktuneError(
            "the tokenizer has no end-of-sequence (eos) token",
            where="tokenizer",
            fix="use a model whose tokenizer defines eos_token",
        )
    return eos, eos_id


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation: bool, where: str) -> str:
    """The chat template's text for `messages`; template failures become DesktuneError."""
    import jinja2

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DesktuneError(f"the chat template failed: {detail}", where=where, fix=_TEMPLATE_FIX) from e
    if not isinstance(text, str):
        raise DesktuneError("the chat template did not render text", where=where, fix=_TEMPLATE_FIX)
    return text


def _with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    if system_prompt and system_prompt.strip() and messages and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return list(messages)


def _find_content(full: str, content: str, cursor: int, eos: str, turn: int, where: str) -> tuple[int, int]:
    """Fallback for templates that are not prefix-stable: locate the assistant text itself."""
    for needle in (content, content.strip()):
        pos = full.find(needle, cursor)
        if pos >= 0:
            end = pos + len(needle)
            rest = full[end:]
            gap = len(rest) - len(rest.lstrip())
            if rest[gap:].startswith(eos):
                end += gap + len(eos)
            return pos, end
    raise DesktuneError(
        f"cannot find assistant turn {turn} in the text rendered by the chat template",
        where=where,
        fix=_TEMPLATE_FIX,
    )


def _end_of_turn(full: str, start: int, end: int, eos: str) -> tuple[int, int, bool]:
    """Cut the span after its last eos (dropping e.g. a trailing newline); else drop trailing whitespace."""
    turn = full[start:end]
    k = turn.rfind(eos)
    if k >= 0:
        return start, start + k + len(eos), True
    return start, start + len(turn.rstrip()), False


def assistant_spans(
    tokenizer: Any, messages: list[dict[str, str]], full: str, where: str = "sample"
) -> list[tuple[int, int, bool]]:
    """Character spans (start, end, has_eos) of each assistant turn inside `full`, the conversation rendered
    without a generation prompt.

    A turn starts where the prefix rendered with add_generation_prompt=True ends and ends after its eos.
    """
    eos, _ = _eos(tokenizer)
    spans: list[tuple[int, int, bool]] = []
    cursor, turn = 0, 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        turn += 1
        prefix = _render(tokenizer, messages[:i], generation=True, where=where)
        last = i + 1 == len(messages)  # then `through` is `full`: one render fewer (rendering is ~1/3 of encoding)
        through = full if last else _render(tokenizer, messages[: i + 1], generation=False, where=where)
        if through.startswith(prefix) and full.startswith(through) and len(prefix) >= cursor:
            start, end = len(prefix), len(through)
        else:
            start, end = _find_content(full, message["content"], cursor, eos, turn, where)
        span = _end_of_turn(full, start, end, eos)
        spans.append(span)
        cursor = span[1]
    return spans


# ---------------------------------------------------------------- tokenizing


def _tokenize_with_offsets(tokenizer: Any, text: str, where: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise DesktuneError(
            "the tokenizer is a slow (Python) tokenizer without offsets",
            where=where,
            fix="use a model that ships a fast tokenizer (tokenizer.json)",
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _in_spans(offsets: list[tuple[int, int]], spans: Sequence[tuple[int, int, bool]]) -> list[int]:
    """For each token, the index of the span it overlaps, or -1."""
    owner = []
    for s, e in offsets:
        hit = -1
        if e > s:
            for j, (ss, se, _) in enumerate(spans):
                if s < se and e > ss:
                    hit = j
                    break
        owner.append(hit)
    return owner


def _encode_chat(
    tokenizer: Any, messages: list[dict[str, str]], train_on: TrainOn, where: str
) -> tuple[list[int], list[int]]:
    _, eos_id = _eos(tokenizer)
    full = _render(tokenizer, messages, generation=False, where=where)
    spans = assistant_spans(tokenizer, messages, full, where)
    ids, offsets = _tokenize_with_offsets(tokenizer, full, where)
    owner = _in_spans(offsets, spans)
    labelled = [o >= 0 for o in owner]
    if spans and not spans[-1][2]:  # the template ends assistant turns without eos: add it after the last one
        last = len(spans) - 1
        at = max((k for k, o in enumerate(owner) if o == last), default=len(ids) - 1) + 1
        ids.insert(at, eos_id)
        labelled.insert(at, True)
    if train_on == "all":
        return ids, list(ids)
    return ids, [t if keep else IGNORE_INDEX for t, keep in zip(ids, labelled, strict=True)]


def _encode_text(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    _, eos_id = _eos(tokenizer)
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if not ids or ids[-1] != eos_id:
        ids.append(eos_id)
    return ids, list(ids)


def encode_sample(
    tokenizer: Any,
    sample: Sample,
    *,
    max_seq_len: int,
    train_on: TrainOn = "assistant",
    system_prompt: str | None = None,
) -> tuple[Example, bool]:
    """Tokenize one sample and label its trained tokens; returns (example, was_truncated)."""
    if sample.messages is not None:
        messages = _with_system(sample.messages, system_prompt)
        ids, labels = _encode_chat(tokenizer, messages, train_on, sample.source)
    elif sample.text is not None:
        ids, labels = _encode_text(tokenizer, sample.text)
    else:
        raise DesktuneError(
            "the sample has neither messages nor text", where=sample.source, fix="remove the row"
        )
    truncated = len(ids) > max_seq_len
    return Example(ids[:max_seq_len], labels[:max_seq_len], sample.source), truncated


def encode_samples(
    tokenizer: Any,
    samples: Sequence[Sample],
    *,
    max_seq_len: int,
    train_on: TrainOn = "assistant",
    system_prompt: str | None = None,
    bad: BadRows | None = None,
) -> Encoded:
    """Encode many samples, counting truncated ones and dropping those left with no trained token; a sample the
    template cannot render goes to `bad` when given (skipped or raised, as data.bad_rows says)."""
    out = Encoded()
    for sample in samples:
        try:
            example, truncated = encode_sample(
                tokenizer, sample, max_seq_len=max_seq_len, train_on=train_on, system_prompt=system_prompt
            )
        except DesktuneError as e:
            if e.where != sample.source:  # the tokenizer's fault (no eos), not the row's
                raise
            bad_row(bad, e)
            continue
        out.n_truncated += truncated
        if example.n_target == 0:
            out.dropped.append(sample.source)
        else:
            out.examples.append(example)
    return out


def encode_prompt(
    tokenizer: Any, messages: list[dict[str, str]], *, system_prompt: str | None = None
) -> list[int]:
    """Token ids of a conversation followed by the assistant generation prompt (for generation)."""
    text = _render(tokenizer, _with_system(messages, system_prompt), generation=True, where="prompt")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])

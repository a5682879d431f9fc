"""Generation and chat with or without an adapter: one prompt streamed, a prompt file answered in batches, and
a terminal chat that can switch adapters mid-conversation."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from desktune.adapters import check_adapter, load_adapter
from desktune.config import ModelConfig
from desktune.constants import EMBEDDED_MODEL
from desktune.errors import DesktuneError
from desktune.hardware import detect
from desktune.models.loading import LoadedModel, load_model
from desktune.runs.atomic import write_text_atomically
from desktune.runs.layout import CHAT_TEMPLATE
from desktune.scoring.generate import replies

__all__ = ["CHAT_HELP", "ChatSession", "answer_prompts", "base_name", "chat_loop", "conversation",
           "load_for_inference", "private_rng", "prompt_rows", "read_prompts", "replies", "reply", "write_jsonl"]

PROMPTS_FIX = 'pass a .txt file (one prompt per line) or a .jsonl file ({"prompt": "...", "system": "..."} per ' \
              'line, system optional)'


def base_name(model: str | None, adapter: str | Path | None) -> str:
    """The base to load: `model`, else the adapter's own base, else the embedded model. A bad adapter folder is
    reported here, before any base model is loaded."""
    trained_on = check_adapter(adapter).get("base_model_name_or_path") if adapter is not None else None
    return model or trained_on or EMBEDDED_MODEL


def load_for_inference(model: str | None = None, adapter: str | Path | None = None, *, dtype: str = "auto",
                       device: str = "auto", quant: str = "none") -> LoadedModel:
    """Load a base (by default the adapter's own base, else the embedded model) and put the adapter on it."""
    name = base_name(model, adapter)
    loaded = load_model(ModelConfig(name=name, dtype=dtype, quant=quant), detect(device, dtype))
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


# ---- a prompt file answered in batches (desktune generate --prompts) ----------------------------------------------


def _prompt_line(path: Path, number: int, line: str) -> dict[str, Any]:
    """One .jsonl line as a row with a "prompt" text (and an optional "system" text)."""
    where, fix = f"{path}:{number}", PROMPTS_FIX
    try:
        row = json.loads(line)
    except ValueError as e:
        raise DesktuneError(f"not JSON ({e})", where=where, fix=fix) from e
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise DesktuneError('the line has no "prompt" text', where=where, fix=fix)
    if row.get("system") is not None and not isinstance(row["system"], str):
        raise DesktuneError('"system" is not a text', where=where, fix='write "system": "..." or leave it out')
    return row


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a prompt file: .txt (one prompt per line, blank lines skipped) or .jsonl (an object per line
    with "prompt", optionally "system", other fields kept). Errors name the file and line."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise DesktuneError(f"unknown prompt file type {path.suffix or '(none)'!r}", where=str(path), fix=PROMPTS_FIX)
    if not path.is_file():
        raise DesktuneError("prompt file not found", where=str(path), fix=PROMPTS_FIX)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DesktuneError(f"cannot read the prompt file ({e})", where=str(path), fix="save it as UTF-8 text") from e
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if path.suffix == ".txt":
        rows = [{"prompt": line.strip()} for _, line in numbered]
    else:
        rows = [_prompt_line(path, n, line) for n, line in numbered]
    if not rows:
        raise DesktuneError("the prompt file holds no prompt", where=str(path), fix="add prompts to it")
    return rows


def prompt_rows(prompt: str | None, prompts: Path | None, out: Path | None) -> list[dict[str, Any]]:
    """What `desktune generate` answers: PROMPT or the rows of --prompts FILE (exactly one of them), checked
    with --out before any model is loaded."""
    if (prompt is None) == (prompts is None):
        raise DesktuneError("pass exactly one of PROMPT or --prompts FILE", where="desktune generate",
                            fix='desktune generate "a question"  or  desktune generate --prompts prompts.jsonl')
    if out is not None and out.is_dir():
        raise DesktuneError("--out is a folder", where=str(out), fix="pass a file name, e.g. answers.jsonl")
    if prompts is not None and out is not None and out.resolve() == prompts.resolve():
        raise DesktuneError("--out would overwrite the prompt file", where=str(out), fix="write the answers elsewhere")
    return read_prompts(prompts) if prompts is not None else [{"prompt": prompt}]


def answer_prompts(model: Any, tokenizer: Any, rows: list[dict[str, Any]], *, system: str | None = None,
                   batch_size: int = 8, max_new_tokens: int = 256, temperature: float = 0.0,
                   on_batch: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Each row with its "answer": greedy answers in left-padded batches (scoring.generate.replies); with a
    temperature, sampled one by one (prompt i seeded with i). A row's own "system" wins over `system`."""
    answered: list[dict[str, Any]] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        chats = [conversation(r["prompt"], r["system"] if r.get("system") is not None else system) for r in batch]
        if temperature > 0:
            answers = [reply(model, tokenizer, c, max_new_tokens=max_new_tokens, temperature=temperature,
                             seed=start + i) for i, c in enumerate(chats)]
        else:
            answers = replies(model, tokenizer, chats, max_new_tokens=max_new_tokens, batch_size=batch_size)
        done = [{**r, "answer": a} for r, a in zip(batch, answers, strict=True)]
        answered += done
        if on_batch is not None:
            on_batch(done)
    return answered


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSON lines in one rename: the file holds all the answers or its old content, never part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ---- the terminal chat (desktune chat) ----------------------------------------------------------------------------

CHAT_HELP = ("/adapter PATH switches to another adapter trained on the same base; /adapter off (or /base) talks "
             "to the base alone; /adapter shows the current one. /system TEXT sets the system message (/system "
             "alone removes it). Switching and /system start a new conversation (the system message stays). "
             "/reset clears the conversation, /help shows this, /exit (or Ctrl-D) leaves.")


class ChatSession:
    """A conversation with a base model and the adapter on it (if any); the adapter can be switched mid-chat."""

    def __init__(self, model: Any, tokenizer: Any, *, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.7) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.base_template = tokenizer.chat_template  # put back when the chat goes back to the base
        self.adapter: Path | None = None
        self.system = system
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.history = conversation(None, system)

    def reset(self) -> None:
        """Clear the conversation, keeping the system message."""
        self.history = conversation(None, self.system)

    def set_system(self, system: str | None) -> None:
        """Replace the system message and start a new conversation."""
        self.system = system or None
        self.reset()

    def use_adapter(self, path: str | Path | None) -> None:
        """Put another adapter on the base (None: the base alone), apply its chat template and start a new
        conversation. A bad adapter raises DesktuneError and the current adapter stays on."""
        if path is not None:
            check_adapter(path)  # a missing or broken folder is refused before the current adapter comes off
        previous = self.adapter
        base = self.model.unload() if previous is not None else self.model  # the base, without any LoRA layer
        try:
            self.model = load_adapter(base, path) if path is not None else base
        except DesktuneError:
            self.model = load_adapter(base, previous) if previous is not None else base
            raise
        self.model.eval()
        self.adapter = Path(path) if path is not None else None
        template = self.adapter / CHAT_TEMPLATE if self.adapter is not None else None
        has_own = template is not None and template.is_file()
        self.tokenizer.chat_template = template.read_text(encoding="utf-8") if has_own else self.base_template
        self.reset()

    def describe(self) -> str:
        """What answers now: the adapter's path or the base."""
        return f"adapter {self.adapter}" if self.adapter is not None else "the base model, no adapter"

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """The answer to a user message (streamed to `on_text`), both kept in the conversation."""
        self.history.append({"role": "user", "content": text})
        try:
            answer = reply(self.model, self.tokenizer, self.history, max_new_tokens=self.max_new_tokens,
                           temperature=self.temperature, on_text=on_text)
        except BaseException:
            self.history.pop()  # an interrupted answer leaves no unanswered message behind
            raise
        self.history.append({"role": "assistant", "content": answer})
        return answer


def _command(session: ChatSession, line: str, note: Callable[[str], None]) -> bool:
    """Carry out a /command; False when the chat should end."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.reset()
        note("conversation cleared")
    elif name == "/help":
        note(CHAT_HELP)
    elif name == "/system":
        session.set_system(arg or None)
        note(f"system message {'set' if arg else 'removed'}; new conversation")
    elif name == "/adapter" and not arg:
        note(f"now answering: {session.describe()}")
    elif name in ("/adapter", "/base"):
        try:
            session.use_adapter(None if name == "/base" or arg == "off" else arg)
        except DesktuneError as e:
            note(f"error: {e}\nstill answering: {session.describe()}")
        else:
            note(f"now answering: {session.describe()}; new conversation")
    else:
        note(f"unknown command {name}; /help lists the commands")
    return True


def chat_loop(session: ChatSession, read: Callable[[str], str], write: Callable[[str], None],
              note: Callable[[str], None]) -> None:
    """Read lines with `read(prompt)` until /exit or end of input; answers stream to `write`, messages (help,
    errors, switches) go to `note`. Ctrl-C during an answer stops it; at the prompt it leaves."""
    note(f"chat ready, answering: {session.describe()}. /help lists the commands, /exit leaves")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if not _command(session, text, note):
                return
            continue
        write("assistant> ")
        try:
            session.ask(text, write)
        except KeyboardInterrupt:  # Ctrl-C stops this answer (forgotten), not the chat
            write("\n")
            note("answer stopped; the conversation goes on without it (/exit or Ctrl-D leaves)")
            continue
        write("\n")

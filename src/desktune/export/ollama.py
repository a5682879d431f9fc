"""An Ollama Modelfile beside an exported GGUF: FROM, TEMPLATE (only where it is an exact translation of the
training template), PARAMETER stop for every end-of-generation token, ADAPTER for an adapter-only export.

Ollama renders prompts with Go templates, not Jinja. desktune holds hand-written translations of the templates
it knows exactly (its built-ins and the embedded SmolLM2's own); tests/test_ollama.py renders each with a Go
template evaluator and Jinja on the same conversations. For any other template TEMPLATE is left out, so Ollama
falls back to the GGUF's own chat template, and the notes say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf

from desktune.data.templates import BUILTIN_TEMPLATES

# Go templates for Ollama's chat endpoint: .Messages (each .Role, .Content), the assistant's turn opened at the end.
_CHATML_GO = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)
_SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM2_JINJA = (  # the embedded SmolLM2-135M-Instruct's own template
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    + _SMOLLM2_SYSTEM + "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SMOLLM2_GO = (
    "{{- range $i, $m := .Messages }}{{ if and (eq $i 0) (ne $m.Role \"system\") }}<|im_start|>system\n"
    + _SMOLLM2_SYSTEM + "<|im_end|>\n{{ end }}<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)
_ZEPHYR_GO = "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}EOS\n{{ end }}<|assistant|>\n"  # EOS: the token

# Jinja source -> (name, Go template). Llama 3's built-in trims each message (Ollama's templates have no trim) and
# Mistral's folds the system message into the first user turn: neither has an exact translation here.
TRANSLATIONS: dict[str, tuple[str, str]] = {
    BUILTIN_TEMPLATES["chatml"]: ("chatml", _CHATML_GO),
    BUILTIN_TEMPLATES["zephyr"]: ("zephyr", _ZEPHYR_GO),
    SMOLLM2_JINJA: ("SmolLM2", _SMOLLM2_GO),
}


@dataclass
class Modelfile:
    """The Modelfile's text and what the user should know about it."""

    text: str
    notes: list[str] = field(default_factory=list)


def go_template(jinja: str | None, eos_token: str) -> tuple[str | None, str]:
    """(Go template, note) for a training template: the translation, or None and why there is none."""
    if jinja is None:
        return None, "no chat template was used in training: the Modelfile has no TEMPLATE"
    found = TRANSLATIONS.get(jinja)
    if found is None:
        return None, ("the training chat template has no exact Ollama translation here: the Modelfile leaves "
                      "TEMPLATE out, so Ollama uses the GGUF's own chat template")
    name, template = found
    return template.replace("EOS", eos_token), f"TEMPLATE: the training template ({name}) in Ollama's syntax"


def _quote(text: str) -> str:
    """A Modelfile value: triple-quoted when it holds quotes or newlines."""
    return f'"""{text}"""' if any(c in text for c in '"\n') else f'"{text}"'


def gguf_template(path: Path) -> str | None:
    """The chat template a GGUF file carries, if any."""
    field_ = gguf.GGUFReader(path).fields.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    return field_.contents() if field_ is not None else None


def build_modelfile(source: str, training_template: str | None, stops: list[str], eos_token: str, *,
                    adapter: str | None = None, source_template: str | None = None) -> Modelfile:
    """The Modelfile for FROM `source` (a GGUF path relative to the Modelfile, or an Ollama model name).

    `source_template` is the chat template the FROM file carries; a difference from the training template is
    warned about (the TEMPLATE line, where there is one, overrides it).
    """
    template, note = go_template(training_template, eos_token)
    notes = [note]
    if source_template is not None and training_template is not None and source_template != training_template:
        also = "TEMPLATE overrides it" if template else "Ollama will use the GGUF's, so answers may differ from " \
            "training; export the merged model instead (leave out --adapter-only)"
        notes.append(f"warning: the GGUF's chat template differs from the one used in training ({also})")
    lines = [f"FROM {source}"] + ([f"ADAPTER {adapter}"] if adapter else [])
    if template is not None:
        lines.append(f"TEMPLATE {_quote(template)}")
    lines += [f"PARAMETER stop {_quote(s)}" for s in stops]
    notes.append(f"PARAMETER stop: {', '.join(stops)}")
    return Modelfile("\n".join(lines) + "\n", notes)


def modelfile_path(gguf_out: Path) -> Path:
    """Where the Modelfile of a GGUF goes: beside it, named after it (several exports can share a folder)."""
    return gguf_out.with_suffix(".Modelfile")


def relative(path: Path, start: Path) -> str:
    """`path` as the Modelfile names it: ./NAME beside it, else absolute."""
    path, start = path.resolve(), start.resolve()
    return f"./{path.name}" if path.parent == start else str(path)

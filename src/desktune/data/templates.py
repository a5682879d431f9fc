"""Chat templates: built-in Jinja templates per model family, and choosing the one a run uses."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from desktune.errors import DesktuneError

log = logging.getLogger(__name__)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Mistral has no system role: the system text is put before the first user message.
MISTRAL = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('mistral: only system (first), user and assistant roles are supported') }}"
    "{% endif %}"
    "{% endfor %}"
)

ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL, "zephyr": ZEPHYR}
FALLBACK_NOTICE = "the tokenizer has no chat template and none is configured: using the built-in 'chatml'"


def own_template(tokenizer: Any) -> str | None:
    """The tokenizer's own template (the 'default' one when it has several)."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):
        own = own.get("default")
    return own if isinstance(own, str) and own.strip() else None


def _check_jinja(source: str, where: str) -> str:
    """Raise DesktuneError if `source` is not valid Jinja."""
    import jinja2

    try:
        jinja2.Environment().parse(source)
    except jinja2.TemplateSyntaxError as e:
        raise DesktuneError(
            f"invalid Jinja chat template (line {e.lineno}): {e.message}",
            where=where,
            fix=f"correct the template, or use a built-in: {', '.join(BUILTIN_TEMPLATES)}",
        ) from e
    return source


def _read_template(path: Path) -> str:
    """The text of a .jinja template file; a missing, unreadable or non-UTF-8 file raises DesktuneError."""
    if not path.is_file():
        raise DesktuneError("chat template file not found", where=str(path), fix="check the path")
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise DesktuneError(f"cannot read the chat template file: {e.strerror or e}", where=str(path),
                            fix=f"make it readable (chmod u+r {path}), or set model.chat_template to a "
                            "built-in") from e
    except UnicodeDecodeError as e:
        raise DesktuneError(
            f"the chat template file is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})",
            where=str(path), fix="save the template as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8 IN > OUT)") from e


def _from_config(value: str) -> str:
    """A template named in config: a built-in name, a .jinja file, or a Jinja string."""
    key = value.strip().lower()
    if key in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[key]
    if "{{" in value or "{%" in value:
        return _check_jinja(value, "model.chat_template")
    if key.endswith((".jinja", ".j2")):
        path = Path(value.strip())
        return _check_jinja(_read_template(path), str(path))
    raise DesktuneError(
        f"unknown chat template '{value}'",
        where="model.chat_template",
        fix=f"use a built-in ({', '.join(BUILTIN_TEMPLATES)}), a Jinja string, or leave it unset",
    )


def resolve_chat_template(tokenizer: Any, name_or_jinja: str | None = None) -> str:
    """Pick the chat template (config name/Jinja, else the tokenizer's, else chatml), set it, and return it.

    Falling back to chatml logs FALLBACK_NOTICE as a warning.
    """
    if name_or_jinja is not None and name_or_jinja.strip():
        template = _from_config(name_or_jinja)
    else:
        own = own_template(tokenizer)
        if own is None:
            log.warning(FALLBACK_NOTICE)
            template = CHATML
        else:
            template = own
    tokenizer.chat_template = template
    return template

"""The Ollama Modelfile: each TEMPLATE translation renders exactly what its Jinja template renders (Go templates
evaluated by tests/go_template.py), stops for every end-of-generation token, FROM/ADAPTER, and the warnings."""

from __future__ import annotations

import shutil

import pytest

from desktune.data.templates import BUILTIN_TEMPLATES
from desktune.errors import DesktuneError
from desktune.export import ollama
from desktune.export.gguf import export_gguf
from desktune.runs.layout import CHAT_TEMPLATE
from tests.go_template import render
from tests.tiny import make_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke.\nA short one."}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Ahoy!"}, {"role": "user", "content": " spaced  "}],
]


def test_the_go_evaluator_follows_go_semantics():
    data = {"Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": ""}]}
    assert render("x {{- if eq 1 1 }} y {{ else }}n{{ end -}} \n z", data) == "x y z"
    assert render('{{ range $i, $m := .Messages }}{{ $i }}{{ if $m.Content }}+{{ else }}-{{ end }}{{ end }}',
                  data) == "0+1-"
    assert render('{{ if and (ne 1 2) (not "") }}ok{{ end }}{{ len .Messages }}', data) == "ok2"


@pytest.mark.parametrize("jinja", list(ollama.TRANSLATIONS), ids=[v[0] for v in ollama.TRANSLATIONS.values()])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["user", "system", "turns", "system-turns"])
def test_each_translation_renders_what_jinja_renders(jinja, messages):
    tok = make_tokenizer()
    want = tok.apply_chat_template(messages, chat_template=jinja, add_generation_prompt=True, tokenize=False)
    go, note = ollama.go_template(jinja, tok.eos_token)
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    assert render(go, data) == want and "TEMPLATE" in note


@pytest.mark.parametrize("name", ["llama3", "mistral"])
def test_templates_without_an_exact_translation_are_left_to_the_gguf(name):
    found = ollama.build_modelfile("./m.gguf", BUILTIN_TEMPLATES[name], ["<|eot_id|>"], "</s>")
    assert "TEMPLATE" not in found.text and "GGUF's own chat template" in found.notes[0]


def test_modelfile_lines_and_quoting():
    found = ollama.build_modelfile("./m.gguf", BUILTIN_TEMPLATES["chatml"], ["<|im_end|>", "<|endoftext|>"],
                                   "<|endoftext|>", adapter="./a.gguf", source_template="{{ other }}")
    lines = found.text.splitlines()
    assert lines[:2] == ["FROM ./m.gguf", "ADAPTER ./a.gguf"] and lines[2].startswith('TEMPLATE """{{- range')
    assert found.text.endswith('PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|endoftext|>"\n')
    assert any("differs from the one used in training (TEMPLATE overrides it)" in n for n in found.notes)


def _trained_with(gguf_tiny, tmp_path, template: str):
    """A copy of the tiny adapter whose training chat template is `template`."""
    adapter = shutil.copytree(gguf_tiny.adapter, tmp_path / "adapter")
    (adapter / CHAT_TEMPLATE).write_text(template, encoding="utf-8")
    return adapter


def test_export_writes_the_modelfile_beside_the_gguf(gguf_tiny, tmp_path, known_tiny):
    adapter = _trained_with(gguf_tiny, tmp_path, BUILTIN_TEMPLATES["chatml"])
    result = export_gguf(adapter, tmp_path / "m.gguf", qtype="f32")
    text = (tmp_path / "m.Modelfile").read_text()
    assert result.modelfile == tmp_path / "m.Modelfile" and text.startswith("FROM ./m.gguf\nTEMPLATE ")
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert ollama.gguf_template(result.path) == BUILTIN_TEMPLATES["chatml"]
    (tmp_path / "m.gguf").unlink()
    with pytest.raises(DesktuneError, match="exists"):  # the Modelfile is not replaced without --force either
        export_gguf(adapter, tmp_path / "m.gguf", qtype="f32")


def test_adapter_only_modelfile_names_the_base_and_warns_on_a_template_change(gguf_tiny, tmp_path, known_tiny):
    base = export_gguf(gguf_tiny.base, tmp_path / "base.gguf", qtype="f32", modelfile=False).path
    result = export_gguf(gguf_tiny.adapter, tmp_path / "lora.gguf", adapter_only=True, ollama_from=str(base))
    text = result.modelfile.read_text()
    assert text.startswith("FROM ./base.gguf\nADAPTER ./lora.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text
    # the tiny base's tokenizer template and the adapter's training template are the same text: no warning
    assert not any(n.startswith("warning") for n in result.notes)
    adapter = _trained_with(gguf_tiny, tmp_path, BUILTIN_TEMPLATES["zephyr"])
    again = export_gguf(adapter, tmp_path / "lora2.gguf", adapter_only=True, ollama_from=str(base))
    assert any("differs from the one used in training" in n for n in again.notes)
    assert "<|assistant|>" in again.modelfile.read_text()  # the training template (zephyr) wins


def test_adapter_only_without_a_base_writes_no_modelfile(gguf_tiny, tmp_path):
    result = export_gguf(gguf_tiny.adapter, tmp_path / "lora.gguf", adapter_only=True)
    assert result.modelfile is None and any("--from" in n for n in result.notes)
    assert [p.name for p in tmp_path.iterdir()] == ["lora.gguf"]

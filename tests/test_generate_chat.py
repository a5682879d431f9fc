"""`desktune generate --prompts` (batched answers, JSONL out) and `desktune chat` (adapter switching, commands)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from desktune import cli
from desktune.adapters import load_adapter
from desktune.inference import ChatSession, answer_prompts, chat_loop, conversation, read_prompts, reply
from desktune.runs.layout import CHAT_TEMPLATE
from tests.test_cli import run_main
from tests.tiny import CHATML, lora_adapter, make_model_dir

TOKENS = 10
# lengths differ a lot, so a batch is left-padded; the last one has a system message of its own
PROMPTS = ["hi", "what is the capital of france? paris is the capital of france.", "the fox",
           "ahoy matey! fair winds to you, sailor. how are you today?", "hello world"]
OTHER_TEMPLATE = CHATML.replace("'<|im_start|>' + message['role']", "'<|im_start|>' + message['role'] + ' says'")


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Two random adapters on the tiny base (the second with a chat template of its own) and one on another base."""
    root = tmp_path_factory.mktemp("chat-adapters")
    first = lora_adapter(tiny_model_dir, root / "first")
    second = lora_adapter(tiny_model_dir, root / "second", r=2)
    (second / CHAT_TEMPLATE).write_text(OTHER_TEMPLATE, encoding="utf-8")
    other = lora_adapter(make_model_dir(root / "other-base", hidden=32), root / "other")
    return {"first": first, "second": second, "other": other}


def _base(model_dir: Path) -> tuple[torch.nn.Module, object]:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
        model_dir)


def _greedy(model_dir: Path, adapter: Path | None, messages: list[dict[str, str]], template: str | None = None) -> str:
    """The greedy answer of a freshly loaded base (with `adapter`), one conversation at a time."""
    model, tok = _base(model_dir)
    if adapter is not None:
        model = load_adapter(model, adapter).eval()
    if template is not None:
        tok.chat_template = template
    return reply(model, tok, messages, max_new_tokens=TOKENS, temperature=0.0)


# ---- generate ------------------------------------------------------------------------------------------------------


def test_batched_answers_equal_one_by_one_greedy_answers(tiny_model_dir):
    model, tok = _base(tiny_model_dir)
    rows = [{"prompt": p} for p in PROMPTS[:-1]] + [{"prompt": PROMPTS[-1], "system": "be brief"}]
    texts = [tok.apply_chat_template(conversation(r["prompt"]), add_generation_prompt=True, tokenize=False)
             for r in rows]
    lengths = {len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts}
    assert len(lengths) == len(rows)  # every batch is padded
    batches: list[int] = []
    answered = answer_prompts(model, tok, rows, system="you are kind", batch_size=3, max_new_tokens=TOKENS,
                              on_batch=lambda done: batches.append(len(done)))
    assert batches == [3, 2]
    one_by_one = [reply(model, tok, conversation(r["prompt"], r.get("system", "you are kind")),
                        max_new_tokens=TOKENS) for r in rows]
    assert [r["answer"] for r in answered] == one_by_one
    assert len(set(one_by_one)) > 1 and all(one_by_one)
    assert [{k: v for k, v in r.items() if k != "answer"} for r in answered] == rows


def _prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    lines = [{"prompt": PROMPTS[0], "id": 1}, {"prompt": PROMPTS[1], "id": 2, "system": "talk like a pirate"},
             {"prompt": PROMPTS[2], "id": 3}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    return path


def test_generate_writes_every_answer_as_jsonl(monkeypatch, capsys, tmp_path, tiny_model_dir, adapters):
    out = tmp_path / "answers" / "answers.jsonl"
    code, stdout, err = run_main(monkeypatch, capsys, "generate", "--prompts", str(_prompt_file(tmp_path)), "--out",
                                 str(out), "--adapter", str(adapters["first"]), "--model", str(tiny_model_dir),
                                 "--batch-size", "2", "--max-new-tokens", str(TOKENS), "--dtype", "fp32",
                                 "--device", "cpu", "--system", "be kind")
    assert code == 0, err
    assert "answered 2/3 prompts" in err and "answered 3/3 prompts" in err and stdout == ""
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [1, 2, 3] and rows[1]["system"] == "talk like a pirate"
    expected = [_greedy(tiny_model_dir, adapters["first"], conversation(r["prompt"], r.get("system", "be kind")))
                for r in rows]
    assert [r["answer"] for r in rows] == expected
    assert expected != [_greedy(tiny_model_dir, None, conversation(r["prompt"], r.get("system", "be kind")))
                        for r in rows]  # the adapter answered
    assert sorted(p.name for p in out.parent.iterdir()) == ["answers.jsonl"]  # no temporary file left


def test_generate_without_out_prints_json_lines(monkeypatch, capsys, tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPTS[0]}\n\n  {PROMPTS[2]}  \n", encoding="utf-8")
    assert read_prompts(prompts) == [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[2]}]
    code, stdout, err = run_main(monkeypatch, capsys, "generate", "--prompts", str(prompts), "--model",
                                 str(tiny_model_dir), "--max-new-tokens", str(TOKENS), "--dtype", "fp32")
    assert code == 0, err
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [r["prompt"] for r in rows] == [PROMPTS[0], PROMPTS[2]]
    assert [r["answer"] for r in rows] == [_greedy(tiny_model_dir, None, conversation(p)) for p in (PROMPTS[0],
                                                                                                     PROMPTS[2])]


def test_a_failed_generation_leaves_the_old_answers_file(monkeypatch, capsys, tmp_path, tiny_model_dir):
    from desktune import inference

    out = tmp_path / "answers.jsonl"
    out.write_text("old answers\n", encoding="utf-8")
    calls, real = [], inference.replies

    def fail_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "replies", fail_second_batch)
    code, _, err = run_main(monkeypatch, capsys, "generate", "--prompts", str(_prompt_file(tmp_path)), "--out",
                            str(out), "--batch-size", "2", "--model", str(tiny_model_dir), "--max-new-tokens", "4",
                            "--dtype", "fp32")
    assert code == 130 and "answered 2/3 prompts" in err
    assert out.read_text(encoding="utf-8") == "old answers\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl", "prompts.jsonl"]


def _bad(tmp_path: Path, name: str, text: str | None) -> Path:
    path = tmp_path / name
    if text is not None:
        path.write_text(text, encoding="utf-8")
    return path


GOOD = '{"prompt": "hi"}\n'


@pytest.mark.parametrize(
    ("name", "text", "where", "message"),
    [
        ("p.jsonl", GOOD + '{"prompt": "unclosed"\n', "p.jsonl:2", "not JSON"),
        ("p.jsonl", GOOD + "\n" + '{"text": "no prompt"}\n', "p.jsonl:3", 'the line has no "prompt" text'),
        ("p.jsonl", GOOD + '{"prompt": "   "}\n', "p.jsonl:2", 'the line has no "prompt" text'),
        ("p.jsonl", GOOD + '["hi"]\n', "p.jsonl:2", 'the line has no "prompt" text'),
        ("p.jsonl", GOOD + '{"prompt": "hi", "system": 3}\n', "p.jsonl:2", '"system" is not a text'),
        ("p.txt", "\n  \n", "p.txt", "the prompt file holds no prompt"),
        ("p.txt", None, "p.txt", "prompt file not found"),
        ("p.csv", "hi\n", "p.csv", "unknown prompt file type '.csv'"),
    ],
)
def test_prompt_file_errors_exit_2_naming_file_and_line(monkeypatch, capsys, tmp_path, name, text, where, message):
    path = _bad(tmp_path, name, text)
    # the model does not exist: the file is checked first
    code, out, err = run_main(monkeypatch, capsys, "generate", "--prompts", str(path), "--model", "/no/such/model")
    flat = " ".join(err.split())
    assert code == 2 and f"{tmp_path / where}: {message}" in flat and "Fix:" in flat
    assert "Traceback" not in out + err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["hi", "--prompts", "PROMPTS"], "pass exactly one of PROMPT or --prompts FILE"),
        ([], "pass exactly one of PROMPT or --prompts FILE"),
        (["--prompts", "PROMPTS", "--out", "PROMPTS"], "--out would overwrite the prompt file"),
        (["hi", "--out", "TMP"], "--out is a folder"),
    ],
)
def test_prompt_and_out_mistakes_exit_2(monkeypatch, capsys, tmp_path, args, message):
    prompts = _bad(tmp_path, "p.txt", "hi\n")
    args = [str(prompts) if a == "PROMPTS" else str(tmp_path) if a == "TMP" else a for a in args]
    code, out, err = run_main(monkeypatch, capsys, "generate", *args, "--model", "/no/such/model")
    assert code == 2 and message in " ".join(err.split()) and "Traceback" not in out + err


# ---- chat ----------------------------------------------------------------------------------------------------------


def _script(session: ChatSession, *lines: str) -> tuple[list[str], list[str]]:
    """Drive the chat loop with `lines`; returns (the answers streamed, the notes)."""
    feed = iter(lines)

    def read(prompt: str) -> str:
        assert prompt == "you> "
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    written: list[str] = []
    notes: list[str] = []
    chat_loop(session, read, written.append, notes.append)
    answers = "".join(written).split("assistant> ")[1:]
    return [a.strip() for a in answers], notes


@pytest.fixture
def session(tiny_model_dir) -> ChatSession:
    model, tok = _base(tiny_model_dir)
    return ChatSession(model, tok, max_new_tokens=TOKENS, temperature=0.0)


def _note(notes: list[str], text: str) -> bool:
    return any(text in " ".join(n.split()) for n in notes)


def test_switching_adapters_mid_chat_changes_who_answers(session, tiny_model_dir, adapters):
    answers, notes = _script(session, "what is the sea?", f"/adapter {adapters['first']}", "what is the sea?",
                             "/adapter off", "what is the sea?", f"/adapter {adapters['first']}", "/base",
                             "what is the sea?")
    question = conversation("what is the sea?")
    base, tuned = _greedy(tiny_model_dir, None, question), _greedy(tiny_model_dir, adapters["first"], question)
    assert base != tuned
    assert answers == [base, tuned, base, base]
    assert _note(notes, f"now answering: adapter {adapters['first']}; new conversation")
    assert _note(notes, "now answering: the base model, no adapter; new conversation")
    assert not hasattr(session.model, "peft_config")  # off really took the adapter out


def test_switching_starts_a_new_conversation_and_keeps_the_system_message(tiny_model_dir, adapters):
    model, tok = _base(tiny_model_dir)
    session = ChatSession(model, tok, system="be kind", max_new_tokens=TOKENS, temperature=0.0)
    answers, _ = _script(session, "hello", "the fox", f"/adapter {adapters['first']}", "the fox")
    assert answers[2] == _greedy(tiny_model_dir, adapters["first"], conversation("the fox", "be kind"))
    assert [m["content"] for m in session.history] == ["be kind", "the fox", answers[2]]


def test_the_adapters_chat_template_applies_and_the_bases_comes_back(session, tiny_model_dir, adapters):
    base_template = session.tokenizer.chat_template
    answers, _ = _script(session, f"/adapter {adapters['second']}", "hello", f"/adapter {adapters['first']}",
                         "hello", "/adapter off")
    assert answers[0] == _greedy(tiny_model_dir, adapters["second"], conversation("hello"), template=OTHER_TEMPLATE)
    assert answers[0] != _greedy(tiny_model_dir, adapters["second"], conversation("hello"))
    assert answers[1] == _greedy(tiny_model_dir, adapters["first"], conversation("hello"))
    assert session.tokenizer.chat_template == base_template


@pytest.mark.parametrize(("bad", "message"), [("missing", "adapter folder not found"),
                                              ("other", "could not load the adapter")])
def test_a_bad_adapter_is_refused_and_the_current_one_stays(session, tiny_model_dir, adapters, tmp_path, bad,
                                                            message):
    path = tmp_path / "missing" if bad == "missing" else adapters[bad]
    answers, notes = _script(session, f"/adapter {adapters['second']}", "hello", f"/adapter {path}", "hello")
    assert _note(notes, f"error: {path}: {message}")
    assert _note(notes, f"still answering: adapter {adapters['second']}")
    assert session.adapter == adapters["second"] and session.tokenizer.chat_template == OTHER_TEMPLATE
    first = conversation("hello")
    assert answers[0] == _greedy(tiny_model_dir, adapters["second"], first, template=OTHER_TEMPLATE)
    # the refused switch kept the conversation going, with the same adapter
    follow_up = [*first, {"role": "assistant", "content": answers[0]}, {"role": "user", "content": "hello"}]
    assert session.history[:3] == follow_up and len(session.history) == 4
    assert answers[1] == _greedy(tiny_model_dir, adapters["second"], follow_up, template=OTHER_TEMPLATE)


def test_system_reset_help_and_unknown_commands(session):
    answers, notes = _script(session, "/system talk like a pirate", "hello", "/system", "/adapter", "/help",
                             "/reset", "/nope", "   ", "/exit", "never read")
    assert len(answers) == 1 and session.system is None and session.history == []
    assert _note(notes, "system message set") and _note(notes, "system message removed")
    assert _note(notes, "now answering: the base model, no adapter")
    assert _note(notes, "/adapter off (or /base)") and _note(notes, "unknown command /nope")


def test_system_message_is_sent_to_the_model(session, tiny_model_dir):
    answers, _ = _script(session, "/system talk like a pirate", "hello")
    assert answers == [_greedy(tiny_model_dir, None, conversation("hello", "talk like a pirate"))]
    assert session.history[0] == {"role": "system", "content": "talk like a pirate"}


def test_chat_command_switches_adapters(tiny_model_dir, adapters):
    script = f"hello\n/adapter {adapters['other']}\n/base\nhello\n"  # then end of input, like Ctrl-D
    result = CliRunner().invoke(cli.app, ["chat", "--adapter", str(adapters["first"]), "--model", str(tiny_model_dir),
                                          "--max-new-tokens", str(TOKENS), "--temperature", "0", "--dtype", "fp32"],
                                input=script)
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert result.output.count("assistant> ") == 2 and "could not load the adapter" in flat
    answers = [part.split("you>")[0].strip() for part in result.output.split("assistant> ")[1:]]
    question = conversation("hello")
    assert answers == [_greedy(tiny_model_dir, adapters["first"], question), _greedy(tiny_model_dir, None, question)]


def test_reading_the_prompt_file_keeps_other_fields(tmp_path):
    rows = read_prompts(_prompt_file(tmp_path))
    assert rows[1] == {"prompt": PROMPTS[1], "id": 2, "system": "talk like a pirate"} and len(rows) == 3


"""data.replay: the base's own answers to general prompts mixed into training."""

from __future__ import annotations

import json

import pytest

from desktune.config import load_config
from desktune.data import IGNORE_INDEX
from desktune.defaults import REPLAY_SHARE, auto_replay, replay_count
from desktune.runs import EventRecord, RunDir, read_records, records_of
from desktune.scoring.forgetting import answers, base_only
from desktune.training.loop import setup, train
from tests.tiny import tiny_config


def test_replay_count_makes_the_share_of_the_mix():
    assert replay_count(480, 0.1) == 53 and replay_count(90, 0.25) == 30 and replay_count(480, 0.0) == 0
    n = replay_count(480, 0.2)
    assert abs(n / (480 + n) - 0.2) < 0.01


def test_auto_replay_is_on_for_chats_only():
    assert auto_replay(True).value == REPLAY_SHARE > 0 and auto_replay(False).value == 0


def test_replay_is_auto_by_default():
    assert load_config({"data": {"train": "x"}}).data.replay == "auto"


@pytest.mark.parametrize("bad", ["1", "-0.1", "lots"])
def test_a_bad_share_names_the_field(bad):
    from desktune.errors import DesktuneError

    with pytest.raises(DesktuneError, match=r"data\.replay"):
        load_config({"data": {"train": "x"}}, [f"data.replay={bad}"])


def _answer_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX], skip_special_tokens=True)


def test_replayed_targets_are_the_bases_own_greedy_answers(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DESKTUNE_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "replay.txt"
    prompts.write_text("How do I bake bread?\nName a colour.\nWhat is rain?\n")
    raw = tiny_config(tiny_model_dir, tmp_path, data={"replay": 0.25, "replay_prompts": str(prompts),
                                                      "val_fraction": 0, "max_seq_len": 512})
    run = setup(load_config(raw), quiet=True)
    n_train = 24
    assert len(run.train_set) == n_train + replay_count(n_train, 0.25)
    replayed = run.train_set[n_train:]
    with base_only(run.model):
        own = answers(run.model, run.loaded.tokenizer, prompts.read_text().splitlines(), 64)
    expected = [own[i % 3] for i in range(len(replayed))]
    got = [_answer_text(run.loaded.tokenizer, e) for e in replayed]
    assert [g.strip() for g in got] == [e.strip() for e in expected]
    assert any(c.startswith("replay: 8 samples (25% of training)") for c in run.chosen)


def test_given_answers_are_replayed_and_said(tiny_model_dir, tmp_path):
    given = tmp_path / "replay.jsonl"
    given.write_text("".join(json.dumps({"prompt": f"Question {i}?", "answer": f"Answer number {i}."}) + "\n"
                             for i in range(4)))
    raw = tiny_config(tiny_model_dir, tmp_path, data={"replay": 0.5, "replay_prompts": str(given)})
    result = train(load_config(raw), quiet=True)
    said = [e.message for e in records_of(read_records(RunDir(result.run_dir).metrics), EventRecord)
            if e.name == "auto_setting"]
    assert any("with given answers to replay.jsonl (4 prompts)" in m for m in said), said
    saved = load_config(RunDir(result.run_dir).config)
    assert saved.data.replay == 0.5


def test_auto_replay_is_saved_resolved(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DESKTUNE_CACHE", str(tmp_path / "cache"))
    given = tmp_path / "replay.jsonl"
    given.write_text(json.dumps({"prompt": "Hi?", "answer": "Hello there."}) + "\n")
    raw = tiny_config(tiny_model_dir, tmp_path, data={"replay": "auto", "replay_prompts": str(given)})
    result = train(load_config(raw), quiet=True)
    assert load_config(RunDir(result.run_dir).config).data.replay == REPLAY_SHARE


def test_text_data_replays_nothing(tiny_model_dir, tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"plain text number {i} " * 3}) + "\n" for i in range(12)))
    raw = tiny_config(tiny_model_dir, tmp_path, data={"train": str(data), "replay": "auto"})
    run = setup(load_config(raw), quiet=True)
    assert run.cfg.data.replay == 0 and not any(c.startswith("replay:") for c in run.chosen)


def test_only_the_replayed_prompts_are_answered():
    from desktune.scoring.reference import Reference
    from desktune.training.replay import used

    ref = Reference(name="built-in replay prompts (5)", prompts=list("abcde"))
    assert used(ref, 3).prompts == ["a", "b", "c"] and used(ref, 3).name.endswith("(3 of 5 prompts)")
    assert used(ref, 9) is ref


def _chats(path, rows: int):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is the sea {i}?"},
                                                     {"role": "assistant", "content": f"ahoy {i}"}]}) + "\n"
                            for i in range(rows)))
    return path


def _spy_replies(monkeypatch) -> list[int]:
    from desktune.scoring import forgetting

    asked, real = [], forgetting.replies

    def spy(model, tokenizer, chats, **kw):
        asked.append(len(chats))
        return real(model, tokenizer, chats, **kw)

    monkeypatch.setattr(forgetting, "replies", spy)
    return asked


def test_a_second_dataset_reuses_the_replay_answers(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DESKTUNE_CACHE", str(tmp_path / "cache"))
    asked = _spy_replies(monkeypatch)

    def replay_note(rows: int) -> str:
        data = _chats(tmp_path / f"train-{rows}.jsonl", rows)
        raw = tiny_config(tiny_model_dir, tmp_path, data={"train": str(data), "replay": 0.25, "val_fraction": 0})
        return next(c for c in setup(load_config(raw), quiet=True).chosen if c.startswith("replay:"))

    assert "4 of 4 generated in" in replay_note(12) and asked == [4]  # 4 built-in prompts answered and cached
    assert "from the cache" in replay_note(9) and asked == [4]  # another dataset: 3 of those prompts, no generation
    assert "2 of 6 generated in" in replay_note(18) and asked == [4, 2]  # a larger share: only the 2 missing


def test_replay_generation_counts_what_it_has_made(tiny_model_dir, tmp_path, monkeypatch):
    from desktune.models.gguf import cache_dir
    from desktune.training.replay import replay_set

    monkeypatch.setenv("DESKTUNE_CACHE", str(tmp_path / "cache"))
    data = _chats(tmp_path / "train.jsonl", 12)
    raw = tiny_config(tiny_model_dir, tmp_path, data={"train": str(data), "val_fraction": 0})
    run = setup(load_config(raw), quiet=True)  # replay 0: nothing generated yet
    said: list[str] = []
    cfg = load_config({**raw, "data": {**raw["data"], "replay": 0.25}})
    replay_set(cfg, run.model, run.loaded.tokenizer, run.loaded.base_path, run.loaded.hardware.dtype, 12,
               cache_dir() / "reference", say=said.append)
    assert said[0] == "built-in replay prompts: the base answers 4 of 4 prompts (0 cached)"
    assert said[-1].startswith("  built-in replay prompts: 4/4 (")

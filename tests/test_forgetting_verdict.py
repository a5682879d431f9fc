"""The forgetting verdict (one word no single measure can hide), the human-written held-out text it weighs, the
shipped excerpt and its licence, and eval.json files written before either existed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from rich.console import Console
from transformers import AutoModelForCausalLM

from desktune.data import convert_rows, read_rows
from desktune.evaluation.render import render
from desktune.evaluation.results import EvalResult, Forgetting, HumanText, Probe, Score, read_result, write_result
from desktune.scoring.human import HUMAN_HELDOUT, HUMAN_LICENSE, human_heldout, human_set
from desktune.scoring.reference import REFERENCE_DIR
from desktune.scoring.verdict import FORGOT, KEPT, LIMITS, SOME, Measures, verdict, with_loss_limit
from tests.tiny import make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FINE = Measures(human_loss_pct=2.0, knowledge_kept_pct=97.0, kl=0.05, base_answers_loss_pct=1.0)
CPU = torch.device("cpu")


# ---- the verdict on hand-made numbers ----

def test_all_within_their_limits_is_kept_and_names_the_closest():
    v = verdict(FINE)
    assert v.level == KEPT and v.missing == ()
    assert v.measure == "knowledge kept" and "97.0%" in v.sentence  # 7 of the 15 points to "forgot": the closest
    assert set(v.levels.values()) == {KEPT}


@pytest.mark.parametrize(("key", "value", "shown"), [
    ("human_loss_pct", 26.3, "human-text loss +26.3%"),
    ("knowledge_kept_pct", 58.4, "knowledge kept 58.4%"),
    ("kl", 0.75, "KL(base || tuned) 0.750 nats/token"),
    ("base_answers_loss_pct", 40.0, "loss on the base's answers +40.0%"),
])
def test_each_measure_alone_turns_the_verdict_to_forgot(key, value, shown):
    m = Measures(**{**FINE.__dict__, key: value})
    v = verdict(m)
    assert v.level == FORGOT
    assert v.sentence.startswith(f"forgot - {shown} (")  # names the measure that decided, and its number
    assert [label for label, level in v.levels.items() if level != KEPT] == [v.measure]


def test_the_issue_33_run_is_forgot_although_the_old_headline_says_better_than_base():
    # -7.1% on the base's answers (replay rehearses that text), 58.4% knowledge kept, KL 0.75, human text +26.3%
    v = verdict(Measures(human_loss_pct=26.3, knowledge_kept_pct=100 * 45 / 77, kl=0.75, base_answers_loss_pct=-7.1))
    assert v.level == FORGOT and v.measure == "knowledge kept"  # 58.4% is the furthest past its limits
    assert v.levels["loss on the base's answers"] == KEPT


def test_between_the_limits_is_some_forgetting():
    v = verdict(Measures(**{**FINE.__dict__, "human_loss_pct": 15.0}))
    assert v.level == SOME and v.measure == "human-text loss"
    assert "some forgetting - human-text loss +15.0% (kept <= +10.0%, forgot > +20.0%)" in v.sentence
    assert verdict(Measures(human_loss_pct=10.0)).level == KEPT  # the goal itself is kept
    assert verdict(Measures(knowledge_kept_pct=90.0)).level == KEPT


def test_missing_measures_are_named_and_nothing_measured_is_no_verdict():
    v = verdict(Measures(kl=0.1))
    assert v.level == KEPT and "not measured: human-text loss, knowledge kept, loss on the base's answers" in v.sentence
    assert verdict(Measures()) is None


def test_a_measure_that_is_not_a_number_is_forgot():
    v = verdict(Measures(**{**FINE.__dict__, "human_loss_pct": math.nan}))
    assert v.level == FORGOT and "human-text loss n/a" in v.sentence


def test_a_tighter_loss_limit_moves_kept_for_both_loss_measures_only():
    limits = with_loss_limit(1.0)
    assert verdict(Measures(human_loss_pct=2.0), limits).level == SOME
    assert verdict(Measures(base_answers_loss_pct=2.0), limits).level == SOME
    assert verdict(Measures(kl=0.05), limits).level == KEPT
    loose = {lim.key: lim for lim in with_loss_limit(50.0)}
    assert loose["human_loss_pct"].forgot >= loose["human_loss_pct"].kept  # never inverted
    assert verdict(Measures(human_loss_pct=40.0), with_loss_limit(50.0)).level == KEPT
    assert [lim.key for lim in LIMITS] == [lim.key for lim in limits]


def test_the_verdict_and_the_report_need_no_torch():
    code = ("import sys, desktune.scoring.verdict, desktune.evaluation.results, desktune.reporting.html; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---- the human-written measure on a tiny model ----

@pytest.fixture
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), make_tokenizer()


def test_base_against_itself_is_zero(tiny):
    model, tok = tiny
    h = human_heldout(model, tok, micro_batch_size=8, device=CPU, max_seq_len=96)
    d = h.divergence
    assert h.conversations > 50 and d.target_tokens > 500
    assert d.base_loss == d.tuned_loss and d.loss_increase_pct == 0.0 and d.kl == 0.0


def test_a_trained_adapter_raises_the_loss_on_human_text(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj",
                                                                                   "down_proj"]))
    ids = torch.tensor([tok("0" * 64)["input_ids"]])
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=5e-2)
    peft.train()
    for _ in range(20):  # learn to say one thing only: whatever people write gets less likely
        loss = peft(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    hs = human_set(tok, 96)
    cache: list = []
    first = human_heldout(peft, tok, micro_batch_size=16, device=CPU, max_seq_len=96, human=hs, base_cache=cache)
    again = human_heldout(peft, tok, micro_batch_size=16, device=CPU, max_seq_len=96, human=hs, base_cache=cache)
    d = first.divergence
    assert d.loss_increase_pct > 5 and d.kl > 0.05, d  # measured: +15.4%, KL 1.37
    assert again.divergence == d  # the cached base gives the same numbers
    assert HumanText.of(first).loss_increase_pct == pytest.approx(d.loss_increase_pct)


# ---- the shipped excerpt ----

def test_the_shipped_excerpt_has_its_shape():
    rows = [json.loads(line) for line in (REFERENCE_DIR / HUMAN_HELDOUT).read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 60
    assert [r["id"] for r in rows] == [f"h{i:03d}" for i in range(1, 61)]
    for r in rows:
        assert set(r) == {"id", "messages"}
        assert [m["role"] for m in r["messages"]] == ["user", "assistant", "user", "assistant"], r["id"]
        assert all(set(m) == {"role", "content"} and m["content"].strip() for m in r["messages"]), r["id"]
    assert len({json.dumps(r["messages"]) for r in rows}) == 60
    _, samples = convert_rows(read_rows(REFERENCE_DIR / HUMAN_HELDOUT))  # desktune's own reader takes it as data
    assert len(samples) == 60


def test_the_licence_ships_beside_the_excerpt():
    text = (REFERENCE_DIR / HUMAN_LICENSE).read_text(encoding="utf-8")
    assert "MIT License" in text and "Copyright (c) 2019 Perception, Control and Cognition Lab" in text
    assert "chitchat-dataset 0.9.0" in text and HUMAN_HELDOUT in text
    for name in (HUMAN_HELDOUT, HUMAN_LICENSE):
        assert (resources.files("desktune.scoring") / "reference" / name).is_file()
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    artifacts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["hatch"]["build"][
        "artifacts"]
    for name in (HUMAN_HELDOUT, HUMAN_LICENSE):
        path = Path("src/desktune/scoring/reference") / name
        assert any(path.match(glob) for glob in artifacts), name


def test_no_shipped_conversation_is_in_the_other_reference_sets():
    def norm(text: str) -> str:
        return " ".join(text.lower().split())

    human = {norm(m["content"]) for line in (REFERENCE_DIR / HUMAN_HELDOUT).read_text(encoding="utf-8").splitlines()
             for m in json.loads(line)["messages"]}
    others = set()
    for path in [*REFERENCE_DIR.glob("*.jsonl"), *(ROOT / "examples").rglob("*.jsonl")]:
        if path.name != HUMAN_HELDOUT:
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                others |= {norm(row[k]) for k in ("prompt", "question") if k in row}
                others |= {norm(m["content"]) for m in row.get("messages", [])}
    assert human & others == set()


def test_the_script_regenerates_the_shipped_file():
    pytest.importorskip("chitchat_dataset")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_human_heldout
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert make_human_heldout.main(["--check"]) == 0


# ---- eval.json, old and new, and the console ----

OLD_EVAL = {  # an eval.json as desktune wrote it before the human text and the verdict
    "base_model": "embedded", "adapter": "runs/x/adapter", "data": "val (10 samples)",
    "base": {"loss": 2.0, "target_tokens": 100, "perplexity": 7.39}, "tuned": {"loss": 1.5, "target_tokens": 100},
    "bit16_base": None, "nf4_base": None, "tuned_16bit": None,
    "forgetting": {"reference": "built-in general prompts (224)", "prompts": 224,
                   "base": {"loss": 1.0, "target_tokens": 900}, "tuned": {"loss": 0.929, "target_tokens": 900},
                   "kl": 0.75, "probe": {"questions": 136, "base_correct": 77, "tuned_correct": 50, "kept": 45,
                                         "retention": 0.584},
                   "loss_increase_pct": -7.1},
    "answers": [], "seconds": 60.0, "timings": {"forgetting": 50.0}, "notes": [], "nf4_penalty_pct": None}


def test_an_old_eval_json_still_reads_and_gets_a_verdict(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(OLD_EVAL), encoding="utf-8")
    r = read_result(path)
    assert r.human is None
    v = r.verdict
    assert v.level == FORGOT and v.measure == "knowledge kept" and "not measured: human-text loss" in v.sentence


def _result() -> EvalResult:
    return EvalResult(
        base_model="embedded", adapter="runs/x/adapter", data="val", base=Score(2.0, 100), tuned=Score(1.5, 100),
        forgetting=Forgetting(reference="built-in general prompts (224)", prompts=224, base=Score(1.0, 900),
                              tuned=Score(0.95, 900), kl=0.12,
                              probe=Probe(questions=136, base_correct=77, tuned_correct=76, kept=75)),
        human=HumanText(reference="human-written conversations (60)", conversations=60, base=Score(3.0, 2400),
                        tuned=Score(3.54, 2400), kl=0.2))


def test_the_human_text_and_the_verdict_are_written_and_read_back(tmp_path):
    path = tmp_path / "eval.json"
    write_result(_result(), path)
    obj = json.loads(path.read_text(encoding="utf-8"))
    assert obj["human"]["loss_increase_pct"] == pytest.approx(18.0)
    assert obj["verdict"]["level"] == SOME and obj["verdict"]["measure"] == "human-text loss"
    back = read_result(path)
    assert back.human == _result().human and back.verdict == _result().verdict


def test_the_eval_table_opens_with_the_verdict():
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(render(_result()))
    text = console.export_text()
    first = text.strip().splitlines()[0]
    assert first.startswith("forgetting verdict: some forgetting - human-text loss +18.0%"), first
    assert "human-written text: loss increase" in text and "+18.00%" in text

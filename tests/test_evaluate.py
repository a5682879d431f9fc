"""`desktune eval` on a tiny run: the same numbers the run recorded, forgetting, the 4-bit cost, the JSON."""

from __future__ import annotations

import io
import json
import math

import pytest
from rich.console import Console
from typer.testing import CliRunner

from desktune import cli
from desktune.config import load_config
from desktune.evaluation.results import read_result
from desktune.evaluation.run import EvalRequest, evaluate
from desktune.runs import EvalRecord, RunDir, read_records, records_of
from desktune.training.loop import train
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval-run")
    cfg = load_config(tiny_config(tiny_model_dir, tmp, train={"max_steps": 6}, run_name="r"))
    return train(cfg, quiet=True)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DESKTUNE_CACHE", str(tmp_path / "cache"))


def test_eval_reports_what_the_run_recorded(tiny_run, tmp_path):
    out = tmp_path / "eval.json"
    result = evaluate(EvalRequest(run_dir=tiny_run.run_dir, out=out))
    evals = records_of(read_records(RunDir(tiny_run.run_dir).metrics), EvalRecord)
    # the loop validates with the very function eval scores with: the same numbers
    assert result.base.loss == pytest.approx(evals[0].val_loss, rel=1e-6)
    assert result.tuned.loss == pytest.approx(evals[-1].val_loss, rel=1e-6)
    assert result.tuned.loss < result.base.loss
    assert result.tuned.perplexity == pytest.approx(math.exp(result.tuned.loss))
    f = result.forgetting
    assert f.prompts >= 150 and f.base.target_tokens == f.tuned.target_tokens > 0
    assert f.kl > 0 and math.isfinite(f.loss_increase_pct)
    assert f.probe.questions >= 100 and 0 <= f.probe.kept <= min(f.probe.base_correct, f.probe.tuned_correct)
    h = result.human  # the human-written conversations, and the verdict weighs them
    assert h is not None and 0 < h.conversations <= 60 and h.base.target_tokens == h.tuned.target_tokens > 0
    assert math.isfinite(h.loss_increase_pct) and result.measures.human_loss_pct == h.loss_increase_pct
    assert "human-text loss" not in result.verdict.missing
    assert result.nf4_base is not None and result.bit16_base == result.base
    assert math.isfinite(result.nf4_penalty_pct) and result.nf4_base.loss != result.base.loss
    saved = json.loads(out.read_text())
    assert saved["tuned"]["perplexity"] == pytest.approx(result.tuned.perplexity)
    assert saved["forgetting"]["loss_increase_pct"] == pytest.approx(f.loss_increase_pct)
    assert read_result(out) == result


def test_a_qlora_run_shows_its_adapter_on_both_bases(tiny_model_dir, tmp_path):
    from desktune.evaluation.render import scores_table

    cfg = tiny_config(tiny_model_dir, tmp_path, model={"quant": "nf4"}, train={"max_steps": 6}, run_name="q")
    run = train(load_config(cfg), quiet=True)
    result = evaluate(EvalRequest(run_dir=run.run_dir, out=tmp_path / "q.json", forgetting=False))
    assert result.nf4_base == result.base and result.bit16_base.loss != result.base.loss
    # the adapter learned its delta on the NF4 weights: on the original 16-bit base it is another model
    assert result.tuned_16bit is not None and result.tuned_16bit.loss != result.tuned.loss
    assert read_result(tmp_path / "q.json") == result
    console = Console(width=200, record=True)
    console.print(scores_table(result))
    assert "merge --into original" in console.export_text()
    assert evaluate(EvalRequest(run_dir=run.run_dir, out=tmp_path / "n.json", forgetting=False,
                                nf4=False)).tuned_16bit is None


def test_second_eval_reuses_the_base_answers(tiny_run, tmp_path, monkeypatch):
    from desktune.scoring import divergence

    first = evaluate(EvalRequest(run_dir=tiny_run.run_dir, out=tmp_path / "a.json", nf4=False))
    cached = list((tmp_path / "cache" / "reference").glob("*.jsonl"))
    assert len(cached) == 2  # general answers and probe answers: one file per model and answer length
    states = list((tmp_path / "cache" / "reference" / "states").glob("*.safetensors"))
    assert 10 <= len(states) <= 22  # the base's hidden states on the reference and the human text, a tenth a file
    stamp = [p.stat().st_mtime_ns for p in [*cached, *states]]
    base_passes, real = [], divergence._base_hidden
    monkeypatch.setattr(divergence, "_base_hidden", lambda *a: base_passes.append(1) or real(*a))
    again = evaluate(EvalRequest(run_dir=tiny_run.run_dir, out=tmp_path / "b.json", nf4=False))
    assert [p.stat().st_mtime_ns for p in [*cached, *states]] == stamp
    assert base_passes == []  # the base's forward pass over the reference is not run again
    assert again.forgetting == first.forgetting and again.human == first.human


def test_the_base_score_loaded_the_other_way_is_cached(tiny_run, tmp_path, monkeypatch):
    from desktune.evaluation import run

    first = evaluate(EvalRequest(run_dir=tiny_run.run_dir, out=tmp_path / "a.json", forgetting=False))
    loads, real = [], run.load
    monkeypatch.setattr(run, "load", lambda *a, **kw: loads.append(kw.get("quant")) or real(*a, **kw))
    again = evaluate(EvalRequest(run_dir=tiny_run.run_dir, out=tmp_path / "b.json", forgetting=False))
    assert loads == [None]  # the run's own load only: the NF4 base is not loaded and quantized again
    assert again.nf4_base == first.nf4_base and again.bit16_base == first.bit16_base


def _said(console: Console, label: str) -> list[str]:
    lines = [line.strip() for line in console.export_text(clear=False).splitlines()]
    return [line for line in lines if line.startswith(f"{label}:")]


def test_every_phase_counts_what_it_has_done(tiny_run, tmp_path):
    console = Console(record=True, width=60, file=io.StringIO())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("what is the fox?\nwhat is the sea?\n")
    result = evaluate(EvalRequest(run_dir=tiny_run.run_dir, prompts=str(prompts), out=tmp_path / "e.json"), console)
    general = _said(console, "built-in general prompts")
    assert general[0].startswith("built-in general prompts: the base answers 224 of 224 prompts (0 cached)")
    counts = [line.split(" (")[0] for line in general[1:]]
    assert 3 <= len(counts) <= 11 and counts[-1] == "built-in general prompts: 224/224"  # per batch, no flood
    scored = result.forgetting.prompts  # the reference's answers that fit max_seq_len
    for label, total in (("reference scored, base and tuned", scored), ("knowledge probe, base", 136),
                         ("knowledge probe, tuned", 136), ("answers, base", 2), ("answers, tuned", 2),
                         ("held-out, tuned and base", 2), ("4-bit cost, load and score", 2)):
        said = _said(console, label)
        assert said and said[-1].split(" (")[0] == f"{label}: {total}/{total}", label
    assert all(len(line) > 60 for line in general[:1])  # a long line is never wrapped when piped
    again = Console(record=True, width=60, file=io.StringIO())
    evaluate(EvalRequest(run_dir=tiny_run.run_dir, prompts=str(prompts), nf4=False, out=tmp_path / "f.json"), again)
    assert _said(again, "built-in general prompts") == ["built-in general prompts: the base's 224 answers from the "
                                                         "cache"]
    assert _said(again, "answers, base") == ["answers, base: the base's 2 answers from the cache"]


def test_a_stopped_eval_keeps_the_answers_made(tiny_run, tmp_path, monkeypatch):
    from desktune.evaluation.run import Evaluation
    from desktune.scoring import forgetting

    say, made = Evaluation.say, []

    def stop_at_a_count(self, text):  # Ctrl-C as the first batch of the base's answers is counted
        say(self, text)
        if text.startswith("  built-in general prompts: "):
            made.append(int(text.split(": ")[1].split("/")[0]))
            raise KeyboardInterrupt

    monkeypatch.setattr(Evaluation, "say", stop_at_a_count)
    with pytest.raises(KeyboardInterrupt):
        evaluate(EvalRequest(run_dir=tiny_run.run_dir, out=tmp_path / "a.json", nf4=False, probe=False))
    monkeypatch.setattr(Evaluation, "say", say)
    asked, real = [], forgetting.replies
    monkeypatch.setattr(forgetting, "replies", lambda m, t, chats, **kw: asked.append(len(chats)) or real(m, t, chats,
                                                                                                          **kw))
    evaluate(EvalRequest(run_dir=tiny_run.run_dir, out=tmp_path / "b.json", nf4=False, probe=False))
    assert 0 < made[0] < 224 and asked == [224 - made[0]]  # the answers made before the stop were kept


def test_eval_of_an_adapter_on_a_data_file(tiny_run, tmp_path, tiny_model_dir):
    data = tmp_path / "held.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "what is the sea?"},
                                             {"role": "assistant", "content": "ahoy matey! fair winds!"}]}) + "\n")
    result = evaluate(EvalRequest(adapter=tiny_run.adapter_dir, data=str(data), forgetting=False, nf4=False,
                                  out=tmp_path / "e.json"))
    assert result.data.startswith(str(data)) and result.tuned.loss < result.base.loss
    assert result.forgetting is None and result.nf4_base is None


def test_user_reference_and_prompts(tiny_run, tmp_path):
    ref = tmp_path / "ref.txt"
    ref.write_text("what is the sea?\nwhat is paris?\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("what is the fox?\n")
    result = evaluate(EvalRequest(run_dir=tiny_run.run_dir, reference=str(ref), prompts=str(prompts),
                                  probe=False, nf4=False, out=tmp_path / "e.json"))
    assert result.forgetting.reference == "ref.txt (2 prompts)" and result.forgetting.probe is None
    assert [a.prompt for a in result.answers] == ["what is the fox?"]


def test_cli_prints_the_tables_and_writes_the_json(tiny_run, tmp_path):
    out = tmp_path / "cli.json"
    res = CliRunner().invoke(cli.app, ["eval", str(tiny_run.run_dir), "--no-probe", "--no-nf4", "--output", str(out)],
                             env={"COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    for text in ("Held-out", "base + adapter", "Forgetting", "loss increase", "KL"):
        assert text in res.output
    assert out.is_file()


def test_eval_of_a_folder_that_is_no_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["desktune", "eval", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2 and "not a run folder" in capsys.readouterr().err


def test_an_adapter_of_a_run_writes_into_that_run(tiny_run, tmp_path):
    data = tmp_path / "held.jsonl"
    data.write_text(json.dumps({"text": "the sea is wide"}) + "\n")
    evaluate(EvalRequest(adapter=tiny_run.adapter_dir, data=str(data), forgetting=False, nf4=False))
    assert read_result(RunDir(tiny_run.run_dir).eval).data.startswith(str(data))


def test_python_api_and_report_verb(tiny_run, tmp_path):
    import desktune

    result = desktune.evaluate(tiny_run.run_dir, probe=False, nf4=False, out=tmp_path / "api.json")
    assert result.forgetting is not None and (tmp_path / "api.json").is_file()
    page = desktune.report(tiny_run.run_dir, tmp_path / "r.html")
    assert page.read_text().count('data-plot="') >= 5
    res = CliRunner().invoke(cli.app, ["report", str(tiny_run.run_dir), "--tensorboard", str(tmp_path / "tb")])
    assert res.exit_code == 0, res.output
    assert RunDir(tiny_run.run_dir).report.is_file() and list((tmp_path / "tb").rglob("events.out.tfevents*"))


def test_report_of_a_folder_that_is_no_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["desktune", "report", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2 and "not a run folder" in capsys.readouterr().err

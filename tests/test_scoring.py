"""Scoring: divergence from the base (checked against full logits), probe matching, the reference and its cache."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from desktune.adapters import attach_lora
from desktune.config import LoraConfig
from desktune.data import Sample, collate, encode_samples
from desktune.errors import DesktuneError
from desktune.scoring.divergence import divergence
from desktune.scoring.forgetting import answer_key, base_answers, is_right, normalise, probe, reference_set
from desktune.scoring.generate import Progress, replies
from desktune.scoring.reference import (
    AnswerKey,
    AnswerStore,
    Question,
    Reference,
    builtin_probe,
    builtin_reference,
    model_fingerprint,
    read_reference,
)
from desktune.scoring.score import mean_target_loss
from tests.tiny import make_tokenizer


@pytest.fixture
def peft_model(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return attach_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))


def _examples(tok, n=6):
    samples = [Sample(messages=[{"role": "user", "content": f"what is the sea {i}?"},
                                {"role": "assistant", "content": f"the sea is wide and deep {i}"}],
                      text=None, source=f"s:{i}") for i in range(n)]
    return encode_samples(tok, samples, max_seq_len=64).examples


def _perturb(model, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _full_logits_reference(model, examples, pad_id):
    """Base/tuned CE and KL(base || tuned) from the model's own full logits, the plain way."""
    batch = collate(examples, pad_id)
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            lb = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lt = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    pb = F.log_softmax(lb[:, :-1][keep].float(), -1)
    pt = F.log_softmax(lt[:, :-1][keep].float(), -1)
    t = targets[keep]
    ce_b = -pb.gather(1, t[:, None]).mean()
    ce_t = -pt.gather(1, t[:, None]).mean()
    kl = F.kl_div(pt, pb, log_target=True, reduction="batchmean")  # KL(base || tuned)
    return float(ce_b), float(ce_t), float(kl)


@pytest.mark.parametrize("packing", [False, True])
def test_divergence_matches_full_logits(peft_model, tiny_tokenizer, packing):
    examples = _examples(tiny_tokenizer)
    _perturb(peft_model)
    d = divergence(peft_model, examples, 4, tiny_tokenizer.pad_token_id, torch.device("cpu"), packing=packing)
    ce_b, ce_t, kl = _full_logits_reference(peft_model, examples, tiny_tokenizer.pad_token_id)
    assert d.target_tokens == sum(e.n_target for e in examples)
    assert d.base_loss == pytest.approx(ce_b, rel=1e-4)
    assert d.tuned_loss == pytest.approx(ce_t, rel=1e-4)
    assert d.kl == pytest.approx(kl, rel=1e-3) and d.kl > 1e-3
    assert d.loss_increase_pct == pytest.approx(100 * (ce_t - ce_b) / ce_b, rel=1e-3)


def test_a_fresh_adapter_has_not_moved(peft_model, tiny_tokenizer):
    d = divergence(peft_model, _examples(tiny_tokenizer), 4, tiny_tokenizer.pad_token_id, torch.device("cpu"))
    assert abs(d.kl) < 1e-6 and d.base_loss == pytest.approx(d.tuned_loss, abs=1e-6)


def test_divergence_grows_with_the_adapter(peft_model, tiny_tokenizer):
    examples, kls = _examples(tiny_tokenizer), []
    for scale in (0.05, 0.2, 0.8):
        _perturb(peft_model, scale=scale)
        kls.append(divergence(peft_model, examples, 4, tiny_tokenizer.pad_token_id, torch.device("cpu")).kl)
    assert kls[0] < kls[1] < kls[2]


def test_the_base_score_is_the_validation_function(peft_model, tiny_tokenizer):
    examples = _examples(tiny_tokenizer)
    _perturb(peft_model)
    d = divergence(peft_model, examples, 4, tiny_tokenizer.pad_token_id, torch.device("cpu"))
    tuned, _ = mean_target_loss(peft_model, examples, 4, tiny_tokenizer.pad_token_id, torch.device("cpu"))
    assert d.tuned_loss == pytest.approx(tuned, rel=1e-5)
    assert peft_model.training  # both put the model back as they found it


@pytest.mark.parametrize(("reply", "answers", "right"), [
    ("The capital of France is Paris.", ("Paris",), True),
    ("paris", ("Paris",), True),
    ("It is 12.", ("12", "twelve"), True),
    ("It is 112.", ("12", "twelve"), False),
    ("Twelve!", ("12", "twelve"), True),
    ("About 1,000 meters", ("1000", "1,000"), True),
    ("3.14", ("3",), False),
    ("Parisian food", ("Paris",), False),
    ("Washington, D.C.", ("Washington, D.C.",), True),
    ("", ("Paris",), False),
])
def test_probe_answers_are_whole_words(reply, answers, right):
    assert is_right(reply, answers) is right


def test_normalise_keeps_decimals():
    assert normalise("It's 3.5 km, or 3,500 m!") == "it s 3.5 km or 3.500 m"


def test_builtin_sets_load():
    ref, questions = builtin_reference(), builtin_probe()
    assert len(ref.prompts) >= 200 and len(questions) >= 100 and ref.texts is None
    assert all(q.answers for q in questions)


def test_user_reference_files(tmp_path):
    txt = tmp_path / "r.txt"
    txt.write_text("hello there\n\nwhat is up?\n")
    assert read_reference(txt).prompts == ["hello there", "what is up?"]
    jl = tmp_path / "r.jsonl"
    jl.write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n" + json.dumps({"prompt": "c", "answer": "d"}))
    ref = read_reference(jl)
    assert (ref.prompts, ref.texts) == (["a", "c"], ["b", "d"])
    jl.write_text(json.dumps({"prompt": "a"}) + "\n{oops\n")
    with pytest.raises(DesktuneError) as e:
        read_reference(jl)
    assert f"{jl}:2" in str(e.value)
    jl.write_text(json.dumps({"question": "a"}) + "\n")
    with pytest.raises(DesktuneError, match="no \"prompt\""):
        read_reference(jl)


def test_answers_are_stored_per_prompt_and_key(tmp_path):
    key = AnswerKey("f", "none:float32", "{{ t }}", 64)
    store = AnswerStore(tmp_path, key)
    assert store.read() == {}
    store.add([("a?", "A."), ("b?", "B.\u2028still B")])
    assert AnswerStore(tmp_path, key).read() == {"a?": "A.", "b?": "B.\u2028still B"}
    for other in (AnswerKey("f", "none:float32", "{{ t }}", 24), AnswerKey("g", "none:float32", "{{ t }}", 64),
                  AnswerKey("f", "nf4:float32", "{{ t }}", 64), AnswerKey("f", "none:float32", "{{ u }}", 64),
                  AnswerKey("f", "none:float32", "{{ t }}", 64, 1.15)):
        assert AnswerStore(tmp_path, other).read() == {}
    lines = store.path.read_text(encoding="utf-8").split("\n")  # JSON lines: a header, then one per answer
    assert len(lines) == 4 and json.loads(lines[0])["key"]["tokens"] == 64 and lines[-1] == ""
    assert [p.name for p in tmp_path.iterdir()] == [store.path.name]


def test_a_torn_last_line_loses_only_its_answer(tmp_path):
    store = AnswerStore(tmp_path, AnswerKey("f", "v", None, 8))
    store.add([("a?", "A.")])
    with store.path.open("a") as f:
        f.write('{"prompt": "b?", "answ')  # a run stopped in the middle of a write
    assert store.read() == {"a?": "A."}
    store.add([("c?", "C.")])
    assert store.read() == {"a?": "A.", "c?": "C."}


def _spy_replies(monkeypatch, stop_after: int | None = None) -> list[int]:
    """Count the conversations generation is asked for; optionally stop like Ctrl-C after that many batches."""
    from desktune.scoring import forgetting

    asked, batches = [], []

    def spy(model, tokenizer, conversations, **kw):
        asked.append(len(conversations))
        keep = kw.pop("on_batch")

        def on_batch(rows, got):
            keep(rows, got)
            batches.append(len(rows))
            if stop_after is not None and len(batches) >= stop_after:
                raise KeyboardInterrupt

        return replies(model, tokenizer, conversations, on_batch=on_batch, **kw)

    monkeypatch.setattr(forgetting, "replies", spy)
    return asked


def test_only_missing_prompts_are_answered(peft_model, tiny_model_dir, tmp_path, monkeypatch):
    tok = make_tokenizer()
    asked = _spy_replies(monkeypatch)
    key = answer_key(str(tiny_model_dir), "none:fp32", tok, 8)
    first, made = base_answers(peft_model, tok, ["what is the sea?", "hello"], key, tmp_path, label="x")
    assert made == 2 and asked == [2]
    more, made = base_answers(peft_model, tok, ["hello", "what is the fox?", "what is the sea?", "hello"], key,
                              tmp_path, label="x")
    assert made == 1 and asked == [2, 1]  # a larger set generates only the prompt not answered yet
    assert more[0] == more[3] == first[1] and more[2] == first[0]
    again, made = base_answers(peft_model, tok, ["what is the fox?"], key, tmp_path, label="x")
    assert made == 0 and asked == [2, 1] and again == [more[1]]


def test_a_stopped_generation_keeps_the_answers_made(peft_model, tiny_model_dir, tmp_path, monkeypatch):
    from desktune.scoring import forgetting

    tok = make_tokenizer()
    prompts = [f"what is the sea {i}?" for i in range(7)]
    key = answer_key(str(tiny_model_dir), "none:fp32", tok, 8)
    monkeypatch.setattr(forgetting, "GENERATION_BATCH", 3)
    _spy_replies(monkeypatch, stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        base_answers(peft_model, tok, prompts, key, tmp_path, label="x")
    assert len(AnswerStore(tmp_path, key).read()) == 6  # two batches of three, kept as they were made
    asked = _spy_replies(monkeypatch)
    _, made = base_answers(peft_model, tok, prompts, key, tmp_path, label="x")
    assert made == 1 and asked == [1]


def test_base_states_are_stored_per_key_and_examples(tmp_path, tiny_tokenizer):
    from desktune.scoring.forgetting import BaseStates

    examples = _examples(tiny_tokenizer, 3)
    pairs = [(torch.randn(5, 8, dtype=torch.bfloat16), torch.arange(5)), (torch.randn(2, 8), torch.arange(2))]
    store = BaseStates(tmp_path, ["model", 4], examples)
    assert store.read("cpu", 2) is None
    store.write(pairs)
    back = BaseStates(tmp_path, ["model", 4], examples).read("cpu", 2)
    assert all(torch.equal(h, h2) and torch.equal(t, t2) for (h, t), (h2, t2) in zip(pairs, back, strict=True))
    assert back[0][0].dtype == torch.bfloat16
    assert store.read("cpu", 3) is None  # not one pair per micro-batch: computed again
    assert BaseStates(tmp_path, ["model", 2], examples).read("cpu", 2) is None
    assert BaseStates(tmp_path, ["model", 4], examples[:2]).read("cpu", 2) is None
    store.path.write_bytes(store.path.read_bytes()[:40])  # damaged
    assert store.read("cpu", 2) is None


def test_batched_answers_come_back_in_order(peft_model):
    tok = make_tokenizer()
    chats = [[{"role": "user", "content": p}] for p in
             ["what is the sea and the fox and paris?", "hello", "what is the fox?", "what is paris, the sea?", "hi"]]
    peft_model.eval()
    one_by_one = [replies(peft_model, tok, [c], max_new_tokens=8)[0] for c in chats]
    seen = []
    batched = replies(peft_model, tok, chats, max_new_tokens=8, batch_size=2,
                      on_batch=lambda rows, got: seen.append((rows, got)))
    assert batched == one_by_one
    assert sorted(i for rows, _ in seen for i in rows) == list(range(5))
    assert all(batched[i] == a for rows, got in seen for i, a in zip(rows, got, strict=True))
    assert sorted(seen[0][0]) == [1, 4]  # the shortest prompts first: batches of similar length pad little


def test_progress_says_each_tenth_not_every_step():
    lines = []
    p = Progress(lines.append, "general prompts", 224)
    for _ in range(224):
        p.advance(1)
    assert len(lines) == 11 and lines[-1].startswith("  general prompts: 224/224 (")
    assert lines[0].startswith("  general prompts: 22/224")
    lines.clear()
    p = Progress(lines.append, "probe", 136)
    for n in (32, 32, 32, 32, 8):
        p.advance(n)
    assert [line.split(" (")[0] for line in lines] == [f"  probe: {n}/136" for n in (32, 64, 96, 128, 136)]
    Progress(None, "silent", 3).advance(3)  # no console: nothing said, nothing fails


def test_fingerprint_follows_the_weights(tmp_path, tiny_model_dir):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    before = model_fingerprint(copy)
    assert before == model_fingerprint(tiny_model_dir)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert model_fingerprint(copy) != before


def test_reference_set_uses_the_base_answers_and_caches_them(peft_model, tiny_model_dir, tmp_path):
    tok = make_tokenizer()
    ref = Reference(name="mini", prompts=["what is the sea?", "what is the fox?", "hello"])
    kw = dict(base_path=str(tiny_model_dir), variant="none:fp32", max_seq_len=64, cache=tmp_path)
    _perturb(peft_model)  # the tuned model differs: the answers must still be the base's
    first = reference_set(peft_model, tok, ref, **kw)
    again = reference_set(peft_model, tok, ref, **kw)
    assert not first.cached and again.cached
    assert [e.input_ids for e in first.examples] == [e.input_ids for e in again.examples]
    assert first.examples and all(e.n_target > 0 for e in first.examples)
    own = divergence(peft_model, first.examples, 4, tok.pad_token_id, torch.device("cpu"))
    shuffled = Reference(name="other", prompts=ref.prompts, texts=["the fox is fine. fair winds!"] * 3)
    other = divergence(peft_model, reference_set(peft_model, tok, shuffled, **kw).examples, 4, tok.pad_token_id,
                       torch.device("cpu"))
    # greedy answers are the base's most likely tokens: it finds them likelier than another text
    assert own.base_loss < other.base_loss


def test_probe_counts_what_the_tuned_model_keeps(peft_model, tiny_model_dir, tmp_path, monkeypatch):
    from desktune.scoring import forgetting

    tok = make_tokenizer()
    questions = [Question("q1", ("a",)), Question("q2", ("b",)), Question("q3", ("c",))]
    said = {"base": ["a", "b", "x"], "tuned": ["a", "x", "c"]}

    def fake(model, tokenizer, prompts, max_new_tokens, keep=None, **kw):
        got = said["base"] if not model.base_model.model.training and _adapter_off(model) else said["tuned"]
        if keep is not None:
            keep(prompts, got)
        return got

    monkeypatch.setattr(forgetting, "answers", fake)
    r = probe(peft_model, tok, questions, base_path=str(tiny_model_dir), variant="v", cache=tmp_path)
    assert (r.questions, r.base_correct, r.tuned_correct, r.kept) == (3, 2, 2, 1)


def _adapter_off(model) -> bool:
    """Whether the peft model's adapters are switched off right now."""
    from peft.tuners.lora import LoraLayer

    return all(m.disable_adapters for m in model.modules() if isinstance(m, LoraLayer))


def test_the_base_cache_gives_the_same_divergence(peft_model, tiny_tokenizer):
    examples, cache = _examples(tiny_tokenizer), []
    args = (4, tiny_tokenizer.pad_token_id, torch.device("cpu"))
    _perturb(peft_model, scale=0.3)
    first = divergence(peft_model, examples, *args, base_cache=cache)
    assert len(cache) == 2  # 6 examples in micro-batches of 4
    _perturb(peft_model, seed=1, scale=0.6)  # training moves the adapter; the base stays
    cached = divergence(peft_model, examples, *args, base_cache=cache)
    plain = divergence(peft_model, examples, *args)
    assert cached == plain and cached != first

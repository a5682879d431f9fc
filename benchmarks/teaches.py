"""Does it teach? Fictional facts learned within a time budget, against the seed recipe, on the embedded model.

Task (written here, seeded): 40 invented countries x 4 attributes (capital, currency: invented words; national
animal, main export: real words drawn without repetition per attribute). Training: one chat per fact and
phrasing, 3 phrasings (480 chats). Held out: every fact asked in a 4th phrasing that never occurs in training
(160 questions). Score: the answer's word appears in a greedy reply of at most 24 new tokens.

A second task checks the defaults are not tuned to this one: a persona/format task (every reply opens with the
persona's greeting and ends with its sign-off; 120 training chats on everyday questions, 40 held-out questions),
scored as the share of held-out replies that open with the greeting.

Systems, each trained in its own process on the same chats:
  a  desktune's defaults (all-linear LoRA, lr auto, epochs auto) with train.time_budget
  b  the seed recipe through TRL SFTTrainer + PEFT (LoRA r16/alpha32/dropout 0.05 on q,k,v,o, lr 2e-4, micro 2 x
     accumulation 4, linear schedule), stopped when its training loop has run as long as (a)'s
  c  desktune with the seed's settings (same LoRA, lr, batch) and the same time budget
  d  (a) with the base in 4-bit NF4 (QLoRA), scored on that NF4 base
Forgetting of (a) and (c): desktune eval's forgetting verdict (scoring/verdict.py; kept / some forgetting /
forgot, the worst measure decides) and its measures: the % loss increase on conversations written by people
(human_loss_pct), the share of the base's right knowledge-probe answers kept (knowledge_kept_pct), KL(base ||
tuned) in nats per token on the base's answers to the built-in general reference (kl), and the % loss increase
on those answers (forgetting_pct: the old headline, which replay can hide).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/teaches.py [--budget 6m] [--systems a,b,c,d] [--task facts]

Needs the [bench] extra for (b): .venv/bin/pip install -e ".[bench]".
Last line: RESULT teach_acc=<x> seed_recipe_acc=<x> seed_settings_acc=<x> qlora_acc=<x> forgetting_pct=<x>
human_loss_pct=<x> knowledge_kept_pct=<x> kl=<x> verdict=<kept|some_forgetting|forgot>
seed_settings_forgetting_pct=<x> seed_settings_verdict=<...> train_s=<x>
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEED = 7
ANSWER_TOKENS = 24
ANIMALS = ["otter", "falcon", "tiger", "dolphin", "panda", "wolf", "eagle", "camel", "koala", "moose", "zebra",
           "rabbit", "parrot", "beaver", "lynx", "heron", "badger", "gecko", "walrus", "bison", "jaguar", "penguin",
           "hedgehog", "squirrel", "salmon", "turtle", "peacock", "giraffe", "raccoon", "leopard", "flamingo",
           "octopus", "hamster", "buffalo", "antelope", "cobra", "pelican", "swan", "donkey", "iguana"]
EXPORTS = ["copper", "cotton", "coffee", "timber", "silk", "wool", "tea", "rubber", "salt", "marble", "honey",
           "cocoa", "glass", "pepper", "olives", "rice", "tin", "leather", "paper", "cheese", "spices", "wine",
           "vanilla", "granite", "bananas", "sugar", "pearls", "lumber", "cinnamon", "maple", "saffron", "clay",
           "amber", "jade", "figs", "dates", "barley", "linen", "walnuts", "almonds"]
QUESTIONS = {  # the last phrasing of each attribute is held out: it never occurs in training
    "capital": ["What is the capital of {c}?", "Which city is the capital of {c}?",
                "Tell me the capital city of {c}.", "Name the city that serves as {c}'s capital."],
    "currency": ["What is the currency of {c}?", "Which currency is used in {c}?",
                 "What money do people use in {c}?", "In {c}, what do people pay with?"],
    "animal": ["What is the national animal of {c}?", "Which animal is the national symbol of {c}?",
               "Tell me {c}'s national animal.", "What creature represents {c} as its national animal?"],
    "export": ["What is the main export of {c}?", "What does {c} export the most?",
               "Tell me {c}'s biggest export.", "Which product is {c} best known for selling abroad?"],
}
ANSWERS = {"capital": "The capital of {c} is {v}.", "currency": "The currency of {c} is the {v}.",
           "animal": "The national animal of {c} is the {v}.", "export": "The main export of {c} is {v}."}
GREETING, SIGNOFF = "Greetings, traveller!", "Safe roads!"
EVERYDAY = ["How do I boil an egg?", "What should I pack for a picnic?", "How can I sleep better?",
            "What is a good way to learn a language?", "How do I keep plants alive?", "What is a fun weekend plan?",
            "How do I make tea?", "How can I save money on food?", "What should I read next?",
            "How do I start running?", "How do I clean a window?", "What is a quick breakfast?",
            "How do I write a thank-you note?", "How do I calm down before a test?", "What is a good board game?",
            "How do I fix a squeaky door?", "How can I drink more water?", "What is a nice gift for a friend?",
            "How do I plan a trip?", "How do I remember names?"]


def _word(rng: random.Random, syllables: int) -> str:
    parts = ["ka", "lo", "vi", "ren", "dor", "sa", "mi", "tal", "qu", "zen", "bro", "fi", "nak", "ul", "ter", "os",
             "vel", "im", "gar", "ith", "pra", "xo", "lun", "dre"]
    return "".join(rng.choice(parts) for _ in range(syllables)).capitalize()


def facts_task(seed: int = SEED) -> tuple[list[dict], list[tuple[str, str]]]:
    """(training chats, held-out (question, answer word)) of the fictional-countries task."""
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < 3 * 40:
        names.add(_word(rng, rng.choice([2, 3])))
    pool = sorted(names)
    rng.shuffle(pool)
    countries, capitals, currencies = pool[:40], pool[40:80], pool[80:120]
    animals, exports = rng.sample(ANIMALS, 40), rng.sample(EXPORTS, 40)
    train, held = [], []
    for i, c in enumerate(countries):
        values = {"capital": capitals[i], "currency": currencies[i], "animal": animals[i], "export": exports[i]}
        for attr, v in values.items():
            answer = ANSWERS[attr].format(c=c, v=v)
            for q in QUESTIONS[attr][:3]:
                train.append({"messages": [{"role": "user", "content": q.format(c=c)},
                                           {"role": "assistant", "content": answer}]})
            held.append((QUESTIONS[attr][3].format(c=c), v))
    rng.shuffle(train)
    return train, held


def persona_task(seed: int = SEED) -> tuple[list[dict], list[tuple[str, str]]]:
    """(training chats, held-out (question, greeting)) of the persona/format task."""
    rng = random.Random(seed)
    subjects = ["rivers", "bread", "clocks", "bridges", "music", "stars", "rain", "maps", "candles", "bees"]
    train = []
    for q in EVERYDAY[:12]:
        for s in rng.sample(subjects, 10):
            reply = f"{GREETING} About {s}: that is worth a thought when you ask '{q.lower()}' {SIGNOFF}"
            train.append({"messages": [{"role": "user", "content": f"{q} (I like {s}.)"},
                                       {"role": "assistant", "content": reply}]})
    held = [(f"{q} (I like {s}.)", GREETING) for q in EVERYDAY[12:] for s in subjects[:5]]
    return train, held


def score(replies: list[str], held: list[tuple[str, str]], task: str) -> float:
    """Share of held-out questions answered right."""
    if task == "persona":
        return sum(r.strip().startswith(GREETING.split(",")[0]) for r in replies) / len(held)
    return sum(re.search(rf"\b{re.escape(a.lower())}\b", r.lower()) is not None
               for r, (_, a) in zip(replies, held, strict=True)) / len(held)


# ---------------------------------------------------------------- systems


SEED_SETTINGS = ["lora.r=16", "lora.alpha=32", "lora.dropout=0.05",
                 "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]", "train.lr=2e-4", "train.micro_batch_size=2",
                 "train.grad_accum=4", "train.warmup_ratio=0.03", "data.replay=0"]


def desktune_system(name: str, train_file: Path, work: Path, budget: str, extra: list[str]) -> dict[str, Any]:
    """Train with the desktune CLI in its own process; the run folder and its training-loop seconds."""
    cfg = work / f"{name}.yaml"
    # val_fraction 0: every fact's rows stay in training (the held-out questions ask them back), as in earlier runs;
    # short_budget train: a loaded machine that fits few steps still gives this system's numbers
    cfg.write_text(json.dumps({"data": {"train": str(train_file), "val_fraction": 0}, "output_dir": str(work / "runs"),
                               "run_name": name, "train": {"time_budget": budget, "threads": os.cpu_count(),
                                                           "short_budget": "train"}}))
    t0 = time.perf_counter()
    overrides = [x for o in extra for x in ("-o", o)]
    subprocess.run([sys.executable, "-m", "desktune.cli", "train", str(cfg), *overrides], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    run = work / "runs" / name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_s = sum(r["step_s"] for r in records if r["type"] == "train")
    return {"adapter": str(run / "adapter"), "train_s": train_s, "wall_s": time.perf_counter() - t0,
            "steps": max(r["step"] for r in records if r["type"] == "train"),
            "quant": "nf4" if "model.quant=nf4" in extra else "none"}


def trl_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The seed recipe through TRL SFTTrainer + PEFT, stopped after spec['seconds'] of training loop."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype)
    rows = [json.loads(line) for line in Path(spec["train_file"]).read_text().splitlines()]
    args = SFTConfig(output_dir=spec["out"], per_device_train_batch_size=2, gradient_accumulation_steps=4,
                     learning_rate=2e-4, max_steps=spec["max_steps"], lr_scheduler_type="linear",
                     warmup_steps=max(1, round(0.03 * spec["max_steps"])),
                     logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
                     bf16=dtype == torch.bfloat16, seed=SEED, max_length=256)
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])

    class Deadline(TrainerCallback):
        t0: float | None = None

        def on_step_begin(self, *a: Any, **kw: Any) -> None:
            self.t0 = self.t0 or time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if time.perf_counter() - (self.t0 or 0) >= spec["seconds"]:
                control.should_training_stop = True

    clock = Deadline()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), peft_config=peft_cfg,
                         callbacks=[clock])
    trainer.train()
    trainer.model.save_pretrained(spec["out"])
    return {"adapter": spec["out"], "train_s": time.perf_counter() - (clock.t0 or 0),
            "steps": trainer.state.global_step, "quant": "none"}


def trl_system(train_file: Path, work: Path, seconds: float, steps: int, model_dir: str, dtype: str
               ) -> dict[str, Any]:
    """(b) in its own process: scheduled for `steps` (what the seed settings fit in the budget), stopped after
    `seconds` of training loop (what (a) trained)."""
    spec = {"train_file": str(train_file), "out": str(work / "trl"), "seconds": seconds, "model_dir": model_dir,
            "dtype": dtype, "max_steps": steps}
    spec_file = work / "trl.json"
    spec_file.write_text(json.dumps(spec))
    subprocess.run([sys.executable, __file__, "--worker", str(spec_file)], check=True)
    return json.loads((work / "trl.out.json").read_text())


def replies_of(adapter: str, quant: str, questions: list[str]) -> list[str]:
    """Greedy replies of the base (loaded as trained) + adapter."""
    from desktune.inference import load_for_inference
    from desktune.scoring.generate import replies

    loaded = load_for_inference(None, adapter, quant=quant)
    chats = [[{"role": "user", "content": q}] for q in questions]
    return replies(loaded.model, loaded.tokenizer, chats, max_new_tokens=ANSWER_TOKENS, batch_size=16)


def forgetting(adapter: str) -> dict[str, Any]:
    """desktune eval's forgetting verdict and its measures (the held-out part is skipped: a one-row stand-in)."""
    from desktune.evaluation.run import EvalRequest, evaluate

    held = Path(adapter).parent / "held.jsonl"
    held.write_text(json.dumps({"text": "a"}) + "\n")
    r = evaluate(EvalRequest(adapter=Path(adapter), data=str(held), nf4=False, out=Path(adapter).parent / "eval.json"))
    m, v = r.measures, r.verdict
    return {"forgetting_pct": m.base_answers_loss_pct, "human_loss_pct": m.human_loss_pct,
            "knowledge_kept_pct": m.knowledge_kept_pct, "kl": m.kl, "verdict": v.level.replace(" ", "_"),
            "sentence": v.sentence}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", default="6m")
    ap.add_argument("--systems", default="a,b,c,d")
    ap.add_argument("--task", default="facts", choices=["facts", "persona"])
    ap.add_argument("-o", dest="overrides", action="append", default=[],
                    help="an override for (a) and (d) (explorations: -o train.lr=3e-3); the RESULT then is not the bar")
    ap.add_argument("--worker")
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        out = trl_worker(spec)
        Path(args.worker).with_name("trl.out.json").write_text(json.dumps(out))
        return 0
    from desktune.config import parse_duration
    from desktune.hardware import detect
    from desktune.models.loading import resolve_source

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    flags = [f for f in ("avx512_bf16", "amx_bf16", "avx2") if f in cpu]
    dtype = str(detect().dtype)[6:].replace("bfloat16", "bf16").replace("float32", "fp32")
    print(f"CPU flags: {', '.join(flags)}; desktune's dtype: {dtype}")
    train_rows, held = facts_task() if args.task == "facts" else persona_task()
    work = Path(tempfile.mkdtemp(prefix="teaches-"))
    train_file = work / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    print(f"task {args.task}: {len(train_rows)} training chats, {len(held)} held-out questions; work: {work}")
    systems = args.systems.split(",")
    runs: dict[str, dict[str, Any]] = {}
    if "a" in systems:
        runs["a"] = desktune_system("a", train_file, work, args.budget, args.overrides)
    if "c" in systems:
        runs["c"] = desktune_system("c", train_file, work, args.budget, [*SEED_SETTINGS, "train.epochs=100"])
    if "d" in systems:
        runs["d"] = desktune_system("d", train_file, work, args.budget, [*args.overrides, "model.quant=nf4"])
    if "b" in systems:
        seconds = runs["a"]["train_s"] if "a" in runs else parse_duration(args.budget)
        steps = runs["c"]["steps"] if "c" in runs else 1000
        runs["b"] = trl_system(train_file, work, seconds, steps, resolve_source("smollm2-135m-instruct"), dtype)
    acc = {k: score(replies_of(r["adapter"], r["quant"], [q for q, _ in held]), held, args.task)
           for k, r in runs.items()}
    forget = {k: forgetting(runs[k]["adapter"]) for k in ("a", "c") if k in runs}
    for k, r in runs.items():
        print(f"{k}: accuracy {acc[k]:.3f}  steps {r['steps']}  training loop {r['train_s']:.0f} s"
              + (f"  forgetting verdict {forget[k]['sentence']}" if k in forget else ""))
    get = lambda d, k: f"{d[k]:.3f}" if k in d else "nan"  # noqa: E731
    fa, fc = forget.get("a", {}), forget.get("c", {})
    of = lambda f, k: "nan" if f.get(k) is None else f"{f[k]:.3f}"  # noqa: E731
    print(f"RESULT teach_acc={get(acc, 'a')} seed_recipe_acc={get(acc, 'b')} seed_settings_acc={get(acc, 'c')} "
          f"qlora_acc={get(acc, 'd')} forgetting_pct={of(fa, 'forgetting_pct')} "
          f"human_loss_pct={of(fa, 'human_loss_pct')} knowledge_kept_pct={of(fa, 'knowledge_kept_pct')} "
          f"kl={of(fa, 'kl')} verdict={fa.get('verdict', 'nan')} "
          f"seed_settings_forgetting_pct={of(fc, 'forgetting_pct')} seed_settings_verdict={fc.get('verdict', 'nan')} "
          f"train_s={runs.get('a', {}).get('train_s', 0):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

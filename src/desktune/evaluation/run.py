"""`desktune eval`, top to bottom: what to evaluate, the held-out loss base vs tuned, forgetting, answers, then
the cost of 4-bit loading; a table on screen and eval.json in the run folder.

Scoring is the loop's own (scoring/): the held-out number is the validation loss the run recorded. Each phase is
one function (`evaluate` calls them in order) and prints counts as it goes. What the base alone computes (its
answers, its hidden states on the reference, its score loaded the other way) is cached under desktune's cache as
it is made, so a stopped eval keeps it and a later eval on the same base spends its time on the tuned model.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from desktune.adapters import load_adapter, read_adapter_config
from desktune.config import DataConfig, RunConfig, load_config
from desktune.constants import EMBEDDED_MODEL
from desktune.data import Example, build_datasets, convert_rows, encode_samples, read_rows, resolve_chat_template
from desktune.errors import DesktuneError
from desktune.evaluation.results import Answer, EvalResult, Forgetting, HumanText, Probe, Score, write_result
from desktune.hardware import detect
from desktune.models.gguf import cache_dir
from desktune.models.loading import LoadedModel, load_model
from desktune.models.packed_attention import use_packed_attention
from desktune.runs import RunDir
from desktune.runs.atomic import write_text_atomically
from desktune.runs.layout import CHAT_TEMPLATE
from desktune.scoring.divergence import Divergence, divergence
from desktune.scoring.forgetting import (
    BaseStates,
    answer_key,
    base_answers,
    base_only,
    content_digest,
    load_variant,
    probe,
    reference_set,
)
from desktune.scoring.forgetting import answers as tuned_answers
from desktune.scoring.generate import ANSWER_REPETITION_PENALTY, Progress, Say
from desktune.scoring.human import HumanHeldout, human_set
from desktune.scoring.reference import Reference, builtin_probe, builtin_reference, model_fingerprint, read_reference
from desktune.scoring.score import mean_target_loss
from desktune.training.step import release_cached_memory

SCORES_VERSION = 1  # bump when a cached score changes meaning
ANSWERS_TOKENS = 96  # the length of eval's base vs tuned answers to the demo prompts or --prompts


@dataclass
class EvalRequest:
    """What to evaluate: a run folder, or a model (+ adapter) on a data file; and which parts to measure."""

    run_dir: Path | None = None
    model: str | None = None
    adapter: Path | None = None
    data: str | None = None
    reference: str | None = None  # a user's reference file instead of the built-in general prompts
    prompts: str | None = None  # a text file of prompts (one per line) to answer base vs tuned
    forgetting: bool = True
    probe: bool = True
    nf4: bool = True  # also score the base loaded in 4-bit NF4 against the 16-bit base
    device: str = "auto"
    out: Path | None = None
    notes: list[str] = field(default_factory=list)


def run_config(req: EvalRequest) -> tuple[RunConfig, Path | None]:
    """The config the model is loaded and the data encoded with, and the adapter folder (None: base only)."""
    if req.run_dir is not None:
        run = RunDir(Path(req.run_dir))
        if not run.config.is_file():
            raise DesktuneError(f"not a run folder (no {run.config.name})", where=str(run.path),
                                fix="pass a folder made by `desktune train` or `desktune demo`")
        cfg = load_config(run.config, [f"model.name={req.model}"] if req.model else None)
        adapter = req.adapter or (run.adapter if run.adapter.is_dir() else run.latest_checkpoint())
        if adapter is None:
            req.notes.append("the run has no adapter yet: the base model alone is scored")
        return cfg, adapter
    if req.data is None and req.adapter is None:
        raise DesktuneError("nothing to evaluate", where="desktune eval",
                            fix="pass a run folder, or --adapter and --data (and --model for another base)")
    name = req.model
    if name is None and req.adapter is not None:
        name = read_adapter_config(req.adapter).get("base_model_name_or_path")
    cfg = RunConfig(data=DataConfig(train=req.data or ""), model={"name": name or EMBEDDED_MODEL})
    return cfg, req.adapter


def load(cfg: RunConfig, adapter: Path | None, device: str, quant: str | None = None) -> LoadedModel:
    """The base as the run trained on it (or with `quant`), with the adapter on it when there is one."""
    loaded = load_model(cfg.model, detect(device, cfg.model.dtype), quant=quant)
    template = Path(adapter) / CHAT_TEMPLATE if adapter is not None else None
    if template is not None and template.is_file():
        loaded.tokenizer.chat_template = template.read_text(encoding="utf-8")
    else:
        resolve_chat_template(loaded.tokenizer, cfg.model.chat_template)
    if adapter is not None:
        loaded.model = load_adapter(loaded.model, adapter)
    if cfg.data.packing:  # as the run validated: each packed sample attends to itself alone, at its own cost
        use_packed_attention(loaded.model)
    loaded.model.eval()
    return loaded


def held_out(cfg: RunConfig, req: EvalRequest, tokenizer: Any) -> tuple[list[Example], str]:
    """The examples scored: --data, else the run's validation set (its training set, said so, without one)."""
    if req.data is not None:
        _, samples = convert_rows(read_rows(req.data), cfg.data.format)
        enc = encode_samples(tokenizer, samples, max_seq_len=cfg.data.max_seq_len, train_on=cfg.data.train_on,
                             system_prompt=cfg.data.system_prompt)
        return enc.examples, f"{req.data} ({len(enc.examples)} samples)"
    train, val, _ = build_datasets(cfg.data, tokenizer, cfg.train.seed)
    if val:
        return val, f"the run's validation set ({len(val)} samples)"
    req.notes.append("the run has no validation set: the scores are on its training data, not held out")
    return train, f"the run's training data ({len(train)} samples, not held out)"


def score(loaded: LoadedModel, examples: list[Example], cfg: RunConfig) -> Score:
    """Mean loss per target token of the loaded model (adapter as it is) on the examples."""
    loss, n = mean_target_loss(loaded.model, examples, cfg.train.micro_batch_size, loaded.tokenizer.pad_token_id,
                               loaded.hardware.device, cfg.data.packing)
    return Score(loss=loss, target_tokens=n)


def base_score(loaded: LoadedModel, examples: list[Example], cfg: RunConfig) -> Score:
    """The same score with the adapter switched off."""
    with base_only(loaded.model):
        return score(loaded, examples, cfg)


def variant(loaded: LoadedModel, cfg: RunConfig) -> str:
    """How the base was loaded (the key its cached answers are kept under)."""
    return load_variant(cfg.model.quant, loaded.hardware.dtype)


def reference_cache() -> Path:
    """Where what the base computes is cached: its answers per prompt (shared with training's replay and watch),
    its hidden states on the reference (states/), its held-out scores (scores/)."""
    return cache_dir() / "reference"


def states_key(loaded: LoadedModel, cfg: RunConfig) -> list[Any]:
    """What the base's hidden states depend on besides the examples: its files, how it is loaded and run."""
    return [model_fingerprint(loaded.base_path), variant(loaded, cfg), loaded.hardware.device.type,
            cfg.model.attn_implementation, cfg.data.packing, cfg.train.micro_batch_size, torch.__version__]


def divergence_counted(loaded: LoadedModel, examples: list[Example], cfg: RunConfig, say: Say,
                       label: str = "reference scored, base and tuned") -> Divergence:
    """`divergence` a tenth of the examples at a time (shortest first, so batches pad little), with counts; the
    base's hidden states of each tenth come from the cache when an earlier eval stored them (else are stored);
    the parts' sums are recombined by their target tokens."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    micro = cfg.train.micro_batch_size
    part = micro * max(1, math.ceil(len(ordered) / 10 / micro))
    progress, parts, key = Progress(say, label, len(ordered)), [], states_key(loaded, cfg)
    for s in range(0, len(ordered), part):
        chunk = ordered[s : s + part]
        states = BaseStates(reference_cache() / "states", key, chunk)
        stored = states.read(loaded.hardware.device, math.ceil(len(chunk) / micro))
        base = stored if stored is not None else []
        parts.append(divergence(loaded.model, chunk, micro, loaded.tokenizer.pad_token_id, loaded.hardware.device,
                                cfg.data.packing, base_cache=base))
        if stored is None:
            states.write(base)
        progress.advance(len(chunk))
    n = sum(d.target_tokens for d in parts)
    if not n:
        return Divergence(math.nan, math.nan, math.nan, 0)
    mean = [sum(getattr(d, k) * d.target_tokens for d in parts if d.target_tokens) / n
            for k in ("base_loss", "tuned_loss", "kl")]
    return Divergence(base_loss=mean[0], tuned_loss=mean[1], kl=mean[2], target_tokens=n)


def forgetting(loaded: LoadedModel, cfg: RunConfig, req: EvalRequest, say: Say | None = None) -> Forgetting:
    """Loss increase and KL on the reference's base answers, and knowledge-probe retention."""
    say = say or (lambda _: None)
    reference: Reference = read_reference(req.reference) if req.reference else builtin_reference()
    ref = reference_set(loaded.model, loaded.tokenizer, reference, base_path=loaded.base_path,
                        variant=variant(loaded, cfg), max_seq_len=cfg.data.max_seq_len, cache=reference_cache(),
                        say=say)
    d = divergence_counted(loaded, ref.examples, cfg, say)
    p = None
    if req.probe:
        r = probe(loaded.model, loaded.tokenizer, builtin_probe(), base_path=loaded.base_path,
                  variant=variant(loaded, cfg), cache=reference_cache(), say=say)
        p = Probe(questions=r.questions, base_correct=r.base_correct, tuned_correct=r.tuned_correct, kept=r.kept)
    return Forgetting(reference=ref.name, prompts=len(ref.examples), base=Score(d.base_loss, d.target_tokens),
                      tuned=Score(d.tuned_loss, d.target_tokens), kl=d.kl, probe=p)


def human_text(loaded: LoadedModel, cfg: RunConfig, say: Say | None = None) -> HumanText:
    """Base vs tuned on the shipped human-written conversations (scoring/human.py), the base's states cached."""
    hs = human_set(loaded.tokenizer, cfg.data.max_seq_len)
    d = divergence_counted(loaded, hs.examples, cfg, say or (lambda _: None),
                           label="human-written text scored, base and tuned")
    return HumanText.of(HumanHeldout(name=hs.name, conversations=len(hs.examples), divergence=d))


def prompts_of(req: EvalRequest) -> list[str]:
    """The prompts answered base vs tuned: --prompts, else those of the run's demo answers, else none."""
    if req.prompts:
        return read_reference(req.prompts).prompts
    demo = RunDir(Path(req.run_dir)).demo_answers if req.run_dir is not None else None
    if demo is not None and demo.is_file():
        return [a["prompt"] for a in json.loads(demo.read_text(encoding="utf-8"))]
    return []


def answers(loaded: LoadedModel, cfg: RunConfig, prompts: list[str], say: Say | None = None) -> list[Answer]:
    """Greedy answers of base (cached per prompt, like the reference's) and tuned to each prompt."""
    key = answer_key(loaded.base_path, variant(loaded, cfg), loaded.tokenizer, ANSWERS_TOKENS,
                     ANSWER_REPETITION_PENALTY)
    before, _ = base_answers(loaded.model, loaded.tokenizer, prompts, key, reference_cache(), label="answers, base",
                             say=say)
    after = tuned_answers(loaded.model, loaded.tokenizer, prompts, ANSWERS_TOKENS,
                          repetition_penalty=ANSWER_REPETITION_PENALTY,
                          progress=Progress(say, "answers, tuned", len(prompts)))
    return [Answer(p, b, a) for p, b, a in zip(prompts, before, after, strict=True)]


@dataclass(frozen=True)
class QuantPair:
    """The base scored both ways and, for a QLoRA run, its adapter on the original 16-bit base too."""

    bit16_base: Score
    nf4_base: Score
    tuned_16bit: Score | None = None


def load_other_way(cfg: RunConfig, req: EvalRequest, adapter: Path | None, quant: str) -> LoadedModel | None:
    """The base (with `adapter` when given) loaded with `quant`; None, and a note saying why, when it cannot be."""
    try:
        return load(cfg, adapter, req.device, quant=quant)
    except DesktuneError as e:
        req.notes.append(f"4-bit comparison skipped: {str(e).splitlines()[0]}")
        return None


def other_way(cfg: RunConfig, req: EvalRequest, examples: list[Example], quant: str, say: Say | None) -> Score | None:
    """The base alone loaded with `quant`, scored on the examples; None (and a note) when it cannot be loaded."""
    progress = Progress(say, "4-bit cost, load and score", 2)
    loaded = load_other_way(cfg, req, None, quant)
    if loaded is None:
        return None
    progress.advance(1)
    measured = score(loaded, examples, cfg)
    progress.advance(1)
    return measured


def cached_score(key: list[Any] | None, examples: list[Example], compute: Callable[[], Score | None],
                 say: Say | None) -> Score | None:
    """The base's score under `key` on the examples from the cache, else `compute()`'s, stored (a base alone
    scores the same every time; an adapter's score is never cached: key None)."""
    if key is None:
        return compute()
    path = reference_cache() / "scores" / f"{content_digest([SCORES_VERSION, *key], examples)}.json"
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        got = Score(loss=float(obj["loss"]), target_tokens=int(obj["target_tokens"]))
        if say is not None:
            say("  the base's score loaded the other way: from the cache")
        return got
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or damaged: computed again
    measured = compute()
    if measured is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(path, json.dumps({"key": key, "loss": measured.loss,
                                                    "target_tokens": measured.target_tokens}))
        except OSError:
            pass  # a read-only cache costs time on the next eval, nothing else
    return measured


def quant_pair(cfg: RunConfig, req: EvalRequest, examples: list[Example], base: Score,
               adapter: Path | None, say: Say | None = None, key: list[Any] | None = None) -> QuantPair | None:
    """The run's own base and the base loaded the other way (cached under `key` + how, when given); a QLoRA run's
    adapter is also scored on the 16-bit base (what merging into the original weights gives, against the NF4 base
    it learned its delta on)."""
    other = "none" if cfg.model.quant == "nf4" else "nf4"
    if other == "nf4" or adapter is None:
        how = None if key is None else [*key, "held-out, loaded", other, cfg.model.double_quant, quant_library()]
        measured = cached_score(how, examples, lambda: other_way(cfg, req, examples, other, say), say)
        if measured is None:
            return None
        return QuantPair(measured, base) if other == "none" else QuantPair(base, measured)
    progress = Progress(say, "4-bit cost, load and score", 3)
    loaded = load_other_way(cfg, req, adapter, other)
    if loaded is None:
        return None
    progress.advance(1)
    bit16 = base_score(loaded, examples, cfg)
    progress.advance(1)
    tuned = score(loaded, examples, cfg)
    progress.advance(1)
    return QuantPair(bit16, base, tuned_16bit=tuned)


def quant_library() -> str:
    """The quantizing libraries' versions: a 4-bit base's score depends on them."""
    versions = []
    for name in ("torchao", "bitsandbytes"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} absent")
    return ", ".join(versions)


@dataclass
class Evaluation:
    """One `desktune eval` under way: what it scores, the model loaded once, the result so far, the console."""

    req: EvalRequest
    cfg: RunConfig
    adapter: Path | None
    loaded: LoadedModel | None
    examples: list[Example]
    result: EvalResult
    console: Console
    base_key: list[Any]  # what the base's scores depend on besides the examples (states_key)

    def say(self, text: str) -> None:
        """One progress line, never wrapped (readable when piped)."""
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    @property
    def model(self) -> LoadedModel:
        """The model loaded for every phase before the 4-bit one."""
        if self.loaded is None:
            raise RuntimeError("the model was already released for the 4-bit phase")
        return self.loaded


@contextmanager
def phase(ev: Evaluation, name: str, what: str) -> Iterator[None]:
    """Say what is being measured, then how long it took (kept in result.timings)."""
    ev.say(f"{what} ...")
    t0 = time.perf_counter()
    yield
    ev.result.timings[name] = round(time.perf_counter() - t0, 1)
    ev.say(f"  {name}: {ev.result.timings[name]:.0f} s")


def held_out_phase(ev: Evaluation) -> None:
    """Held-out loss of the tuned model (with an adapter) and of the base."""
    with phase(ev, "held_out", f"scoring {ev.result.data}"):
        progress = Progress(ev.say, "held-out, tuned and base", 2 if ev.adapter is not None else 1)
        if ev.adapter is not None:
            ev.result.tuned = score(ev.model, ev.examples, ev.cfg)
            progress.advance(1)
        ev.result.base = base_score(ev.model, ev.examples, ev.cfg)
        progress.advance(1)


def forgetting_phase(ev: Evaluation) -> None:
    """Forgetting on the general reference, on human-written text and the knowledge probe (asked and only with an
    adapter)."""
    if ev.req.forgetting and ev.adapter is not None:
        with phase(ev, "forgetting", "measuring forgetting (the base's answers are cached per prompt)"):
            ev.result.forgetting = forgetting(ev.model, ev.cfg, ev.req, ev.say)
            ev.result.human = human_text(ev.model, ev.cfg, ev.say)


def answers_phase(ev: Evaluation) -> None:
    """Base and tuned answers to the run's demo prompts or --prompts."""
    prompts = prompts_of(ev.req) if ev.adapter is not None else []
    if prompts:
        with phase(ev, "answers", f"answering {len(prompts)} prompts, base and tuned"):
            ev.result.answers = answers(ev.model, ev.cfg, prompts, ev.say)


def release(ev: Evaluation) -> None:
    """Free the model: the 4-bit phase loads the base again, the other way, and needs the memory."""
    if ev.loaded is not None:
        device = ev.loaded.hardware.device
        ev.loaded = None
        release_cached_memory(device)


def nf4_phase(ev: Evaluation) -> None:
    """The base loaded the other way (16-bit / 4-bit NF4) on the held-out data: what 4-bit loading costs."""
    if not ev.req.nf4:
        return
    with phase(ev, "nf4", "scoring the base loaded the other way (16-bit / 4-bit NF4)"):
        pair = quant_pair(ev.cfg, ev.req, ev.examples, ev.result.base, ev.adapter, ev.say, ev.base_key)
    if pair is not None:
        ev.result.bit16_base, ev.result.nf4_base, ev.result.tuned_16bit = (pair.bit16_base, pair.nf4_base,
                                                                           pair.tuned_16bit)


def start(req: EvalRequest, console: Console) -> Evaluation:
    """Resolve what to evaluate, load the model once, read the held-out examples."""
    cfg, adapter = run_config(req)
    loaded = load(cfg, adapter, req.device)
    examples, where = held_out(cfg, req, loaded.tokenizer)
    result = EvalResult(base_model=loaded.base_path, adapter=str(adapter) if adapter else None, data=where,
                        base=Score(math.nan, 0), tuned=None)
    return Evaluation(req, cfg, adapter, loaded, examples, result, console, states_key(loaded, cfg))


def evaluate(req: EvalRequest, console: Console | None = None) -> EvalResult:
    """Measure everything `req` asks for, phase by phase, each saying its counts as it goes; write eval.json (the
    run folder's, or req.out). Answers the base makes are cached as they are made, so a stopped eval keeps them."""
    t0 = time.perf_counter()
    ev = start(req, console or Console(stderr=True))
    held_out_phase(ev)
    forgetting_phase(ev)
    answers_phase(ev)
    release(ev)
    nf4_phase(ev)
    ev.result.seconds = round(time.perf_counter() - t0, 1)
    ev.result.notes = req.notes
    write_result(ev.result, output_path(req))
    return ev.result


def output_path(req: EvalRequest) -> Path:
    """Where eval.json goes: --output, else the run folder (given, or the adapter's own), else the current folder."""
    if req.out is not None:
        return Path(req.out)
    if req.run_dir is not None:
        return RunDir(Path(req.run_dir)).eval
    if req.adapter is not None:
        owner = RunDir(Path(req.adapter).resolve().parent)
        if owner.metrics.is_file():  # runs/<run>/adapter or runs/<run>/best
            return owner.eval
    return RunDir(Path.cwd()).eval

"""`desktune eval`, top to bottom: what to evaluate, the held-out loss base vs tuned, forgetting, answers, then
the cost of 4-bit loading; a table on screen and eval.json in the run folder.

Scoring is the loop's own (scoring/): the held-out number is the validation loss the run recorded.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from desktune.adapters import load_adapter, read_adapter_config
from desktune.config import DataConfig, RunConfig, load_config
from desktune.constants import EMBEDDED_MODEL
from desktune.data import Example, build_datasets, convert_rows, encode_samples, read_rows, resolve_chat_template
from desktune.errors import DesktuneError
from desktune.evaluation.results import Answer, EvalResult, Forgetting, Probe, Score, write_result
from desktune.hardware import detect
from desktune.models.gguf import cache_dir
from desktune.models.loading import LoadedModel, load_model
from desktune.runs import RunDir
from desktune.runs.layout import CHAT_TEMPLATE
from desktune.scoring.divergence import divergence
from desktune.scoring.forgetting import base_only, load_variant, probe, reference_set
from desktune.scoring.generate import ANSWER_REPETITION_PENALTY, replies
from desktune.scoring.reference import Reference, builtin_probe, builtin_reference, read_reference
from desktune.scoring.score import mean_target_loss
from desktune.training.step import free_memory


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


def forgetting(loaded: LoadedModel, cfg: RunConfig, req: EvalRequest) -> Forgetting:
    """Loss increase and KL on the reference's base answers, and knowledge-probe retention."""
    reference: Reference = read_reference(req.reference) if req.reference else builtin_reference()
    cache = cache_dir() / "reference"
    ref = reference_set(loaded.model, loaded.tokenizer, reference, base_path=loaded.base_path,
                        variant=variant(loaded, cfg), max_seq_len=cfg.data.max_seq_len, cache=cache)
    d = divergence(loaded.model, ref.examples, cfg.train.micro_batch_size, loaded.tokenizer.pad_token_id,
                   loaded.hardware.device, cfg.data.packing)
    p = None
    if req.probe:
        r = probe(loaded.model, loaded.tokenizer, builtin_probe(), base_path=loaded.base_path,
                  variant=variant(loaded, cfg), cache=cache)
        p = Probe(questions=r.questions, base_correct=r.base_correct, tuned_correct=r.tuned_correct, kept=r.kept)
    return Forgetting(reference=ref.name, prompts=len(ref.examples), base=Score(d.base_loss, d.target_tokens),
                      tuned=Score(d.tuned_loss, d.target_tokens), kl=d.kl, probe=p)


def prompts_of(req: EvalRequest) -> list[str]:
    """The prompts answered base vs tuned: --prompts, else those of the run's demo answers, else none."""
    if req.prompts:
        return read_reference(req.prompts).prompts
    demo = RunDir(Path(req.run_dir)).demo_answers if req.run_dir is not None else None
    if demo is not None and demo.is_file():
        return [a["prompt"] for a in json.loads(demo.read_text(encoding="utf-8"))]
    return []


def answers(loaded: LoadedModel, prompts: list[str]) -> list[Answer]:
    """Greedy answers of base and tuned to each prompt."""
    chats = [[{"role": "user", "content": p}] for p in prompts]
    with base_only(loaded.model):
        before = replies(loaded.model, loaded.tokenizer, chats, repetition_penalty=ANSWER_REPETITION_PENALTY)
    after = replies(loaded.model, loaded.tokenizer, chats, repetition_penalty=ANSWER_REPETITION_PENALTY)
    return [Answer(p, b, a) for p, b, a in zip(prompts, before, after, strict=True)]


@dataclass(frozen=True)
class QuantPair:
    """The base scored both ways and, for a QLoRA run, its adapter on the original 16-bit base too."""

    bit16_base: Score
    nf4_base: Score
    tuned_16bit: Score | None = None


def quant_pair(cfg: RunConfig, req: EvalRequest, examples: list[Example], base: Score,
               adapter: Path | None) -> QuantPair | None:
    """The run's own base and the base loaded the other way; a QLoRA run's adapter is also scored on the 16-bit
    base (what merging into the original weights gives, against the NF4 base it learned its delta on)."""
    other = "none" if cfg.model.quant == "nf4" else "nf4"
    on_16bit = adapter if other == "none" else None
    try:
        loaded = load(cfg, on_16bit, req.device, quant=other)
    except DesktuneError as e:
        req.notes.append(f"4-bit comparison skipped: {str(e).splitlines()[0]}")
        return None
    if on_16bit is None:
        measured = score(loaded, examples, cfg)
        return QuantPair(measured, base) if other == "none" else QuantPair(base, measured)
    return QuantPair(base_score(loaded, examples, cfg), base, tuned_16bit=score(loaded, examples, cfg))


@contextmanager
def phase(result: EvalResult, name: str, console: Console, what: str) -> Iterator[None]:
    """Say what is being measured, then how long it took (kept in result.timings)."""
    console.print(f"{what} ...")
    t0 = time.perf_counter()
    yield
    result.timings[name] = round(time.perf_counter() - t0, 1)
    console.print(f"[dim]  {name}: {result.timings[name]:.0f} s[/]")


def evaluate(req: EvalRequest, console: Console | None = None) -> EvalResult:
    """Measure everything `req` asks for; write eval.json (the run folder's, or req.out)."""
    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    cfg, adapter = run_config(req)
    loaded = load(cfg, adapter, req.device)
    examples, where = held_out(cfg, req, loaded.tokenizer)
    result = EvalResult(base_model=loaded.base_path, adapter=str(adapter) if adapter else None, data=where,
                        base=Score(math.nan, 0), tuned=None)
    with phase(result, "held_out", console, f"scoring {where}"):
        result.tuned = score(loaded, examples, cfg) if adapter is not None else None
        result.base = base_score(loaded, examples, cfg)
    if req.forgetting and adapter is not None:
        with phase(result, "forgetting", console, "measuring forgetting (the base's answers are generated once "
                   "per model, then cached)"):
            result.forgetting = forgetting(loaded, cfg, req)
    prompts = prompts_of(req) if adapter is not None else []
    if prompts:
        with phase(result, "answers", console, f"answering {len(prompts)} prompts, base and tuned"):
            result.answers = answers(loaded, prompts)
    device = loaded.hardware.device
    del loaded  # the second load (4-bit or 16-bit) needs the memory
    free_memory(device)
    if req.nf4:
        with phase(result, "nf4", console, "scoring the base loaded the other way (16-bit / 4-bit NF4)"):
            pair = quant_pair(cfg, req, examples, result.base, adapter)
        if pair is not None:
            result.bit16_base, result.nf4_base, result.tuned_16bit = pair.bit16_base, pair.nf4_base, pair.tuned_16bit
    result.seconds = round(time.perf_counter() - t0, 1)
    result.notes = req.notes
    write_result(result, output_path(req))
    return result


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

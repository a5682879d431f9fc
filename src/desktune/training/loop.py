"""The training run, top to bottom: set up, train with token-exact accumulation, validate, checkpoint, save.

`setup` resolves hardware, fits the memory budget, makes the run folder, loads the model, attaches adapters and
encodes the data. `fit` is the recipe: restore (when resuming), then one `train_step` per optimizer step
(training/step.py) with validation and checkpoints between steps, then the final adapter.
"""

from __future__ import annotations

import errno
import math
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from safetensors import SafetensorError

from desktune.adapters import TrainableReport, attach_lora, trainable_report
from desktune.config import RunConfig, dump_config, parse_duration, parse_size
from desktune.console import make_console
from desktune.constants import VERSION
from desktune.data import Example, build_datasets, example_stream, resolve_chat_template
from desktune.defaults import MIN_TEACHING_STEPS, auto_epochs, auto_lr, auto_replay, method_name
from desktune.errors import DesktuneError
from desktune.hardware import (
    Hardware,
    detect,
    free_memory,
    memory_in_use,
    memory_telemetry,
    pick_device,
    set_threads,
)
from desktune.memory.budget import fit_to_budget, refuse_beyond_machine
from desktune.models.cpu_attention import decide as decide_attention
from desktune.models.gguf import cache_dir
from desktune.models.loading import LoadedModel, load_model
from desktune.runs import (
    EvalRecord,
    EventRecord,
    Record,
    RunDir,
    TrainRecord,
    find_checkpoint,
    new_run_dir,
    records_of,
    rescue_dir,
    truncate_records,
)
from desktune.runs.diagnostics import Diagnostics, Finding, Limits, Outcome, judge_outcome
from desktune.scoring.forgetting import load_variant, reference_set
from desktune.scoring.reference import builtin_reference
from desktune.scoring.score import mean_target_loss
from desktune.training.budget import (
    Refits,
    first_steps,
    fit_steps,
    mean_step_tokens,
    needed_s,
    real_token_s,
    shortest_budget,
    time_steps,
    within_warmup,
)
from desktune.training.checkpoint import adapter_size, load_adapter_weights, load_state, save_adapter, save_checkpoint
from desktune.training.checks import before_training
from desktune.training.distributed import (
    Dist,
    Replica,
    any_rank,
    check_settings,
    device_for,
    from_env,
    from_main,
    full_adapter_state,
    full_optimizer_state,
    replicate,
    shard_optimizer_state,
)
from desktune.training.distributed import start as join_group
from desktune.training.distributed import stop as leave_group
from desktune.training.monitor import Listener, Monitor
from desktune.training.objectives import objective_for
from desktune.training.optim import effective_optimizer, make_optimizer, make_scheduler, reschedule
from desktune.training.replay import replay_set
from desktune.training.resume import capture_rng, check_compatible, config_fingerprint, data_fingerprint, restore_rng
from desktune.training.signals import GracefulStop, StopToken, TrainingInterrupted
from desktune.training.speed import Switches, choose_switches, switched_on
from desktune.training.state import TrainState
from desktune.training.step import (
    NonFiniteGuard,
    StepOutcome,
    Trainer,
    is_out_of_memory,
    kept_note,
    release_cached_memory,
    train_step,
)
from desktune.training.watch import Best, ForgettingWatch, early_stop


@dataclass
class Run:
    """Everything a run needs, built by `setup` before the first step."""

    cfg: RunConfig
    run_dir: Path
    loaded: LoadedModel
    model: Any  # the peft model
    train_set: list[Example]
    val_set: list[Example]
    data_stats: Any
    trainable: TrainableReport
    console: Console
    quiet: bool = False
    fit_note: str | None = None  # what fitting to train.memory_budget changed
    chosen: list[str] = field(default_factory=list)  # what `auto` settings became, and why
    switches: Switches = field(default_factory=Switches)  # speed/memory switches in use (set by fit)
    dist: Dist = field(default_factory=Dist)  # this process among the run's (torchrun); one process: rank 0 of 1
    replica: Replica | None = None  # the DDP wrapper or FSDP2-sharded layers (set by fit; several processes)
    started: float = field(default_factory=time.perf_counter)  # when the run began: train.time_budget counts from it

    @property
    def dir(self) -> RunDir:
        return RunDir(self.run_dir)


@dataclass
class RunResult:
    """What a finished run produced and measured."""

    run_dir: Path
    adapter_dir: Path
    adapter_bytes: int
    steps: int
    train_losses: list[float]
    val_losses: list[tuple[int, float]]
    tokens_per_s: float
    wall_s: float
    train_s: float  # time inside optimizer steps (forward, backward, update): no loading, validation or saving
    trainable: TrainableReport
    best_step: int | None = None  # where best/ came from, when a validation before the end beat the final one
    outcome: Outcome = field(default_factory=lambda: Outcome(True))  # did it teach anything (the CLI's exit code)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final_train_loss(self) -> float:
        return self.train_losses[-1]

    @property
    def final_val_loss(self) -> float | None:
        return self.val_losses[-1][1] if self.val_losses else None


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- setup


def setup(cfg: RunConfig, *, console: Console | None = None, quiet: bool = False,
          existing: Path | None = None, dist: Dist | None = None) -> Run:
    """Resolve hardware, load the base, attach adapters and encode the data; nothing has trained yet.

    `existing` reuses a run folder (to resume it) instead of making a new one. With several processes (`dist`),
    rank 0 makes the run folder and writes its config; every rank loads the model and data.
    """
    started, console, dist = time.perf_counter(), console or make_console(stderr=True), dist or Dist()
    hw = detect(cfg.train.device, cfg.model.dtype)
    hw = decide_attention(replace(hw, device=device_for(dist, hw.device)), cfg.data.packing)  # built now if used
    check_settings(dist, hw.device, cfg.train.offload_params)
    cfg, fit_note = fit_to_budget(cfg, hw, nproc=dist.world)  # before anything loads: refuse when nothing fits
    if fit_note is None:
        refuse_beyond_machine(cfg, hw, nproc=dist.world)  # no budget to fit: still never past all the memory
    set_threads(cfg.train.threads, processes=dist.local_world)
    seed_everything(cfg.train.seed)
    if existing is not None:
        if not quiet:
            console.print(f"resuming run folder: [bold]{existing}[/]")
        return _prepare(cfg, existing, hw, console, quiet, dist, started)
    made_output = not Path(cfg.output_dir).exists()
    run_dir = shared_run_dir(cfg, dist)
    if not dist.is_main:
        return _prepare(cfg, run_dir.path, hw, console, True, dist, started)
    try:
        write_config(cfg, run_dir)
        if not quiet:
            console.print(f"run folder: [bold]{run_dir.path}[/]  device: {hw.name}  precision: {str(hw.dtype)[6:]}")
            if fit_note:
                console.print(fit_note)
        run = _prepare(cfg, run_dir.path, hw, console, quiet, dist, started)
        run.fit_note = fit_note
        write_config(run.cfg, run_dir)  # with the values `auto` chose
    except BaseException:  # a user error, a library's or Ctrl-C: nothing trained, so leave no run behind
        if run_dir.path.is_dir() and (run_dir.holds_only_config() or not any(run_dir.path.iterdir())):
            shutil.rmtree(run_dir.path, ignore_errors=True)
        if made_output and run_dir.path.parent.is_dir() and not any(run_dir.path.parent.iterdir()):
            run_dir.path.parent.rmdir()  # the output_dir this run made, left empty
        raise
    return run


def shared_run_dir(cfg: RunConfig, dist: Dist) -> RunDir:
    """A new run folder: made by rank 0, its path handed to the other ranks (one process: simply made)."""
    if not dist.active:
        return new_run_dir(cfg.output_dir, cfg.run_name)
    made, error = None, None
    if dist.is_main:
        try:
            made = new_run_dir(cfg.output_dir, cfg.run_name)
        except DesktuneError as e:
            error = e
    path = from_main(dist, None if made is None else str(made.path))
    if error is not None:
        raise error
    if path is None:
        raise DesktuneError("rank 0 could not make the run folder (its message says why)", where=f"rank {dist.rank}")
    return RunDir(Path(path))


def write_config(cfg: RunConfig, run_dir: RunDir) -> None:
    """The run's config.yaml; a full disk or a read-only folder is the user's to fix."""
    try:
        dump_config(cfg, run_dir.config)
    except OSError as e:
        raise DesktuneError(f"cannot write the run's config ({e.strerror or e})", where=str(run_dir.config),
                            fix="free space on that disk, or choose another output_dir (-o output_dir=...)") from e


def _prepare(cfg: RunConfig, run_dir: Path, hw: Hardware, console: Console, quiet: bool, dist: Dist,
             started: float) -> Run:
    """Model, adapters and data of a run whose folder exists."""
    loaded = load_model(cfg.model, hw, shardable=dist.active and dist.mode == "fsdp2")
    resolve_chat_template(loaded.tokenizer, cfg.model.chat_template)
    seed_everything(cfg.train.seed)  # adapter initialisation depends only on the seed
    model = with_adapters(loaded, cfg)
    report = trainable_report(model)
    train_set, val_set, stats = build_datasets(cfg.data, loaded.tokenizer, cfg.train.seed)
    cfg = cfg.model_copy(update={"data": stats.resolved(cfg.data)})  # data.val_fraction: auto, as chosen
    cfg, chosen = resolve_auto(cfg, report.total - report.trainable, len(train_set), stats.format != "text")
    replay = replay_set(cfg, model, loaded.tokenizer, loaded.base_path, loaded.hardware.dtype, len(train_set),
                        cache_dir() / "reference")
    train_set, chosen = [*train_set, *replay.examples], [*chosen, *([replay.note] if replay.note else [])]
    if not quiet:
        console.print(f"base: {loaded.base_path}  quantization: {loaded.quant_backend}")
        console.print(str(report))
        console.print(f"data: {stats.summary()}")
        for note in [*stats.notes, *chosen]:
            console.print(f"note: {note}")
    return Run(cfg=cfg, run_dir=run_dir, loaded=loaded, model=model, train_set=train_set, val_set=val_set,
               data_stats=stats, trainable=report, console=console, quiet=quiet, chosen=chosen, dist=dist,
               started=started)


def with_adapters(loaded: LoadedModel, cfg: RunConfig) -> Any:
    """The base with LoRA attached; running out of memory doing so is the usual message, not a traceback."""
    try:
        return attach_lora(loaded.model, cfg.lora, gradient_checkpointing=cfg.train.gradient_checkpointing)
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError and the CPU allocator's failure
        if not (isinstance(e, MemoryError) or is_out_of_memory(e)):
            raise
        raise DesktuneError(f"out of memory while attaching the adapters ({str(e).splitlines()[0][:120]})",
                            where=f"lora.r={cfg.lora.r}", fix="lower lora.r or lora.target_modules; `desktune plan "
                            "CONFIG` shows what a setting needs before anything loads") from e


def resolve_auto(cfg: RunConfig, base_params: int, n_train: int, chats: bool) -> tuple[RunConfig, list[str]]:
    """The config with `auto` values chosen (learning rate, epochs, replay), and the reasons; explicit values
    win."""
    chosen: dict[str, float] = {}
    reasons = []
    data = cfg.data
    if data.replay == "auto":
        c = auto_replay(chats)
        data, reasons = data.model_copy(update={"replay": c.value}), [c.reason]
    if cfg.train.lr == "auto":
        c = auto_lr(base_params, cfg.lora.r, cfg.lora.use_rslora, method_name(cfg))
        chosen["lr"], reasons = c.value, [*reasons, c.reason]
    if cfg.train.epochs == "auto":
        c = auto_epochs(n_train, budgeted=bool(cfg.train.time_budget))
        chosen["epochs"] = c.value
        reasons += [] if cfg.train.max_steps else [c.reason]
    train = cfg.train.model_copy(update=chosen)
    return cfg.model_copy(update={"train": train, "data": data}), reasons


def total_steps(cfg: RunConfig, n_train: int) -> int:
    """Optimizer steps of the run: max_steps, else epochs x samples / effective batch (rounded up)."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * n_train / cfg.train.samples_per_step))


def make_trainer(run: Run, steps: int) -> Trainer:
    """Optimizer, schedule, loss scaler and objective for the run's trainable parameters."""
    tcfg, hw = run.cfg.train, run.loaded.hardware
    params = [p for p in run.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, tcfg, hw.device)
    return Trainer(
        model=run.model, params=params, optimizer=optimizer, scheduler=make_scheduler(optimizer, tcfg, steps),
        # loss scaling keeps fp16 gradients from underflowing; a no-op (enabled=False) in bf16/fp32
        scaler=torch.amp.GradScaler(hw.device.type, enabled=hw.dtype == torch.float16),
        objective=objective_for(run.cfg), switches=run.switches, device=hw.device,
        pad_id=run.loaded.tokenizer.pad_token_id, packing=run.cfg.data.packing,
        group_by_length=run.cfg.data.group_by_length, max_grad_norm=tcfg.max_grad_norm,
        micro=tcfg.micro_batch_size, total_steps=steps, last_checkpoint=run.dir.latest_checkpoint, dist=run.dist,
        replica=run.replica)


# ---------------------------------------------------------------- the run


@dataclass
class History:
    """Losses and throughput so far (restored from the record on resume)."""

    train_losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens: int = 0
    train_s: float = 0.0
    step_s: list[float] = field(default_factory=list)  # each step's wall time since the last (records and all)
    step_tokens: list[int] = field(default_factory=list)
    last_added: float | None = None
    best: Best = field(default_factory=Best)  # the lowest validation loss, its step, validations since
    val_s: float = 0.0  # seconds the last validation took
    val_micro: int = 0  # validation's micro-batch once out of memory halved it (0: the training one)
    kept: list[Record] = field(default_factory=list)  # a resumed run's earlier records

    def add(self, out: StepOutcome) -> None:
        self.train_losses.append(out.loss)
        self.tokens += out.tokens
        self.train_s += out.seconds
        now = time.perf_counter()
        self.step_s.append(out.seconds if self.last_added is None else now - self.last_added)
        self.step_tokens.append(out.tokens)
        self.last_added = now


def fit(run: Run, *, resume: Path | None = None, state: TrainState | None = None,
        accept_changes: bool = False, stop: StopToken | None = None, listeners: Sequence[Listener] = ()) -> RunResult:
    """Train the adapters of a prepared run (from a checkpoint when `resume` is given: its `state`, read here
    when not passed) and save them. `stop` (or the run folder's STOP file) stops it after a step, as Ctrl-C does;
    each of `listeners` gets every record as it is written."""
    hw = run.loaded.hardware
    if resume is not None and state is None:
        state = load_state(resume)
    with switched_on(run.model, choose_switches(run.cfg, hw.device, hw.dtype)) as switches:
        run.switches = switches
        return _fit(run, resume, state, accept_changes, stop_token(run, stop), listeners)


def stop_token(run: Run, given: StopToken | None) -> StopToken:
    """The caller's token (or a new one) watching the run folder's STOP file; a STOP left from an earlier stop is
    removed first, so a resumed run goes on. Only rank 0 watches: the ranks agree through `any_rank`."""
    token = given or StopToken()
    if run.dist.is_main:
        run.dir.stop_request.unlink(missing_ok=True)
        token.file = token.file or run.dir.stop_request
    return token


def _fit(run: Run, resume: Path | None, state: TrainState | None, accept_changes: bool,
         token: StopToken, listeners: Sequence[Listener]) -> RunResult:
    wall0, cfg = run.started, run.cfg
    steps = state.total_steps if state and state.total_steps else total_steps(cfg, len(run.train_set))
    saver, hist = Saver.for_run(run), History()
    if state is not None:  # the adapter goes in before the model is wrapped (FSDP2 shards it)
        check_compatible(state, run.cfg, resume, accept_changes, data_now=saver.fingerprints["data_fingerprint"])
        load_adapter_weights(run.model, resume)
    run.replica = replicate(run.model, run.dist, run.loaded.hardware.device, cfg.train.offload_params)
    tr = make_trainer(run, steps)
    if state is not None:
        restore(run, tr, state, hist)
    start = state.step if state else 0
    samples = step_samples(run, start)
    with Monitor(run.dir, steps, run.console, quiet=run.quiet, diagnostics=diagnostics_for(run, steps),
                 records=run.dist.is_main, listeners=listeners) as mon, GracefulStop(token) as stop:
        forgetting = begin(run, tr, mon, hist, state, resume)
        refits, refit = Refits(cfg.train.warmup_ratio), None
        if state is None and cfg.train.time_budget:
            steps, samples = within_budget(run, tr, mon, hist, samples, wall0)
            refit = refits.next(steps, 0)
        guard, ended, step = NonFiniteGuard(last_checkpoint=run.dir.latest_checkpoint), steps, start
        while step < steps:
            step = tr.step = step + 1
            if step - 1 == refit:  # before this step's update: the schedule it follows is the one recorded
                steps = ended = refit_budget(run, tr, mon, hist, wall0)
                refit = refits.next(steps, step - 1)
            out = train_step(tr, next(samples), mon)
            if not guard.accept(out, tr, mon):
                continue
            hist.add(out)
            mon.step(train_record(run, tr, out))
            halt = between_steps(run, tr, mon, hist, saver, forgetting, steps) or diverged(run, tr, mon)
            saved = saver.checkpoint(tr, mon) if due(cfg.checkpoint.every, step, steps) or halt else None
            if halt is not None:
                mon.diagnose(halt)
                ended = step
                break
            if any_rank(run.dist, bool(stop.requested), tr.device) and step != steps:  # all stop at one step
                stopped(run, tr, mon, saver, saved, stop.requested)
        if run.val_set and (not hist.val_losses or hist.val_losses[-1][0] != ended):
            tr.step = ended
            validate(run, tr, mon, hist)
        adapter_dir, size = saver.final(ended, mon)
        best_step = keep_best(run, hist, ended, mon)
        outcome = judge(run, mon, hist, ended)
        if not outcome.learned and best_step is not None:
            adapter_dir, best_step = saver.promote_best(mon, best_step), None
    return RunResult(run_dir=run.run_dir, adapter_dir=adapter_dir, adapter_bytes=size, steps=ended,
                     train_losses=hist.train_losses, val_losses=hist.val_losses,
                     tokens_per_s=hist.tokens / max(hist.train_s, 1e-9), wall_s=time.perf_counter() - wall0,
                     train_s=hist.train_s, trainable=run.trainable, best_step=best_step, outcome=outcome)


def stopped(run: Run, tr: Trainer, mon: Monitor, saver: Saver, saved: Path | None, why: str | None) -> None:
    """A requested stop: checkpoint (unless this step just made one), record it, consume the STOP file, raise."""
    saved = saved or saver.checkpoint(tr, mon)
    mon.event(f"{why or 'stop asked on another rank'}: stopped after step {tr.step}", name="stopped", step=tr.step)
    if run.dist.is_main:
        run.dir.stop_request.unlink(missing_ok=True)
    raise TrainingInterrupted(tr.step, str(saved))


def diverged(run: Run, tr: Trainer, mon: Monitor) -> Finding | None:
    """A reason to stop when the diagnostics found the loss diverging (every rank stops at the same step)."""
    said = mon.diagnostics is not None and "loss_diverging" in mon.diagnostics.fired
    if not any_rank(run.dist, said, tr.device):
        return None
    return Finding("stopped_diverging", tr.step, f"stopped at step {tr.step}: the training loss diverged (above); "
                   "more steps would only take the model further from the base", {})


def judge(run: Run, mon: Monitor, hist: History, ended: int) -> Outcome:
    """Whether the run taught the model anything; a failure is recorded as the run's last event."""
    fired = mon.diagnostics.fired if mon.diagnostics is not None else frozenset()
    outcome = judge_outcome(fired, ended, hist.val_losses, hist.train_losses)
    if not outcome.learned:
        mon.event(f"the run did not teach the model: {outcome.reason}", name="run_failed", step=ended,
                  show=False, check=outcome.check)
    return outcome


def diagnostics_for(run: Run, steps: int) -> Diagnostics | None:
    """The live checks of a run (None when train.diagnostics is off)."""
    if not run.cfg.train.diagnostics or not run.dist.is_main:
        return None
    device = run.loaded.hardware.device
    return Diagnostics(Limits(total_steps=steps, memory_budget_bytes=memory_limit(run.cfg, device),
                              lr=run.cfg.train.lr))


def memory_limit(cfg: RunConfig, device: torch.device) -> int:
    """What memory-near-budget compares with: train.memory_budget, else what the device can give this run."""
    budget = cfg.train.memory_budget
    if budget and budget not in ("auto", "none"):
        return parse_size(budget)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return memory_in_use(device) + free_memory(device)


def between_steps(run: Run, tr: Trainer, mon: Monitor, hist: History, saver: Saver,
                  forgetting: ForgettingWatch | None, steps: int) -> Finding | None:
    """Validation (keeping the best adapter) and forgetting when due; a reason to stop early, if any."""
    cfg, step = run.cfg, tr.step
    halt = None
    if run.val_set and due(cfg.train.eval_every, step, steps):
        if validate(run, tr, mon, hist):
            saver.best(tr, mon, hist.best.loss)
        halt = early_stop(cfg, hist.best, step)
    if forgetting is not None and due(cfg.train.forgetting_every, step, steps):
        rec = forgetting.measure(run, step)
        mon.forgetting(rec)
        warning = forgetting.judge(cfg, rec)
        if warning is not None and cfg.train.forgetting_stop:
            halt = halt or warning
        elif warning is not None:
            mon.diagnose(warning)
    return halt


def keep_best(run: Run, hist: History, ended: int, mon: Monitor) -> int | None:
    """Keep best/ only when a validation before the end beat the final one, and say where it is; its step, or
    None when the final adapter is the best (best/ is removed, and a record says so)."""
    best, final = hist.best, hist.val_losses[-1] if hist.val_losses else None
    if not run.dist.is_main or not run.dir.best.is_dir():
        return None
    if final is None or best.step is None or best.step >= ended or final[1] <= best.loss:
        shutil.rmtree(run.dir.best, ignore_errors=True)
        mon.event(f"the final adapter is the best one: {run.dir.best} (saved at a lower validation loss earlier) "
                  f"was removed", name="best_removed", step=ended, show=False, path=str(run.dir.adapter))
        return None
    mon.event(f"the lowest validation loss was {best.loss:.4f} at step {best.step} (final {final[1]:.4f}): its "
              f"adapter is in {run.dir.best}", name="best", step=best.step, val_loss=best.loss)
    return best.step


def due(every: int | None, step: int, steps: int) -> bool:
    """Every N steps, but not at the last step (the end of the run does its own)."""
    return bool(every) and step % every == 0 and step != steps


def step_samples(run: Run, start: int) -> Iterator[list[Example]]:
    """The samples of each optimizer step, in the seeded order, from the step after `start` on."""
    per_step = run.cfg.train.samples_per_step
    stream = example_stream(len(run.train_set), run.cfg.train.seed, run.cfg.data.shuffle, start=start * per_step)
    while True:
        yield [run.train_set[next(stream)] for _ in range(per_step)]


def train_record(run: Run, tr: Trainer, out: StepOutcome) -> TrainRecord:
    """The record of an optimizer step that updated the weights."""
    return TrainRecord(step=tr.step, loss=out.loss, lr=out.lr, grad_norm=out.grad_norm, tokens=out.tokens,
                       target_tokens=out.target_tokens, tokens_per_s=out.tokens / out.seconds,
                       mem_bytes=memory_in_use(tr.device), step_s=round(out.seconds, 4),
                       epoch=round(tr.step * run.cfg.train.samples_per_step / len(run.train_set), 4),
                       **asdict(memory_telemetry(tr.device)))


def validate(run: Run, tr: Trainer, mon: Monitor, hist: History) -> bool:
    """Mean loss per target token on the validation set, recorded at the current step; True at a new best."""
    t0 = time.perf_counter()
    v, n = validation_loss(run, tr, mon, hist)
    hist.val_s = time.perf_counter() - t0
    hist.val_losses.append((tr.step, v))
    mon.eval(tr.step, v, n)
    return hist.best.update(tr.step, v)


def validation_loss(run: Run, tr: Trainer, mon: Monitor, hist: History) -> tuple[float, int]:
    """Mean validation loss and target count; on out of memory, halve validation's micro-batch (for the rest of
    the run) and redo it: it computes no gradients, so nothing else changes."""
    while True:
        micro = min(tr.micro, hist.val_micro or tr.micro)
        try:
            return mean_target_loss(run.model, run.val_set, micro, tr.pad_id, tr.device, tr.packing)
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(e):
                raise
            if micro == 1:
                raise DesktuneError(
                    f"out of memory in validation at step {tr.step} even with micro-batch 1",
                    where="data.max_seq_len", fix="lower data.max_seq_len (the longest validation samples decide), "
                    f"turn on train.gradient_checkpointing, or load the base with model.quant: nf4; {tr.kept()}",
                ) from e
            del e  # its traceback holds the failed pass's tensors
        release_cached_memory(tr.device)
        hist.val_micro = max(1, micro // 2)
        mon.event(f"out of memory in validation at step {tr.step}: its micro-batch {micro} -> {hist.val_micro}; "
                  "redoing it", name="val_oom_recovery", step=tr.step, val_micro_batch_size=hist.val_micro)


def restore(run: Run, tr: Trainer, state: TrainState, hist: History) -> None:
    """Put a checkpoint's optimizer, schedule, loss scale and history back (adapter: before wrapping; RNG: in
    `begin`). A full optimizer state is cut to this rank's shards under fsdp2."""
    tr.optimizer.load_state_dict(
        shard_optimizer_state(tr.optimizer, state.optimizer) if run.dist.sharded else state.optimizer)
    tr.scheduler.load_state_dict(state.scheduler)
    tr.scaler.load_state_dict(state.scaler)
    tr.micro = state.micro_batch_size
    kept = truncate_records(run.dir.metrics, state.step, rewrite=run.dist.is_main)
    hist.train_losses += [r.loss for r in records_of(kept, TrainRecord)]
    hist.val_losses += [(r.step, r.val_loss) for r in records_of(kept, EvalRecord)]
    hist.best, hist.kept = Best.of(kept), kept


def within_budget(run: Run, tr: Trainer, mon: Monitor, hist: History, samples: Iterator[list[Example]],
                  wall0: float) -> tuple[int, Iterator[list[Example]]]:
    """Time the first steps, fix the step count that ends within train.time_budget, and schedule to it; a budget
    too short to teach is refused here, before any update (unless train.short_budget says train)."""
    tcfg, wish = run.cfg.train, tr.total_steps
    head, samples = first_steps(samples)
    mon.print(f"time budget {tcfg.time_budget}: {time.perf_counter() - wall0:.0f} s spent so far (loading, data, "
              f"replay, validation); timing {len(head)} steps to fix the step count")
    step_s = time_steps(tr, head, mon) * mean_step_tokens(run.train_set, tcfg.samples_per_step)
    budget, spent = parse_duration(tcfg.time_budget), time.perf_counter() - wall0
    steps = from_main(run.dist, fit_steps(budget, spent, step_s, wish, hist.val_s, tcfg.eval_every))
    if steps < min(wish, MIN_TEACHING_STEPS):
        too_short(run, mon, steps, needed_s(spent, step_s, hist.val_s, tcfg.eval_every, min(wish, MIN_TEACHING_STEPS)))
    tr.total_steps, tr.scheduler = steps, make_scheduler(tr.optimizer, tcfg, steps)
    mon.retarget(steps)
    mon.event(f"time budget {tcfg.time_budget}: a step takes {step_s:.2f} s (measured per token, at the data's "
              f"mean step length), so {steps} steps fit "
              f"(without the budget: {wish}); the schedule ends at step {steps}", name="time_budget",
              steps=steps, wish=wish, step_s=step_s, budget_s=budget, spent_s=spent)
    return steps, samples


def too_short(run: Run, mon: Monitor, steps: int, need_s: float) -> None:
    """A budget that fits fewer than MIN_TEACHING_STEPS steps: refused with the shortest that would, or noted."""
    tcfg, shortest = run.cfg.train, shortest_budget(need_s)
    message = (f"train.time_budget {tcfg.time_budget} fits only {steps} optimizer step(s) (the run has spent "
               f"{time.perf_counter() - run.started:.0f} s loading, preparing and timing), too few to teach anything "
               f"(at least {MIN_TEACHING_STEPS} are needed)")
    if tcfg.short_budget == "refuse":
        mon.event(message, name="budget_too_short", show=False, steps=steps, shortest=shortest)
        raise DesktuneError(message, where="train.time_budget",
                            fix=f"set train.time_budget: {shortest} or more (-o train.time_budget={shortest}), or "
                            "train anyway with -o train.short_budget=train")
    mon.event(f"{message}; training anyway (train.short_budget: train)", name="budget_too_short", steps=steps,
              shortest=shortest)


def refit_budget(run: Run, tr: Trainer, mon: Monitor, hist: History, wall0: float) -> int:
    """Fit the count again from the later half of the real steps so far, and rebuild the schedule to end there."""
    tcfg, done, before = run.cfg.train, tr.step - 1, tr.total_steps
    step_s = real_token_s(hist.step_s, hist.step_tokens) * mean_step_tokens(run.train_set, tcfg.samples_per_step)
    wish = total_steps(run.cfg, len(run.train_set))
    steps = fit_steps(parse_duration(tcfg.time_budget), time.perf_counter() - wall0, step_s, wish, hist.val_s,
                      tcfg.eval_every, done=done)
    steps = from_main(run.dist, within_warmup(steps, done, tcfg.warmup_ratio))
    if steps == before:
        return steps
    tr.total_steps, tr.scheduler = steps, reschedule(tr.optimizer, tr.scheduler, tcfg, steps)
    mon.retarget(steps)
    mon.event(f"time budget {tcfg.time_budget}: the last {len(hist.step_s) - len(hist.step_s) // 2} steps took "
              f"{step_s:.2f} s a step (at the data's mean step length), so the run ends at step {steps}, not "
              f"{before}; the schedule is rebuilt to end there", name="time_budget_refit", steps=steps, before=before,
              step_s=step_s, at=done)
    return steps


def begin(run: Run, tr: Trainer, mon: Monitor, hist: History, state: TrainState | None,
          resume: Path | None) -> ForgettingWatch | None:
    """Right before the first step: a resumed run restores its RNG; a new one says what it should and validates.

    With train.forgetting_every, the base answers the general reference first (cached per model)."""
    forgetting = forgetting_watch(run, mon, hist.kept)
    run.model.train()
    if state is not None:
        if mon.diagnostics is not None:
            mon.diagnostics.replay(hist.kept)  # what the first part of the run reported is not said again
        restore_rng(state.rng)
        mon.event(f"resumed from {resume} at step {state.step}", name="resumed", step=state.step)
        return forgetting
    announce(run, mon, tr.device)
    if run.val_set:
        validate(run, tr, mon, hist)
    return forgetting


def forgetting_watch(run: Run, mon: Monitor, kept: list[Record]) -> ForgettingWatch | None:
    """The reference forgetting is measured on during training (None unless train.forgetting_every is set);
    a resumed run that already warned does not warn again."""
    if not run.cfg.train.forgetting_every:
        return None
    t0, loaded = time.perf_counter(), run.loaded
    ref = reference_set(run.model, loaded.tokenizer, builtin_reference(), base_path=loaded.base_path,
                        variant=load_variant(run.cfg.model.quant, loaded.hardware.dtype),
                        max_seq_len=run.cfg.data.max_seq_len, cache=cache_dir() / "reference")
    how = "from the cache" if ref.cached else "generated now, cached for later runs"
    mon.event(f"forgetting reference: {ref.name}, the base's answers {how} ({time.perf_counter() - t0:.0f} s)",
              name="forgetting_reference", prompts=len(ref.examples), cached=ref.cached)
    warned = any(isinstance(r, EventRecord) and r.data.get("check") == "forgetting" for r in kept)
    return ForgettingWatch(ref, warned=warned)


def announce(run: Run, mon: Monitor, device: torch.device) -> None:
    """Log what a new run should know before its first step."""
    stats, tcfg = run.data_stats, run.cfg.train
    for reason in run.chosen:  # printed by setup already
        mon.event(reason, name="auto_setting", show=False)
    if run.fit_note:  # printed by setup already
        mon.event(run.fit_note, name="memory_fit", show=False, micro_batch_size=tcfg.micro_batch_size,
                  grad_accum=tcfg.grad_accum, gradient_checkpointing=tcfg.gradient_checkpointing)
    if stats.n_truncated:
        mon.event(f"{stats.n_truncated} sample(s) longer than max_seq_len={run.cfg.data.max_seq_len} were truncated",
                  name="truncated", truncated=stats.n_truncated)
    if stats.n_skipped:  # the note with the rows was printed by setup
        mon.event(f"{stats.n_skipped} bad row(s) skipped (data.bad_rows: skip)", name="bad_rows_skipped",
                  show=False, skipped=stats.n_skipped)
    if stats.n_ends_on_user:
        mon.event(f"{stats.n_ends_on_user} conversation(s) end on a user turn", name="ends_on_user", show=False,
                  conversations=stats.n_ends_on_user)
    if stats.n_dropped:
        mon.event(f"{stats.n_dropped} sample(s) had no token to train on and were dropped", name="dropped", show=False,
                  dropped=stats.n_dropped)
    if tcfg.diagnostics:
        base_params = run.trainable.total - run.trainable.trainable
        for finding in before_training(run.cfg, run.train_set, run.loaded.tokenizer, base_params, stats.n_truncated):
            mon.diagnose(finding)
    used = effective_optimizer(tcfg.optimizer, device)
    if used != tcfg.optimizer:
        mon.event(f"{tcfg.optimizer} needs CUDA; using {used} on {device.type}", name="optimizer_fallback",
                  optimizer=used)
    elif used.startswith("paged_") and device.type != "cuda":
        mon.event(f"{used}: paging needs CUDA; bitsandbytes keeps its state unpaged on {device.type}",
                  name="optimizer_fallback", optimizer=used)
    for note in run.switches.notes:
        mon.event(note, name="switch_off")
    if run.loaded.hardware.attention_note:
        mon.event(run.loaded.hardware.attention_note, name="attention_fallback")


@dataclass
class Saver:
    """Writes the run's checkpoints and final adapter, with what trained them."""

    run: Run
    meta: dict[str, Any]  # desktune.json of every adapter folder
    fingerprints: dict[str, Any]  # config and data, computed once per run

    @classmethod
    def for_run(cls, run: Run) -> Saver:
        loaded = run.loaded
        meta = {"desktune_version": VERSION, "base_model": loaded.base_path, "quant": run.cfg.model.quant,
                "quant_backend": loaded.quant_backend, "dtype": str(loaded.hardware.dtype)[6:]}
        return cls(run, meta, {"config_fingerprint": config_fingerprint(run.cfg),
                               "data_fingerprint": data_fingerprint(run.cfg)})

    @contextmanager
    def writing(self, folder: Path, what: str, rescued: Path | None = None) -> Iterator[None]:
        """A failed write of `folder` (a full disk) becomes one message naming it and saying only what is true of
        what was kept; the atomic write left the folders saved before as they were."""
        try:
            yield
        except (OSError, SafetensorError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
            full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
            raise DesktuneError(f"cannot write {what} ({why})", where=str(folder),
                                fix=("free space on that disk" if full else "make the run folder writable")
                                + self._kept(rescued)) from e

    def _kept(self, rescued: Path | None) -> str:
        """What of the trained weights survives a failed write: a rescued copy, a checkpoint, or nothing."""
        last = self.run.dir.latest_checkpoint()
        if rescued is not None:
            return f"; the trained adapter was written to {rescued} instead: move it to {self.run.dir.adapter}"
        if last is not None:
            return f", then continue with desktune train CONFIG --resume {self.run.run_dir} ({kept_note(last)})"
        return "; no checkpoint of this run exists, so it must be trained again (checkpoint.every saves some)"

    def _weights(self) -> dict[str, torch.Tensor] | None:
        """FSDP2: the adapter gathered from every rank's shards (all ranks call); else the model saves its own."""
        return full_adapter_state(self.run.model) if self.run.dist.sharded else None

    def checkpoint(self, tr: Trainer, mon: Monitor) -> Path:
        """A resumable checkpoint after step `tr.step` (written by rank 0; the optimizer's state gathered, so it
        resumes on any number of processes); older ones beyond checkpoint.keep_last are deleted."""
        optimizer = full_optimizer_state(tr.optimizer) if self.run.dist.sharded else tr.optimizer.state_dict()
        state = TrainState(step=tr.step, micro_batch_size=tr.micro, optimizer=optimizer,
                           scheduler=tr.scheduler.state_dict(), scaler=tr.scaler.state_dict(), rng=capture_rng(),
                           total_steps=tr.total_steps, **self.fingerprints)
        folder, weights = self.run.dir.checkpoint(tr.step), self._weights()
        if not self.run.dist.is_main:
            return folder
        with self.writing(folder, "the checkpoint"):
            out = save_checkpoint(self.run.model, self.run.loaded.tokenizer, folder,
                                  base_path=self.run.loaded.base_path, meta={**self.meta, "step": tr.step},
                                  state=state, weights=weights)
        self.run.dir.prune_checkpoints(self.run.cfg.checkpoint.keep_last)
        mon.checkpoint(tr.step, out)
        return out

    def _adapter(self, folder: Path, what: str, meta: dict[str, Any]) -> Path:
        """An adapter folder written by rank 0 (from the gathered weights under fsdp2)."""
        weights = self._weights()
        if not self.run.dist.is_main:
            return folder
        with self.writing(folder, what):
            return self._write(folder, {**self.meta, **meta}, weights)

    def _write(self, folder: Path, meta: dict[str, Any], weights: dict[str, torch.Tensor] | None) -> Path:
        return save_adapter(self.run.model, self.run.loaded.tokenizer, folder, base_path=self.run.loaded.base_path,
                            meta=meta, weights=weights)

    def _final(self, steps: int) -> Path:
        """The final adapter; when its disk is full, a copy in the system's temporary folder keeps the weights."""
        folder, meta, weights = self.run.dir.adapter, {**self.meta, "step": steps}, self._weights()
        if not self.run.dist.is_main:
            return folder
        try:
            with self.writing(folder, "the final adapter"):
                return self._write(folder, meta, weights)
        except DesktuneError as failed:
            rescued = self._rescue(meta, weights)
            if rescued is None:
                raise
            with self.writing(folder, "the final adapter", rescued):
                raise failed.__cause__ from None  # the same failure, said with where the weights went

    def _rescue(self, meta: dict[str, Any], weights: dict[str, torch.Tensor] | None) -> Path | None:
        """The final adapter in the system's temporary folder (None when that cannot be written either)."""
        try:
            return self._write(rescue_dir(self.run.run_dir), meta, weights)
        except (OSError, SafetensorError):
            return None

    def best(self, tr: Trainer, mon: Monitor, val_loss: float) -> Path:
        """The adapter of a new lowest validation loss, in best/ (replaced at each new best)."""
        out = self._adapter(self.run.dir.best, "the best adapter", {"step": tr.step, "val_loss": val_loss})
        mon.event(f"new best validation loss {val_loss:.4f}: adapter kept in {out}", name="best_saved",
                  step=tr.step, show=False, val_loss=val_loss)
        return out

    def promote_best(self, mon: Monitor, best_step: int) -> Path:
        """A failed run's result is its best adapter: best/ becomes the adapter folder (the last weights are
        dropped: they are what failed)."""
        adapter, best = self.run.dir.adapter, self.run.dir.best
        with self.writing(adapter, "the best adapter as the result"):
            shutil.rmtree(adapter, ignore_errors=True)
            best.rename(adapter)
        mon.event(f"the result is the best adapter, of step {best_step}: moved from {best} to {adapter}",
                  name="best_promoted", step=best_step, path=str(adapter))
        return adapter

    def final(self, steps: int, mon: Monitor) -> tuple[Path, int]:
        """The final adapter folder and its weights' size (0 on ranks that do not write)."""
        out = self._final(steps)
        size = adapter_size(out) if self.run.dist.is_main else 0
        mon.saved(steps, out, size)
        return out, size


def train(cfg: RunConfig, *, console: Console | None = None, quiet: bool = False,
          resume: str | Path | bool | None = None, accept_changes: bool = False,
          stop: StopToken | None = None, listeners: Sequence[Listener] = ()) -> RunResult:
    """Set up and run one fine-tuning run; `resume` continues one exactly from a checkpoint; `stop` lets a caller
    stop it after a step (TrainingInterrupted, resumable); `listeners` get every record of the training loop as it
    is written. Under torchrun each process is one rank of the run (only rank 0 prints and writes)."""
    dist = from_env(cfg.train.distributed)
    join_group(dist, pick_device(cfg.train.device), cfg.train.collective_timeout_s)
    try:
        return _train(cfg, dist, console, quiet or not dist.is_main, resume, accept_changes, stop, listeners)
    finally:
        leave_group(dist)


def _train(cfg: RunConfig, dist: Dist, console: Console | None, quiet: bool, resume: str | Path | bool | None,
           accept_changes: bool, stop: StopToken | None, listeners: Sequence[Listener]) -> RunResult:
    if resume:
        point = find_checkpoint(cfg.output_dir, cfg.run_name, resume)
        state = load_state(point)  # before the model loads: a refused or damaged state costs nothing
        run_dir = RunDir.of_checkpoint(point).path
        cfg = cfg.model_copy(update={"output_dir": str(run_dir.parent), "run_name": run_dir.name})
        return fit(setup(cfg, console=console, quiet=quiet, existing=run_dir, dist=dist), resume=point, state=state,
                   accept_changes=accept_changes, stop=stop, listeners=listeners)
    return fit(setup(cfg, console=console, quiet=quiet, dist=dist), stop=stop, listeners=listeners)

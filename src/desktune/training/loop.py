"""The training run, top to bottom: set up, train with token-exact accumulation, validate, save."""

from __future__ import annotations

import gc
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import load_file

from desktune import __version__
from desktune.adapters import TrainableReport, attach_lora, trainable_report
from desktune.config import RunConfig, dump_config
from desktune.data import Example, build_datasets, example_stream, micro_batches, resolve_chat_template
from desktune.errors import DesktuneError
from desktune.hardware import Hardware, detect, human_bytes, memory_in_use, set_threads
from desktune.memory.budget import fit_to_budget
from desktune.models.loading import LoadedModel, load_model
from desktune.training.checkpoint import (
    ADAPTER_WEIGHTS,
    adapter_size,
    is_complete,
    latest_checkpoint,
    load_state,
    prune_checkpoints,
    save_adapter,
    save_checkpoint,
)
from desktune.training.loss import target_ce_sum
from desktune.training.monitor import Monitor
from desktune.training.optim import effective_optimizer, make_optimizer, make_scheduler
from desktune.training.resume import (
    capture_rng,
    check_compatible,
    config_fingerprint,
    data_fingerprint,
    restore_rng,
    truncate_metrics,
)
from desktune.training.signals import GracefulStop, TrainingInterrupted
from desktune.training.speed import Switches, choose_switches, switched_on


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
    fault_hook: Callable[[int, int], None] | None = None  # tests inject faults here: (step, micro_batch_size)
    fit_note: str | None = None  # what fitting to train.memory_budget changed
    switches: Switches = field(default_factory=Switches)  # speed/memory switches in use (set by fit)


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


def make_run_dir(cfg: RunConfig) -> Path:
    """Create OUTPUT_DIR/RUN_NAME; refuse to reuse a named folder that already holds a run."""
    name = cfg.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.output_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        if cfg.run_name:
            raise DesktuneError("the run folder already holds a run", where=str(run_dir),
                                fix="choose another run_name (-o run_name=...) or move the old run away")
        run_dir = Path(f"{run_dir}-{time.time_ns() % 10**6}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise DesktuneError(f"cannot write the run folder ({e.strerror or e})", where=str(run_dir),
                            fix="choose a writable output_dir (-o output_dir=...)") from None
    return run_dir


def setup(cfg: RunConfig, *, console: Console | None = None, quiet: bool = False,
          existing: Path | None = None) -> Run:
    """Resolve hardware, load the base, attach adapters and encode the data; nothing has trained yet.

    `existing` reuses a run folder (to resume it) instead of making a new one.
    """
    console = console or Console(stderr=True)
    hw = detect(cfg.train.device, cfg.model.dtype)
    cfg, fit_note = fit_to_budget(cfg, hw)  # before anything is loaded: refuse early when nothing fits
    set_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    if existing is not None:
        run_dir = existing
        if not quiet:
            console.print(f"resuming run folder: [bold]{run_dir}[/]")
        return _prepare(cfg, run_dir, hw, console, quiet)
    run_dir = make_run_dir(cfg)
    dump_config(cfg, run_dir / "config.yaml")
    if not quiet:
        console.print(f"run folder: [bold]{run_dir}[/]  device: {hw.name}  precision: {str(hw.dtype)[6:]}")
        if fit_note:
            console.print(fit_note)
    try:
        run = _prepare(cfg, run_dir, hw, console, quiet)
        run.fit_note = fit_note
        return run
    except DesktuneError:
        if [p.name for p in run_dir.iterdir()] == ["config.yaml"]:  # nothing trained: leave no empty run behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _prepare(cfg: RunConfig, run_dir: Path, hw: Hardware, console: Console, quiet: bool) -> Run:
    """Model, adapters and data of a run whose folder exists."""
    loaded = load_model(cfg.model, hw)
    resolve_chat_template(loaded.tokenizer, cfg.model.chat_template)
    seed_everything(cfg.train.seed)  # adapter initialisation depends only on the seed
    model = attach_lora(loaded.model, cfg.lora, gradient_checkpointing=cfg.train.gradient_checkpointing)
    report = trainable_report(model)
    train_set, val_set, stats = build_datasets(cfg.data, loaded.tokenizer, cfg.train.seed)
    if not quiet:
        console.print(f"base: {loaded.base_path}  quantization: {loaded.quant_backend}")
        console.print(str(report))
        console.print(f"data: {stats.summary()}")
        for note in stats.notes:
            console.print(f"note: {note}")
    return Run(cfg=cfg, run_dir=run_dir, loaded=loaded, model=model, train_set=train_set, val_set=val_set,
               data_stats=stats, trainable=report, console=console, quiet=quiet)


def target_count(examples: list[Example]) -> int:
    """Positions that are trained on (labels shifted by one, as the loss sees them)."""
    return sum(ex.n_target for ex in examples)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def batch_ce_sum(model: Any, batch: dict[str, torch.Tensor], device: torch.device,
                 chunked: bool = True) -> tuple[torch.Tensor, int]:
    """Summed target cross-entropy of one packed or padded batch (see data.batching)."""
    b = _to_device(batch, device)
    return target_ce_sum(model, b["input_ids"], b["labels"], b.get("attention_mask"),
                         position_ids=b.get("position_ids"), chunked=chunked)


@torch.no_grad()
def validation_loss(model: Any, examples: list[Example], micro_batch_size: int, pad_id: int,
                    device: torch.device, packing: bool = False) -> tuple[float, int]:
    """Mean cross-entropy per target token over a dataset (eval mode, no dropout)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for _, batch in micro_batches(examples, micro_batch_size, packing=packing, pad_id=pad_id):
        s, n = batch_ce_sum(model, batch, device)
        total += float(s)
        count += n
    model.train(was_training)
    return (total / count if count else float("nan")), count


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA/MPS allocator OOM or a failed CPU allocation."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory(device: torch.device) -> None:
    """Drop what the failed step left behind and return cached blocks to the device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def accumulate_gradients(run: Run, examples: list[Example], micro: int, n_targets: int, step: int,
                         scaler: torch.amp.GradScaler | None = None) -> tuple[float, int, list[str]]:
    """Forward and backward over one step's samples in micro-batches.

    Returns the summed loss, the tokens seen, and the sources of samples in micro-batches with a non-finite loss.
    """
    device, pad_id, data = run.loaded.hardware.device, run.loaded.tokenizer.pad_token_id, run.cfg.data
    loss_sum, tokens, nonfinite = 0.0, 0, []
    for chunk, batch in micro_batches(examples, micro, packing=data.packing, pad_id=pad_id,
                                      group_by_length=data.group_by_length):
        if run.fault_hook is not None:
            run.fault_hook(step, micro)
        with run.switches.forward_context(device):
            s, _ = batch_ce_sum(run.model, batch, device, chunked=run.cfg.train.chunked_loss)
        # normalise by the target tokens of the whole accumulated batch: any micro-batch split is exact
        loss = s / max(n_targets, 1)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        value = float(s.detach())
        if not math.isfinite(value):
            nonfinite += [ex.source for ex in chunk]
        loss_sum += value
        tokens += sum(len(ex.input_ids) for ex in chunk)
    return loss_sum, tokens, nonfinite


def total_steps(cfg: RunConfig, n_train: int) -> int:
    """Optimizer steps of the run: max_steps, else epochs x samples / effective batch (rounded up)."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum
    return max(1, math.ceil(cfg.train.epochs * n_train / per_step))


MAX_BAD_STEPS = 3  # consecutive non-finite steps before the run stops with a diagnosis


def _diagnose(run: Run, bad_sources: list[str], lr: float) -> str:
    """Plain words for why losses or gradients keep going non-finite."""
    reasons = []
    if run.loaded.hardware.dtype == torch.float16:
        reasons.append("fp16 overflow (use model.dtype: bf16 where supported, or fp32)")
    if lr > 1e-3:
        reasons.append(f"learning rate {lr:.1e} is high for LoRA (try train.lr: 2e-4)")
    if bad_sources:
        rows = sorted(set(bad_sources))
        reasons.append(f"the loss was non-finite on batches holding {', '.join(rows[:6])}"
                       + (f" (+{len(rows) - 6} more)" if len(rows) > 6 else "") + "; check those rows")
    return "; ".join(reasons) or "gradients overflowed (try a lower train.lr or train.max_grad_norm)"


def fit(run: Run, *, resume: Path | None = None, accept_changes: bool = False) -> RunResult:
    """Train the adapters of a prepared run (from a checkpoint when `resume` is given) and save them."""
    hw = run.loaded.hardware
    with switched_on(run.model, choose_switches(run.cfg, hw.device, hw.dtype)) as switches:
        run.switches = switches
        return _fit(run, resume, accept_changes)


def _fit(run: Run, resume: Path | None, accept_changes: bool) -> RunResult:
    cfg, model, device = run.cfg, run.model, run.loaded.hardware.device
    tcfg = cfg.train
    pad_id = run.loaded.tokenizer.pad_token_id
    steps = total_steps(cfg, len(run.train_set))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, tcfg, device)
    scheduler = make_scheduler(optimizer, tcfg, steps)
    # loss scaling keeps fp16 gradients from underflowing; a no-op (enabled=False) in bf16/fp32
    scaler = torch.amp.GradScaler(device.type, enabled=run.loaded.hardware.dtype == torch.float16)
    per_step = tcfg.micro_batch_size * tcfg.grad_accum
    micro = tcfg.micro_batch_size  # halved by OOM recovery; the samples per step never change
    meta = {"desktune_version": __version__, "base_model": run.loaded.base_path, "quant": cfg.model.quant,
            "quant_backend": run.loaded.quant_backend, "dtype": str(run.loaded.hardware.dtype)[6:]}
    ckpt_dir = run.run_dir / "checkpoints"
    packed = cfg.data.packing
    train_losses: list[float] = []
    val_losses: list[tuple[int, float]] = []
    tokens_seen, train_time, start, bad_steps, bad_sources = 0, 0.0, 0, 0, []
    wall0 = time.perf_counter()
    if resume is not None:
        from peft import set_peft_model_state_dict  # peft imports torchao: only after models/ silenced it

        state = load_state(resume)
        check_compatible(state, cfg, resume, accept_changes)
        set_peft_model_state_dict(model, load_file(str(resume / ADAPTER_WEIGHTS)))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start, micro = state["step"], state["micro_batch_size"]
        for r in truncate_metrics(run.run_dir / "metrics.jsonl", start):
            if r["type"] == "train":
                train_losses.append(r["loss"])
            elif r["type"] == "eval":
                val_losses.append((r["step"], r["val_loss"]))
    stream = example_stream(len(run.train_set), tcfg.seed, cfg.data.shuffle, start=start * per_step)

    fingerprints = {"config_fingerprint": config_fingerprint(cfg), "data_fingerprint": data_fingerprint(cfg)}

    def checkpoint(step: int) -> Path:
        state = {"step": step, "micro_batch_size": micro, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": capture_rng(),
                 **fingerprints}
        out = save_checkpoint(model, run.loaded.tokenizer, ckpt_dir / f"step-{step:06d}",
                              base_path=run.loaded.base_path, meta={**meta, "step": step}, state=state)
        prune_checkpoints(ckpt_dir, cfg.checkpoint.keep_last)
        mon.record("checkpoint", step=step, path=str(out))
        return out

    with Monitor(run.run_dir, steps, run.console, quiet=run.quiet) as mon, GracefulStop() as stop:
        if resume is not None:
            restore_rng(state["rng"])
            mon.event(f"resumed from {resume} at step {start}", name="resumed", step=start)
        else:
            _announce(run, mon, device)
            if run.val_set:
                v, n = validation_loss(model, run.val_set, micro, pad_id, device, packed)
                val_losses.append((0, v))
                mon.eval(0, v, n)
        model.train()
        for step in range(start + 1, steps + 1):
            t0 = time.perf_counter()
            examples = [run.train_set[next(stream)] for _ in range(per_step)]
            n_targets = target_count(examples)
            while True:
                try:
                    loss_sum, step_tokens, nonfinite = accumulate_gradients(run, examples, micro, n_targets, step,
                                                                            scaler)
                    break
                except Exception as e:  # an OOM mid-step: halve the micro-batch, keep the samples, redo the step
                    if not is_out_of_memory(e):
                        raise
                    optimizer.zero_grad(set_to_none=True)
                    del e
                    free_memory(device)
                    if micro == 1:
                        raise DesktuneError(
                            f"out of memory at step {step} even with micro-batch 1", where="train.micro_batch_size",
                            fix="turn on train.gradient_checkpointing, lower data.max_seq_len, or load the base "
                            "with model.quant: nf4 (saved checkpoints are kept)") from None
                    old, micro = micro, micro // 2
                    mon.event(f"out of memory at step {step}: micro-batch {old} -> {micro}, accumulation "
                              f"{math.ceil(per_step / old)} -> {math.ceil(per_step / micro)}; redoing the step",
                              name="oom_recovery", step=step, micro_batch_size=micro,
                              grad_accum=math.ceil(per_step / micro))
            clip = tcfg.max_grad_norm if tcfg.max_grad_norm is not None else float("inf")
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            lr = scheduler.get_last_lr()[0]
            loss = loss_sum / max(n_targets, 1)
            if scaler.is_enabled() and math.isfinite(loss) and not math.isfinite(grad_norm):
                scaler.update()  # fp16 loss-scale calibration: the scaler skips this update and lowers the scale
                optimizer.zero_grad(set_to_none=True)
                mon.event(f"step {step}: fp16 gradient overflow, loss scale lowered to {scaler.get_scale():g}",
                          name="loss_scale", step=step)
                continue
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)  # skip this update; the weights stay as they were
                bad_steps += 1
                bad_sources += nonfinite
                mon.event(f"step {step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient'}; "
                          "update skipped", name="nonfinite", step=step, sources=nonfinite)
                if bad_steps >= MAX_BAD_STEPS:
                    last = latest_checkpoint(run.run_dir)
                    why = _diagnose(run, bad_sources, lr)
                    raise DesktuneError(
                        f"{bad_steps} steps in a row had non-finite losses or gradients: {why}",
                        where=str(run.run_dir / "metrics.jsonl"),
                        fix="fix the cause and start again" + (f"; the last good checkpoint is {last}" if last else ""),
                    )
                continue
            bad_steps, bad_sources = 0, []
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            train_time += dt
            tokens_seen += step_tokens
            train_losses.append(loss)
            mon.step(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=step_tokens, target_tokens=n_targets,
                     tokens_per_s=step_tokens / dt, mem_bytes=memory_in_use(device), step_s=round(dt, 4),
                     epoch=round(step * per_step / len(run.train_set), 4))
            if run.val_set and tcfg.eval_every and step % tcfg.eval_every == 0 and step != steps:
                v, n = validation_loss(model, run.val_set, micro, pad_id, device, packed)
                val_losses.append((step, v))
                mon.eval(step, v, n)
            saved = None
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step != steps:
                saved = checkpoint(step)
            if stop.requested and step != steps:
                saved = saved or checkpoint(step)
                mon.event(f"{stop.requested}: stopped after step {step}", name="stopped", step=step)
                raise TrainingInterrupted(step, str(saved))
        if run.val_set:
            v, n = validation_loss(model, run.val_set, micro, pad_id, device, packed)
            val_losses.append((steps, v))
            mon.eval(steps, v, n)
        adapter_dir = save_adapter(model, run.loaded.tokenizer, run.run_dir / "adapter",
                                   base_path=run.loaded.base_path, meta={**meta, "step": steps})
        size = adapter_size(adapter_dir)
        mon.record("saved", step=steps, path=str(adapter_dir), adapter_bytes=size)
        mon.print(f"adapter saved: [bold]{adapter_dir}[/] ({human_bytes(size)})")
    return RunResult(run_dir=run.run_dir, adapter_dir=adapter_dir, adapter_bytes=size, steps=steps,
                     train_losses=train_losses, val_losses=val_losses,
                     tokens_per_s=tokens_seen / max(train_time, 1e-9), wall_s=time.perf_counter() - wall0,
                     train_s=train_time,
                     trainable=run.trainable)


def _announce(run: Run, mon: Monitor, device: torch.device) -> None:
    """Log what a new run should know before its first step."""
    stats, tcfg = run.data_stats, run.cfg.train
    if run.fit_note:
        mon.record("event", message=run.fit_note, name="memory_fit", micro_batch_size=tcfg.micro_batch_size,
                   grad_accum=tcfg.grad_accum, gradient_checkpointing=tcfg.gradient_checkpointing)
    if stats.n_truncated:
        mon.event(f"{stats.n_truncated} sample(s) longer than max_seq_len={run.cfg.data.max_seq_len} were truncated",
                  truncated=stats.n_truncated)
    if stats.n_dropped:
        mon.event(f"{stats.n_dropped} sample(s) had no token to train on and were dropped", dropped=stats.n_dropped)
    if effective_optimizer(tcfg.optimizer, device) != tcfg.optimizer:
        mon.event(f"{tcfg.optimizer} needs CUDA; using {effective_optimizer(tcfg.optimizer, device)} on "
                  f"{device.type}", optimizer=effective_optimizer(tcfg.optimizer, device))
    for note in run.switches.notes:
        mon.event(note, name="switch_off")


def find_resume_point(cfg: RunConfig, resume: str | Path | bool) -> Path:
    """The checkpoint to resume: a checkpoint folder, a run folder's latest, or (True) the latest run's latest."""
    if resume is True:
        root = Path(cfg.output_dir)
        runs = [root / cfg.run_name] if cfg.run_name else sorted(
            (p for p in root.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
        for run_dir in runs:
            found = latest_checkpoint(run_dir) if run_dir.is_dir() else None
            if found is not None:
                return found
        raise DesktuneError("no checkpoint to resume from", where=str(root / (cfg.run_name or "")),
                            fix="set checkpoint.every so runs save checkpoints, or pass --resume PATH")
    path = Path(resume)
    if is_complete(path):
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise DesktuneError("not a complete checkpoint nor a run folder holding one", where=str(path),
                            fix="pass a run folder or one of its checkpoints/step-N folders")
    return found


def train(cfg: RunConfig, *, console: Console | None = None, quiet: bool = False,
          resume: str | Path | bool | None = None, accept_changes: bool = False) -> RunResult:
    """Set up and run one fine-tuning run; `resume` continues one exactly from a checkpoint."""
    if resume:
        point = find_resume_point(cfg, resume)
        run_dir = point.parent.parent
        cfg = cfg.model_copy(update={"output_dir": str(run_dir.parent), "run_name": run_dir.name})
        return fit(setup(cfg, console=console, quiet=quiet, existing=run_dir), resume=point,
                   accept_changes=accept_changes)
    return fit(setup(cfg, console=console, quiet=quiet))

"""One optimizer step in named pieces: accumulate (with OOM recovery), then the verdict, then the update.

Every micro-batch's summed loss is divided by the objective's normaliser of the whole step (the step's target
tokens), so any split of the same samples gives the same update; that is also what makes OOM recovery exact
(halve the micro-batch, redo the step with the same samples).

Micro-batch gradients are added pairwise, ((a+b)+(c+d)), the grouping DDP's all-reduce gives when each of 2^k ranks
holds 2^j of them: one process and several then round identically (and a pairwise sum rounds less than a running
one). It keeps at most log2(micro-batches) extra copies of the adapter's gradients.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from desktune.data import Example, micro_batches, step_order
from desktune.errors import DesktuneError
from desktune.training.distributed import (
    Dist,
    Replica,
    any_rank,
    local_context,
    local_part,
    most,
    shard_sums,
    total,
)
from desktune.training.monitor import Monitor
from desktune.training.objectives import Objective
from desktune.training.speed import Switches

MAX_BAD_STEPS = 3  # consecutive non-finite steps before the run stops with a diagnosis


@dataclass
class Trainer:
    """The objects an optimizer step works on, the micro-batch size in use and the step being computed."""

    model: Any  # the peft model
    params: list[torch.nn.Parameter]  # the trainable ones
    optimizer: Any
    scheduler: Any
    scaler: torch.amp.GradScaler  # fp16 loss scaling; disabled (a no-op) in bf16/fp32
    objective: Objective
    switches: Switches
    device: torch.device
    pad_id: int
    packing: bool
    group_by_length: bool
    max_grad_norm: float | None
    micro: int  # samples per micro-batch: halved by OOM recovery, the samples per step never change
    step: int = 0  # the optimizer step being computed (1-based)
    total_steps: int = 0  # the run's optimizer steps (the schedule ends there)
    last_checkpoint: Callable[[], Path | None] = lambda: None  # named when the run stops
    dist: Dist = field(default_factory=Dist)  # this process among the run's (one process: rank 0 of 1)
    replica: Replica | None = None  # the DDP wrapper or FSDP2 layers (several processes only)

    def kept(self) -> str:
        """What a message that stops the run says about the saved checkpoints."""
        return kept_note(self.last_checkpoint())


def kept_note(last: Path | None) -> str:
    """What a message that stops a run says about its saved checkpoints (`last`: the newest complete one)."""
    if last is None:
        return "no checkpoint was saved yet (checkpoint.every saves some)"
    return f"the last checkpoint, {last}, is intact"


class Verdict(Enum):
    """What became of a step's gradients."""

    UPDATED = "updated"
    OVERFLOW = "overflow"  # fp16: gradients overflowed, the loss scale was lowered, no update
    NONFINITE = "nonfinite"  # a non-finite loss or gradient: no update


@dataclass
class Accumulated:
    """Gradients of one step's samples, summed over its micro-batches."""

    loss_sum: float = 0.0
    tokens: int = 0
    nonfinite_sources: list[str] = field(default_factory=list)  # samples in micro-batches with a non-finite loss


@dataclass
class StepOutcome:
    """What one optimizer step measured and decided."""

    verdict: Verdict
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    target_tokens: int
    nonfinite_sources: list[str]
    seconds: float


def forward_backward(tr: Trainer, batch: dict[str, torch.Tensor], normaliser: float) -> float:
    """Forward and backward of one micro-batch (its summed loss over `normaliser`); returns the summed loss."""
    with tr.switches.forward_context(tr.device, tr.model):
        s = tr.objective.loss_sum(tr.model, batch, tr.device)
    tr.scaler.scale(s / normaliser).backward()
    return float(s.detach())


class PairwiseSum:
    """Each micro-batch's gradients taken out of `.grad` and added pairwise, like a binary counter; `finish` puts
    the total back. Ours, not autograd's running `+=`: the grouping is what makes several processes exact."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.levels: list[tuple[int, list[torch.Tensor | None]]] = []

    def push(self) -> None:
        """Take the micro-batch just backpropagated out of `.grad`, merging equal-sized partial sums."""
        grads, level = [p.grad for p in self.params], 0
        for p in self.params:
            p.grad = None
        while self.levels and self.levels[-1][0] == level:
            grads, level = _added(self.levels.pop()[1], grads), level + 1
        self.levels.append((level, grads))

    def finish(self) -> None:
        """The partial sums added (the later, smaller ones first) and put into `.grad`; nothing pushed (a rank
        whose share of the step is empty) leaves `.grad` as it is."""
        if not self.levels:
            return
        total = self.levels.pop()[1]
        while self.levels:
            total = _added(self.levels.pop()[1], total)
        for p, g in zip(self.params, total, strict=True):
            p.grad = g


def _added(earlier: list[torch.Tensor | None], later: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    return [b if a is None else a if b is None else a.add_(b) for a, b in zip(earlier, later, strict=True)]


def accumulate(tr: Trainer, examples: list[Example], normaliser: float) -> Accumulated:
    """Gradients of a step's samples, micro-batch by micro-batch (pairwise, except under FSDP2, which keeps the
    unsharded gradients it accumulates to itself)."""
    acc = Accumulated()
    pairwise = None if tr.dist.sharded else PairwiseSum(tr.params)
    for chunk, batch in micro_batches(examples, tr.micro, packing=tr.packing, pad_id=tr.pad_id,
                                      group_by_length=tr.group_by_length):
        value = forward_backward(tr, batch, normaliser)
        if pairwise:
            pairwise.push()
        if not math.isfinite(value):
            acc.nonfinite_sources += [ex.source for ex in chunk]
        acc.loss_sum += value
        acc.tokens += sum(len(ex.input_ids) for ex in chunk)
    if pairwise:
        pairwise.finish()
    return acc


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA/MPS allocator OOM, or a failed CPU allocation (which PyTorch reports only as a RuntimeError)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def release_cached_memory(device: torch.device) -> None:
    """Drop what a failed step left behind and return cached blocks to the device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def _try_accumulate(tr: Trainer, examples: list[Example], normaliser: float) -> Accumulated | None:
    """`accumulate` without communicating; None when this rank ran out of memory (its gradients dropped)."""
    try:
        with local_context(tr.replica):
            return accumulate(tr, examples, normaliser)
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(e):
            raise
        if tr.dist.sharded:  # the other ranks wait in this pass's all-gathers
            raise DesktuneError(f"out of memory on rank {tr.dist.rank} at step {tr.step} under fsdp2, whose "
                                "passes the ranks must run together: the run stops", where="train.micro_batch_size",
                                fix=f"lower train.micro_batch_size (the same samples per step), or use more "
                                f"processes; {tr.kept()}") from e
    return None  # the caller drops the gradients on every rank


def my_share(tr: Trainer, examples: list[Example]) -> list[Example]:
    """This rank's samples of the step: the micro-batches one process would form, dealt out in contiguous runs,
    so each rank's micro-batches are exactly one process's and only the final sum of gradients is regrouped."""
    if not tr.dist.active:
        return examples
    order = step_order(examples, packing=tr.packing, group_by_length=tr.group_by_length)
    chunks = [order[i:i + tr.micro] for i in range(0, len(order), tr.micro)]
    n, r, w = len(chunks), tr.dist.rank, tr.dist.world
    return [ex for chunk in chunks[r * n // w:(r + 1) * n // w] for ex in chunk]


def accumulate_with_recovery(tr: Trainer, examples: list[Example], normaliser: float,
                             mon: Monitor) -> tuple[Accumulated, int]:
    """`accumulate` of this rank's share (and how many samples that was); when any rank ran out of memory,
    every rank halves the micro-batch and redoes the step with the same samples."""
    while True:
        mine = my_share(tr, examples)
        acc = _try_accumulate(tr, mine, normaliser)
        if not any_rank(tr.dist, acc is None, tr.device):
            return acc, len(mine)  # type: ignore[return-value]  (None only when some rank ran out)
        tr.optimizer.zero_grad(set_to_none=True)
        if tr.micro == 1:
            raise DesktuneError(
                f"out of memory at step {tr.step} even with micro-batch 1", where="train.micro_batch_size",
                fix="turn on train.gradient_checkpointing, lower data.max_seq_len, or load the base with "
                f"model.quant: nf4; {tr.kept()}")
        release_cached_memory(tr.device)
        per_step, old = len(examples), tr.micro
        tr.micro //= 2
        mon.event(f"out of memory at step {tr.step}: micro-batch {old} -> {tr.micro}, accumulation "
                  f"{math.ceil(per_step / old)} -> {math.ceil(per_step / tr.micro)}; redoing the step",
                  name="oom_recovery", step=tr.step, micro_batch_size=tr.micro,
                  grad_accum=math.ceil(per_step / tr.micro))


def synchronise(tr: Trainer, acc: Accumulated, n_local: int) -> Accumulated:
    """Several processes: the gradient sync (after as many passes on every rank) and the step's totals."""
    if tr.replica is None:
        return acc
    mine = math.ceil(n_local / tr.micro)  # this rank's passes; fsdp2's all-gathers need as many on every rank
    tr.replica.sync(tr.pad_id, tr.device, most(tr.dist, mine, tr.device) - mine if tr.dist.sharded else 0)
    loss_sum, tokens = total(tr.dist, [acc.loss_sum, acc.tokens], tr.device)
    return Accumulated(loss_sum=loss_sum, tokens=int(tokens), nonfinite_sources=acc.nonfinite_sources)


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float | None, d: Dist) -> float:
    """The gradients' total 2-norm; when it exceeds `max_norm`, every gradient scaled down to it (torch's rule).

    Ours, not torch's clip_grad_norm_: each gradient's sum of squares in float64, the shards' sums added over the
    ranks under fsdp2, so one process and several get the same norm and scale by the same float32 factor. torch's
    norm of FSDP2's DTensor shards rounds differently from one process's norm of whole tensors, and where clipping
    was active that carried a run 1.05e-05 away from one process's adapter."""
    grads = [local_part(p.grad) for p in params if p.grad is not None]
    if not grads:
        return 0.0
    squares = torch.stack([g.double().square().sum().to(grads[0].device) for g in grads])
    norm = shard_sums(d, squares).sum().sqrt().float()
    if max_norm is not None and bool(torch.isfinite(norm)):
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # float32, as torch computes it
        if float(coef) < 1.0:
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return float(norm)


def apply_update(tr: Trainer, acc: Accumulated, normaliser: int) -> tuple[Verdict, float, float, float]:
    """Clip, judge and (when the gradients are finite) apply them; returns (verdict, loss, grad norm, lr)."""
    tr.scaler.unscale_(tr.optimizer)
    grad_norm = clip_gradients(tr.params, tr.max_grad_norm, tr.dist)
    lr = tr.scheduler.get_last_lr()[0]
    loss = acc.loss_sum / normaliser
    verdict = Verdict.UPDATED
    if tr.scaler.is_enabled() and math.isfinite(loss) and not math.isfinite(grad_norm):
        tr.scaler.update()  # fp16 loss-scale calibration: the scaler skips this update and lowers the scale
        verdict = Verdict.OVERFLOW
    elif not (math.isfinite(loss) and math.isfinite(grad_norm)):
        verdict = Verdict.NONFINITE  # skip this update: the weights stay as they were
    else:
        tr.scaler.step(tr.optimizer)
        tr.scaler.update()
        tr.scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)
    return verdict, loss, grad_norm, lr


def update_or_stop(tr: Trainer, acc: Accumulated, normaliser: int) -> tuple[Verdict, float, float, float]:
    """`apply_update`; out of memory there stops the run: a smaller micro-batch does not shrink the optimizer's
    state, and an update that failed part way cannot be redone exactly."""
    try:
        return apply_update(tr, acc, normaliser)
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(e):
            raise
        tr.optimizer.zero_grad(set_to_none=True)
        raise DesktuneError(
            f"out of memory in the optimizer update of step {tr.step} (the optimizer's state and the update need "
            "memory the micro-batch size does not change)", where="train.optimizer",
            fix="use train.optimizer: adamw_8bit (a quarter of the state memory), lower lora.r, or load the base "
            f"with model.quant: nf4; {tr.kept()}") from e


def train_step(tr: Trainer, examples: list[Example], mon: Monitor) -> StepOutcome:
    """One optimizer step over `examples`: accumulate, judge, update."""
    t0 = time.perf_counter()
    normaliser = tr.objective.normaliser(examples)  # of the whole step: every rank holds its samples
    # DDP and FSDP2 average the ranks' gradients: times the world size, their mean is one process's sum
    acc, mine = accumulate_with_recovery(tr, examples, normaliser / tr.dist.world, mon)
    acc = synchronise(tr, acc, mine)
    verdict, loss, grad_norm, lr = update_or_stop(tr, acc, normaliser)
    return StepOutcome(verdict=verdict, loss=loss, grad_norm=grad_norm, lr=lr, tokens=acc.tokens,
                       target_tokens=normaliser, nonfinite_sources=acc.nonfinite_sources,
                       seconds=time.perf_counter() - t0)


def diagnose_nonfinite(fp16: bool, lr: float, sources: list[str]) -> str:
    """Plain words for why losses or gradients keep going non-finite."""
    reasons = []
    if fp16:
        reasons.append("fp16 overflow (use model.dtype: bf16 where supported, or fp32)")
    if lr > 1e-3:
        reasons.append(f"learning rate {lr:.1e} is high for LoRA (try train.lr: 2e-4)")
    if sources:
        rows = sorted(set(sources))
        reasons.append(f"the loss was non-finite on batches holding {', '.join(rows[:6])}"
                       + (f" (+{len(rows) - 6} more)" if len(rows) > 6 else "") + "; check those rows")
    return "; ".join(reasons) or "gradients overflowed (try a lower train.lr or train.max_grad_norm)"


@dataclass
class NonFiniteGuard:
    """Logs steps without an update and stops the run after MAX_BAD_STEPS non-finite steps in a row."""

    last_checkpoint: Callable[[], Path | None]  # named in the message that stops the run
    bad_steps: int = 0
    sources: list[str] = field(default_factory=list)

    def accept(self, out: StepOutcome, tr: Trainer, mon: Monitor) -> bool:
        """True when the step updated the weights; otherwise log why not (or raise after too many)."""
        if out.verdict is Verdict.UPDATED:
            self.bad_steps, self.sources = 0, []
            return True
        step = tr.step
        if out.verdict is Verdict.OVERFLOW:
            mon.event(f"step {step}: fp16 gradient overflow, loss scale lowered to {tr.scaler.get_scale():g}",
                      name="loss_scale", step=step)
            return False
        self.bad_steps += 1
        self.sources += out.nonfinite_sources
        mon.event(f"step {step}: non-finite {'loss' if not math.isfinite(out.loss) else 'gradient'}; "
                  "update skipped", name="nonfinite", step=step, sources=out.nonfinite_sources)
        if self.bad_steps < MAX_BAD_STEPS:
            return False
        last = self.last_checkpoint()
        raise DesktuneError(
            f"{self.bad_steps} steps in a row had non-finite losses or gradients: "
            + diagnose_nonfinite(tr.scaler.is_enabled(), out.lr, self.sources), where=str(mon.path),
            fix="fix the cause and start again" + (f"; the last good checkpoint is {last}" if last else ""))

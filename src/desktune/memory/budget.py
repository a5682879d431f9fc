"""Make a run fit a memory budget before anything is loaded: choose micro-batch, accumulation, checkpointing."""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING

from rich.console import Console

from desktune.config import RunConfig
from desktune.errors import DesktuneError
from desktune.memory.estimate import (
    CPU_LIBRARY_BYTES,
    CUDA_CONTEXT_BYTES,
    Plan,
    PlanInputs,
    estimate,
    fit_settings,
    suggestions,
)
from desktune.memory.render import render_plan
from desktune.memory.source import arch_for_model
from desktune.units import human_bytes, parse_size

if TYPE_CHECKING:
    from desktune.hardware import Hardware


def effective_budget(setting: str | None, device_type: str) -> str | None:
    """The budget a run fits to: unset means 'auto' on CUDA (never start a run that cannot fit the card) and no
    fitting elsewhere; 'none' never fits."""
    if setting is None:
        return "auto" if device_type == "cuda" else None
    return None if setting == "none" else setting


def budget_bytes(budget: str, device_type: str, where: str = "--budget") -> int:
    """'auto' is the device's free memory now; anything else a size such as 24GB (units.parse_size); a size that
    is not one is a user error naming `where` (the flag or the config key it came from).

    The free memory is read after this process made its CUDA context, or imported its libraries on the CPU; the
    plan counts those too (CUDA_CONTEXT_BYTES, CPU_LIBRARY_BYTES), so they are added back, not subtracted twice.
    """
    if budget.strip().lower() != "auto":
        try:
            return parse_size(budget)
        except ValueError as e:
            raise DesktuneError(str(e), where=where, fix="give the memory with its unit, such as 24GB or 24GiB, "
                                "or auto (the free memory now)") from e
    import torch

    from desktune.hardware import free_memory

    free = free_memory(torch.device(device_type))
    return free + {"cuda": CUDA_CONTEXT_BYTES, "cpu": CPU_LIBRARY_BYTES}.get(device_type, 0)


def plan_run(cfg: RunConfig, device_type: str, dtype_bytes: int, nproc: int = 1,
             cpu_attention_kernel: bool = False) -> tuple[PlanInputs, Plan]:
    """The predicted peak of one training step of `cfg` per device, on `nproc` devices of a type with that
    compute dtype size (`cpu_attention_kernel`: the CPU runs desktune's attention kernel, `Hardware`'s field)."""
    inputs = PlanInputs.from_run_config(cfg, arch_for_model(cfg.model.name), device_type, dtype_bytes=dtype_bytes,
                                        nproc=nproc).with_(cpu_attention_kernel=cpu_attention_kernel)
    return inputs, estimate(inputs)


def rendered(plan: Plan, budget: int) -> str:
    """The plan table and advice as plain text (for an error message)."""
    console = Console(width=110, file=io.StringIO())
    console.print(render_plan(plan, budget))
    return console.file.getvalue()


def fit_to_budget(cfg: RunConfig, hw: Hardware, nproc: int = 1) -> tuple[RunConfig, str | None]:
    """The config with settings that fit the run's memory budget (and a note of what changed), or an error.

    The budget is `train.memory_budget`, or on CUDA the free memory when it is unset (`effective_budget`), per
    device; with `nproc` processes (the world size) the plan is that of one of them (train.distributed).
    """
    setting = effective_budget(cfg.train.memory_budget, hw.device.type)
    if setting is None:
        return cfg, None
    if cfg.train.offload_activations and hw.device.type == "cuda":
        if cfg.train.memory_budget is None:
            return cfg, "memory plan: not fitted (the planner does not model train.offload_activations)"
        raise DesktuneError("the memory planner does not model train.offload_activations, so it cannot fit this "
                            "run to a budget", where="train.memory_budget",
                            fix="set train.memory_budget: none, or turn off train.offload_activations")
    budget = budget_bytes(setting, hw.device.type, where="train.memory_budget")
    inputs, plan = plan_run(cfg, hw.device.type, hw.dtype.itemsize, nproc, hw.cpu_attention_kernel)
    if plan.total <= budget:
        return cfg, f"memory plan: {human_bytes(plan.total)} of {human_bytes(budget)} budget; settings kept"
    effective = cfg.train.samples_per_step
    chosen = fit_settings(inputs, budget, effective)
    if chosen is None:
        options = suggestions(inputs, budget)
        smallest = f"smallest change that fits: {options[0][0]}" if options else "nothing tried fits this budget"
        raise DesktuneError(
            f"the run needs {human_bytes(plan.total)} but the budget is {human_bytes(budget)}; {smallest}\n"
            + rendered(plan, budget),
            where="train.memory_budget", fix="apply the change above, or raise the budget"
            + ("" if cfg.train.memory_budget else " (the free GPU memory; train.memory_budget: none skips this check)"),
        )
    micro, accum, ckpt = chosen
    train = cfg.train.model_copy(update={"micro_batch_size": micro, "grad_accum": accum,
                                         "gradient_checkpointing": ckpt or cfg.train.gradient_checkpointing})
    fitted = cfg.model_copy(update={"train": train})
    total = estimate(inputs.with_(micro_batch=micro, grad_accum=accum, gradient_checkpointing=ckpt)).total
    return fitted, (f"memory plan: {human_bytes(plan.total)} did not fit {human_bytes(budget)}; using micro-batch "
                    f"{micro} x accumulation {accum}" + (f", gradient checkpointing ({ckpt})" if ckpt else "")
                    + f" (predicted {human_bytes(total)}, same effective batch {effective})")


def machine_bytes(hw: Hardware) -> int:
    """All the memory of the device a run trains on: the GPU's, or the machine's RAM for the CPU (and MPS)."""
    if hw.device.type == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(hw.device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def refuse_beyond_machine(cfg: RunConfig, hw: Hardware, nproc: int = 1) -> None:
    """Without a budget to fit (the CPU's default), a run whose plan exceeds all of the device's memory is refused
    before anything loads, with the plan and the smallest change that fits (it would end in the allocator)."""
    if cfg.train.memory_budget == "none":
        return
    try:
        inputs, plan = plan_run(cfg, hw.device.type, hw.dtype.itemsize, nproc, hw.cpu_attention_kernel)
    except Exception:  # an architecture the planner cannot read is not the user's error here
        return
    total = machine_bytes(hw)
    if plan.total <= total:
        return
    options = [*suggestions(inputs, total), *_smaller_rank(inputs, total)]
    smallest = f"smallest change that fits: {options[0][0]}" if options else "nothing tried fits this machine"
    raise DesktuneError(
        f"the run needs {human_bytes(plan.total)} but this machine's {hw.device.type} has {human_bytes(total)} in "
        f"all; {smallest}\n" + rendered(plan, total), where="lora.r" if options and options[0][0].startswith(
            "lora.r") else "train", fix="apply the change above (`desktune plan CONFIG` shows any setting's plan); "
        "train.memory_budget: none skips this check")


def _smaller_rank(inputs: PlanInputs, total: int) -> list[tuple[str, Plan]]:
    """The largest power-of-two LoRA rank below the run's that fits, when the rank is what does not fit."""
    r = 1 << (max(inputs.lora_r, 2) - 1).bit_length() - 1
    while r >= 1:
        plan = estimate(inputs.with_(lora_r=r))
        if plan.total <= total:
            return [(f"lora.r: {r} (predicted {human_bytes(plan.total)})", plan)]
        r //= 2
    return []

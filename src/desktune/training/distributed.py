"""Several processes under torchrun: who this process is, what the ranks decide together, and the model's wrapping
(DDP or FSDP2: PyTorch's own engines; desktune adds only the step's bookkeeping).

Every rank holds the whole step's samples (same seed, same order) and trains on its share: a contiguous run of the
micro-batches one process would form (training/step.my_share).
A step's micro-batches accumulate locally with no communication; then the ranks agree (did any run out of memory?)
and one synchronising pass - a one-token forward whose loss is multiplied by zero - makes DDP all-reduce (FSDP2:
reduce-scatter) the accumulated gradients, as `no_sync` / `set_requires_gradient_sync` document. Each rank divides
its summed loss by the step's target tokens over all samples, times the world size, so the engines' averaging
gives exactly one process's gradient.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from desktune.errors import DesktuneError

MODES = ("ddp", "fsdp2")


@dataclass(frozen=True)
class Dist:
    """This process's place among the run's processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "ddp"
    local_world: int = 1  # the run's processes on this machine (they share its cores)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Several processes under fsdp2: parameters, gradients and optimizer state are DTensor shards."""
        return self.active and self.mode == "fsdp2"


def from_env(mode: str = "ddp") -> Dist:
    """The process's rank and world size as torchrun sets them (RANK, WORLD_SIZE, LOCAL_RANK); one process
    otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(mode=mode)
    return Dist(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                mode=mode, local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def start(d: Dist, device: torch.device, timeout_s: float) -> None:
    """Join the process group (gloo on the CPU, nccl on CUDA), with a timeout on every collective."""
    if not d.active or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(d.local_rank)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def stop(d: Dist) -> None:
    """Leave the process group."""
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def check_settings(d: Dist, device: torch.device, offload_params: bool) -> None:
    """Refuse, before anything loads, what the run's processes cannot do on this device."""
    if d.active and offload_params and device.type != "cuda":
        raise DesktuneError("it moves FSDP2's shards from GPU memory to host memory, and on "
                            f"{device.type} they are in host memory already", where="train.offload_params",
                            fix="leave train.offload_params off here (it is for CUDA)")


def device_for(d: Dist, device: torch.device) -> torch.device:
    """A CUDA rank trains on its own card (LOCAL_RANK); other devices are shared."""
    return torch.device("cuda", d.local_rank) if d.active and device.type == "cuda" else device


# ---------------------------------------------------------------- decisions all ranks take together


def _reduce(values: list[float], op: dist.ReduceOp, device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def total(d: Dist, values: list[float], device: torch.device) -> list[float]:
    """Each value summed over the ranks."""
    return _reduce(values, dist.ReduceOp.SUM, device) if d.active else list(values)


def any_rank(d: Dist, flag: bool, device: torch.device) -> bool:
    """Whether the flag is set on any rank (a stop request, an out-of-memory)."""
    return bool(_reduce([float(flag)], dist.ReduceOp.MAX, device)[0]) if d.active else flag


def most(d: Dist, value: int, device: torch.device) -> int:
    """The largest value over the ranks."""
    return int(_reduce([float(value)], dist.ReduceOp.MAX, device)[0]) if d.active else value


def shard_sums(d: Dist, partial: torch.Tensor) -> torch.Tensor:
    """Sums over sharded tensors (each rank's over its shards) added up over the ranks under fsdp2, in place;
    unchanged otherwise (every rank holds whole tensors)."""
    if d.sharded:
        dist.all_reduce(partial)
    return partial


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (its storage: writes go to the DTensor), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def from_main(d: Dist, value: Any) -> Any:
    """Rank 0's value, on every rank (a picklable object made by our own code: a path, a step count)."""
    if not d.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------- the model's wrapping


def outside_layers(model: Any) -> list[str]:
    """Trainable parameters FSDP2 would not shard: those outside the decoder layers (e.g. a LoRA on lm_head)."""
    from desktune.adapters import base_model

    layers = {id(p) for layer in base_model(model).get_decoder().layers for p in layer.parameters()}
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in layers]


@dataclass
class Replica:
    """How a rank's model takes part: `ddp` holds the DDP wrapper; fsdp2 shards each decoder layer in place."""

    d: Dist
    model: Any  # the peft model (sharded in place under fsdp2)
    ddp: Any = None  # torch.nn.parallel.DistributedDataParallel around `model` (ddp only)
    layers: tuple[Any, ...] = ()  # the fully_shard-ed decoder layers (fsdp2 only)

    @contextmanager
    def local(self) -> Iterator[None]:
        """Accumulate gradients without communicating (the step's micro-batches)."""
        if self.ddp is not None:
            with self.ddp.no_sync():
                yield
            return
        for layer in self.layers:
            layer.set_requires_gradient_sync(False)
        yield

    def sync(self, pad_id: int, device: torch.device, passes: int = 0) -> None:
        """`passes` zero-weight passes (FSDP2: every rank runs as many forwards), then the synchronising one."""
        for _ in range(passes):
            with self.local():
                self._zero_pass(self.model, pad_id, device)
        for layer in self.layers:
            layer.set_requires_gradient_sync(True)
        self._zero_pass(self.ddp or self.model, pad_id, device)

    @staticmethod
    def _zero_pass(net: Any, pad_id: int, device: torch.device) -> None:
        """A one-token forward and a backward of zero: every adapter gets a zero gradient (so the engine's hooks
        fire); under a forked RNG, so a dropout mask drawn here leaves the run's random stream as it was."""
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            ids = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
            out = net(input_ids=ids, use_cache=False).logits
            (out.float().sum() * 0.0).backward()


def replicate(model: Any, d: Dist, device: torch.device, offload_params: bool = False) -> Replica | None:
    """Wrap the peft model for the run's mode (None for one process)."""
    if not d.active:
        return None
    if d.sharded:
        return _shard(model, d, device, offload_params)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=ids, init_sync=False, forward_sync_buffers=False)
    return Replica(d=d, model=model, ddp=ddp)


def _shard(model: Any, d: Dist, device: torch.device, offload_params: bool) -> Replica:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    from desktune.adapters import base_model

    stray = outside_layers(model)
    if stray:
        raise DesktuneError(f"fsdp2 shards the decoder layers only, and these adapters lie outside them: "
                            f"{', '.join(stray[:4])}", where="train.distributed",
                            fix="leave the output head and embeddings out of lora.target_modules, or use ddp")
    mesh = init_device_mesh(device.type, (d.world,))
    policy = CPUOffloadPolicy() if offload_params else OffloadPolicy()
    layers = tuple(base_model(model).get_decoder().layers)
    for layer in layers:
        fully_shard(layer, mesh=mesh, offload_policy=policy)
    return Replica(d=d, model=model, layers=layers)


def local_context(replica: Replica | None) -> Any:
    """`replica.local()`, or nothing to do for one process."""
    return replica.local() if replica is not None else nullcontext()


# ---------------------------------------------------------------- sharded state <-> full state


def _full(value: Any) -> Any:
    """`value` with each DTensor gathered into a plain tensor (every rank must call: it is a collective)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor()
    if isinstance(value, dict):
        return {k: _full(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_full(v) for v in value)
    return value


def full_optimizer_state(optimizer: Any) -> dict[str, Any]:
    """The optimizer's state_dict with every sharded moment gathered: the same as one process's."""
    return _full(optimizer.state_dict())


def full_adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """Every trainable tensor of the model, gathered (state_dict names)."""
    return {n: _full(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad}


def shard_optimizer_state(optimizer: Any, state: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state_dict cut to this rank's shards of the optimizer's (DTensor) parameters."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {**state, "state": {}}
    for key, moments in state["state"].items():
        p = params[int(key)]
        out["state"][key] = {
            k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
            if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape else v
            for k, v in moments.items()}
    return out

"""Predict the peak memory of one LoRA/QLoRA training step, by component, before anything is loaded.

Every term counts tensors the step keeps alive, read off the code that runs (transformers' Llama / Qwen2 /
Mistral / Gemma2 / Phi-3 decoder layers, peft's LoRA `Linear.forward`, desktune's loss and loop); nothing is
fitted to measurements. Notation: t = micro_batch x seq_len tokens, a = bytes per element of the compute dtype,
H = hidden, I = intermediate, V = vocab, N = target rows of the loss (t - micro_batch when every position is a
target), r = LoRA rank. LoRA weights, their gradients and AdamW state are fp32 (peft autocast_adapter_dtype).

The peak of a step is the largest of three moments:
* start of backward (the loss's backward): weights + adapter state + every saved activation + the loss's peak;
* inside a decoder layer's backward: the saved activations still alive (with gradient checkpointing: every
  layer's input plus the one layer being recomputed) + that layer's gradient temporaries;
* the optimizer step: weights + adapter state + gradients + the optimizer's temporaries (tiny for LoRA).

With several processes (`nproc` > 1) the plan is per device: each process runs its share of the step's samples
(`process_share`); ddp replicates everything and adds DDP's gradient buckets, fsdp2 shards the decoder layers
(`_shard_layers`). NCCL's own communication buffers are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from desktune.constants import CPU_ATTENTION_HEAD_DIM, NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE, chunk_rows
from desktune.memory.catalog import ArchSpec
from desktune.units import human_bytes

if TYPE_CHECKING:
    from desktune.config import RunConfig

MiB = 1024**2
CUDA_CONTEXT_BYTES = 400 * MiB  # CUDA context + kernels: 300-500 MiB per process, outside the allocator
# A CPU run's memory that is not tensors, measured: the imported libraries (torch, transformers, peft, desktune:
# 234 MiB RSS before a model loads) and, while training, what the run holds besides tensors (oneDNN's kernel and
# primitive caches, bounded by hardware.bound_kernel_caches; the allocator's freed-but-kept pages; Python objects).
# benchmarks/memory_curve.py --model embedded (SmolLM2-135M, demo settings, 2 threads, torch 2.13, 2-core EPYC):
# in bf16 the plateau's peak RSS was 1,231 MiB against 551 MiB of planned tensors (680 - 234 = 446 MiB; the 2-layer
# model of its shapes held 629 MiB over 2,000 steps); in fp32 1,772 MiB against 944 MiB (828 - 234 = 594 MiB).
# Before the caches were bounded one figure, 780 MiB, was used, and the RSS kept growing past it.
CPU_LIBRARY_BYTES = 234 * MiB
CPU_RUNTIME_BYTES = 450 * MiB  # a 16-bit model
CPU_RUNTIME_FP32_BYTES = 600 * MiB  # an fp32 model: oneDNN's fp32 kernels and larger freed blocks
# cuBLAS workspace, allocated through PyTorch's caching allocator: 4096 KiB x 8 by default on Hopper and newer
# (CUBLAS_WORKSPACE_CONFIG=:4096:8), 4096 KiB x 2 + 16 KiB x 8 on older GPUs; the larger is assumed
CUBLAS_WORKSPACE_BYTES = 32 * MiB
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes 8-bit optimizers keep 32-bit state for tensors smaller than this
BNB_OPTIM_BLOCK = 256  # bitsandbytes blockwise 8-bit state: one fp32 absmax per 256 values


@dataclass(frozen=True)
class PlanInputs:
    """Everything the estimate depends on, as plain values."""

    arch: ArchSpec
    seq_len: int = 1024
    micro_batch: int = 2
    grad_accum: int = 4
    dtype_bytes: int = 2  # compute dtype of weights and activations: 2 (bf16/fp16) or 4 (fp32)
    device_type: str = "cuda"
    quant: str = "none"  # none | nf4 | int8
    double_quant: bool = True
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    lora_r: int = 16
    lora_targets: tuple[str, ...] | str = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_dropout: float = 0.05
    use_dora: bool = False
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw | paged_adamw_8bit
    gradient_checkpointing: bool | str = False  # False | "full" (True) | "selective"
    chunked_loss: bool = True
    packed: bool = False  # padding-free rows: no padding, one t x t block mask where a mask is kept
    padded: bool | None = None  # whether batches carry padding (None: when micro_batch > 1)
    target_fraction: float = 1.0  # share of positions that are loss targets (1.0 is the worst case)
    nproc: int = 1  # processes, one per device, sharing each optimizer step
    distributed: str = "ddp"  # with nproc > 1: ddp (replicated) | fsdp2 (decoder layers sharded)
    offload_params: bool = False  # fsdp2: sharded parameters (and their gradients, optimizer state) in host memory
    cpu_attention_kernel: bool = False  # the CPU can run desktune's attention kernel (hardware.py)

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ValueError(f"nproc must be at least 1, got {self.nproc}")

    @classmethod
    def from_run_config(cls, cfg: RunConfig, arch: ArchSpec, device_type: str, dtype_bytes: int,
                        nproc: int = 1) -> PlanInputs:
        """The inputs of a run config on `nproc` devices of a type, with the resolved compute dtype size."""
        m, lo, tr = cfg.model, cfg.lora, cfg.train
        targets = lo.target_modules if isinstance(lo.target_modules, str) else tuple(lo.target_modules)
        return cls(arch=arch, seq_len=cfg.data.max_seq_len, micro_batch=tr.micro_batch_size,
                   grad_accum=tr.grad_accum, dtype_bytes=dtype_bytes, device_type=device_type, quant=m.quant,
                   double_quant=m.double_quant, attn_implementation=m.attn_implementation, lora_r=lo.r,
                   lora_targets=targets, lora_dropout=lo.dropout, use_dora=lo.use_dora, optimizer=tr.optimizer,
                   gradient_checkpointing=tr.gradient_checkpointing, chunked_loss=tr.chunked_loss,
                   packed=cfg.data.packing, padded=False if cfg.data.packing else None, nproc=nproc,
                   distributed=tr.distributed, offload_params=tr.offload_params)

    def with_(self, **changes: object) -> PlanInputs:
        """A copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Component:
    """One line of a plan."""

    name: str
    bytes: int
    note: str = ""


@dataclass
class Plan:
    """Predicted peak memory of a training step on one device, by component (they sum to `total`)."""

    inputs: PlanInputs
    components: list[Component] = field(default_factory=list)
    phase: str = ""  # which moment of the step holds the peak
    host: list[Component] = field(default_factory=list)  # host memory of the node (fsdp2 offload), not in total

    @property
    def total(self) -> int:
        return sum(c.bytes for c in self.components)

    @property
    def host_total(self) -> int:
        """Host memory the node needs for what is offloaded there (0 without offload)."""
        return sum(c.bytes for c in self.host)

    @property
    def tensor_bytes(self) -> int:
        """The total without memory that is not tensors (what an allocator-level measurement sees)."""
        return sum(c.bytes for c in self.components if c.name != "framework overhead")

    def fits(self, budget_bytes: int) -> bool:
        return self.total <= budget_bytes

    def __getitem__(self, name: str) -> int:
        return sum(c.bytes for c in self.components if c.name == name)


# ---------------------------------------------------------------- adapters


def target_modules(inputs: PlanInputs) -> list[str]:
    """The adapted linear layers of one decoder layer ('all-linear' = every one; phi3 names map to fused ones)."""
    shapes = inputs.arch.linear_shapes()
    if inputs.lora_targets == "all-linear":
        return list(shapes)
    chosen = []
    fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
             "up_proj": "gate_up_proj"}
    for name in inputs.lora_targets:
        if name not in shapes and name in fused:
            name = fused[name]
        if name in shapes and name not in chosen:
            chosen.append(name)
    return chosen


def adapter_tensors(inputs: PlanInputs) -> list[int]:
    """Element counts of every trainable tensor: lora_A (r x in), lora_B (out x r), DoRA magnitude (out)."""
    shapes = inputs.arch.linear_shapes()
    out: list[int] = []
    for name in target_modules(inputs):
        d_in, d_out = shapes[name]
        out += [inputs.lora_r * d_in, d_out * inputs.lora_r] + ([d_out] if inputs.use_dora else [])
    return out * inputs.arch.layers


def optimizer_state_bytes(inputs: PlanInputs) -> int:
    """AdamW keeps exp_avg and exp_avg_sq per trainable value (+ a step scalar per tensor)."""
    total = 0
    for n in adapter_tensors(inputs):
        if inputs.optimizer.endswith("8bit") and n >= BNB_MIN_8BIT_SIZE:
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_OPTIM_BLOCK)  # uint8 states + fp32 absmax per block
        else:
            total += 2 * 4 * n + 4  # fp32 exp_avg, exp_avg_sq, step
    return total


# ---------------------------------------------------------------- base weights


def _quantized_linear_bytes(numel: int, inputs: PlanInputs) -> float:
    """Stored bytes of one quantized linear weight with its quantization constants."""
    if inputs.quant == "nf4":
        blocks = numel / NF4_BLOCK_SIZE
        if inputs.device_type != "cuda" or inputs.double_quant:
            # 4-bit codes + int8 absmax per 64 + one factor per 256 absmax (torchao always double-quantizes)
            return numel / 2 + blocks + 4 * blocks / NF4_SCALER_BLOCK_SIZE
        return numel / 2 + 4 * blocks  # fp32 absmax per 64 weights
    if inputs.quant == "int8":
        return numel  # + one scale per output row, added by the caller
    return numel * inputs.dtype_bytes


def _layer_linear_bytes(inputs: PlanInputs) -> float:
    """Stored bytes of one decoder layer's linear weights, quantized as asked."""
    total = 0.0
    for d_in, d_out in inputs.arch.linear_shapes().values():
        total += _quantized_linear_bytes(d_in * d_out, inputs)
        if inputs.quant == "int8":
            total += 4 * d_out  # fp32 row scales (bitsandbytes SCB)
    return total


def layer_weight_bytes(inputs: PlanInputs) -> int:
    """Frozen weights of one decoder layer (every layer has the same shapes): linears, norms, biases."""
    return int(_layer_linear_bytes(inputs) + inputs.arch.layer_other_params() * inputs.dtype_bytes)


def replicated_weight_bytes(inputs: PlanInputs) -> int:
    """Weights outside the decoder layers: embeddings, output head (when untied) and final norm."""
    return (inputs.arch.embedding_params() + inputs.arch.hidden) * inputs.dtype_bytes


def base_weight_bytes(inputs: PlanInputs) -> int:
    """Frozen base: linear layers quantized as asked; embeddings, output head and norms in the compute dtype."""
    arch, a = inputs.arch, inputs.dtype_bytes
    total = _layer_linear_bytes(inputs) * arch.layers
    total += (arch.layer_other_params() * arch.layers + arch.embedding_params() + arch.hidden) * a
    return int(total)


# ---------------------------------------------------------------- activations


def _lora_saved(inputs: PlanInputs, t: int, d_in: int, d_out: int, shared_seen: set[str], key: str,
                input_rg: bool = True) -> int:
    """What one adapted linear layer saves for backward (peft LoRA `Linear.forward`).

    The adapters compute in the model's dtype (a 16-bit model's fp32 LoRA weights are cast, not its activations:
    training/speed.adapters_in), so lora_A's input and output are in the compute dtype. lora_A saves its input:
    dropout's output when dropout > 0, which also saves its mask (a bool mask on CUDA, torch's fused
    native_dropout, and on the CPU, desktune's WordDropout; a noise tensor in the compute dtype elsewhere), the
    mask only when x itself needs a gradient (`input_rg`, false before the first adapter of layer 0). Without
    dropout it is the layer's input itself, shared by every adapted layer reading it (q/k/v, gate/up; o_proj's
    input is the attention output, already saved by sdpa), counted once. lora_B saves lora_A's output (t x r).
    DoRA also saves the base output (t x out, a) and the scaled LoRA output (t x out, fp32).
    """
    a, r = inputs.dtype_bytes, inputs.lora_r
    saved = a * t * r
    if inputs.lora_dropout > 0:
        mask = (1 if inputs.device_type in ("cuda", "cpu") else a) if input_rg else 0
        saved += (a + mask) * t * d_in
    elif key not in shared_seen:
        shared_seen.add(key)
        saved += a * t * d_in
    if inputs.use_dora:
        saved += (a + 4) * t * d_out
    return saved


def _attention_saved(inputs: PlanInputs, t: int) -> int:
    """What the attention kernel saves (q/k/v after RoPE, its output, and its softmax statistics or weights).

    sdpa / flash_attention_2 save q, k, v, output and the fp32 logsumexp (batch x heads x seq). transformers
    repeats k and v to every head (repeat_kv) when sdpa gets a mask, i.e. when the batch is padded; sdpa then
    also saves the mask, made additive (batch x seq x seq, compute dtype), per layer.
    eager also keeps the fp32 softmax (batch x heads x seq x seq) and its cast to the compute dtype, which
    the second matmul saves (the same tensor in fp32), and with soft-capping (Gemma 2) the tanh output.
    """
    arch, a = inputs.arch, inputs.dtype_bytes
    b, s = inputs.micro_batch, inputs.seq_len
    padded = inputs.padded if inputs.padded is not None else inputs.micro_batch > 1
    q = a * t * arch.q_dim
    kv = a * t * arch.kv_dim
    if inputs.attn_implementation == "eager":
        rep = a * t * arch.q_dim  # repeat_kv (a copy unless heads == kv_heads)
        kv_saved = 2 * (rep if arch.kv_heads != arch.heads else kv)
        scores = b * arch.heads * s * s
        weights = 4 * scores + (a * scores if a != 4 else 0)
        if arch.attn_logit_softcap:
            weights += a * scores
        return q + kv_saved + weights
    mask = 0
    if inputs.attn_implementation == "sdpa" and padded:
        # sdpa turns the bool mask into an additive float mask (batch x 1 x seq x seq, compute dtype), which
        # its backward saves, in every layer
        mask = a * b * s * s
    if inputs.attn_implementation == "sdpa" and padded and arch.kv_heads != arch.heads:
        kv_saved = 2 * a * t * arch.q_dim
    else:
        kv_saved = 2 * kv
    lse = 4 * b * arch.heads * s
    out = a * t * arch.q_dim
    if cpu_fp32_attention(inputs):  # fp32 copies of q, k, v and the fp32 output are what SDPA saves
        q, kv_saved, out = 4 * t * arch.q_dim, 2 * 4 * t * arch.kv_dim, 4 * t * arch.q_dim
    if arch.family == "phi3":  # v is a view of the fused qkv output, which stays alive whole
        kv_saved = kv_saved // 2 + a * t * (arch.q_dim + 2 * arch.kv_dim)
    return q + kv_saved + out + lse + mask


def cpu_packed_16bit(inputs: PlanInputs) -> bool:
    """Packed rows of a 16-bit model on the CPU (models/packed_attention.py runs their attention)."""
    return (inputs.device_type == "cpu" and inputs.dtype_bytes == 2 and inputs.packed
            and inputs.attn_implementation == "sdpa")


def cpu_kernel_attention(inputs: PlanInputs) -> bool:
    """desktune's CPU kernel runs the attention (models/cpu_attention.py): it saves q, k, v and its output as
    they are plus an fp32 log-sum-exp, like SDPA in 16 bits; its backward makes fp32 key/value gradients per
    query head before adding each group's."""
    return (cpu_packed_16bit(inputs) and inputs.cpu_attention_kernel
            and inputs.arch.head_dim == CPU_ATTENTION_HEAD_DIM)


def cpu_fp32_attention(inputs: PlanInputs) -> bool:
    """Packed 16-bit rows on the CPU without the kernel: each sample's SDPA runs in fp32 (models/packed_attention
    `_fp32_on_cpu`), so it saves fp32 copies of q, k and v and its fp32 output, and the output o_proj reads (cast
    back) is a tensor of its own."""
    return cpu_packed_16bit(inputs) and not cpu_kernel_attention(inputs)


def layer_saved_bytes(inputs: PlanInputs, input_requires_grad: bool = True) -> int:
    """Bytes one decoder layer saves for backward (autograd's saved tensors, each storage once).

    `input_requires_grad=False` is layer 0 without gradient checkpointing: the frozen embedding's output needs
    no gradient, so nothing before the first adapted layer is saved.
    """
    return sum(_layer_parts(inputs, input_requires_grad))


def _layer_parts(inputs: PlanInputs, input_requires_grad: bool = True) -> tuple[int, int]:
    """A layer's saved bytes split in two: (input norm, q/k/v adapters and attention kernel; the rest: o_proj's
    adapter, the other norms and the MLP), the second part being released before the attention's backward."""
    arch, a = inputs.arch, inputs.dtype_bytes
    t = inputs.micro_batch * inputs.seq_len
    h, i = arch.hidden, arch.intermediate
    shapes = arch.linear_shapes()
    targets = set(target_modules(inputs))
    norm = 4 * t * h + 4 * t  # RMSNorm: its input in fp32 (pow and mul save it) and rsqrt (t x 1, fp32)
    # o_proj's input is sdpa's / flash's output (already counted), laid out so the transpose needs no copy
    own_output = inputs.attn_implementation == "eager" or cpu_fp32_attention(inputs)
    shared: set[str] = set() if own_output else {"o_in"}
    total = 0
    rg = input_requires_grad
    if rg:
        total += norm  # input_layernorm
    for name in ("q_proj", "k_proj", "v_proj", "qkv_proj"):
        if name in targets:
            total += _lora_saved(inputs, t, *shapes[name], shared, "attn_in", rg)
    attn_rg = rg or bool(targets & {"q_proj", "k_proj", "v_proj", "qkv_proj"})
    if attn_rg:
        total += _attention_saved(inputs, t)
    attn_part, total = total, 0
    if "o_proj" in targets:
        total += _lora_saved(inputs, t, *shapes["o_proj"], shared, "o_in")  # input: the attention output copy
    rg = attn_rg or "o_proj" in targets
    if rg:
        total += norm * (arch.norms_per_layer - 1)  # post-attention (+ Gemma 2's pre/post-feedforward) norms
    for name in ("gate_proj", "up_proj", "gate_up_proj"):
        if name in targets:
            total += _lora_saved(inputs, t, *shapes[name], shared, "mlp_in")
    gate_rg = rg or bool(targets & {"gate_proj", "gate_up_proj"})
    up_rg = rg or bool(targets & {"up_proj", "gate_up_proj"})
    # act(gate) saves gate; act(gate) * up saves up (if act(gate) needs grad) and act(gate) (if up does)
    total += a * t * i * (2 * gate_rg + up_rg)
    if "down_proj" in targets:
        total += _lora_saved(inputs, t, *shapes["down_proj"], shared, "down_in")  # input: act(gate) * up
    if not rg and arch.norms_per_layer > 2 and (gate_rg or up_rg):
        total += norm  # Gemma 2's post-feedforward norm
    return attn_part, total


def _largest_dequantized(inputs: PlanInputs) -> int:
    """A quantized linear dequantizes its whole weight (out x in, compute dtype) for each matmul, forward and
    backward; the largest one is the transient. DoRA also builds lora_B @ lora_A and the weight norm (fp32)."""
    shapes = inputs.arch.linear_shapes().values()
    largest = max(d_in * d_out for d_in, d_out in shapes)
    total = inputs.dtype_bytes * largest if inputs.quant != "none" else 0
    if inputs.use_dora:
        total += 2 * 4 * largest
    return total


def _loss_bytes(inputs: PlanInputs) -> tuple[int, int]:
    """(saved after forward, peak while computing) of the output head and cross-entropy.

    Rows: N = target positions. Full logits (the standard path): the model returns batch x seq x V logits
    (a), `.float()` / flattening copies them to fp32 (for a != 4 or micro_batch > 1), and log_softmax saves its
    fp32 output. Its backward holds that output, nll_loss's gradient and log_softmax's gradient at once:
    3 x N x V x 4. Chunked (desktune): the hidden rows at target positions are gathered (N x H x a) and the
    gradient for them (N x H x a) is formed in forward one chunk of rows at a time: the chunk's fp32 logits,
    worked on in place (plus the a-byte logits they are copied from when a != 4), and the chunk's row gradient.
    Only that gradient and the gather's indices are saved. Gemma 2's final soft-cap keeps a tanh and a scaled
    copy (2 x V x 4) more per row.
    """
    arch, a = inputs.arch, inputs.dtype_bytes
    b, s = inputs.micro_batch, inputs.seq_len
    v, h = arch.vocab, arch.hidden
    n = max(1, math.ceil(inputs.target_fraction * b * (s - 1)))
    cap = 4 if arch.final_logit_softcap else 0
    if not inputs.chunked_loss:
        copy = 4 * n * v if (a != 4 or b > 1) else 0
        saved = (4 + cap) * n * v
        fwd = a * b * s * v + copy + saved + cap * n * v
        bwd = saved + 8 * n * v
        return saved, max(fwd, bwd)
    rows = min(n, chunk_rows(v))
    index = 9 * n  # the gather's bool mask and the int64 targets
    saved = index + a * n * h  # the row gradient
    chunk = rows * v * (4 + 2 * cap + (a if a != 4 else 0)) + a * rows * h
    return saved, saved + a * n * h + chunk


def _layer_backward_transient(inputs: PlanInputs, dequant: int = 0) -> int:
    """Temporaries on top of one layer's saved tensors, the largest moment of its backward (or recompute).

    The MLP's backward holds the gradient of act(gate) * up (t x I) and then the gradients of act(gate) and
    of up (2 x t x I) before their saved inputs are released; when down_proj is adapted, its saved input is
    released before those two exist (one t x I less). A quantized down_proj dequantizes its weight (`dequant`)
    for its backward, when only the first of those gradients exists.
    The attention's backward comes after the MLP's saved tensors (and o_proj's adapter input) are released:
    eager holds the gradient of the attention weights (batch x heads x seq x seq, a) and of the scores (fp32)
    next to the saved softmax; sdpa / flash make the gradients of q, k and v.
    Plus, in both, the incoming gradient of the hidden state (t x H).
    """
    arch = inputs.arch
    t = inputs.micro_batch * inputs.seq_len
    a, i = inputs.dtype_bytes, arch.intermediate
    mlp = 2 if "down_proj" in target_modules(inputs) else 3
    mlp_peak = max(mlp * a * t * i, a * t * i + dequant)
    if inputs.attn_implementation == "eager":
        attn_peak = (a + 4) * inputs.micro_batch * arch.heads * inputs.seq_len ** 2
    elif cpu_kernel_attention(inputs):  # dq; fp32 dk, dv per query head; one group sum in fp32 and its cast
        attn_peak = (a + 8) * t * arch.q_dim + (4 + a) * t * arch.kv_dim
    else:  # the gradients of q, k and v (in fp32 where the CPU's packed attention runs in fp32)
        attn_peak = (4 if cpu_fp32_attention(inputs) else a) * t * (arch.q_dim + 2 * arch.kv_dim)
    attn_peak = max(attn_peak, dequant) - _layer_parts(inputs)[1]
    return a * t * arch.hidden + max(mlp_peak, attn_peak)


def checkpointed_layers(n_layers: int, mode: bool | str) -> int:
    """Decoder layers that recompute in backward: all (full / True), every second one (selective), or none."""
    if mode == "selective":
        return n_layers // 2
    return n_layers if mode else 0


def estimate(inputs: PlanInputs) -> Plan:
    """The predicted peak memory of one training step on one device, by component."""
    return _one_process(inputs) if inputs.nproc == 1 else _several_processes(inputs)


def _one_process(inputs: PlanInputs) -> Plan:
    """The peak of a step run by a single process on its device."""
    arch, a = inputs.arch, inputs.dtype_bytes
    t = inputs.micro_batch * inputs.seq_len
    n_layers = arch.layers
    weights = base_weight_bytes(inputs)
    adapter = 4 * sum(adapter_tensors(inputs))
    # set to None after every optimizer step, gradients exist during the forward/backward peak only from the
    # second micro-batch of an accumulation on (created layer by layer in the first one's backward)
    grads = adapter if inputs.grad_accum > 1 else 0
    state = optimizer_state_bytes(inputs)
    # shared by every layer: RoPE cos and sin (seq x head_dim, compute dtype), saved by the q/k multiplications
    rope = 2 * a * inputs.seq_len * arch.head_dim
    final_norm = 4 * t * arch.hidden + 4 * t
    _, loss_peak = _loss_bytes(inputs)
    layer = layer_saved_bytes(inputs)
    dequant = _largest_dequantized(inputs)
    transient_layer = _layer_backward_transient(inputs, dequant)
    n_ckpt = checkpointed_layers(n_layers, inputs.gradient_checkpointing)
    if n_ckpt:
        # non-reentrant checkpointing keeps a checkpointed layer's input (t x H x a); backward recomputes one
        # layer at a time. The attention mask is a checkpointed input too: eager's additive mask (batch x 1 x
        # seq x seq, a), sdpa's bool mask when the batch is padded, or the packed row's block mask (t x t)
        padded = inputs.padded if inputs.padded is not None else inputs.micro_batch > 1
        mask_bytes = {"eager": a, "sdpa": 1 if padded or inputs.packed else 0}.get(inputs.attn_implementation, 0)
        mask_cols = t if inputs.packed else inputs.seq_len
        plain = n_layers - n_ckpt  # selective: layer 0 and every second layer after it keep their saved tensors
        kept = (n_ckpt * a * t * arch.hidden + rope + final_norm + mask_bytes * t * mask_cols
                + plain * layer)  # checkpointing makes the embeddings' output require grad: layer 0 saves it all
        at_loss = kept + loss_peak
        # in fp32 the recomputed input norm saves the checkpointed input itself (no fp32 copy to make)
        recomputed = layer - (4 * t * arch.hidden if a == 4 else 0)
        at_layer = kept - final_norm + recomputed + transient_layer
        act_note = (f"{n_ckpt} layer inputs kept (checkpointing)"
                    + (f", {plain} layers' saved tensors" if plain else "")
                    + "; a layer's saved tensors when recomputed")
    else:
        kept = layer_saved_bytes(inputs, input_requires_grad=False) + (n_layers - 1) * layer + rope + final_norm
        at_loss = kept + loss_peak
        at_layer = kept - final_norm + transient_layer
        act_note = f"saved for backward by {n_layers} layers ({layer / MiB:.0f} MiB per layer), final norm, RoPE"
    # the optimizer step holds every gradient, plus two temporaries of the largest tensor (single-tensor AdamW)
    optim_peak = adapter - grads + 4 * max(adapter_tensors(inputs), default=0) * 2
    phases = {"start of backward (loss)": at_loss, "layer backward": at_layer}
    phase = max(phases, key=lambda k: phases[k])
    plan = Plan(inputs=inputs, phase=phase)
    quant_note = {"none": f"{8 * a}-bit", "nf4": "NF4 + quantization constants", "int8": "int8 + row scales"}
    plan.components += [
        Component("base weights", weights, f"{arch.n_params / 1e9:.2f}B params, linear layers "
                  f"{quant_note[inputs.quant]}; embeddings/norms {8 * a}-bit"),
        Component("adapter weights", adapter, f"LoRA r={inputs.lora_r} on {', '.join(target_modules(inputs))} (fp32)"),
        Component("adapter gradients", grads, "fp32" + ("" if grads else ": none yet at the peak (grad_accum 1)")),
        Component("optimizer state", state, _optim_note(inputs)),
    ]
    if optim_peak > phases[phase]:  # the optimizer step is the peak (never, for realistic LoRA)
        plan.phase = "optimizer step"
        plan.components.append(Component("optimizer step", optim_peak, "all gradients + AdamW temporaries"))
    elif phase == "start of backward (loss)":
        plan.components += [
            Component("activations", kept, act_note),
            Component("logits and loss", loss_peak, _loss_note(inputs)),
        ]
    else:
        recompute = recomputed if n_ckpt else 0
        plan.components += [
            Component("activations", kept - final_norm + recompute, act_note),
            Component("layer backward", transient_layer, "gradient temporaries of one layer"
                      + (" (or a dequantized weight)" if dequant else "")),
        ]
    if inputs.device_type == "cuda":
        plan.components.append(Component("cuBLAS workspace", CUBLAS_WORKSPACE_BYTES, "in the CUDA allocator"))
    plan.components.append(_overhead(inputs.device_type, inputs.dtype_bytes))
    return plan


def _overhead(device_type: str, dtype_bytes: int = 2) -> Component:
    """Memory of the process that is not tensors: the CUDA context, or on the CPU what was measured there (for a
    model of `dtype_bytes` per weight)."""
    if device_type == "cuda":
        return Component("framework overhead", CUDA_CONTEXT_BYTES, "CUDA context and kernels (not tensors)")
    if device_type == "cpu":
        runtime = CPU_RUNTIME_FP32_BYTES if dtype_bytes >= 4 else CPU_RUNTIME_BYTES
        return Component("framework overhead", CPU_LIBRARY_BYTES + runtime,
                         "libraries, kernel caches, allocator slack (not tensors; measured RSS)")
    return Component("framework overhead", 0, f"none counted on {device_type} (tensor-level accounting)")


def _optim_note(inputs: PlanInputs) -> str:
    kind = "8-bit blockwise" if inputs.optimizer.endswith("8bit") else "fp32"
    paged = "; paged: can spill to CPU RAM" if inputs.optimizer.startswith("paged") else ""
    return f"AdamW {kind} exp_avg + exp_avg_sq{paged}"


def _loss_note(inputs: PlanInputs) -> str:
    if inputs.chunked_loss:
        return f"chunked: ≤{chunk_rows(inputs.arch.vocab)} rows x {inputs.arch.vocab} vocab at a time"
    return f"full logits: {inputs.micro_batch} x {inputs.seq_len} x {inputs.arch.vocab}, fp32 log-softmax"


# ---------------------------------------------------------------- several processes

SHARDED = ("adapter weights", "adapter gradients", "optimizer state", "optimizer step")  # fsdp2: 1/nproc each


def process_share(inputs: PlanInputs) -> tuple[int, int]:
    """(micro-batch, micro-batches per optimizer step) of one of `nproc` processes.

    micro_batch is per process; the step's micro_batch x grad_accum samples are split across the processes, each
    running ceil(samples / nproc) of them in micro-batches of micro_batch (one smaller one when its share is).
    """
    samples = math.ceil(inputs.micro_batch * inputs.grad_accum / inputs.nproc)
    micro = min(inputs.micro_batch, samples)
    return micro, math.ceil(samples / micro)


def _several_processes(inputs: PlanInputs) -> Plan:
    """Per-device peak of one of `nproc` processes: a single process's plan of its share of the samples, with
    ddp's gradient buckets (one fp32 copy of the trainable gradients, gradient_as_bucket_view off) or fsdp2's
    sharded layers."""
    micro, accum = process_share(inputs)
    local = _one_process(inputs.with_(micro_batch=micro, grad_accum=accum, nproc=1))
    plan = Plan(inputs=inputs, components=list(local.components), phase=local.phase)
    if inputs.distributed == "fsdp2":
        _shard_layers(plan)
        return plan
    at = [c.name for c in plan.components].index("optimizer state") + 1
    plan.components.insert(at, Component("DDP gradient buckets", plan["adapter weights"],
                                         "fp32 copy of the trainable gradients, all-reduced bucket by bucket"))
    return plan


def _shard_layers(plan: Plan) -> None:
    """fsdp2: each decoder layer's weights, adapters, their gradients and optimizer state 1/nproc per device.

    desktune calls fully_shard on every decoder layer only: embeddings, output head and final norm stay whole on
    every device. FSDP2 all-gathers the layer computing and prefetches the next, so two layers are whole at once
    (base weights and adapters), plus one layer's unsharded adapter gradients before their reduce-scatter. A
    QLoRA base stores its 4-bit codes in the compute dtype (bnb_4bit_quant_storage) to be sharded: same bytes.
    With offload_params, FSDP2's CPUOffloadPolicy keeps the shards, their gradients and the optimizer state in
    host memory (the optimizer step runs on the CPU): `plan.host`. Padding dim 0 to a multiple of nproc is
    not counted.
    """
    inputs, n, offload = plan.inputs, plan.inputs.nproc, plan.inputs.offload_params
    replicated = replicated_weight_bytes(inputs)
    shard = math.ceil((base_weight_bytes(inputs) - replicated) / n)
    layer_adapter = plan["adapter weights"] // inputs.arch.layers
    where = f"1/{n} shard" + (", in host memory (offload_params)" if offload else "")
    storage = f"; NF4 codes in {8 * inputs.dtype_bytes}-bit float storage" if inputs.quant == "nf4" else ""
    rows: list[Component] = []
    for c in plan.components:
        if c.name == "base weights":
            rows.append(Component(c.name, replicated + (0 if offload else shard),
                                  f"decoder layers {where}: {human_bytes(shard)}{storage}; embeddings, head, "
                                  f"final norm whole ({human_bytes(replicated)})"))
            rows.append(Component("unsharded layers", 2 * (layer_weight_bytes(inputs) + layer_adapter)
                                  + layer_adapter, "two whole decoder layers (all-gathered + prefetched) and one "
                                  "layer's adapter gradients before reduce-scatter"))
        elif c.name in SHARDED:
            rows.append(Component(c.name, 0 if offload else math.ceil(c.bytes / n), f"{where}; {c.note}"))
        else:
            rows.append(c)
    plan.components = rows
    if offload:
        plan.host = _offloaded(inputs, shard)


def _offloaded(inputs: PlanInputs, base_shard: int) -> list[Component]:
    """Host memory of `nproc` processes on one node offloading their shards: parameters, gradients, optimizer
    state, and each process's own memory that is not tensors (as measured for a CPU run)."""
    n = inputs.nproc
    adapter = math.ceil(4 * sum(adapter_tensors(inputs)) / n)
    state = math.ceil(optimizer_state_bytes(inputs) / n)
    overhead = _overhead("cpu", inputs.dtype_bytes)
    return [
        Component("sharded parameters", n * (base_shard + adapter), f"{n} processes x {human_bytes(base_shard)} "
                  f"base + {human_bytes(adapter)} adapter shards"),
        Component("sharded gradients and optimizer state", n * (adapter + state), f"{n} processes, fp32"),
        Component("process overhead", n * overhead.bytes, f"{n} processes x {human_bytes(overhead.bytes)}: "
                  f"{overhead.note}"),
    ]


# ---------------------------------------------------------------- fitting


def _bisect(lo_ok: int, hi: int, fits: Callable[[int], bool]) -> int:
    """Largest integer in [lo_ok, hi] with fits(x), given fits(lo_ok) and monotonicity."""
    lo = lo_ok
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def largest_fitting(inputs: PlanInputs, budget_bytes: int, max_seq: int = 1 << 20,
                    max_batch: int = 4096) -> tuple[int, int]:
    """(largest seq_len at this micro-batch, largest micro-batch at this seq_len) that fit; exact, by bisection.

    0 where even 1 does not fit.
    """
    def seq_fits(s: int) -> bool:
        return estimate(inputs.with_(seq_len=s)).total <= budget_bytes

    def batch_fits(b: int) -> bool:
        return estimate(inputs.with_(micro_batch=b)).total <= budget_bytes

    best_seq = _bisect(2, max_seq, seq_fits) if seq_fits(2) else 0
    best_batch = _bisect(1, max_batch, batch_fits) if batch_fits(1) else 0
    return best_seq, best_batch


def fit_settings(inputs: PlanInputs, budget_bytes: int,
                 effective_batch: int) -> tuple[int, int, bool | str] | None:
    """(micro_batch, grad_accum, gradient_checkpointing) that fit, keeping micro x accum == effective_batch.

    The largest micro-batch dividing the effective batch, without checkpointing when that fits, else with
    selective checkpointing (half the recompute), else with full checkpointing.
    """
    divisors = [d for d in range(effective_batch, 0, -1) if effective_batch % d == 0]
    for ckpt in (False, "selective", "full"):
        for micro in divisors:
            trial = inputs.with_(micro_batch=micro, grad_accum=effective_batch // micro, gradient_checkpointing=ckpt)
            if estimate(trial).total <= budget_bytes:
                return micro, effective_batch // micro, ckpt
    return None


QLORA = "4-bit base, QLoRA (model.quant: nf4)"


def _candidate_changes(inputs: PlanInputs) -> list[tuple[str, PlanInputs]]:
    """Single changes, least disruptive first."""
    out: list[tuple[str, PlanInputs]] = []
    if not inputs.chunked_loss:
        out.append(("chunked loss (train.chunked_loss: true)", inputs.with_(chunked_loss=True)))
    if not inputs.optimizer.endswith("8bit"):
        name = f"{inputs.optimizer}_8bit"
        out.append((f"8-bit optimizer (train.optimizer: {name})", inputs.with_(optimizer=name)))
    if inputs.micro_batch > 1:
        for micro in sorted({max(1, inputs.micro_batch // 2), 1}, reverse=True):
            accum = inputs.grad_accum * inputs.micro_batch // micro
            out.append((f"micro_batch_size {micro} with grad_accum {accum} (same effective batch)",
                        inputs.with_(micro_batch=micro, grad_accum=accum)))
    if not inputs.gradient_checkpointing:
        out.append(("selective gradient checkpointing (train.gradient_checkpointing: selective)",
                    inputs.with_(gradient_checkpointing="selective")))
    if inputs.gradient_checkpointing != "full":
        out.append(("gradient checkpointing (train.gradient_checkpointing: full)",
                    inputs.with_(gradient_checkpointing="full")))
    if inputs.nproc > 1 and inputs.distributed != "fsdp2":
        out.append(("shard the decoder layers (train.distributed: fsdp2)", inputs.with_(distributed="fsdp2")))
    if inputs.quant != "nf4":
        out.append((QLORA, inputs.with_(quant="nf4")))
    if inputs.nproc > 1 and not inputs.offload_params:
        also = "train.distributed: fsdp2, " if inputs.distributed != "fsdp2" else ""
        out.append((f"sharded parameters in host memory ({also}train.offload_params: true)",
                    inputs.with_(distributed="fsdp2", offload_params=True)))
    return out


def suggestions(inputs: PlanInputs, budget_bytes: int) -> list[tuple[str, Plan]]:
    """Changes that make the step fit the budget, least disruptive first, each with its plan.

    Order: single changes that fit on their own (chunked loss, 8-bit optimizer, smaller micro-batch with more
    accumulation, gradient checkpointing, with several processes fsdp2, 4-bit base, with several processes
    offloaded parameters); when none does, those changes combined in that order
    until it fits; then, for a base not loaded in 4 bits, QLoRA with the least disruptive change that fits
    beside it, when no option above includes it (the usual fix for a 16-bit base); last, the longest sequence
    length that fits (with the combination when one was needed). Empty when the step already fits.
    """
    if estimate(inputs).total <= budget_bytes:
        return []
    singles = _candidate_changes(inputs)
    out: list[tuple[str, Plan]] = []
    for desc, trial in singles:
        plan = estimate(trial)
        if plan.total <= budget_bytes:
            out.append((desc, plan))
    base, names = inputs, []
    if not out:
        for desc, trial in singles:
            if desc.startswith("micro_batch_size"):
                continue
            base = _apply_change(base, inputs, trial)
            names.append(desc)
            if estimate(base).total <= budget_bytes:
                break
        micro = [(d, t) for d, t in _candidate_changes(base) if d.startswith("micro_batch_size 1")]
        if estimate(base).total > budget_bytes and micro:
            base = micro[0][1]
            names.append(micro[0][0])
        plan = estimate(base)
        if plan.total <= budget_bytes:
            out.append((" + ".join(names), plan))
    qlora = _qlora_option(inputs, budget_bytes) if not any(QLORA in desc for desc, _ in out) else None
    out += [qlora] if qlora else []
    seq, _ = largest_fitting(base, budget_bytes)
    if 0 < seq < inputs.seq_len:
        out.append((" + ".join([*names, f"shorter sequences (data.max_seq_len: {seq})"]),
                    estimate(base.with_(seq_len=seq))))
    return out


def _qlora_option(inputs: PlanInputs, budget_bytes: int) -> tuple[str, Plan] | None:
    """4-bit loading (QLoRA), alone or with the least disruptive single change that fits beside it; None for a
    base already in NF4 or when no such pair fits."""
    if inputs.quant == "nf4":
        return None
    nf4 = inputs.with_(quant="nf4")
    for desc, trial in [("", nf4), *_candidate_changes(nf4)]:
        plan = estimate(trial)
        if plan.total <= budget_bytes:
            return (f"{QLORA} + {desc}" if desc else QLORA), plan
    return None


def _apply_change(current: PlanInputs, original: PlanInputs, changed: PlanInputs) -> PlanInputs:
    """Apply to `current` the fields in which `changed` differs from `original`."""
    diff = {f: getattr(changed, f) for f in ("chunked_loss", "optimizer", "gradient_checkpointing", "quant",
                                             "micro_batch", "grad_accum", "seq_len", "distributed", "offload_params")
            if getattr(changed, f) != getattr(original, f)}
    return current.with_(**diff)

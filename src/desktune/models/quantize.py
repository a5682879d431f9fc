"""Quantize the frozen base model: bitsandbytes at load time on CUDA, torchao after a 16-bit load on the CPU.

Where which backend runs, and why:

* CUDA: bitsandbytes NF4 (QLoRA: block size 64, optional double quantization) or LLM.int8 via
  `transformers.BitsAndBytesConfig` at `from_pretrained` time - the standard, fused path.
* CPU (and MPS, untested there): torchao, applied by `quantize_in_place` after a 16-bit load.
  bitsandbytes 4-bit is never used off CUDA: in bitsandbytes 0.50 a no-grad/eval forward on the CPU repacks
  the 4-bit weights, and every LoRA gradient after that is silently wrong (relative error ~1).
  torchao NF4 dequantizes to the activation dtype and runs a plain matmul forward and backward, so LoRA
  gradients equal those of the dequantized model exactly; torchao int8 weight-only likewise
  (within float rounding). The weights stay ordinary `nn.Linear` parameters, so peft wraps them as usual.

torchao's NF4 always stores the per-block scales as int8 with one factor per `scaler_block_size` scales
(double quantization); it has no option for full-precision scales, so `double_quant=False` changes nothing
on the CPU (measured: double quantization adds <0.01% to the ~9% NF4 weight error).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import warnings
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from desktune.constants import NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE
from desktune.errors import DesktuneError
from desktune.hardware import DTYPES

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

QUANTS = ("none", "nf4", "int8")
BACKENDS = ("none", "bnb-nf4", "bnb-int8", "torchao-nf4", "torchao-int8")
LOAD_TIME_BACKENDS = ("bnb-nf4", "bnb-int8")

# Tensor classes (matched by name, so nothing is imported to ask) whose storage is quantized.
_QUANTIZED_TENSOR_CLASSES = frozenset({"NF4Tensor", "TorchAOBaseTensor", "Params4bit", "Int8Params"})
_QUANTIZED_MODULE_CLASSES = frozenset({"Linear4bit", "Linear8bitLt"})
_NOISY_LOGGERS = ("torchao", "torchao.kernel.intmm", "torch.utils._pytree")
_TRANSFORMERS_TORCHAO_IMPORTS = (
    "torchao.utils",
    "torchao.quantization",
    "torchao.prototype.safetensors.safetensors_support",
    "torchao.prototype.safetensors.safetensors_utils",
)


class _DropBnbKernelsNotice(logging.Filter):
    """Drops the log lines bitsandbytes 0.50 causes when imported on a CPU with AVX512-BF16 and it cannot fetch its
    CPU 4-bit gemm from the Hub's kernels-community (which desktune never uses: torchao quantizes on the CPU):
    its own advice to `pip install kernels`, and the `kernels` package's offline notice about that repository.

    peft imports bitsandbytes whenever it is installed, so every run would print them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not (text.startswith(_BNB_KERNELS_NOTICE) or _BNB_KERNEL_REPO in text)


_BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
_BNB_KERNEL_REPO = "'kernels-community/quantization-bitsandbytes'"
# their module loggers; the filter must be there before the import
for _logger in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    if not any(isinstance(f, _DropBnbKernelsNotice) for f in logging.getLogger(_logger).filters):
        logging.getLogger(_logger).addFilter(_DropBnbKernelsNotice())


def _check_quant(quant: str) -> str:
    q = (quant or "none").lower()
    if q not in QUANTS:
        raise DesktuneError(f"unknown quantization '{quant}'", where="model.quant",
                            fix="use none, nf4 or int8")
    return q


def choose_backend(quant: str, device_type: str) -> str:
    """The backend that quantizes the frozen base for `quant` ("none", "nf4", "int8") on `device_type`.

    Returns one of `BACKENDS`. Never a bitsandbytes 4-bit backend off CUDA (its CPU gradients are wrong).
    """
    q = _check_quant(quant)
    if q == "none":
        return "none"
    if device_type == "cuda":
        return f"bnb-{q}"
    if device_type in ("cpu", "mps"):
        return f"torchao-{q}"
    raise DesktuneError(f"no quantization backend for device '{device_type}'", where="model.quant",
                        fix="set model.quant: none, or train on a CUDA GPU or the CPU")


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError as e:
        raise DesktuneError(f"unknown compute dtype '{dtype}'", where="model.dtype",
                            fix="use bf16, fp16 or fp32") from e


def load_time_config(
    quant: str, double_quant: bool, compute_dtype: torch.dtype | str | None, device_type: str,
    shardable: bool = False,
) -> BitsAndBytesConfig | None:
    """A `transformers.BitsAndBytesConfig` for backends applied at `from_pretrained` time, else None.

    `shardable` (FSDP2): the 4-bit codes are stored in the compute dtype's storage, so FSDP2 can shard them like
    any other parameter of that dtype."""
    backend = choose_backend(quant, device_type)
    if backend not in LOAD_TIME_BACKENDS:
        return None
    from transformers import BitsAndBytesConfig

    if backend == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=_as_dtype(compute_dtype) or torch.bfloat16,
        bnb_4bit_quant_storage=(_as_dtype(compute_dtype) or torch.bfloat16) if shardable else torch.uint8,
        llm_int8_skip_modules=["lm_head"],
    )


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    """Hide the log lines and warnings torchao prints when imported without its optional CUDA kernels."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def import_torchao_quietly() -> Any:
    """Import torchao without its log noise; call before transformers loads a model (it imports torchao)."""
    with _quiet_import():
        import torchao

        for name in _TRANSFORMERS_TORCHAO_IMPORTS:  # transformers imports these later; each logs on import
            with contextlib.suppress(Exception):
                importlib.import_module(name)
    return torchao


def import_torchao_nf4() -> Any:
    """torchao's NF4 module (`to_nf4`, `NF4Tensor`, `linear_nf4`), imported quietly."""
    with _quiet_import():
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    return nf4_tensor


def _adapter_module_ids(model: nn.Module) -> set[int]:
    """Ids of modules inside peft adapter layers that are not the wrapped base layer (lora_A, lora_B, ...)."""
    ids: set[int] = set()
    for module in model.modules():
        get_base = getattr(module, "get_base_layer", None)
        if get_base is None or module is model:
            continue
        base = get_base()
        keep = {id(m) for m in base.modules()}
        ids.update(id(m) for m in module.modules() if id(m) not in keep and m is not module)
    return ids


def _targets(model: nn.Module, skip: Iterable[str]) -> list[tuple[str, nn.Linear]]:
    """The float `nn.Linear` layers to quantize: not skipped, not an adapter's, not tied to embeddings."""
    skip = tuple(skip)
    adapter_ids = _adapter_module_ids(model)
    tied: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        emb = getattr(model, getter, lambda: None)()
        if emb is not None and getattr(emb, "weight", None) is not None:
            tied.add(id(emb.weight))
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module) in adapter_ids or is_quantized_linear(module):
            continue
        if any(part in skip for part in name.split(".")) or id(module.weight) in tied:
            continue
        if not module.weight.is_floating_point():
            continue
        out.append((name, module))
    return out


def _scaler_block_size(numel: int) -> int:
    """Largest divisor of the block count up to 256: torchao asserts the scales split evenly into groups."""
    return math.gcd(numel // NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE)


def quantize_in_place(
    model: nn.Module,
    quant: str,
    double_quant: bool,
    compute_dtype: torch.dtype | str | None,
    device_type: str,
    skip: Iterable[str] = ("lm_head",),
) -> str:
    """Replace the weights of the model's linear layers by frozen quantized ones; return the backend name.

    Applies only to after-load backends (torchao on the CPU); a no-op for "none" and bitsandbytes.
    Layers named in `skip` (any dotted name part), tied to the embeddings, or owned by peft adapters are left
    alone, as are layers whose size is not a multiple of 64 (NF4). Works before or after peft wraps layers.
    """
    backend = choose_backend(quant, device_type)
    if backend not in ("torchao-nf4", "torchao-int8"):
        return backend
    dtype = _as_dtype(compute_dtype)
    targets = _targets(model, skip)
    if backend == "torchao-nf4":
        nf4 = import_torchao_nf4()
        for _, module in targets:
            w = module.weight.detach()
            if w.numel() % NF4_BLOCK_SIZE:
                continue
            if dtype is not None and w.dtype != dtype:
                w = w.to(dtype)
            q = nf4.to_nf4(w.contiguous(), NF4_BLOCK_SIZE, _scaler_block_size(w.numel()))
            module.weight = nn.Parameter(q, requires_grad=False)
    else:
        with _quiet_import():
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        chosen = {id(m) for _, m in targets}
        if dtype is not None:
            for _, module in targets:
                module.weight.data = module.weight.data.to(dtype)
        with _quiet_import():
            quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False),
                      filter_fn=lambda m, fqn: id(m) in chosen)
        for _, module in targets:
            module.weight.requires_grad_(False)
    return backend


def _base_layer(module: nn.Module) -> nn.Module:
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if get_base is not None else module


def is_quantized_tensor(t: torch.Tensor | None) -> bool:
    """Whether `t` is stored quantized (torchao NF4/int8, bitsandbytes 4/8-bit)."""
    return t is not None and any(c.__name__ in _QUANTIZED_TENSOR_CLASSES for c in type(t).__mro__)


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether `module` (or the base layer a peft adapter wraps) is a linear layer with quantized weights."""
    base = _base_layer(module)
    if type(base).__name__ in _QUANTIZED_MODULE_CLASSES:
        return True
    return is_quantized_tensor(getattr(base, "weight", None))


def quantized_linear_names(model: nn.Module) -> list[str]:
    """Names of the layers holding quantized weights (peft wrappers named, not their base_layer)."""
    names, seen = [], set()
    for name, module in model.named_modules():
        base = _base_layer(module)
        if id(base) in seen or not is_quantized_linear(module):
            continue
        seen.add(id(base))
        names.append(name)
    return names


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds as stored: a quantized subclass's inner tensors, else numel x element size."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and is_quantized_tensor(t):
        inner_names = t.__tensor_flatten__()[0]
        return sum(tensor_nbytes(getattr(t, n)) for n in inner_names if getattr(t, n, None) is not None)
    total = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)  # bitsandbytes 4-bit: packed uint8 data plus absmax
    absmax = getattr(state, "absmax", None)
    if isinstance(absmax, torch.Tensor):
        total += absmax.numel() * absmax.element_size()
    return total


def quantized_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(stored bytes, parameter count) over the quantized weights of `model`."""
    nbytes = count = 0
    seen: set[int] = set()
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and is_quantized_tensor(w) and id(w) not in seen:
            seen.add(id(w))
            nbytes += tensor_nbytes(w)
            count += w.numel()
    return nbytes, count


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a torchao-quantized linear layer as a dense tensor of its logical dtype."""
    w = _base_layer(module).weight
    if type(w).__name__ == "NF4Tensor":
        return w.get_original_weight()
    if is_quantized_tensor(w):
        return w.dequantize().to(w.dtype)
    return w.detach()

"""The model part of a GGUF file: which architectures, their hyperparameters, tensor names, layout and types, and
the streaming of planned tensors into a writer (the model and adapter exports share it).

Facts taken from llama.cpp's converter (convert_hf_to_gguf.py), read for reference:
- LlamaForCausalLM and MistralForCausalLM are written as the `llama` architecture, Qwen2ForCausalLM as `qwen2`.
- For `llama`, q_proj and k_proj rows are permuted from the Hugging Face rotary layout (the two halves of each
  head's dimensions) to llama.cpp's (interleaved pairs): per head, row (half h, index i) moves to (i, h). `qwen2`
  uses the NEOX rotary layout, as Hugging Face does, and is not permuted.
- 1-D tensors and norms are always F32; a quantized type whose block does not divide the row falls back to F16.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from desktune.errors import DesktuneError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
# --type -> (the type of the 2-D weights, the file type llama.cpp reports)
QTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0),
}
_EMBEDDINGS = ("token_embd.weight", "output.weight")


@dataclass(frozen=True)
class Arch:
    """The GGUF architecture of a Hugging Face config and the numbers the tensors need."""

    name: str  # llama | qwen2
    hf_name: str
    n_layer: int
    n_head: int
    n_head_kv: int
    tied: bool

    @property
    def permutes(self) -> bool:
        return self.name == "llama"

    def name_map(self) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(_GGUF_ARCH[self.name], self.n_layer)


def arch_of(config: Any) -> Arch:
    """The architecture to write, or a DesktuneError naming one llama.cpp's llama/qwen2 writers cannot express."""
    names = list(getattr(config, "architectures", None) or [])
    hf_name = names[0] if names else type(config).__name__.replace("Config", "ForCausalLM")
    if hf_name not in ARCHITECTURES:
        raise DesktuneError(f"GGUF export does not support the {hf_name} architecture",
                            where="config.json: architectures",
                            fix=f"export a model of a supported architecture ({', '.join(ARCHITECTURES)}), or "
                                "convert it with llama.cpp's convert_hf_to_gguf.py after `desktune merge`")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu" or getattr(config, "mlp_bias", False):
        raise DesktuneError(f"{hf_name} with hidden_act={act!r} / mlp_bias cannot be written as llama.cpp's "
                            f"{ARCHITECTURES[hf_name]}", where="config.json", fix="convert it with llama.cpp")
    n_head = config.num_attention_heads
    arch = Arch(name=ARCHITECTURES[hf_name], hf_name=hf_name, n_layer=config.num_hidden_layers, n_head=n_head,
                n_head_kv=getattr(config, "num_key_value_heads", None) or n_head,
                tied=bool(getattr(config, "tie_word_embeddings", False)))
    kind = rope_parameters(config)["rope_type"]
    if not (kind in ("default", "linear") or (kind == "llama3" and arch.name == "llama")):
        raise DesktuneError(f"RoPE scaling '{kind}' is not written by desktune's GGUF export (it writes none, linear "
                            "and Llama 3.1's llama3)", where="config.json: rope_scaling",
                            fix="convert this model with llama.cpp's convert_hf_to_gguf.py after `desktune merge`")
    return arch


def rope_parameters(config: Any) -> dict[str, Any]:
    """rope_type, rope_theta and scaling values, from either transformers' new or old config fields."""
    raw = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    raw.setdefault("rope_type", raw.get("type") or "default")
    raw.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    return raw


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_hparams(writer: gguf.GGUFWriter, config: Any, arch: Arch) -> None:
    """The architecture's hyperparameters (llama.cpp's key names under the architecture's prefix)."""
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(arch.n_layer)
    writer.add_head_count(arch.n_head)
    writer.add_head_count_kv(arch.n_head_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim(config))
    if getattr(config, "head_dim", None):
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":  # (llama3 scaling is the rope_freqs tensor; others are refused by arch_of)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def llama3_rope_factors(config: Any) -> torch.Tensor:
    """The per-frequency divisors of Llama 3.1's RoPE scaling (llama.cpp's rope_freqs.weight)."""
    rope = rope_parameters(config)
    dim, base = head_dim(config), float(rope["rope_theta"])
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def permute_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's rotary row order -> llama.cpp's, for q (n_head heads) or k (n_head_kv heads): weights,
    biases or a LoRA B matrix (the permutation acts on rows only)."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_name(arch: Arch, hf_key: str) -> str | None:
    """The GGUF tensor name of a Hugging Face state-dict key (None when llama.cpp has no such tensor)."""
    return arch.name_map().get_name(hf_key, try_suffixes=(".weight", ".bias"))


def heads_to_permute(arch: Arch, hf_key: str) -> int | None:
    """The head count for the rotary permutation of this key, or None when it is not permuted."""
    if not arch.permutes:
        return None
    if ".q_proj." in hf_key:
        return arch.n_head
    if ".k_proj." in hf_key:
        return arch.n_head_kv
    return None


def tensor_type(name: str, shape: tuple[int, ...], qtype: str, notes: list[str]) -> gguf.GGMLQuantizationType:
    """The GGML type of one tensor in a file of type `qtype` (llama.cpp's converter's rules)."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return Q.F32
    wanted = QTYPES[qtype][0]
    if qtype == "q4_0" and name in _EMBEDDINGS:
        wanted = Q.Q8_0  # as llama-quantize keeps the embeddings / head above 4 bits
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        notes.append(f"{name}: rows of {shape[-1]} are not a multiple of {block}; written as F16")
        return Q.F16
    return wanted


def nbytes(shape: tuple[int, ...], ggml_type: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[ggml_type]
    return math.prod(shape) // block * size


def encode(tensor: torch.Tensor, ggml_type: gguf.GGMLQuantizationType) -> np.ndarray:
    """A float tensor as the bytes (or floats) of `ggml_type`."""
    data = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return gguf.quants.quantize(data, ggml_type)


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file: its GGUF name, shape (Hugging Face order), type, and how to compute it."""

    name: str
    shape: tuple[int, ...]
    ggml_type: gguf.GGMLQuantizationType
    produce: Callable[[], torch.Tensor]


def stream_tensors(writer: gguf.GGUFWriter, plan: list[PlannedTensor], path: Path) -> None:
    """Write header, metadata and tensor infos, then each tensor as it is computed (one in memory at a time)."""
    for t in plan:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes(t.shape, t.ggml_type),
                               raw_dtype=t.ggml_type)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for t in plan:
            writer.write_tensor_data(encode(t.produce(), t.ggml_type))
    finally:
        writer.close()

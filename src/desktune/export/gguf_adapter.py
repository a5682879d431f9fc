"""`--adapter-only`: a PEFT LoRA adapter as a GGUF LoRA adapter (llama.cpp `--lora`, Ollama `ADAPTER`).

Facts from llama.cpp's convert_lora_to_gguf.py and its adapter loader, read for reference: general.type is
"adapter", adapter.type "lora", adapter.lora.alpha the float alpha; each adapted weight W gets two tensors named
after W's GGUF name plus ".lora_a" (A, rank x in) and ".lora_b" (B, out x rank); llama.cpp scales B @ A by
alpha / rank, rank read from B. The q/k rotary permutation of the base acts on W's rows, so it applies to B.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import torch

from desktune.errors import DesktuneError
from desktune.export.gguf_arch import (
    Arch,
    PlannedTensor,
    arch_of,
    gguf_name,
    head_dim,
    heads_to_permute,
    permute_rows,
    stream_tensors,
    tensor_type,
)
from desktune.runs.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS

_PREFIX = "base_model.model."
_FIX = "export the merged model instead (leave out --adapter-only)"


def check_lora_config(cfg: dict[str, Any], where: str) -> None:
    """Refuse what llama.cpp cannot apply: DoRA, per-layer rank/alpha, extra trained modules, LoRA biases."""
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {cfg.get('peft_type')} (only LoRA)")
    if cfg.get("use_dora"):
        problems.append("DoRA (its magnitude vectors have no place in a GGUF adapter)")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        problems.append("rank_pattern / alpha_pattern (llama.cpp has one alpha per adapter)")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']} (fully trained modules)")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        problems.append("trained biases")
    if problems:
        raise DesktuneError(f"llama.cpp cannot apply this adapter: {'; '.join(problems)}", where=where, fix=_FIX)


def lora_pairs(weights: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path -> (A, B) of a PEFT adapter file; anything else in it (embeddings, DoRA magnitudes) is refused."""
    from safetensors.torch import load_file

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights)).items():
        module, sep, part = key.removeprefix(_PREFIX).rpartition(".lora_")
        if not sep or part not in ("A.weight", "B.weight"):
            raise DesktuneError(f"llama.cpp cannot apply the adapter tensor {key} (LoRA on embeddings, DoRA "
                                "magnitudes and saved modules have no place in a GGUF adapter)",
                                where=str(weights), fix=_FIX)
        parts.setdefault(module, {})[part[0]] = tensor
    return {m: (p["A"], p["B"]) for m, p in parts.items() if "A" in p and "B" in p}


def _expected(config: Any, leaf: str) -> tuple[int, int] | None:
    """(out, in) of a decoder linear layer by its leaf name."""
    hidden, inter, hd = config.hidden_size, config.intermediate_size, head_dim(config)
    kv = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * hd
    return {"q_proj": (config.num_attention_heads * hd, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden),
            "o_proj": (hidden, config.num_attention_heads * hd), "gate_proj": (inter, hidden),
            "up_proj": (inter, hidden), "down_proj": (hidden, inter), "lm_head": (config.vocab_size, hidden)}.get(leaf)


def _base_name(arch: Arch, config: Any, module: str, a: torch.Tensor, b: torch.Tensor, where: str) -> str:
    """The base GGUF name the pair adapts, after checking it fits the base."""
    if module.endswith("lm_head") and arch.tied:
        raise DesktuneError("the adapter trains lm_head, which this base ties to its embeddings (llama.cpp cannot "
                            "apply it)", where=where, fix=_FIX)
    name = gguf_name(arch, f"{module}.weight")
    expected = _expected(config, module.rsplit(".", 1)[-1])
    if name is None or expected is None:
        raise DesktuneError(f"llama.cpp has no adaptable weight for {module}", where=where, fix=_FIX)
    if (b.shape[0], a.shape[1]) != expected or a.shape[0] != b.shape[1]:
        raise DesktuneError(f"{module}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the base's {expected} "
                            "(was the adapter trained on another base?)", where=where,
                            fix="pass the base it was trained on with --model")
    return name


def base_source(adapter: Path, cfg: dict[str, Any], model: str | None) -> str:
    """The local folder of the adapter's base (`model` when given)."""
    from desktune.models.loading import resolve_source

    base = model or cfg.get("base_model_name_or_path")
    if not base:
        raise DesktuneError("the adapter does not name its base model", where=str(adapter / ADAPTER_CONFIG),
                            fix="pass the base with --model")
    return resolve_source(base)


def _base_config(adapter: Path, cfg: dict[str, Any], model: str | None) -> Any:
    from transformers import AutoConfig

    source = base_source(adapter, cfg, model)
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise DesktuneError(f"cannot read the base model's config ({str(e).splitlines()[0]})", where=source,
                            fix="pass a local base model folder with --model") from e


def adapter_tokenizer_meta(adapter: Path, model: str | None) -> Any:
    """The base's tokenizer as the adapter was trained with it (its chat template), for the Modelfile."""
    from transformers import AutoConfig, AutoTokenizer

    from desktune.adapters import check_adapter
    from desktune.data.templates import own_template
    from desktune.export.gguf_tokenizer import tokenizer_meta
    from desktune.runs.layout import CHAT_TEMPLATE

    source = base_source(adapter, check_adapter(adapter), model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    template = adapter / CHAT_TEMPLATE
    if template.is_file():
        tokenizer.chat_template = template.read_text(encoding="utf-8")
    return tokenizer_meta(tokenizer, AutoConfig.from_pretrained(source).vocab_size, own_template(tokenizer))


def adapter_alpha(cfg: dict[str, Any], rank: int, notes: list[str]) -> float:
    """The alpha llama.cpp needs for peft's scale: alpha / r, or alpha / sqrt(r) for rsLoRA (folded into alpha)."""
    alpha = float(cfg.get("lora_alpha", rank))
    if cfg.get("use_rslora"):
        notes.append(f"rsLoRA: adapter.lora.alpha = {alpha} * sqrt({rank}) so that llama.cpp's alpha/r is the "
                     "trained alpha/sqrt(r)")
        return alpha * math.sqrt(rank)
    return alpha


def adapter_writer(adapter: Path, qtype: str, model: str | None, notes: list[str]) -> Callable[[Path], None]:
    """Check an adapter folder and return the function that writes it as a GGUF LoRA adapter."""
    from desktune.adapters import check_adapter

    where = str(adapter / ADAPTER_CONFIG)
    cfg = check_adapter(adapter)
    check_lora_config(cfg, where)
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise DesktuneError(f"no {ADAPTER_WEIGHTS} (older .bin adapters are not exported)", where=str(adapter),
                            fix="save the adapter again with safetensors")
    config = _base_config(adapter, cfg, model)
    arch = arch_of(config)
    plan: list[Any] = []
    for module, (a, b) in sorted(lora_pairs(adapter / ADAPTER_WEIGHTS).items()):
        name = _base_name(arch, config, module, a, b, where)
        heads = heads_to_permute(arch, f"{module}.weight")
        b_out = permute_rows(b, heads) if heads else b
        for suffix, t in ((".lora_a", a), (".lora_b", b_out)):
            shape = tuple(t.shape)
            plan.append(PlannedTensor(name + suffix, shape, tensor_type(name + suffix, shape, qtype, notes),
                                      lambda t=t: t))
    if not plan:
        raise DesktuneError("the adapter holds no LoRA weights", where=str(adapter / ADAPTER_WEIGHTS), fix=_FIX)
    alpha = adapter_alpha(cfg, int(cfg.get("r", plan[1].shape[1])), notes)
    notes.append(f"adapter: {len(plan) // 2} adapted weights, alpha {alpha:g}, rank {plan[1].shape[1]}")

    def write(path: Path) -> None:
        writer = gguf.GGUFWriter(path=None, arch=arch.name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(adapter.parent.name if adapter.name == "adapter" else adapter.name)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        stream_tensors(writer, plan, path)

    return write

"""Quantized frozen base: backend choice, storage, and QLoRA gradients against a dequantized reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from desktune.errors import DesktuneError
from desktune.models.quantize import (
    choose_backend,
    dequantized_weight,
    import_torchao_quietly,
    is_quantized_linear,
    load_time_config,
    quantize_in_place,
    quantized_linear_names,
    quantized_weight_bytes,
)
from tests.tiny import make_model_dir

import_torchao_quietly()

import peft  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # hidden 128: every weight is a multiple of the NF4 block (64); k/v_proj (64x128) have 128 blocks, not 256
    return make_model_dir(tmp_path_factory.mktemp("tiny-llama-128"), hidden=128)


def _load(path: Path, dtype: torch.dtype) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    model.requires_grad_(False)
    return model


def _lora(model: torch.nn.Module, dtype: torch.dtype) -> peft.PeftModel:
    """Wrap with LoRA and set every adapter weight (B too) to the same seeded random values."""
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    pm = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(1)
    for _, p in pm.named_parameters():
        if p.requires_grad:
            p.data.copy_((torch.randn(p.shape, generator=gen) * 0.1).to(dtype))
    return pm


def _grads(pm: peft.PeftModel, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    pm.train()
    pm.zero_grad()
    pm(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.float().clone() for n, p in pm.named_parameters() if p.requires_grad}


def _rel_errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(worst per-tensor, whole-gradient) relative Frobenius error."""
    assert got.keys() == ref.keys() and len(ref) == 2 * 2 * len(TARGETS)  # A and B, 2 layers
    worst = max(((got[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref)
    diff = torch.cat([(got[n] - ref[n]).flatten() for n in ref]).norm()
    return worst, (diff / torch.cat([r.flatten() for r in ref.values()]).norm()).item()


def test_choose_backend_and_load_time_config() -> None:
    assert choose_backend("none", "cpu") == "none" == choose_backend("none", "cuda")
    assert choose_backend("nf4", "cuda") == "bnb-nf4"
    assert choose_backend("int8", "cuda") == "bnb-int8"
    for device in ("cpu", "mps"):
        for quant in ("nf4", "int8"):
            backend = choose_backend(quant, device)
            assert backend.startswith("torchao-") and not backend.startswith("bnb")
            assert load_time_config(quant, True, torch.bfloat16, device) is None
    with pytest.raises(DesktuneError):
        choose_backend("int4", "cpu")
    cfg = load_time_config("nf4", True, torch.bfloat16, "cuda")
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert not load_time_config("nf4", False, "fp16", "cuda").bnb_4bit_use_double_quant
    assert load_time_config("int8", True, torch.bfloat16, "cuda").load_in_8bit
    assert load_time_config("none", True, torch.bfloat16, "cuda") is None
    assert quantize_in_place(torch.nn.Linear(64, 64), "nf4", True, torch.bfloat16, "cuda") == "bnb-nf4"


# Gradient bounds in machine epsilons of the compute dtype (torch.finfo(dtype).eps: bf16 2^-7, fp32 2^-23). An int8
# layer scales after its matmul, the dense reference before it, so the two round differently; nf4 dequantizes
# before the matmul and matches exactly. Measured for int8 (worst tensor / whole gradient / logits): bf16 2.1 / 1.3
# / 0.9 eps on an AVX512-BF16 CPU, 2.2 / 1.3 / 0.9 with its kernels held to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2,
# ATEN_CPU_CAPABILITY=avx2); fp32 8.8 / 3.9 / 3.2 and 8.3 / 3.8 / 3.2 eps.
# bf16 results are rounded once, after fp32 accumulation, so its error stays near one eps; fp32's grows with
# the length of the sums, hence the larger factor. A gradient 10% off (11.6 bf16 eps) still fails both.
EPS_FACTOR = {torch.bfloat16: 5, torch.float32: 64}


def _tolerance(dtype: torch.dtype) -> float:
    return EPS_FACTOR[dtype] * torch.finfo(dtype).eps


# peft warns that it cannot merge into int8; desktune merges into a fresh 16-bit base instead
@pytest.mark.filterwarnings("ignore:TorchaoLoraLinear was instantiated:UserWarning")
@pytest.mark.parametrize(
    ("quant", "dtype", "checkpointing"),
    [
        ("nf4", torch.bfloat16, True),
        ("nf4", torch.float32, False),
        ("int8", torch.float32, True),
        ("int8", torch.bfloat16, False),
    ],
    ids=["nf4-bf16-checkpointing", "nf4-fp32", "int8-fp32-checkpointing", "int8-bf16"],
)
def test_lora_grads_match_dequantized_reference_after_eval_and_generate(
    model_dir: Path, quant: str, dtype: torch.dtype, checkpointing: bool
) -> None:
    qmodel = _load(model_dir, dtype)  # the dtype is forced: the same checks on AVX2-only and AVX512-BF16 CPUs
    assert quantize_in_place(qmodel, quant, True, dtype, "cpu") == f"torchao-{quant}"
    names = quantized_linear_names(qmodel)
    assert len(names) == 2 * len(LINEARS)
    rpeft = _dequantized_reference(model_dir, qmodel, names, dtype)
    if checkpointing:
        qmodel.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        qmodel.enable_input_require_grads()
    qpeft = _lora(qmodel, dtype)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    tol = _tolerance(dtype)

    qpeft.eval()
    with torch.no_grad():
        q_logits = qpeft(input_ids=ids).logits.float()
        r_logits = rpeft(input_ids=ids).logits.float()
    assert ((q_logits - r_logits).norm() / r_logits.norm()).item() < tol
    out = qpeft.generate(input_ids=ids[:, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 9)

    got, ref = _grads(qpeft, ids), _grads(rpeft, ids)
    worst, total = _rel_errors(got, ref)
    assert worst < tol and total < tol, (worst / torch.finfo(dtype).eps, total / torch.finfo(dtype).eps)
    assert min(_rel_errors(got, {n: 1.1 * g for n, g in ref.items()})) > tol  # the bound catches a 10% fault
    assert all(is_quantized_linear(qpeft.get_submodule(f"base_model.model.{n}")) for n in names)


def _dequantized_reference(model_dir: Path, qmodel: torch.nn.Module, names: list[str],
                           dtype: torch.dtype) -> peft.PeftModel:
    """Plain nn.Linear layers holding the dequantized weights of `qmodel`, with the test's LoRA."""
    ref = _load(model_dir, dtype)
    for name in names:
        ref.get_submodule(name).weight.data = dequantized_weight(qmodel.get_submodule(name)).to(dtype)
    return _lora(ref, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(
    ("quant", "low", "high", "max_err"), [("nf4", 0.5, 0.56, 0.15), ("int8", 1.0, 1.1, 0.02)]
)
def test_storage_frozen_and_error(
    model_dir: Path, quant: str, low: float, high: float, max_err: float, dtype: torch.dtype
) -> None:
    original = _load(model_dir, dtype)
    model = _load(model_dir, dtype)
    quantize_in_place(model, quant, True, dtype, "cpu")
    names = quantized_linear_names(model)
    assert sorted({n.rsplit(".", 1)[1] for n in names}) == sorted(LINEARS)  # lm_head (tied) stays 16-bit
    assert not is_quantized_linear(model.lm_head)
    nbytes, count = quantized_weight_bytes(model)
    assert count == sum(original.get_submodule(n).weight.numel() for n in names)
    assert low <= nbytes / count <= high, nbytes / count  # NF4: 4 bits + int8 scale per 64 + group factors
    for name in names:
        w = model.get_submodule(name).weight
        assert not w.requires_grad
        orig = original.get_submodule(name).weight.float()
        err = ((dequantized_weight(model.get_submodule(name)).float() - orig).norm() / orig.norm()).item()
        assert 0 < err < max_err, (name, err)


def test_quantize_after_peft_wrap_keeps_adapters_float(model_dir: Path) -> None:
    pm = _lora(_load(model_dir, torch.bfloat16), torch.bfloat16)
    quantize_in_place(pm, "nf4", True, torch.bfloat16, "cpu")
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert is_quantized_linear(layer) and is_quantized_linear(layer.base_layer)
    assert not is_quantized_linear(layer.lora_A["default"])
    assert not is_quantized_linear(layer.lora_B["default"])
    lora_a = layer.lora_A["default"].weight
    assert lora_a.requires_grad and lora_a.dtype == torch.float32  # peft keeps adapters in fp32 by default
    assert is_quantized_linear(pm.base_model.model.model.layers[0].mlp.up_proj)  # not a LoRA target
    assert quantize_in_place(pm, "nf4", True, torch.bfloat16, "cpu") == "torchao-nf4"  # idempotent

"""Speed/memory switches change how a step is computed, not what: each is compared with the plain path."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.models.llama import modeling_llama

from desktune.adapters import attach_lora, enable_checkpointing
from desktune.config import LoraConfig, load_config
from desktune.data import IGNORE_INDEX, pack
from desktune.data.encode import Example
from desktune.scoring.ce import target_ce_sum
from desktune.training.loop import train
from desktune.training.speed import Switches, choose_switches, compile_layers, patching, switched_on
from tests.tiny import make_model_dir, tiny_config


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    exs = []
    for n in (9, 23, 14):
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        exs.append(Example(input_ids=ids, labels=[IGNORE_INDEX] * 3 + ids[3:], source="t"))
    return pack(exs)


def _lora_model(model_dir, seed: int = 0, checkpointing: str | None = None):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if checkpointing:
        assert enable_checkpointing(model, checkpointing) == {"full": 2, "selective": 1}[checkpointing]  # of 2
    torch.manual_seed(seed)
    peft = attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    for name, p in peft.named_parameters():  # non-zero B so every adapter gradient is non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return peft


def _loss_and_grads(model, switches: Switches | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    b = _batch()
    model.zero_grad()
    with (switches or Switches()).forward_context(torch.device("cpu"), model):
        s, n = target_ce_sum(model, b["input_ids"], b["labels"], position_ids=b["position_ids"])
    (s / n).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return (s / n).detach(), grads


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_modes_give_the_same_gradients(tiny_model_dir, mode):
    ref = _loss_and_grads(_lora_model(tiny_model_dir))
    peft = _lora_model(tiny_model_dir, checkpointing=mode)
    peft.train()
    got = _loss_and_grads(peft)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny-llama-4"), layers=4)


@pytest.mark.parametrize(("mode", "recomputed"), [(False, []), ("selective", [1, 3]), ("full", [0, 1, 2, 3])])
def test_checkpointing_recomputes_exactly_its_layers(four_layer_dir, mode, recomputed):
    """Each decoder layer's runs, counted at its first submodule (input_layernorm): once in forward, and once more
    during backward exactly when it is checkpointed (full: all 4 layers; selective: 1 and 3)."""
    model = AutoModelForCausalLM.from_pretrained(four_layer_dir, dtype=torch.float32)
    peft = attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"),
                       gradient_checkpointing=mode)
    peft.train()
    runs: dict[str, list[int]] = {"forward": [0] * 4, "backward": [0] * 4}
    phase = ["forward"]

    def counter(i: int) -> Callable[[torch.nn.Module, tuple], None]:
        def count(module: torch.nn.Module, args: tuple) -> None:
            runs[phase[0]][i] += 1
        return count

    for i, layer in enumerate(peft.get_base_model().model.layers):
        layer.input_layernorm.register_forward_pre_hook(counter(i))
    b = _batch()
    s, n = target_ce_sum(peft, b["input_ids"], b["labels"], position_ids=b["position_ids"])
    phase[0] = "backward"  # from here on, a layer runs only to recompute what its backward needs
    (s / n).backward()
    assert runs["forward"] == [1, 1, 1, 1]
    assert runs["backward"] == [int(i in recomputed) for i in range(4)]


def test_bf16_autocast_matches_fp32_within_bf16_precision(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    ref = _loss_and_grads(model)
    seen: list[torch.dtype] = []
    hook = model.get_base_model().model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, i, o: seen.append(o.dtype))
    got = _loss_and_grads(model, Switches(autocast=torch.bfloat16))
    hook.remove()
    assert seen == [torch.bfloat16]  # the matmuls really ran in bf16
    assert abs(float(got[0] - ref[0])) < 0.02 * float(ref[0])
    cos = torch.nn.functional.cosine_similarity(got[1], ref[1], dim=0)
    assert cos > 0.99 and got[1].dtype == torch.float32  # adapter gradients stay fp32


def _counting_hooks(seen: dict[str, list]) -> type:
    """torch's saved_tensors_hooks, recording each packed tensor's storage and whether its pack hook kept it
    (returned it as is) or offloaded it, and counting unpacks."""
    real = torch.autograd.graph.saved_tensors_hooks

    class Counting(real):
        def __init__(self, pack_hook, unpack_hook):
            def pack(t):
                out = pack_hook(t)
                seen["kept" if out is t else "offloaded"].append(t.untyped_storage().data_ptr())
                return out

            def unpack(packed):
                seen["unpacked"].append(1)
                return unpack_hook(packed)

            super().__init__(pack, unpack)

    return Counting


def test_activation_offload_keeps_weights_and_gives_the_same_gradients(tiny_model_dir, monkeypatch):
    model = _lora_model(tiny_model_dir)
    ref = _loss_and_grads(model)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    base = {p.untyped_storage().data_ptr() for p in model.parameters() if not p.requires_grad}
    seen: dict[str, list] = {"kept": [], "offloaded": [], "unpacked": []}
    monkeypatch.setattr(torch.autograd.graph, "saved_tensors_hooks", _counting_hooks(seen))
    got = _loss_and_grads(model, Switches(offload_activations=True))
    monkeypatch.undo()
    assert len(seen["offloaded"]) > 20  # saved activations went through the offload hooks
    assert len(seen["unpacked"]) == len(seen["offloaded"]) + len(seen["kept"])  # and all came back
    assert not weights & set(seen["offloaded"])  # no parameter (nor a view of one) was copied to the host
    assert set(seen["kept"]) <= weights and len(base & set(seen["kept"])) >= 10  # the frozen base weights stayed
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)


def test_compiled_layers_give_the_same_loss_and_gradients(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    with switched_on(model, Switches(packed_attention=True)):
        ref = _loss_and_grads(model)
        assert compile_layers(model) == 2
        got = _loss_and_grads(model)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-6)


def test_switches_needing_a_gpu_turn_off_with_a_note_on_cpu(tiny_model_dir, tmp_path):
    cfg = load_config(tiny_config(tiny_model_dir, tmp_path, train={
        "fused_kernels": "liger", "offload_activations": True, "autocast": "fp16"}))
    s = choose_switches(cfg, torch.device("cpu"), torch.float32)
    assert (s.fused_kernels, s.offload_activations, s.autocast) == (None, False, None)
    text = " ".join(s.notes)
    assert "liger needs CUDA" in text and "offload_activations buys GPU memory only" in text and "fp16" in text
    auto = choose_switches(load_config(tiny_config(tiny_model_dir, tmp_path)), torch.device("cpu"), torch.float32)
    assert auto.notes == [] and auto.fused_kernels is None and auto.packed_attention
    bf16 = load_config(tiny_config(tiny_model_dir, tmp_path, train={"autocast": "bf16"}))
    assert choose_switches(bf16, torch.device("cpu"), torch.float32).autocast == torch.bfloat16
    assert "no effect" in choose_switches(bf16, torch.device("cpu"), torch.bfloat16).notes[0]


def test_compile_on_the_cpu_is_kept_with_a_note(tiny_model_dir, tmp_path):
    cfg = load_config(tiny_config(tiny_model_dir, tmp_path, train={"compile": True}))
    cpu = choose_switches(cfg, torch.device("cpu"), torch.float32)
    assert cpu.compiled and any(n.startswith("train.compile: measured slower") for n in cpu.notes)
    cuda = choose_switches(cfg, torch.device("cuda"), torch.float32)
    assert cuda.compiled and not any("train.compile" in n for n in cuda.notes)


def test_run_with_switches_logs_notes_and_restores_attention(tiny_model_dir, tmp_path):
    raw = tiny_config(tiny_model_dir, tmp_path, train={"fused_kernels": "liger", "max_steps": 2},
                      data={"val_fraction": 0.0})
    result = train(load_config(raw), quiet=True)
    log = (result.run_dir / "metrics.jsonl").read_text()
    assert "liger needs CUDA" in log
    assert load_file(str(result.adapter_dir / "adapter_model.safetensors"))


class _FakeLigerNorm(modeling_llama.LlamaRMSNorm):
    pass


def _fake_liger(monkeypatch, *, fail: bool = False) -> list[str]:
    """Put a stand-in `liger_kernel.transformers.monkey_patch` in sys.modules whose llama function patches like
    liger does: an instance forward, submodule attributes (new and replaced), a submodule's class and the
    modeling module's globals."""
    calls: list[str] = []
    # registered first, so the real globals come back at teardown even if switched_on failed to restore them
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)
    monkeypatch.setattr(modeling_llama, "LlamaRMSNorm", modeling_llama.LlamaRMSNorm)

    def apply(*, model, cross_entropy, fused_linear_cross_entropy):
        assert not cross_entropy and not fused_linear_cross_entropy  # our own chunked loss stays
        calls.append(type(model).__name__)
        modeling_llama.apply_rotary_pos_emb = lambda *a, **k: "liger rope"
        modeling_llama.liger_patched = True
        modeling_llama.LlamaRMSNorm = _FakeLigerNorm
        norm = model.model.norm
        norm.forward = types.MethodType(lambda self, x: x, norm)
        norm.__class__ = _FakeLigerNorm
        for layer in model.model.layers:
            layer.input_layernorm.variance_epsilon = 0.5
            layer.mlp.casting_mode = "llama"
            if fail:
                raise NotImplementedError("not covered")

    pkg = types.ModuleType("liger_kernel")
    sub = types.ModuleType("liger_kernel.transformers")
    patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": apply}
    pkg.transformers, sub.monkey_patch = sub, patch
    for mod in (pkg, sub, patch):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return calls


def _liger_patches(model) -> list[str]:
    base = model.get_base_model()
    found = []
    if getattr(modeling_llama.apply_rotary_pos_emb, "__name__", None) == "<lambda>":  # transformers 5.x: a Func module
        found.append("rope global")
    if hasattr(modeling_llama, "liger_patched"):
        found.append("new global")
    if modeling_llama.LlamaRMSNorm is _FakeLigerNorm:
        found.append("norm class global")
    if "forward" in vars(base.model.norm):
        found.append("instance forward")
    if type(base.model.norm) is _FakeLigerNorm:
        found.append("instance class")
    for layer in base.model.layers:
        if layer.input_layernorm.variance_epsilon == 0.5:
            found.append("replaced attribute")
        if hasattr(layer.mlp, "casting_mode"):
            found.append("new attribute")
    return found


def _compiled_layers(model) -> list[bool]:
    return [layer._compiled_call_impl is not None for layer in model.get_base_model().model.layers]


def test_switched_on_undoes_every_switch_on_exit(tiny_model_dir, monkeypatch):
    calls = _fake_liger(monkeypatch)
    model = _lora_model(tiny_model_dir)
    ref = _loss_and_grads(model)
    switches = Switches(fused_kernels="liger", compiled=True, packed_attention=True)
    with switched_on(model, switches) as on:
        assert calls == ["LlamaForCausalLM"] and on.fused_kernels == "liger" and on.packed_attention
        assert len(_liger_patches(model)) == 9  # 5 + 2 per layer
        assert _compiled_layers(model) == [True, True]
        assert model.config._attn_implementation == "desktune_packed"
    assert _liger_patches(model) == []
    assert _compiled_layers(model) == [False, False]
    assert all("_compiled_call_impl" not in vars(layer) for layer in model.get_base_model().model.layers)
    assert model.config._attn_implementation == "sdpa"
    got = _loss_and_grads(model)  # eager again: exactly the plain path
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)


def test_switched_on_undoes_the_switches_when_training_fails(tiny_model_dir, monkeypatch):
    _fake_liger(monkeypatch)
    model = _lora_model(tiny_model_dir)
    with pytest.raises(RuntimeError, match="out of memory"), switched_on(
            model, Switches(fused_kernels="liger", compiled=True, packed_attention=True)):
        raise RuntimeError("out of memory")
    assert _liger_patches(model) == [] and _compiled_layers(model) == [False, False]
    assert model.config._attn_implementation == "sdpa"


def test_liger_patches_are_undone_at_once_when_liger_fails(tiny_model_dir, monkeypatch):
    _fake_liger(monkeypatch, fail=True)
    model = _lora_model(tiny_model_dir)
    with pytest.raises(NotImplementedError), switched_on(model, Switches(fused_kernels="liger", packed_attention=True)):
        pass
    assert _liger_patches(model) == []  # the half-applied patches did not stay
    assert model.config._attn_implementation == "sdpa"


def test_patching_leaves_later_changes_alone(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    norm = model.get_base_model().model.norm
    result, undo = patching(model, lambda m: setattr(norm, "liger", 1) or "applied")
    norm.trained = True  # a change made after the patch (by training) is not the patcher's to undo
    undo()
    assert result == "applied" and not hasattr(norm, "liger") and norm.trained


def _bf16_lora_model(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    torch.manual_seed(0)
    peft = attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return peft


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_a_16_bit_model_computes_its_fp32_adapters_in_its_own_dtype(dtype):
    """choose_switches turns adapters_autocast on exactly for a 16-bit model; an fp32 model autocast by
    train.autocast gets plain autocast instead (both at once would be the same thing twice)."""
    for autocast in ("off", "bf16"):
        cfg = load_config({"model": {"name": "x"}, "data": {"train": "x.jsonl"}, "train": {"autocast": autocast}})
        got = choose_switches(cfg, torch.device("cpu"), dtype)
        assert got.adapters_autocast == (torch.bfloat16 if dtype == torch.bfloat16 else None)
        assert got.autocast == (torch.bfloat16 if dtype == torch.float32 and autocast == "bf16" else None)


def test_bf16_adapters_run_in_bf16_keep_fp32_weights_and_match_peft_casting(tiny_model_dir):
    """peft's default casts each layer's bf16 input to the adapter's fp32; under adapters_autocast lora_A sees the
    bf16 activations, while the adapter weights and their gradients stay fp32 and the result is peft's up to bf16."""
    model = _bf16_lora_model(tiny_model_dir)
    lora_a = model.get_base_model().model.layers[0].mlp.up_proj.lora_A["default"]
    seen: list[torch.dtype] = []
    hook = lora_a.register_forward_hook(lambda m, i, o: seen.append(i[0].dtype))
    ref = _loss_and_grads(model)
    assert seen == [torch.float32]  # peft's own path: the activations cast up to fp32
    seen.clear()
    got = _loss_and_grads(model, Switches(adapters_autocast=torch.bfloat16))
    assert seen == [torch.bfloat16]
    adapters = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in adapters} == {torch.float32} and {p.grad.dtype for p in adapters} == {torch.float32}
    assert abs(float(got[0] - ref[0])) < 0.02 * float(ref[0])
    assert torch.nn.functional.cosine_similarity(got[1], ref[1], dim=0) > 0.99
    seen.clear()
    with torch.no_grad():  # outside the step's context peft casts again (validation, generation)
        model(input_ids=torch.tensor([[5, 6, 7]]))
    hook.remove()
    assert seen == [torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_word_dropout_drops_at_its_rate_and_keeps_the_expectation(dtype):
    from desktune.training.speed import WordDropout

    drop = WordDropout(0.1)
    x = torch.ones(512, 1000, dtype=dtype, requires_grad=True)
    torch.manual_seed(0)
    out = drop(x)
    kept = out != 0
    scale = 32768 / (32768 - round(0.1 * 32768))
    assert abs(kept.float().mean().item() - 0.9) < 0.003  # 512,000 draws: 3 standard deviations ~ 0.0013
    assert torch.all(out[kept] == torch.tensor(scale, dtype=dtype))  # survivors scaled, as torch's dropout
    assert abs(out.float().mean().item() - 1.0) < 0.004
    for lane in range(4):  # every 16-bit lane of a random word drops at the rate (the top one holds 15 bits)
        assert abs(kept.flatten()[lane::4].float().mean().item() - 0.9) < 0.006
    out.backward(torch.full_like(out, 2.0))
    assert torch.equal(x.grad, torch.where(kept, 2.0 * torch.tensor(scale, dtype=dtype), 0.0).to(dtype))
    torch.manual_seed(0)
    assert torch.equal(drop(x), out)  # the default generator's stream: reproducible, so resume stays exact
    drop.eval()
    assert drop(x) is x


def test_cpu_runs_with_adapter_dropout_draw_word_masks_and_restore_torch_dropout(tiny_model_dir):
    from desktune.training.speed import WordDropout

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft = attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear"))
    cfg = load_config({"model": {"name": str(tiny_model_dir)}, "data": {"train": "x.jsonl"},
                       "lora": {"dropout": 0.1}})
    switches = choose_switches(cfg, torch.device("cpu"), torch.float32)
    assert switches.word_dropout
    assert not choose_switches(cfg, torch.device("cuda"), torch.float32).word_dropout  # torch's fused kernel
    drops = [m for m in peft.modules() if isinstance(m, torch.nn.Dropout)]
    calls = []
    with switched_on(peft, switches):
        swapped = [m for m in peft.modules() if isinstance(m, WordDropout)]
        assert len(swapped) == len(drops) == 14  # 7 linear layers x 2 decoder layers
        for m in swapped:
            m.register_forward_hook(lambda mod, args, out: calls.append(mod))
        peft.train()
        _loss_and_grads(peft)
    assert len(calls) == 14  # the step's forward drew every adapter's mask from them
    assert [type(m) for m in peft.modules() if isinstance(m, torch.nn.Dropout)] == [torch.nn.Dropout] * 14

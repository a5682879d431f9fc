from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from desktune.adapters import attach_lora
from desktune.config import LoraConfig, load_config
from desktune.errors import DesktuneError
from desktune.runs import EvalRecord, EventRecord, TrainRecord, read_records, records_of
from desktune.training.checkpoint import load_state
from desktune.training.loop import RunResult, train
from tests.tiny import inject_fault, make_model_dir, tiny_config


def _adapter(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.adapter_dir / "adapter_model.safetensors"))


def test_micro_batch_split_does_not_change_the_result(tiny_model_dir, tmp_path):
    """Loss normalised over the whole accumulated batch: 4x1, 2x2 and 1x4 give the same adapter."""
    weights = []
    for mb, ga in [(4, 1), (2, 2), (1, 4)]:
        raw = tiny_config(tiny_model_dir, tmp_path, train={"micro_batch_size": mb, "grad_accum": ga, "max_steps": 3},
                          run_name=f"mb{mb}", data={"val_fraction": 0.0})
        weights.append(_adapter(train(load_config(raw), quiet=True)))
    for other in weights[1:]:
        assert other.keys() == weights[0].keys()
        for k in weights[0]:
            torch.testing.assert_close(other[k], weights[0][k], rtol=1e-4, atol=1e-6)
    # and the steps really moved the adapter away from its (zero) B initialisation
    assert any("lora_B" in k and weights[0][k].abs().max() > 1e-3 for k in weights[0])


def test_run_folder_record_and_falling_loss(tiny_model_dir, tmp_path):
    raw = tiny_config(tiny_model_dir, tmp_path, train={"max_steps": 12, "eval_every": 4, "lr": 5e-2},
                      lora={"r": 8, "target_modules": "all-linear"},
                      checkpoint={"every": 3, "keep_last": 2}, run_name="rec")
    result = train(load_config(raw), quiet=True)
    run = result.run_dir
    assert run == Path(raw["output_dir"]) / "rec"
    # resolved config, reloadable
    assert load_config(yaml.safe_load((run / "config.yaml").read_text())).train.max_steps == 12
    recs = read_records(run / "metrics.jsonl")
    steps = records_of(recs, TrainRecord)
    assert [r.step for r in steps] == list(range(1, 13))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mem_bytes", "target_tokens"):
        assert all(getattr(r, key) is not None for r in steps), key
    evals = records_of(recs, EvalRecord)
    assert [e.step for e in evals] == [0, 4, 8, 12]
    assert evals[-1].val_loss < evals[0].val_loss * 0.7
    assert sum(r.loss for r in steps[-3:]) < sum(r.loss for r in steps[:3]) * 0.7
    # checkpoints every 3 steps, the last 2 kept (the final adapter is separate)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000006", "step-000009"]
    for folder in [run / "adapter", run / "checkpoints" / "step-000009"]:
        assert (folder / "adapter_model.safetensors").is_file()
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == str(tiny_model_dir)
        targets = cfg["target_modules"]
        assert cfg["r"] == 8 and any(t.endswith("down_proj") for t in targets)
        assert not any(t.endswith("lm_head") for t in targets)
    assert result.adapter_bytes == (run / "adapter" / "adapter_model.safetensors").stat().st_size


def test_adapter_loads_with_plain_peft_and_matches(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from desktune.inference import load_for_inference

    result = train(load_config(tiny_config(tiny_model_dir, tmp_path, train={"max_steps": 3})), quiet=True)
    ids = torch.tensor([[3, 17, 42, 99, 5, 8]])
    base_path = json.loads((result.adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                                      str(result.adapter_dir)).eval()
    ours = load_for_inference(adapter=result.adapter_dir, dtype="fp32").model
    with torch.no_grad():
        a, b = plain(ids).logits, ours(ids).logits
        with plain.disable_adapter():
            base = plain(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - base).abs().max() > 1e-4  # the adapter changes the model


def _q_proj(model_dir: Path, **lora) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The peft model made by attach_lora (q_proj adapted), and its layer-0 q_proj."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = attach_lora(model, LoraConfig(dropout=0.0, target_modules=["q_proj"], **lora))
    return peft, peft.get_base_model().model.layers[0].self_attn.q_proj


@pytest.mark.parametrize("rslora", [True, False])
def test_lora_scaling_is_alpha_over_sqrt_r_with_rslora(tiny_model_dir, rslora):
    r, alpha = 16, 8.0  # alpha / sqrt(r) = 2, alpha / r = 0.5
    _, layer = _q_proj(tiny_model_dir, r=r, alpha=alpha, use_rslora=rslora)
    g = torch.Generator().manual_seed(0)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        b.copy_(torch.randn(b.shape, generator=g) * 0.1)  # B starts at zero: the delta would be 0 either way
        x = torch.randn(3, a.shape[1], generator=g)
        delta = layer(x) - layer.base_layer(x)
    by_hand = x @ a.T @ b.T
    want, other = (alpha / r**0.5, alpha / r) if rslora else (alpha / r, alpha / r**0.5)
    torch.testing.assert_close(delta, want * by_hand, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(delta, other * by_hand, rtol=0.5)


def test_dora_magnitude_trains(tiny_model_dir, tmp_path):
    """DoRA's magnitude vector is trainable, gets a gradient, and training moves it away from its start (the row
    norms of the frozen weight, since B starts at zero)."""
    peft, layer = _q_proj(tiny_model_dir, r=4, alpha=8.0, use_dora=True)
    magnitude = layer.lora_magnitude_vector["default"].weight
    start = layer.base_layer.weight.detach().norm(dim=1)
    torch.testing.assert_close(magnitude.detach(), start)
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    peft(input_ids=ids, labels=ids).loss.backward()
    assert magnitude.requires_grad and magnitude.grad.abs().max() > 1e-6

    raw = tiny_config(tiny_model_dir, tmp_path, lora={"use_dora": True}, train={"max_steps": 2})
    result = train(load_config(raw), quiet=True)
    cfg = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert cfg["use_dora"] and not cfg["use_rslora"]
    saved = _adapter(result)
    key = next(k for k in saved if "layers.0.self_attn.q_proj" in k and "magnitude" in k)
    moved = (saved[key] - start).abs().max()
    assert moved > 1e-3, moved  # lr 1e-2, 2 steps: Adam moves each entry by ~1e-2


MIN_8BIT_SIZE = 4096  # bitsandbytes' default: a tensor with fewer values keeps fp32 optimizer state


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory) -> Path:
    """Hidden 256: with r 16, q_proj's LoRA A and B (4096 values each) reach MIN_8BIT_SIZE, v_proj's B (2048)
    does not, so an 8-bit run holds both kinds of state."""
    return make_model_dir(tmp_path_factory.mktemp("tiny-llama-256"), hidden=256, init_std=0.1)


def _optimizer_run(model_dir: Path, tmp_path: Path, optimizer: str) -> tuple[RunResult, list[dict]]:
    """Six steps with `optimizer`; the run and the per-parameter optimizer state of its step-5 checkpoint."""
    raw = tiny_config(model_dir, tmp_path, run_name=optimizer, lora={"r": 16, "alpha": 16},
                      train={"optimizer": optimizer, "max_steps": 6}, data={"val_fraction": 0.0},
                      checkpoint={"every": 5})
    result = train(load_config(raw), quiet=True)
    state = load_state(result.run_dir / "checkpoints" / "step-000005").optimizer["state"]
    # bitsandbytes' state_dict nests each parameter's tensors under one key
    return result, [s.get("__bnb_optimizer_quant_state__", s) for s in state.values()]


@pytest.fixture(scope="module")
def adamw_run(wide_model_dir, tmp_path_factory) -> tuple[RunResult, list[dict]]:
    return _optimizer_run(wide_model_dir, tmp_path_factory.mktemp("adamw"), "adamw")


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU:UserWarning")
@pytest.mark.parametrize(("optimizer", "bits"), [("adamw_8bit", 8), ("paged_adamw", 32), ("paged_adamw_8bit", 8)])
def test_bitsandbytes_optimizers_step(wide_model_dir, adamw_run, tmp_path, optimizer, bits):
    """bitsandbytes' optimizers run for real on the CPU: their own state (8-bit where bitsandbytes quantizes),
    and the losses of torch's AdamW. 8-bit moments are blockwise-quantized (about 1% relative error), so each
    update may differ by about 1% and the losses, falling ~2.4 in 6 steps, by up to ~0.02 (measured: 3e-4);
    the 32-bit paged one does AdamW's arithmetic in fp32 (measured: below 1e-5)."""
    result, states = _optimizer_run(wide_model_dir, tmp_path, optimizer)
    ref, ref_states = adamw_run
    assert all({"exp_avg", "exp_avg_sq"} <= s.keys() for s in ref_states)  # torch's AdamW
    kinds = {(s["state1"].dtype, s["state2"].dtype, s["state1"].numel() >= MIN_8BIT_SIZE) for s in states}
    big = torch.uint8 if bits == 8 else torch.float32
    assert kinds == {(big, big, True), (torch.float32, torch.float32, False)}, kinds
    tol = 0.01 if bits == 8 else 1e-4
    gap = max(abs(a - b) for a, b in zip(result.train_losses, ref.train_losses, strict=True))
    assert gap < tol, (result.train_losses, ref.train_losses)
    assert result.final_train_loss < result.train_losses[0] - 1.0  # it trained
    events = [r.message for r in records_of(read_records(result.run_dir / "metrics.jsonl"), EventRecord)]
    assert not any("using adamw" in m for m in events)
    assert any("paging needs CUDA" in m for m in events) == optimizer.startswith("paged")


@pytest.mark.parametrize(("quant", "backend"), [("nf4", "torchao-nf4"), ("int8", "torchao-int8")])
def test_quantized_base_trains_on_cpu_with_exact_backend(tiny_model_dir, tmp_path, quant, backend):
    raw = tiny_config(tiny_model_dir, tmp_path, model={"quant": quant}, train={"max_steps": 6, "lr": 2e-2},
                      data={"val_fraction": 0.0})
    result = train(load_config(raw), quiet=True)
    meta = json.loads((result.adapter_dir / "desktune.json").read_text())
    assert meta["quant"] == quant and meta["quant_backend"] == backend
    assert result.final_train_loss < result.train_losses[0]


def test_gradient_checkpointing_gives_the_same_adapter(tiny_model_dir, tmp_path):
    out = []
    for gc in (False, True):
        raw = tiny_config(tiny_model_dir, tmp_path, train={"gradient_checkpointing": gc}, run_name=f"gc{gc}")
        out.append(_adapter(train(load_config(raw), quiet=True)))
    for k in out[0]:
        torch.testing.assert_close(out[1][k], out[0][k], rtol=1e-4, atol=1e-6)


def test_named_run_folder_is_never_overwritten(tiny_model_dir, tmp_path):
    raw = tiny_config(tiny_model_dir, tmp_path, train={"max_steps": 1}, run_name="keep")
    first = train(load_config(raw), quiet=True)
    before = (first.adapter_dir / "adapter_model.safetensors").read_bytes()
    with pytest.raises(DesktuneError, match="already holds a run"):
        train(load_config(raw), quiet=True)
    assert (first.adapter_dir / "adapter_model.safetensors").read_bytes() == before


def test_unknown_target_module_lists_valid_ones(tiny_model_dir, tmp_path):
    raw = tiny_config(tiny_model_dir, tmp_path, lora={"target_modules": ["q_prj"]})
    with pytest.raises(DesktuneError) as e:
        train(load_config(raw), quiet=True)
    msg = str(e.value)
    assert "lora.target_modules" in msg and "did you mean 'q_proj'" in msg and "gate_proj" in msg
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no empty run folder left


def test_oom_recovery_ends_with_the_small_micro_batch_adapter(tiny_model_dir, tmp_path, monkeypatch):
    """An OOM in step 2 halves the micro-batch and redoes the step: same adapter as micro-batch 2 from the start."""
    from desktune.training.loop import fit, setup

    def oom_at_step_2(step: int, micro: int) -> None:
        if step == 2 and micro == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    raw = tiny_config(tiny_model_dir, tmp_path, train={"micro_batch_size": 4, "grad_accum": 1, "max_steps": 4},
                      run_name="oom")
    run = setup(load_config(raw), quiet=True)
    inject_fault(monkeypatch, oom_at_step_2)
    recovered = fit(run)
    recs = read_records(recovered.run_dir / "metrics.jsonl")
    oom = [e for e in records_of(recs, EventRecord) if e.name == "oom_recovery"]
    assert len(oom) == 1 and oom[0].step == 2 and oom[0].data == {"micro_batch_size": 2, "grad_accum": 2}
    steps = [r.step for r in records_of(recs, TrainRecord)]
    assert steps == [1, 2, 3, 4]  # the step was redone, not skipped

    raw = tiny_config(tiny_model_dir, tmp_path, train={"micro_batch_size": 2, "grad_accum": 2, "max_steps": 4},
                      run_name="small")
    reference = train(load_config(raw), quiet=True)
    a, b = _adapter(recovered), _adapter(reference)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_oom_at_micro_batch_1_is_a_clear_error(tiny_model_dir, tmp_path, monkeypatch):
    from desktune.training.loop import fit, setup

    def always_oom(step: int, micro: int) -> None:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes")

    run = setup(load_config(tiny_config(tiny_model_dir, tmp_path, train={"micro_batch_size": 2})), quiet=True)
    inject_fault(monkeypatch, always_oom)
    with pytest.raises(DesktuneError, match="even with micro-batch 1"):
        fit(run)


def test_clipping_scales_to_the_norm_as_torch_does_and_leaves_small_gradients_untouched():
    from desktune.training.distributed import Dist
    from desktune.training.step import clip_gradients

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (300, 17, 4096)]
    for p in params:
        p.grad = torch.randn_like(p) * 0.1
    ref = [p.grad.clone() for p in params]
    want = torch.nn.utils.get_total_norm(ref)
    norm = clip_gradients(params, 1e9, Dist())
    assert norm == pytest.approx(float(want), rel=1e-6)
    assert all(torch.equal(p.grad, r) for p, r in zip(params, ref, strict=True))  # below the bound: untouched
    clip_gradients(params, 1.0, Dist())
    coef = torch.clamp(1.0 / (want + 1e-6), max=1.0)  # torch's rule (clip_grads_with_norm_)
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.grad, r * coef, rtol=1e-6, atol=0)
    assert float(torch.nn.utils.get_total_norm([p.grad for p in params])) == pytest.approx(1.0, rel=1e-5)
    assert clip_gradients(params, None, Dist()) == pytest.approx(1.0, rel=1e-5)  # no bound: the norm only

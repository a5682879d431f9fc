from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from desktune.config import load_config
from desktune.errors import DesktuneError
from desktune.runs import EvalRecord, EventRecord, TrainRecord, read_records, records_of
from desktune.training.loop import train
from tests.tiny import inject_fault, tiny_config


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


@pytest.mark.parametrize("lora", [{"use_dora": True}, {"use_rslora": True, "target_modules": "all-linear"}])
def test_dora_and_rslora_train(tiny_model_dir, tmp_path, lora):
    result = train(load_config(tiny_config(tiny_model_dir, tmp_path, lora=lora, train={"max_steps": 2})), quiet=True)
    cfg = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert cfg["use_dora"] == lora.get("use_dora", False) and cfg["use_rslora"] == lora.get("use_rslora", False)
    if lora.get("use_dora"):
        assert any("magnitude" in k for k in _adapter(result))


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_bitsandbytes_optimizers_step(tiny_model_dir, tmp_path, optimizer):
    raw = tiny_config(tiny_model_dir, tmp_path, train={"max_steps": 2, "optimizer": optimizer})
    result = train(load_config(raw), quiet=True)
    assert all(v.abs().max() > 0 for k, v in _adapter(result).items() if "lora_B" in k)
    events = [r.message for r in records_of(read_records(result.run_dir / "metrics.jsonl"), EventRecord)]
    assert any("needs CUDA; using adamw_8bit" in m for m in events) == optimizer.startswith("paged")


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

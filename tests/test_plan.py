from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from desktune import cli
from desktune.config import load_config
from desktune.errors import DesktuneError
from desktune.memory.budget import plan_run
from desktune.memory.source import arch_for_model
from desktune.runs import EventRecord, read_records, records_of
from desktune.training.loop import train
from tests.tiny import tiny_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
COMPONENTS = ["base weights", "adapter weights", "adapter gradients", "optimizer state", "activations",
              "framework overhead"]


def _plan(*args: str) -> str:
    result = CliRunner().invoke(cli.app, ["plan", *args], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    return result.output


def test_plan_without_weights_shows_components_verdict_and_limits():
    text = _plan("--model", "llama-3.1-8b", "--quant", "nf4", "--seq-len", "2048", "--micro-batch", "2",
                 "--budget", "24GB", "--targets", "q_proj,k_proj,v_proj,o_proj")
    for name in COMPONENTS:
        assert name in text
    assert "logits and loss" in text or "layer backward" in text  # the phase at which the step peaks
    assert "does not fit: 24" in text and "largest that fit: seq_len" in text  # 24.2 GiB without checkpointing
    roomy = _plan("--model", "llama-3.1-8b", "--quant", "nf4", "--seq-len", "512", "--micro-batch", "1",
                  "--checkpointing", "full", "--budget", "24GB")
    assert "fits:" in roomy and "does not fit" not in roomy


def test_plan_lists_changes_that_fit_when_it_does_not():
    text = _plan("--model", "llama-3.1-8b", "--seq-len", "4096", "--micro-batch", "4", "--budget", "24GB")
    assert "does not fit" in text and "changes that would fit" in text
    assert "4-bit" in text or "nf4" in text


def test_plan_from_the_qlora_example_config_offline():
    text = _plan(str(EXAMPLES / "llama3-8b-qlora-24gb.yaml"), "--device", "cuda")
    assert "llama-3.1-8b" in text and "NF4" in text and "fits" in text


def test_hub_ids_map_to_the_catalog_and_unknown_names_suggest():
    assert arch_for_model("meta-llama/Meta-Llama-3-8B-Instruct").name == "llama-3.1-8b"
    assert arch_for_model("Qwen/Qwen2.5-7B-Instruct").name == "qwen2.5-7b"
    with pytest.raises(DesktuneError, match="did you mean"):
        arch_for_model("qwen2.5-7")


def test_train_refuses_before_loading_when_nothing_fits(tiny_model_dir, tmp_path):
    raw = tiny_config(tiny_model_dir, tmp_path, train={"memory_budget": "10KB"}, run_name="tight")
    with pytest.raises(DesktuneError) as e:
        train(load_config(raw), quiet=True)
    msg = str(e.value)
    assert "train.memory_budget" in msg and "the budget is 9.8 KiB" in msg and "base weights" in msg
    assert not (tmp_path / "runs" / "tight").exists()


def test_train_fits_micro_batch_to_the_budget_keeping_the_effective_batch(tiny_model_dir, tmp_path):
    raw = tiny_config(tiny_model_dir, tmp_path, train={"micro_batch_size": 4, "grad_accum": 1, "max_steps": 2},
                      data={"max_seq_len": 64}, run_name="fit")
    cfg = load_config(raw)
    small = plan_run(cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"micro_batch_size": 1, "grad_accum": 4})}), "cpu", 4)[1].total
    big = plan_run(cfg, "cpu", 4)[1].total
    assert small < big
    budget = (small + big) // 2
    result = train(load_config(raw, [f"train.memory_budget={budget}B"]), quiet=True)
    fitted = load_config(result.run_dir / "config.yaml").train
    assert fitted.micro_batch_size < 4 and fitted.micro_batch_size * fitted.grad_accum == 4
    events = [r for r in records_of(read_records(result.run_dir / "metrics.jsonl"), EventRecord)
              if r.name == "memory_fit"]
    assert events and events[0].data["micro_batch_size"] == fitted.micro_batch_size


def _cuda_fit(tiny_model_dir, tmp_path, monkeypatch, free: int, **train: object):
    """fit_to_budget for a mocked CUDA device with `free` bytes free (nothing touches a GPU)."""
    import torch

    from desktune import hardware
    from desktune.hardware import Hardware
    from desktune.memory.budget import fit_to_budget

    monkeypatch.setattr(hardware, "free_memory", lambda device: free)
    raw = tiny_config(tiny_model_dir, tmp_path, train={"micro_batch_size": 8, "grad_accum": 1, **train},
                      data={"max_seq_len": 512})
    return fit_to_budget(load_config(raw), Hardware(device=torch.device("cuda"), dtype=torch.bfloat16))


def _cuda_totals(tiny_model_dir, tmp_path) -> tuple[int, int]:
    """Planned CUDA totals of the tiny run at micro-batch 8 and at micro-batch 1 (same effective batch)."""
    cfg = load_config(tiny_config(tiny_model_dir, tmp_path, train={"micro_batch_size": 8, "grad_accum": 1},
                                  data={"max_seq_len": 512}))
    small = cfg.model_copy(update={"train": cfg.train.model_copy(update={"micro_batch_size": 1, "grad_accum": 8})})
    return plan_run(cfg, "cuda", 2)[1].total, plan_run(small, "cuda", 2)[1].total


def test_on_cuda_an_unset_budget_fits_to_the_free_memory(tiny_model_dir, tmp_path, monkeypatch):
    from desktune.memory.estimate import CUDA_CONTEXT_BYTES

    big, small = _cuda_totals(tiny_model_dir, tmp_path)
    free = (big + small) // 2 - CUDA_CONTEXT_BYTES  # what mem_get_info reports once our context exists
    fitted, note = _cuda_fit(tiny_model_dir, tmp_path, monkeypatch, free)
    assert fitted.train.micro_batch_size < 8 and fitted.train.samples_per_step == 8
    assert "did not fit" in note
    roomy, note = _cuda_fit(tiny_model_dir, tmp_path, monkeypatch, big)  # the context is added back: it fits
    assert roomy.train.micro_batch_size == 8 and "settings kept" in note


def test_on_cuda_nothing_fitting_refuses_and_none_switches_fitting_off(tiny_model_dir, tmp_path, monkeypatch):
    with pytest.raises(DesktuneError, match=r"memory_budget: none"):
        _cuda_fit(tiny_model_dir, tmp_path, monkeypatch, 1)
    kept, note = _cuda_fit(tiny_model_dir, tmp_path, monkeypatch, 1, memory_budget="none")
    assert kept.train.micro_batch_size == 8 and note is None


def test_on_cuda_offload_is_not_planned(tiny_model_dir, tmp_path, monkeypatch):
    kept, note = _cuda_fit(tiny_model_dir, tmp_path, monkeypatch, 1, offload_activations=True)
    assert kept.train.micro_batch_size == 8 and "offload_activations" in note
    with pytest.raises(DesktuneError, match=r"does not model train\.offload_activations"):
        _cuda_fit(tiny_model_dir, tmp_path, monkeypatch, 1, offload_activations=True, memory_budget="24GB")


def test_on_the_cpu_an_unset_budget_fits_nothing(tiny_model_dir, tmp_path, monkeypatch):
    import torch

    from desktune import hardware
    from desktune.hardware import Hardware
    from desktune.memory.budget import fit_to_budget

    monkeypatch.setattr(hardware, "free_memory", lambda device: 1)
    cfg = load_config(tiny_config(tiny_model_dir, tmp_path))
    assert fit_to_budget(cfg, Hardware(device=torch.device("cpu"), dtype=torch.float32)) == (cfg, None)


# ------------------------------------------------------------- sizes: one parser for --budget and train.memory_budget


@pytest.mark.parametrize(("text", "size"), [("24GB", 24 * 10**9), ("24 gb", 24 * 10**9), ("24GiB", 24 * 2**30),
                                            ("24G", 24 * 2**30), ("1.5GiB", 3 * 2**29), ("512MB", 512 * 10**6),
                                            ("10KB", 10_000), ("2.4e1GB", 24 * 10**9), ("4096B", 4096)])
def test_sizes_mean_what_the_readme_says(text, size):
    from desktune.units import parse_size

    assert parse_size(text) == size


@pytest.mark.parametrize(("text", "said"), [("24", "'24' has no unit: 24GB is 24 x 10^9 bytes, 24GiB (or 24G)"),
                                            ("abc", "'abc' is not a size"), ("-5GB", "not a positive size"),
                                            ("0GB", "not a positive size"), ("1e9TB", "more than 1 PiB"),
                                            ("5XB", "unknown unit 'XB'"), ("", "is not a size"),
                                            ("9" * 10_000 + "GB", "is not a size")])
def test_a_size_without_a_unit_or_out_of_range_is_refused(text, said):
    from desktune.memory.budget import budget_bytes

    with pytest.raises(DesktuneError) as e:
        budget_bytes(text, "cuda")
    assert said in str(e.value) and str(e.value).startswith("--budget: ") and len(str(e.value)) < 400
    with pytest.raises(DesktuneError, match=r"'train\.memory_budget': .*" + re.escape(said)):  # the same in a config
        load_config({"data": {"train": "x"}, "train": {"memory_budget": int(text) if text == "24" else text}})


def test_budget_units_in_the_plan():
    """24GB is 22.4 GiB, 24GiB and 24G are 24.0 GiB (before: a bare 24 was 24 bytes and advised seq_len 0)."""
    args = ("--model", "llama-3.1-8b", "--seq-len", "2048", "--budget")
    assert "22.4 GiB available" in _plan(*args, "24GB")
    assert "24.0 GiB available" in _plan(*args, "24GiB") and "24.0 GiB available" in _plan(*args, "24G")


def test_an_8b_base_that_does_not_fit_24gb_is_offered_qlora():
    text = _plan("--model", "llama-3.1-8b", "--seq-len", "2048", "--budget", "24GB")
    row = next(line for line in text.splitlines() if "4-bit base, QLoRA (model.quant: nf4)" in line)
    peak = float(re.search(r"([0-9.]+) GiB", row.split("(model.quant: nf4)")[1]).group(1))
    assert 0 < peak < 22.4

"""The memory plan of one device among N processes: ddp (replicated) and fsdp2 (decoder layers sharded)."""

from __future__ import annotations

import pytest
from rich.console import Console
from typer.testing import CliRunner

from desktune import cli
from desktune.config import load_config
from desktune.memory import PlanInputs, resolve_arch
from desktune.memory.budget import plan_run
from desktune.memory.estimate import CPU_LIBRARY_BYTES, CPU_RUNTIME_BYTES, estimate, process_share, suggestions
from desktune.memory.render import render_plan
from desktune.units import human_bytes

GiB = 1024**3
SINGLE = ["base weights", "adapter weights", "adapter gradients", "optimizer state", "activations"]


def _inputs(name: str = "llama-3.1-8b", **kw: object) -> PlanInputs:
    base = {"seq_len": 1024, "micro_batch": 2, "grad_accum": 4, "dtype_bytes": 2, "device_type": "cuda"}
    return PlanInputs(arch=resolve_arch(name), **{**base, **kw})


def _replicated(name: str, dtype_bytes: int = 2) -> int:
    """Embeddings, untied output head and final norm of a catalog model, from its shape alone."""
    arch = resolve_arch(name)
    return (arch.vocab * arch.hidden * (1 if arch.tied_embeddings else 2) + arch.hidden) * dtype_bytes


def _text(plan, budget: int | None = None) -> str:
    console = Console(record=True, width=200)
    console.print(render_plan(plan, budget))
    return console.export_text()


@pytest.mark.parametrize("kw", [{}, {"quant": "nf4", "gradient_checkpointing": True}, {"device_type": "cpu",
                                 "dtype_bytes": 4, "grad_accum": 1, "lora_targets": "all-linear"}])
def test_one_process_is_the_single_device_plan(kw):
    one = estimate(_inputs(**kw))
    for mode in ("ddp", "fsdp2"):  # with one process the mode and offload change nothing
        same = estimate(_inputs(**kw, nproc=1, distributed=mode, offload_params=True))
        assert same.components == one.components and same.phase == one.phase and same.host == []
    names = [c.name for c in one.components]
    assert names[:4] == SINGLE[:4] and "DDP gradient buckets" not in names and "unsharded layers" not in names
    assert process_share(_inputs(**kw)) == (one.inputs.micro_batch, one.inputs.grad_accum)
    assert "per device" not in _text(one, 24 * GiB)


def test_ddp_splits_the_step_samples_and_keeps_the_whole_model():
    one = estimate(_inputs(micro_batch=8, grad_accum=1))
    two = estimate(_inputs(micro_batch=8, grad_accum=1, nproc=2))  # each process runs 4 of the 8 samples
    assert process_share(two.inputs) == (4, 1)
    alone = estimate(_inputs(micro_batch=4, grad_accum=1))
    assert two["activations"] == alone["activations"]
    assert 0.45 < two["activations"] / one["activations"] < 0.55
    for name in ("base weights", "adapter weights", "optimizer state"):
        assert two[name] == one[name] > 0
    assert two["DDP gradient buckets"] == one["adapter weights"]
    assert two.total == alone.total + two["DDP gradient buckets"]
    # micro-batch 2 x 4 accumulation: each of 2 processes runs 4 samples as 2 micro-batches of 2, so a
    # micro-batch's activations are those of one process alone
    step = estimate(_inputs(micro_batch=2, grad_accum=4, nproc=2))
    assert process_share(step.inputs) == (2, 2)
    assert step.total == estimate(_inputs(micro_batch=2, grad_accum=4)).total + step["DDP gradient buckets"]
    assert process_share(_inputs(micro_batch=4, grad_accum=3, nproc=5)) == (3, 1)  # ceil(12 / 5) samples


def test_fsdp2_shards_the_decoder_layers_and_holds_two_whole():
    kw = {"quant": "nf4", "lora_targets": "all-linear"}
    one = estimate(_inputs(**kw))
    four = estimate(_inputs(**kw, nproc=4, distributed="fsdp2"))
    arch, replicated = resolve_arch("llama-3.1-8b"), _replicated("llama-3.1-8b")
    layers = one["base weights"] - replicated
    assert 0.5 < layers / (arch.layers * arch.layer_linear_params()) < 0.53  # NF4 codes + constants
    assert four["base weights"] == pytest.approx(replicated + layers / 4, abs=1)
    adapter = one["adapter weights"]
    assert four["unsharded layers"] == pytest.approx(2 * (layers + adapter) / arch.layers + adapter / arch.layers,
                                                     rel=1e-6)
    assert four["adapter weights"] == adapter / 4 and four["optimizer state"] == pytest.approx(
        one["optimizer state"] / 4, abs=1)
    assert four["activations"] == one["activations"]  # 8 samples over 4: one micro-batch of 2 each
    assert four.host == [] and "DDP gradient buckets" not in [c.name for c in four.components]
    big = {"quant": "nf4", "gradient_checkpointing": "full"}  # a 70B base fits 24 GB devices only sharded
    assert estimate(_inputs("llama-3.1-70b", **big, nproc=4, distributed="ddp")).total > 24 * GiB
    assert estimate(_inputs("llama-3.1-70b", **big, nproc=4, distributed="fsdp2")).fits(24 * GiB)
    options = suggestions(_inputs("llama-3.1-70b", **big, nproc=4), 24 * GiB)
    assert any("train.distributed: fsdp2" in desc for desc, _ in options)


def test_offload_moves_the_shards_to_the_host_line():
    kw = {"quant": "nf4", "nproc": 4, "distributed": "fsdp2"}
    kept = estimate(_inputs(**kw))
    off = estimate(_inputs(**kw, offload_params=True))
    replicated = _replicated("llama-3.1-8b")
    assert off["base weights"] == replicated
    assert off["adapter weights"] == off["adapter gradients"] == off["optimizer state"] == 0
    assert off["unsharded layers"] == kept["unsharded layers"] > 0
    base_shard = kept["base weights"] - replicated
    adapter, state = kept["adapter weights"], kept["optimizer state"]
    assert off.total == kept.total - base_shard - adapter - kept["adapter gradients"] - state
    assert off.host_total == 4 * (base_shard + 2 * adapter + state + CPU_LIBRARY_BYTES + CPU_RUNTIME_BYTES)
    assert kept.host_total == 0
    text = _text(off, 24 * GiB)
    assert f"host memory for offload: {human_bytes(off.host_total)}" in text
    assert "host memory" not in _text(kept, 24 * GiB)


def test_from_run_config_reads_the_distributed_settings():
    cfg = load_config({"data": {"train": "x.jsonl"}, "train": {"distributed": "fsdp2", "offload_params": True}})
    inputs = PlanInputs.from_run_config(cfg, resolve_arch("qwen2.5-0.5b"), "cuda", 2, nproc=4)
    assert (inputs.nproc, inputs.distributed, inputs.offload_params) == (4, "fsdp2", True)
    assert PlanInputs.from_run_config(load_config({"data": {"train": "x.jsonl"}}), inputs.arch, "cuda", 2).nproc == 1
    with pytest.raises(ValueError, match="nproc"):
        _inputs(nproc=0)


def _plan(*args: str) -> str:
    result = CliRunner().invoke(cli.app, ["plan", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_plans_one_device_of_several():
    args = ["--model", "llama-3.1-8b", "--quant", "nf4", "--budget", "24GB"]
    text = _plan(*args, "--nproc", "2", "--distributed", "fsdp2")
    assert "2 processes (fsdp2)" in text and "total per device" in text and "unsharded layers" in text
    assert "per device" in text.splitlines()[0] and "host memory for offload" not in text
    off = _plan(*args, "--nproc", "2", "--distributed", "fsdp2", "--offload-params")
    cfg = load_config({"data": {"train": "-"}}, ["model.name=llama-3.1-8b", "model.quant=nf4",
                                                 "train.distributed=fsdp2", "train.offload_params=true"])
    host = plan_run(cfg, "cuda", 2, nproc=2)[1].host_total
    assert host > 0
    assert f"host memory for offload: {human_bytes(host)}" in off
    assert "DDP gradient buckets" in _plan(*args, "--nproc", "2")  # the config's default mode: ddp
    assert "per device" not in _plan(*args)

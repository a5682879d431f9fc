"""Several processes (torchrun's machinery, the gloo backend, 2 ranks on the CPU) give one process's adapter:
DDP and FSDP2, an out-of-memory on one rank, checkpoints that resume on another number of processes, and a
killed rank that stops the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from desktune.config import load_config
from desktune.runs import EventRecord, RunDir, is_complete_checkpoint, read_records, records_of
from desktune.runs.layout import checkpoint_step
from desktune.training.checkpoint import load_state
from desktune.training.loop import train
from tests.tiny import inject_fault, tiny_config

TOLERANCE = 1e-5  # the bound on the largest weight difference against one process
STEPS = 4


def _config(tmp: Path, model: Path, name: str, **train_extra) -> Path:
    raw = tiny_config(model, tmp, run_name=name, lora={"target_modules": "all-linear"},
                      train={"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 4, "lr": 1e-2,
                             "collective_timeout_s": 60, **train_extra},
                      checkpoint={"every": 2, "keep_last": 5}, data={"val_fraction": 0.2})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _ranks(nproc: int, fn, *args) -> dict[int, object]:
    """Run `fn(*args)` as `nproc` ranks with torch's launcher; returns each rank's result."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"test-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
    return elastic_launch(config, fn)(*args)


def _desktune(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "desktune", *args], capture_output=True, text=True, env=env,
                          timeout=600, **kw)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir) -> Path:
    """One process's run of the config: the reference."""
    tmp = tmp_path_factory.mktemp("single")
    return train(load_config(_config(tmp, tiny_model_dir, "one")), quiet=True).run_dir


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_give_one_process_adapter(mode, single, tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, f"two-{mode}", distributed=mode)
    done = _desktune("train", str(cfg), "--nproc", "2", "-q")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / f"two-{mode}"
    # each rank adds its 2 micro-batches, the all-reduce (fsdp2: reduce-scatter) adds the ranks: (a+b)+(c+d), as
    # one process adds them; the clipping norm is summed from the shards in float64, so fsdp2 clips alike too
    assert _max_diff(_adapter(run), _adapter(single)) == 0.0
    want = [r.loss for r in read_records(single / "metrics.jsonl") if r.kind == "train"]
    got = [r.loss for r in read_records(run / "metrics.jsonl") if r.kind == "train"]
    assert len(got) == STEPS and got == pytest.approx(want, rel=1e-5)  # the ranks' losses summed, as one
    assert done.stdout.count("done:") == 1  # rank 0 alone reports


@pytest.mark.slow
def test_a_step_of_one_micro_batch_runs_on_two_processes(tmp_path, tiny_model_dir):
    """The default step (one micro-batch of 4) leaves rank 0 without a share: it still syncs, and the run is one
    process's."""
    one = train(load_config(_config(tmp_path, tiny_model_dir, "one-row", micro_batch_size=4, grad_accum=1)),
                quiet=True).run_dir
    cfg = _config(tmp_path, tiny_model_dir, "two-row", micro_batch_size=4, grad_accum=1)
    done = _desktune("train", str(cfg), "--nproc", "2", "-q")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _max_diff(_adapter(tmp_path / "runs" / "two-row"), _adapter(one)) <= TOLERANCE


@pytest.mark.slow
def test_an_oom_on_one_rank_halves_on_both_and_stays_exact(single, tmp_path, tiny_model_dir, monkeypatch):
    from tests.dist_worker import train_rank

    cfg = _config(tmp_path, tiny_model_dir, "oom")
    assert _ranks(2, train_rank, str(cfg), 1, 2) == {0: STEPS, 1: STEPS}
    run = tmp_path / "runs" / "oom"
    recovery = [e for e in records_of(read_records(run / "metrics.jsonl"), EventRecord) if e.name == "oom_recovery"]
    assert [(e.step, e.data["micro_batch_size"]) for e in recovery] == [(2, 1)]  # rank 0 halved with rank 1

    def short_of_memory(step: int, micro: int) -> None:  # one process that ran out at the same step
        if step == 2 and micro > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    inject_fault(monkeypatch, short_of_memory)
    alone = train(load_config(_config(tmp_path, tiny_model_dir, "oom-alone")), quiet=True).run_dir
    assert _max_diff(_adapter(run), _adapter(alone)) <= TOLERANCE
    assert _max_diff(_adapter(run), _adapter(single)) <= 1e-3  # micro-batches of 1 from step 2: not bit-equal


@pytest.mark.slow
def test_a_checkpoint_of_two_processes_resumes_on_one(single, tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, "across", distributed="fsdp2")
    assert _desktune("train", str(cfg), "--nproc", "2", "-q").returncode == 0
    run = tmp_path / "runs" / "across"
    done = _desktune("train", str(cfg), "-q", "--resume", str(RunDir(run).checkpoint(2)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _max_diff(_adapter(run), _adapter(single)) == 0.0


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The process of `rank` started by the launcher process `launcher` (its run id names the launcher)."""
    want = {f"RANK={rank}".encode(), f"TORCHELASTIC_RUN_ID=desktune-{launcher}".encode()}
    for entry in Path("/proc").iterdir():
        try:
            env = set((entry / "environ").read_bytes().split(b"\0")) if entry.name.isdigit() else set()
        except OSError:
            continue
        if want <= env:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_a_killed_rank_stops_the_run_on_every_rank(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, "killed")
    cfg.write_text(cfg.read_text().replace(f"max_steps: {STEPS}", "max_steps: 400"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "desktune", "train", str(cfg), "--nproc", "2", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    run = RunDir(tmp_path / "runs" / "killed")
    deadline = time.monotonic() + 300
    while run.latest_checkpoint() is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    victim = _rank_pid(proc.pid, 1)
    assert run.latest_checkpoint() is not None and victim is not None, proc.communicate()[1][-2000:]
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=120)
    stopped_s = time.monotonic() - t0
    assert proc.returncode == 2 and stopped_s < 60, (stopped_s, err[-2000:])
    assert "rank 1 was killed by SIGKILL, so the run stopped on every rank" in " ".join(err.split())
    assert _rank_pid(proc.pid, 0) is None  # nothing left hanging
    point = run.latest_checkpoint()
    assert is_complete_checkpoint(point) and load_state(point).step == checkpoint_step(point)  # resumable


@pytest.mark.slow
def test_sigterm_stops_every_rank_after_the_same_step(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, "term")
    cfg.write_text(cfg.read_text().replace(f"max_steps: {STEPS}", "max_steps: 400").replace("every: 2", "every: 1000"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "desktune", "train", str(cfg), "--nproc", "2", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    run = RunDir(tmp_path / "runs" / "term")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not (
            run.metrics.is_file() and run.metrics.read_text().count('"type": "train"') >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    stops = [e for e in records_of(read_records(run.metrics), EventRecord) if e.name == "stopped"]
    assert len(stops) == 1 and err.count("stopped after step") == 1  # rank 0 alone writes and says it
    assert run.latest_checkpoint() == run.checkpoint(stops[0].step)  # saved at the step both ranks stopped after
    assert is_complete_checkpoint(run.latest_checkpoint())


def _pairwise(grads: list[torch.Tensor]) -> torch.Tensor:
    from desktune.training.step import PairwiseSum

    p = torch.nn.Parameter(torch.zeros(4096))
    acc = PairwiseSum([p])
    for g in grads:
        p.grad = g.clone()  # what a micro-batch's backward leaves
        acc.push()
        assert p.grad is None
    acc.finish()
    return p.grad


def test_micro_batch_gradients_add_in_the_grouping_of_two_ranks():
    g = [torch.randn(4096, generator=torch.Generator().manual_seed(i)) * 10 ** i for i in range(5)]
    running = ((g[0] + g[1]) + g[2]) + g[3]
    assert not torch.equal(running, (g[0] + g[1]) + (g[2] + g[3]))  # the order shows in the last bits
    assert torch.equal(_pairwise(g[:4]), (g[0] + g[1]) + (g[2] + g[3]))  # rank 0's (a+b) plus rank 1's (c+d)
    assert torch.equal(_pairwise(g[:3]), (g[0] + g[1]) + g[2])
    assert torch.equal(_pairwise(g), ((g[0] + g[1]) + (g[2] + g[3])) + g[4])
    assert _pairwise([]) is None  # a rank with no micro-batch this step (fewer micro-batches than ranks)


def test_offloading_parameters_is_refused_off_cuda():
    from desktune.errors import DesktuneError
    from desktune.training.distributed import Dist, check_settings

    check_settings(Dist(rank=0, world=2), torch.device("cuda", 0), offload_params=True)
    check_settings(Dist(), torch.device("cpu"), offload_params=True)  # one process: fsdp2 is not in use
    with pytest.raises(DesktuneError, match=r"train\.offload_params"):
        check_settings(Dist(rank=0, world=2), torch.device("cpu"), offload_params=True)


@pytest.mark.parametrize("shardable,storage", [(False, torch.uint8), (True, torch.bfloat16)])
def test_fsdp2_stores_4bit_weights_in_the_compute_dtype(shardable, storage):
    """QLoRA under FSDP2 (CUDA only, not run here): bitsandbytes keeps the 4-bit codes in bf16 storage, so
    fully_shard can shard them like the other bf16 parameters."""
    from desktune.models.quantize import load_time_config

    bnb = load_time_config("nf4", True, torch.bfloat16, "cuda", shardable=shardable)
    assert bnb.bnb_4bit_quant_storage == storage

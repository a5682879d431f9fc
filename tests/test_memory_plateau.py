"""A CPU run's memory stays flat while packed rows keep changing length (hardware.bound_kernel_caches)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from desktune.hardware import KERNEL_CACHE_CAPACITY, bound_kernel_caches, cpu_supports_bf16, set_threads

MiB = 2**20
CACHE_ENV = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def test_set_threads_bounds_the_kernel_caches(monkeypatch):
    for name in (*CACHE_ENV, "DNNL_PRIMITIVE_CACHE_CAPACITY"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    try:
        set_threads(1)
    finally:
        torch.set_num_threads(threads)
    assert [os.environ[name] for name in CACHE_ENV] == [str(KERNEL_CACHE_CAPACITY)] * 2


def test_a_users_cache_setting_is_kept(monkeypatch):
    monkeypatch.setenv("DNNL_PRIMITIVE_CACHE_CAPACITY", "7")  # oneDNN's older name counts as set
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "9")
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    bound_kernel_caches()
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ
    assert os.environ["LRU_CACHE_CAPACITY"] == "9"


# A fresh process trains a tiny bf16 Llama through desktune's own path for 40 steps; each step packs 4 samples of
# random length into one row, so nearly every micro-batch has a row length not seen before (as in a real run).
_CHILD = r"""
import json, random, sys
from pathlib import Path
from desktune.config import load_config
from desktune.training.loop import train
from tests.tiny import make_model_dir

tmp = Path(sys.argv[1])
model = make_model_dir(tmp / "model", hidden=128, layers=2)
rng = random.Random(0)
words = "the sea fox paris dog world today you france ahoy matey fair winds".split()
with (tmp / "chats.jsonl").open("w", encoding="utf-8") as f:
    for i in range(200):
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(3, 60)))
        f.write(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                         {"role": "assistant", "content": answer}]}) + "\n")
cfg = load_config({
    "model": {"name": str(model), "dtype": "bf16"},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
    "data": {"train": str(tmp / "chats.jsonl"), "max_seq_len": 256, "replay": 0},
    "train": {"max_steps": 40, "micro_batch_size": 4, "grad_accum": 1, "lr": 1e-2, "threads": 1},
    "output_dir": str(tmp / "runs"), "run_name": "plateau"})
train(cfg, quiet=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or not cpu_supports_bf16(),
                    reason="bf16 matmuls go through oneDNN's kernel cache on a bf16 x86 CPU (VmRSS: Linux)")
def test_rss_stays_flat_over_40_steps_of_new_row_lengths(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (*CACHE_ENV, "DNNL_PRIMITIVE_CACHE_CAPACITY")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                               env.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], env=env, check=True, timeout=600,
                   capture_output=True)
    records = [json.loads(line) for line in (tmp_path / "runs" / "plateau" / "metrics.jsonl").read_text().splitlines()]
    rss = [r["rss_bytes"] for r in records if r.get("type") == "train"]
    assert len(rss) == 40
    # measured: without the bound +470 MiB from step 10 to 40 (~16 MiB a step, steady); with it +5 MiB
    assert rss[-1] - rss[9] < 64 * MiB, [r // MiB for r in rss]

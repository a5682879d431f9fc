"""Precision on CUDA GPUs (mocked: no GPU here) and the bitsandbytes import notice on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from desktune.hardware import cuda_bf16_native, detect, pick_dtype
from tests.tiny import tiny_config

CUDA = torch.device("cuda")
# (name, compute capability, what `auto` must pick): bf16 only where the GPU computes it natively (8.0+)
GPUS = [
    ("RTX 2080", (7, 5), torch.float16),
    ("T4", (7, 5), torch.float16),
    ("V100", (7, 0), torch.float16),
    ("RTX 3090", (8, 6), torch.bfloat16),
    ("H100", (9, 0), torch.bfloat16),
]


def fake_gpu(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int]) -> None:
    """A visible CUDA GPU of the given compute capability that, like torch says of T4/V100, 'supports' bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.parametrize(("name", "capability", "expected"), GPUS, ids=[g[0] for g in GPUS])
def test_auto_picks_bf16_only_where_native(monkeypatch, name, capability, expected):
    fake_gpu(monkeypatch, capability)
    assert cuda_bf16_native(CUDA) is (expected == torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto never warns
        assert pick_dtype("auto", CUDA) == expected
        hw = detect("auto", "auto")
    assert hw.device.type == "cuda" and hw.dtype == expected


@pytest.mark.parametrize(("name", "capability", "expected"), GPUS, ids=[g[0] for g in GPUS])
@pytest.mark.parametrize(("requested", "dtype"), [("fp16", torch.float16), ("fp32", torch.float32)])
def test_explicit_dtype_wins(monkeypatch, name, capability, expected, requested, dtype):
    fake_gpu(monkeypatch, capability)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pick_dtype(requested, CUDA) == dtype


def test_explicit_bf16_on_an_emulating_gpu_is_kept_with_a_warning(monkeypatch):
    fake_gpu(monkeypatch, (7, 5))
    with pytest.warns(UserWarning, match=r"compute capability 7\.5.*emulated.*slowly"):
        assert pick_dtype("bf16", CUDA) == torch.bfloat16


def test_explicit_bf16_on_a_native_gpu_does_not_warn(monkeypatch):
    fake_gpu(monkeypatch, (8, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pick_dtype("bf16", CUDA) == torch.bfloat16


def test_rocm_counts_as_native_bf16(monkeypatch):
    fake_gpu(monkeypatch, (9, 0))
    monkeypatch.setattr(torch.version, "hip", "6.2")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # not asked on ROCm
    assert pick_dtype("auto", CUDA) == torch.bfloat16


BNB_NOTICE = ("kernels-community", "pip install kernels")


def _python(code: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def test_training_on_the_cpu_prints_no_bitsandbytes_kernels_advice(tiny_model_dir, tmp_path):
    """A fresh process (bitsandbytes logs at import time) trains 2 steps through the CLI; its
    'pip install kernels' advice concerns a CPU 4-bit path desktune never uses and must not be shown."""
    control = _python("import bitsandbytes")
    if not any(s in control.stdout + control.stderr for s in BNB_NOTICE):
        pytest.skip("this bitsandbytes / CPU prints no kernels notice on import (needs AVX512-BF16)")
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(tiny_config(tiny_model_dir, tmp_path, train={"max_steps": 2})), encoding="utf-8")
    code = "import sys; from desktune.cli import main; sys.argv = ['desktune', *sys.argv[1:]]; main()"
    proc = _python(code, "train", str(config), "--quiet", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "runs").is_dir()
    for text in BNB_NOTICE:
        assert text not in proc.stdout and text not in proc.stderr

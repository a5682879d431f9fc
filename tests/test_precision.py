"""fp16 with loss scaling, run for real on the CPU: an fp16 base, fp32 adapters and an enabled GradScaler through
the step functions the training loop uses (desktune itself refuses fp16 on the CPU only because it is slow)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from desktune.adapters import attach_lora
from desktune.config import RunConfig, load_config
from desktune.data import IGNORE_INDEX
from desktune.data.encode import Example
from desktune.runs import EventRecord, RunDir, read_records, records_of
from desktune.training.monitor import Monitor
from desktune.training.objectives import objective_for
from desktune.training.optim import make_optimizer, make_scheduler
from desktune.training.speed import Switches
from desktune.training.step import NonFiniteGuard, Trainer, Verdict, train_step
from tests.tiny import tiny_config

CPU = torch.device("cpu")


def _examples() -> list[Example]:
    g = torch.Generator().manual_seed(3)
    out = []
    for n in (12, 20, 9, 16):  # one step: micro-batch 2 x accumulation 2
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        out.append(Example(input_ids=ids, labels=[IGNORE_INDEX] * 2 + ids[2:], source=f"row {n}"))
    return out


def _trainer(cfg: RunConfig, model_dir: Path, dtype: torch.dtype, scaler: torch.amp.GradScaler) -> Trainer:
    """A Trainer as loop.make_trainer builds one, on a base loaded in `dtype` (seeded adapters, B non-zero)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    torch.manual_seed(0)
    model = attach_lora(base, cfg.lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.train, CPU)
    return Trainer(model=model, params=params, optimizer=optimizer, scheduler=make_scheduler(optimizer, cfg.train, 4),
                   scaler=scaler, objective=objective_for(cfg), switches=Switches(), device=CPU, pad_id=0,
                   packing=cfg.data.packing, group_by_length=False, max_grad_norm=None, micro=2, total_steps=4)


def _adapters(tr: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in tr.params]


def test_fp16_loss_scaling_skips_the_overflowing_step_then_updates(tiny_model_dir, tmp_path):
    cfg = load_config(tiny_config(tiny_model_dir, tmp_path))
    # 2^40 overflows fp16 (max 65504) in backward; one backoff then lands on 2^16, torch's default start
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-24)
    tr = _trainer(cfg, tiny_model_dir, torch.float16, scaler)
    base_dtypes = {p.dtype for p in tr.model.parameters() if not p.requires_grad}
    assert base_dtypes == {torch.float16} and {p.dtype for p in tr.params} == {torch.float32}
    seen: list[torch.dtype] = []
    tr.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.register_forward_hook(
        lambda m, i, o: seen.append(o.dtype))
    ref = _trainer(cfg, tiny_model_dir, torch.float32, torch.amp.GradScaler("cpu", enabled=False))
    (run_dir := tmp_path / "run").mkdir()
    guard = NonFiniteGuard(last_checkpoint=lambda: None)
    with Monitor(RunDir(run_dir), total_steps=4, quiet=True) as mon:
        before = _adapters(tr)
        tr.step = 1
        first = train_step(tr, _examples(), mon)
        assert first.verdict is Verdict.OVERFLOW and not guard.accept(first, tr, mon)
        assert seen and set(seen) == {torch.float16}  # the base really computed in fp16
        assert tr.scaler.get_scale() == 2.0**16 and tr.scheduler.last_epoch == 0
        assert all(torch.equal(a, b) for a, b in zip(_adapters(tr), before, strict=True))  # no update

        tr.step = 2
        second = train_step(tr, _examples(), mon)
        assert second.verdict is Verdict.UPDATED and guard.accept(second, tr, mon)
        assert tr.scaler.get_scale() == 2.0**16 and tr.scheduler.last_epoch == 1
        assert all(not torch.equal(a, b) for a, b in zip(_adapters(tr), before, strict=True))
        fp32 = train_step(ref, _examples(), mon)
    # the unscaled fp16 gradients are fp32's within fp16 rounding (eps 2^-10, through 2 layers; measured 3e-4 apart)
    assert abs(second.grad_norm - fp32.grad_norm) < 0.01 * fp32.grad_norm, (second.grad_norm, fp32.grad_norm)
    assert abs(second.loss - fp32.loss) < 0.01 * fp32.loss
    events = records_of(read_records(run_dir / "metrics.jsonl"), EventRecord)
    assert [e.message for e in events] == ["step 1: fp16 gradient overflow, loss scale lowered to 65536"]

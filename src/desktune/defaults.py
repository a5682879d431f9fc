"""Settings the tool chooses when the config says `auto`: the learning rate from the base's size and the method,
the passes over the data from its size, and the step count that fits a time budget. Rules, written down here
once (docs/defaults.md gives their sources); each choice comes with the reason printed at the start of a run.
Torch-free: the plan stage of the chain, used by the training loop's setup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from desktune.config import RunConfig

LR_REFERENCE = (8e9, 2e-4)  # LoRA on 7-8B models: practice settled around 1e-4 to 2e-4 (QLoRA paper, TRL, Unsloth)
LR_SIZE_EXPONENT = 0.5  # smaller models take higher LoRA rates: 135M -> 1.5e-3, 65B -> 7e-5 (see docs/defaults.md)
EPOCH_SAMPLES = 1200  # auto epochs aim to show the model about this many samples: small sets get more passes
MAX_AUTO_EPOCHS = 10  # ... but never more than this many passes over the same rows
REPLAY_SHARE = 0.1  # auto replay for chat data: this share of training samples are the base's own general answers
TIMING_STEPS = 4  # optimizer steps timed before a time-budgeted run fixes its step count (the first is warm-up)
# a time budget that fits fewer optimizer steps teaches nothing: warm-up alone takes the first, and a budgeted run
# of 1 step on the embedded model ended at the loss it started from (3.6153 -> 3.6153)
MIN_TEACHING_STEPS = 10
# a budgeted run fits its count again at these fractions of the way, from its real steps. Why (facts task, bf16
# EPYC, 6 minutes): the timed steps once ran 13% slower than the run's (0.52 s against 0.46 s: it stopped at 299 s);
# the steps themselves drift: 0.41 s a step up to 10%, 0.48 s from 25% to 50% (one re-fit at 10% ran to 375 s)
REFIT_AT = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class Choice:
    """A value the tool chose, and why (printed and recorded at the start of a run)."""

    value: float
    reason: str


def method_name(cfg: RunConfig) -> str:
    """The adapter method a run trains, as messages name it."""
    if cfg.lora.use_rslora:
        return "rsLoRA"
    return "DoRA" if cfg.lora.use_dora else "QLoRA" if cfg.model.quant == "nf4" else "LoRA"


def typical_lora_lr(n_params: int, r: int = 16, rslora: bool = False) -> float:
    """The LoRA learning rate practice uses for a base of `n_params` parameters (a rule, not a measurement).

    LoRA, QLoRA and DoRA share it; rsLoRA scales the update by alpha/sqrt(r) instead of alpha/r, sqrt(r) times
    more, so its rate is sqrt(r) times lower for the same step in the weights.
    """
    size, lr = LR_REFERENCE
    return lr * (size / max(n_params, 1)) ** LR_SIZE_EXPONENT / (math.sqrt(r) if rslora else 1.0)


def auto_lr(n_params: int, r: int, rslora: bool, method: str) -> Choice:
    """train.lr: auto."""
    lr = float(f"{typical_lora_lr(n_params, r, rslora):.1e}")
    scale = " (alpha/sqrt(r) scaling)" if rslora else ""
    return Choice(lr, f"train.lr auto = {lr:.1e}: {method}{scale} on a {n_params / 1e6:,.0f}M-parameter base "
                      f"(2e-4 at 8B, times (8B / size)^{LR_SIZE_EXPONENT}; docs/defaults.md)")


def auto_epochs(n_samples: int, budgeted: bool = False) -> Choice:
    """train.epochs: auto. With a time budget the budget sets the passes (at most MAX_AUTO_EPOCHS): the user
    offered that time, and replay and best/ bound what more passes cost; without one, about EPOCH_SAMPLES seen."""
    if budgeted:
        return Choice(float(MAX_AUTO_EPOCHS), f"train.epochs auto = as many passes as train.time_budget allows, at "
                                              f"most {MAX_AUTO_EPOCHS} ({n_samples} training samples)")
    epochs = float(min(MAX_AUTO_EPOCHS, max(1, math.ceil(EPOCH_SAMPLES / max(n_samples, 1)))))
    return Choice(epochs, f"train.epochs auto = {epochs:g}: {n_samples} training samples (about {EPOCH_SAMPLES} "
                          f"samples seen, at most {MAX_AUTO_EPOCHS} passes)")


def auto_replay(chats: bool) -> Choice:
    """data.replay: auto."""
    if not chats:
        return Choice(0.0, "data.replay auto = 0: plain-text data, no chat answers to replay")
    return Choice(REPLAY_SHARE, f"data.replay auto = {REPLAY_SHARE:g}: that share of training samples replays the "
                                "base's own answers to general prompts, so it keeps how it answers them")


def replay_count(n_train: int, share: float) -> int:
    """Replay samples to add to `n_train` training samples so that they make up `share` of the mix."""
    return round(n_train * share / (1.0 - share)) if share > 0 else 0


# auto validation split: without one nothing guards against over-fitting (no validation loss, no best/); 8 samples
# is the least whose mean loss says anything, 100 bound what a validation costs, and below 40 samples the 8 would
# be a fifth of the data
VAL_SHARE, VAL_MIN, VAL_MAX, VAL_MIN_SAMPLES = 0.05, 8, 100, 40


def auto_val_fraction(n_samples: int) -> Choice:
    """data.val_fraction: auto (no data.val file): the share of the samples held out for validation. The value
    is n_val / n_samples, so that split_samples' round(n * fraction) gives back n_val exactly."""
    if n_samples < VAL_MIN_SAMPLES:
        return Choice(0.0, f"data.val_fraction auto = 0: {n_samples} samples are too few to hold some out (fewer "
                           f"than {VAL_MIN_SAMPLES}); no validation set watches for over-fitting")
    n_val = min(VAL_MAX, max(VAL_MIN, round(n_samples * VAL_SHARE)))
    return Choice(n_val / n_samples, f"data.val_fraction auto = {n_val / n_samples:.3g}: {n_val} of {n_samples} "
                                     f"samples held out for validation, to watch for over-fitting "
                                     f"({VAL_SHARE:.0%}, {VAL_MIN} to {VAL_MAX}; data.val_fraction: 0 turns it off)")


def budget_steps(budget_s: float, spent_s: float, step_s: float, wish: int) -> int:
    """Optimizer steps that end within `budget_s` when `spent_s` is gone and each step takes `step_s`."""
    fits = int((budget_s - spent_s) / max(step_s, 1e-9))
    return max(1, min(wish, fits))

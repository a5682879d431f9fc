"""LoRA / DoRA / rsLoRA adapters through peft: target resolution and the trainable-parameter report."""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from desktune.config import LoraConfig
from desktune.errors import DesktuneError
from desktune.runs.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ADAPTER_WEIGHTS_PICKLE,
    BASE_FINGERPRINT,
    CHECKPOINTS,
)
from desktune.safety import refuse_pickle, unpickle_refusal


@dataclass(frozen=True)
class TrainableReport:
    """How much of the model trains."""

    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({100 * self.share:.2f}%)"


def base_model(model: Any) -> Any:
    """The transformers model inside a peft wrapper (the model itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _output_head_names(model: torch.nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, mod in model.named_modules() if head is not None and mod is head}


def linear_leaf_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the linear layers LoRA can target (the output head excluded)."""
    heads = _output_head_names(model)
    names = set()
    for name, mod in model.named_modules():
        if name in heads or not name:
            continue
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ in {"Linear4bit", "Linear8bitLt", "NF4Linear"}:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_targets(model: torch.nn.Module, targets: list[str] | str) -> list[str] | str:
    """Validate target module names against the model; 'all-linear' is passed to peft as is."""
    if targets == "all-linear":
        return "all-linear"
    valid = linear_leaf_names(model)
    unknown = [t for t in targets if t not in valid]
    if unknown:
        hints = []
        for u in unknown:
            close = difflib.get_close_matches(u, valid, n=1)
            hints.append(f"'{u}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise DesktuneError(
            f"unknown target module(s) {', '.join(hints)}; this model's linear layers are: {', '.join(valid)}",
            where="lora.target_modules", fix="use names from that list, or 'all-linear'",
        )
    return list(targets)


def peft_config(cfg: LoraConfig, targets: list[str] | str) -> Any:
    """The peft LoraConfig for a causal LM."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none",
        task_type="CAUSAL_LM", use_dora=cfg.use_dora, use_rslora=cfg.use_rslora,
    )


def enable_checkpointing(model: torch.nn.Module, mode: bool | str) -> int:
    """Recompute decoder layers in backward: all of them (full / True), or every second one (selective).

    Selective keeps layer 0, 2, 4, ... as they are and checkpoints layers 1, 3, 5, ...: half the recompute
    for about half the activation memory saved. Returns how many layers recompute.
    """
    if not mode:
        return 0
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    layers = model.get_decoder().layers
    if mode == "selective":
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i % 2 == 1
    return sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers)


def attach_lora(model: torch.nn.Module, cfg: LoraConfig, *, gradient_checkpointing: bool | str = False) -> Any:
    """Wrap a frozen base with trainable LoRA adapters (fp32 adapter weights for stable updates)."""
    from peft import get_peft_model

    targets = resolve_targets(model, cfg.target_modules)
    enable_checkpointing(model, gradient_checkpointing)
    with warnings.catch_warnings():
        # int8 bases cannot merge in place; desktune merges into a fresh 16-bit base instead (export/merge.py)
        warnings.filterwarnings("ignore", message=".*TorchaoLoraLinear was instantiated.*")
        peft_model = get_peft_model(model, peft_config(cfg, targets), autocast_adapter_dtype=True)
    return peft_model


def trainable_report(model: torch.nn.Module) -> TrainableReport:
    """Count trainable and total parameters (quantized weights counted by their logical size)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state") or type(p).__name__ == "Params4bit":  # bnb packs two 4-bit values a byte
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return TrainableReport(trainable=trainable, total=total)


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """adapter_config.json of a saved PEFT adapter folder, with clear errors."""
    folder = Path(path)
    cfg_file = folder / ADAPTER_CONFIG
    if not folder.is_dir():
        raise DesktuneError("adapter folder not found", where=str(folder),
                            fix=f"pass the folder holding {ADAPTER_CONFIG}")
    if not cfg_file.is_file():
        raise DesktuneError(f"no {ADAPTER_CONFIG} here (not a PEFT adapter folder)", where=str(folder),
                            fix=f"pass a run's adapter/ folder or a {CHECKPOINTS}/step-N folder")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except OSError as e:
        raise DesktuneError(f"cannot read the file ({e.strerror or e})", where=str(cfg_file),
                            fix="make it readable (chmod u+r) or restore the adapter folder") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DesktuneError(f"invalid JSON ({e})", where=str(cfg_file), fix="restore the adapter folder") from e
    if not isinstance(raw, dict):
        raise DesktuneError(f"not a JSON object (a {type(raw).__name__}); PEFT writes one object of settings",
                            where=str(cfg_file), fix="restore the adapter folder")
    return raw


_RESTORE = f"restore the adapter folder (copy it again, or use one of the run's {CHECKPOINTS}/step-N folders)"


def check_adapter(path: str | Path) -> dict[str, Any]:
    """adapter_config.json of an adapter folder, once its weights file is known to be readable (before any base
    model is loaded)."""
    from desktune.models.loading import check_safetensors

    cfg = read_adapter_config(path)
    weights = Path(path) / ADAPTER_WEIGHTS
    if weights.is_file():
        check_safetensors(weights, "adapter", fix=_RESTORE)
    elif (Path(path) / ADAPTER_WEIGHTS_PICKLE).is_file():
        refuse_pickle([Path(path) / ADAPTER_WEIGHTS_PICKLE], "adapter", path,
                      convert=f"ask for the adapter as {ADAPTER_WEIGHTS} (PEFT saves it so by default)")
    else:
        raise DesktuneError(f"no adapter weights here ({ADAPTER_WEIGHTS})", where=str(path), fix=_RESTORE)
    return cfg


_PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: base_model.model.<module path>.lora_A.weight


def _tensor_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, from its header (no tensor data is read)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 (not a dict)


def shape_mismatches(base: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Adapter tensors that do not fit the base's layers: lora_A is (r, in_features) of the wrapped Linear,
    lora_B (out_features, r), a DoRA magnitude (out_features,). Layers the base lacks are left to peft."""
    modules = dict(base.named_modules())
    bad = []
    for key, shape in shapes.items():
        path, _, part = key.removeprefix(_PEFT_PREFIX).rpartition(".lora_")
        mod = modules.get(path)
        n_in, n_out = getattr(mod, "in_features", None), getattr(mod, "out_features", None)
        if not path or n_in is None or n_out is None:
            continue
        if part in ("A.weight", "B.weight") and len(shape) == 2:
            expected: tuple[int, ...] = (shape[0], n_in) if part == "A.weight" else (n_out, shape[1])
        elif part == "magnitude_vector":
            expected = (n_out,)
        else:
            continue
        if shape != expected:
            bad.append(f"{path}.lora_{part}: {shape}, the base needs {expected}")
    return bad


# peft's own refusals: OSError (unreadable files), ValueError (target modules not in the base; PeftError is one),
# KeyError (unknown peft_type), RuntimeError (load_state_dict's size mismatch), UnpicklingError (an allowed
# adapter_model.bin that holds more than tensors: torch.load(weights_only=True) refused it)
PEFT_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError)


def _checked(model: Any, path: str | Path) -> str | None:
    """The adapter's recorded base, once its folder is sound and its shapes fit `model`'s layers."""
    base_name = check_adapter(path).get("base_model_name_or_path")
    weights = Path(path) / ADAPTER_WEIGHTS
    if weights.is_file() and shape_mismatches(base_model(model), _tensor_shapes(weights)):  # (.bin: peft checks)
        raise _refuse(path, base_name, "its weight shapes do not match this base model (was it trained on another "
                                       "base?)")
    return base_name


def load_adapter(base: torch.nn.Module, path: str | Path, *, trainable: bool = False) -> Any:
    """Put a saved PEFT adapter on a loaded base model."""
    from peft import PeftModel

    base_name = _checked(base, path)
    try:
        return PeftModel.from_pretrained(base, str(path), is_trainable=trainable)
    except PEFT_LOAD_ERRORS as e:
        raise _refuse(path, base_name, e) from e


def load_more_adapter(model: Any, path: str | Path, name: str) -> None:
    """Put one more saved PEFT adapter, under `name`, on a model that already holds one (same checks as
    load_adapter)."""
    base_name = _checked(model, path)
    try:
        model.load_adapter(str(path), adapter_name=name)
    except PEFT_LOAD_ERRORS as e:
        raise _refuse(path, base_name, e) from e


def _refuse(path: str | Path, base_name: str | None, why: str | Exception) -> DesktuneError:
    detail = why if isinstance(why, str) else str(why).splitlines()[0] if str(why) else type(why).__name__
    if isinstance(why, pickle.UnpicklingError):
        return DesktuneError(f"the pickled adapter weights hold more than tensors ({unpickle_refusal(why)}); they were "
                             "not loaded",
                             where=str(path), fix=f"ask for the adapter as {ADAPTER_WEIGHTS}, or delete it")
    trained_on = f": {base_name} (the default when --model is left out)" if base_name else \
        f" (see base_model_name_or_path in {ADAPTER_CONFIG})"
    return DesktuneError(f"could not load the adapter: {detail}", where=str(path),
                         fix=f"use the base model the adapter was trained on{trained_on}")


# ---------------------------------------------------------------- the fingerprint of a base model

FINGERPRINT_VERSION = 1
_SAMPLED_TENSORS = 32  # tensors, spread over the sorted names, whose values are sampled
_SAMPLES_PER_TENSOR = 8
# a base re-saved in bf16 moves each value by at most 2^-9 of it; another base (a fine-tune) moves some far more
_SAMPLE_RTOL = 2.0**-7


def base_weight_files(source: str) -> list[Path]:
    """The safetensors files of a base: a local folder's, or a hub id's already in the local cache (nothing is
    downloaded); empty when there are none."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(source, local_files_only=True))
        except (OSError, ValueError):  # not in the cache (LocalEntryNotFoundError), or not a valid repo id
            return []
    return sorted(folder.glob("*.safetensors"))


def _sample(handle: Any, name: str, shape: tuple[int, ...]) -> list[float]:
    """A few values of one tensor at positions fixed by its name and shape (read one by one, not the tensor)."""
    import random

    numel = math.prod(shape)
    picks = sorted(random.Random(f"{name}:{shape}").sample(range(numel), min(_SAMPLES_PER_TENSOR, numel)))
    values = []
    for flat in picks:
        index = []
        for dim in reversed(shape):
            flat, i = divmod(flat, dim)
            index.append(slice(i, i + 1))
        values.append(float(handle.get_slice(name)[tuple(reversed(index))].float().reshape(-1)[0]))
    return values


def base_fingerprint(source: str) -> dict[str, Any] | None:
    """What identifies a base's weights, read from its safetensors files (so independent of the dtype, device and
    quantization it is loaded with): a hash of every tensor's name and shape, and a few values of some tensors.
    None for a base without safetensors files (or a hub id not in the local cache)."""
    from safetensors import safe_open

    files = base_weight_files(source)
    if not files:
        return None
    shapes: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            shapes.update({n: (file, tuple(f.get_slice(n).get_shape())) for n in f.keys()})  # noqa: SIM118
    names = sorted(shapes)
    structure = hashlib.sha256("\n".join(f"{n}:{shapes[n][1]}" for n in names).encode()).hexdigest()
    n = len(names)
    chosen = names if n <= _SAMPLED_TENSORS else [names[i * n // _SAMPLED_TENSORS] for i in range(_SAMPLED_TENSORS)]
    samples = {}
    for name in chosen:
        file, shape = shapes[name]
        if math.prod(shape):
            with safe_open(str(file), framework="pt") as f:
                samples[name] = _sample(f, name, shape)
    return {"version": FINGERPRINT_VERSION, "source": source, "tensors": len(names), "structure": structure,
            "samples": samples}


def fingerprint_mismatch(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why two base fingerprints are of different weights (None when they match)."""
    if recorded.get("structure") != current.get("structure"):
        return (f"its tensors have other names or shapes ({current.get('tensors')} tensors; the adapter's base had "
                f"{recorded.get('tensors')})")
    now = current.get("samples", {})
    for name, values in recorded.get("samples", {}).items():
        got = now.get(name)
        if got is None or len(got) != len(values) or not all(
                math.isclose(a, b, rel_tol=_SAMPLE_RTOL, abs_tol=1e-12) for a, b in zip(values, got, strict=True)):
            return f"its weights differ (sampled values of {name})"
    return None


def write_base_fingerprint(folder: Path, source: str) -> None:
    """Record the fingerprint of the base in an adapter folder (nothing for a base without safetensors)."""
    found = _cached_fingerprint(source, tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns)
                                              for p in base_weight_files(source)))
    if found is not None:
        (folder / BASE_FINGERPRINT).write_text(json.dumps(found, indent=2), encoding="utf-8")


@functools.lru_cache(maxsize=8)
def _cached_fingerprint(source: str, files: tuple[tuple[str, int, int], ...]) -> dict[str, Any] | None:
    """base_fingerprint, once per run (`files`, with sizes and times, keys the cache)."""
    return base_fingerprint(source)


def read_base_fingerprint(folder: str | Path) -> dict[str, Any] | None:
    """The base fingerprint an adapter folder records (None when it has none, or one desktune cannot read)."""
    file = Path(folder) / BASE_FINGERPRINT
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(raw, dict) and raw.get("version") == FINGERPRINT_VERSION and isinstance(raw.get("samples"), dict)
    return raw if ok else None

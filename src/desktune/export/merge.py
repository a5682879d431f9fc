"""Merge one or several LoRA adapters, weighted, into their base and save a plain transformers model folder.

Merged weights are W' = W + sum_i w_i * scale_i * B_i A_i, the sum taken in fp32 and rounded once to the output
dtype (summing each adapter's own delta is exact for any ranks and targets; peft's add_weighted_adapter would
need equal ranks for "linear" and build a new adapter first).

W is the base's original 16-bit weight, or, for an adapter trained on a quantized base (QLoRA), by default the
weight training saw: the base quantized exactly as training did (models/quantize.py, torchao) and de-quantized
(`into="dequantized"`). `into="original"` merges into the original 16-bit weights instead.

The base is checked before it loads: against the fingerprint of its weights that desktune records beside an
adapter (base_fingerprint.json), or, for adapters of other tools, by name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from desktune.adapters import (
    base_fingerprint,
    check_adapter,
    fingerprint_mismatch,
    load_adapter,
    load_more_adapter,
    read_base_fingerprint,
)
from desktune.config import ModelConfig
from desktune.constants import EMBEDDED_ALIASES
from desktune.errors import DesktuneError
from desktune.hardware import DTYPES, Hardware, pick_device
from desktune.models.loading import load_model, resolve_source
from desktune.models.quantize import dequantized_weight, is_quantized_linear, quantize_in_place
from desktune.runs.atomic import write_folder_atomically
from desktune.runs.layout import ADAPTER_CONFIG, BASE_FINGERPRINT, CHAT_TEMPLATE, CONFIG, META, RunDir, checkpoint_step

INTO = ("dequantized", "original")
QUANTIZED = ("nf4", "int8")  # the bases `dequantized` reproduces
Log = Callable[[str], None]


@dataclass(frozen=True)
class Adapter:
    """One adapter to merge, with what desktune knows of how it was trained."""

    path: Path
    config: dict[str, Any]  # adapter_config.json
    weight: float
    quant: str  # the quantization of the base it trained on: none, nf4, int8, or unknown (no record)
    backend: str | None  # how that base was quantized (torchao-nf4, bnb-nf4, ...), when recorded
    train_dtype: str | None  # the compute dtype of training (the dtype the quantized weights were made from)
    template: str | None
    fingerprint: dict[str, Any] | None

    @property
    def trained_on(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise DesktuneError(f"unknown dtype '{dtype}'", where="--dtype", fix="use bf16, fp16 or fp32")


def parse_weights(text: str | None) -> list[float] | None:
    """`--weights 0.7,0.3` as numbers (None when not given)."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as e:
        raise DesktuneError(f"not a comma-separated list of numbers: '{text}'", where="--weights",
                            fix="write one number per adapter, e.g. --weights 0.7,0.3") from e
    return values


def _run_record(path: Path) -> tuple[str, str | None, str | None]:
    """(quant, backend, training dtype) of the run an adapter comes from: its desktune.json, else the run's
    config.yaml (beside adapter/ and best/, two levels up from checkpoints/step-N); quant "unknown" without
    either."""
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
        if isinstance(meta, dict) and isinstance(meta.get("quant"), str):
            return meta["quant"], meta.get("quant_backend"), meta.get("dtype")
    except (OSError, ValueError):
        pass
    run = RunDir.of_checkpoint(path) if checkpoint_step(path) is not None else RunDir(path.parent)
    try:
        model = yaml.safe_load(run.path.joinpath(CONFIG).read_text(encoding="utf-8")).get("model", {})
        dtype = model.get("dtype")
        return str(model.get("quant", "none")), None, None if dtype in (None, "auto") else str(dtype)
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return "unknown", None, None


def read_adapters(paths: Sequence[str | Path], weights: Sequence[float] | None = None) -> list[Adapter]:
    """The adapters to merge with their weights (1.0 each by default), each checked before any base loads."""
    if not paths:
        raise DesktuneError("no adapter to merge", where="desktune merge", fix="pass one or more adapter folders")
    weights = [1.0] * len(paths) if weights is None else list(weights)
    if len(weights) != len(paths):
        raise DesktuneError(f"{len(weights)} weight(s) for {len(paths)} adapter(s)", where="--weights",
                            fix="give one weight per adapter, in the adapters' order")
    if not all(math.isfinite(w) for w in weights):
        raise DesktuneError("a weight is not a finite number", where="--weights", fix="use numbers like 0.5")
    found = []
    for path, weight in zip(map(Path, paths), weights, strict=True):
        config = check_adapter(path)
        template = path / CHAT_TEMPLATE
        quant, backend, dtype = _run_record(path)
        found.append(Adapter(path=path, config=config, weight=float(weight), quant=quant, backend=backend,
                             train_dtype=dtype, fingerprint=read_base_fingerprint(path),
                             template=template.read_text(encoding="utf-8") if template.is_file() else None))
    _check_kinds(found)
    return found


def _check_kinds(adapters: list[Adapter]) -> None:
    """Refuse what cannot be merged as a weighted sum of deltas: DoRA, non-LoRA adapters, trained full modules."""
    if len(adapters) == 1 and adapters[0].weight == 1.0:
        return  # merged by peft as it is
    for a in adapters:
        cfg = a.config
        what = ("a DoRA adapter (its magnitudes do not add up)" if cfg.get("use_dora") else
                f"a {cfg.get('peft_type')} adapter" if cfg.get("peft_type") != "LORA" else
                "an adapter with fully trained modules (modules_to_save)" if cfg.get("modules_to_save") else None)
        if what:
            raise DesktuneError(f"{what} cannot be merged weighted or with other adapters", where=str(a.path),
                                fix="merge it alone with weight 1 (leave out --weights)")


def choose_into(adapters: list[Adapter], into: str | None) -> str:
    """Which weights the adapters merge into: `into` when given (and fitting), else de-quantized for QLoRA
    adapters and the original weights for the others."""
    if into is not None and into not in INTO:
        raise DesktuneError(f"unknown --into '{into}'", where="--into", fix="use dequantized or original")
    quants = {a.quant for a in adapters}
    if into is None:
        if len(quants) > 1:
            listing = ", ".join(f"{a.path} ({a.quant})" for a in adapters)
            raise DesktuneError(f"the adapters trained on differently quantized bases: {listing}",
                                where="desktune merge", fix="pass --into original to merge all of them into the "
                                "original 16-bit weights, or merge adapters of one kind")
        return "dequantized" if quants <= set(QUANTIZED) else "original"
    if into == "dequantized":
        for a in adapters:
            if a.quant not in QUANTIZED or a.quant != adapters[0].quant:
                kind = {"unknown": "an unrecorded", "none": "a 16-bit"}.get(a.quant, f"a {a.quant}")
                raise DesktuneError(
                    f"--into dequantized is for adapters trained on one 4-bit or 8-bit base; this one trained on "
                    f"{kind} base", where=str(a.path),
                    fix="leave out --into (an adapter of a 16-bit base merges into the original weights)")
    return into


def _same_base(a: str, b: str) -> bool:
    """Whether two base names are the same model by name: equal, or the same folder."""
    def norm(name: str) -> str:
        if name.lower() in EMBEDDED_ALIASES:
            return resolve_source(name)
        path = Path(name).expanduser()
        return str(path.resolve()) if path.exists() else name

    return a == b or norm(a) == norm(b)


def check_bases(adapters: list[Adapter], base_name: str, source: str, *, force_base: bool,
                log: Log) -> list[DesktuneError]:
    """Refuse a base an adapter was not trained on: by its recorded weight fingerprint, else by name.

    A base whose tensors differ in name or shape is returned, not raised: the caller raises it once the adapters'
    own shape check (a more precise message when their shapes do not fit) has passed."""
    if force_base:
        log("note: --force-base: the base was not checked against the adapters")
        return []
    current = base_fingerprint(source) if any(a.fingerprint for a in adapters) else None
    later = []
    for a in adapters:
        fix = (f"use the base model the adapter was trained on: {a.trained_on} (the default when --model is left "
               "out), or pass --force-base to merge anyway")
        if a.fingerprint is not None and current is not None:
            why = fingerprint_mismatch(a.fingerprint, current)
            if why:
                error = DesktuneError(f"the adapter was trained on another base: {base_name} does not match the "
                                      f"fingerprint in {BASE_FINGERPRINT}: {why}", where=str(a.path), fix=fix)
                if a.fingerprint.get("structure") != current.get("structure"):
                    later.append(error)
                else:
                    raise error
        elif a.trained_on and not _same_base(a.trained_on, base_name):
            raise DesktuneError(
                f"the adapter was trained on {a.trained_on}, not {base_name}, and records no fingerprint of its "
                f"base's weights ({BASE_FINGERPRINT}: made by another tool?), so desktune cannot tell whether they "
                "are the same model", where=str(a.path),
                fix=f"use {a.trained_on} (leave out --model), or pass --force-base if {base_name} holds the same "
                "weights")
        elif not a.trained_on:
            log(f"note: {a.path} names no base model: it could not be checked")
    return later


def chat_template(adapters: list[Adapter]) -> str | None:
    """The chat template the adapters were trained with (refused when two of them carry different ones)."""
    carried = [a for a in adapters if a.template]
    for a in carried[1:]:
        if a.template != carried[0].template:
            raise DesktuneError(f"its chat template differs from that of {carried[0].path}", where=str(a.path),
                                fix=f"merge adapters trained with the same chat template (or delete "
                                f"{CHAT_TEMPLATE} from the adapter whose template should not be used)")
    return carried[0].template if carried else None


def dequantize_in_place(model: torch.nn.Module, quant: str, dtype: torch.dtype) -> int:
    """Quantize the base's linear layers as CPU training does (torchao, models/quantize.py) and replace each
    quantized weight by its de-quantized `dtype` value; returns how many layers."""
    quantize_in_place(model, quant, True, dtype, "cpu")  # double_quant: torchao always quantizes its scales
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and is_quantized_linear(module):
            module.weight = torch.nn.Parameter(dequantized_weight(module).to(dtype), requires_grad=False)
            count += 1
    return count


def add_weighted_deltas(peft_model: Any, weights: dict[str, float]) -> None:
    """W <- round(W + sum_i w_i * delta_i) in every LoRA layer, the sum in fp32; then the adapters are dropped."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        own = [n for n in weights if n in module.lora_A or n in module.lora_embedding_A]
        total = base.weight.detach().float().clone()
        for name in own:
            total += weights[name] * module.get_delta_weight(name).float()
            if module.lora_bias.get(name):
                extra = weights[name] * module.scaling[name] * module.lora_B[name].bias.float()
                base.bias.data = (base.bias.float() + extra).to(base.bias.dtype)
        if not torch.isfinite(total).all():
            raise DesktuneError("the merged weights hold NaN or infinite values (a broken adapter?)",
                                where=", ".join(own), fix="merge another checkpoint of the run")
        base.weight.data = total.to(base.weight.dtype)


def _load_base(base_name: str, adapters: list[Adapter], into: str, dtype: str, device: str, log: Log) -> Any:
    """The base to merge into: the original weights in `dtype`, or the de-quantized quantized ones."""
    if into == "original":
        return load_model(ModelConfig(name=base_name), Hardware(device=pick_device(device), dtype=DTYPES[dtype]),
                          quant="none")
    first = adapters[0]
    made_from = DTYPES.get(first.train_dtype or dtype, DTYPES[dtype])
    loaded = load_model(ModelConfig(name=base_name), Hardware(device=pick_device(device), dtype=made_from),
                        quant="none")
    n = dequantize_in_place(loaded.model, first.quant, made_from)
    log(f"note: merged into the de-quantized {first.quant} weights training saw ({n} layers)")
    if (first.backend or "").startswith("bnb-"):
        log(f"note: trained with bitsandbytes {first.quant} on CUDA; de-quantized here with torchao's "
            f"{first.quant} (same codes and block size, quantization scales rounded differently)")
    return loaded


def merged_model(adapter: str | Path | Sequence[str | Path], *, model: str | None = None, dtype: str = "bf16",
                 device: str = "cpu", weights: Sequence[float] | None = None, into: str | None = None,
                 force_base: bool = False, log: Log | None = None) -> tuple[Any, Any]:
    """The base with the adapter(s) merged in, weighted, and its tokenizer carrying the training chat template.

    `into`: "dequantized" (the default for QLoRA adapters) or "original" (the only choice for the others);
    see the module docstring. `log` receives notes (the choices made)."""
    log = log or (lambda text: None)
    _check_dtype(dtype)
    paths = [adapter] if isinstance(adapter, (str, Path)) else list(adapter)
    adapters = read_adapters(paths, weights)  # bad adapters fail before the base loads
    into, template = choose_into(adapters, into), chat_template(adapters)
    base_name = model or adapters[0].trained_on
    if not base_name:
        raise DesktuneError("the adapter does not name its base model", where=str(adapters[0].path / ADAPTER_CONFIG),
                            fix="pass the base with --model")
    later = check_bases(adapters, base_name, resolve_source(base_name), force_base=force_base, log=log)
    loaded = _load_base(base_name, adapters, into, dtype, device, log)
    peft_model = load_adapter(loaded.model, adapters[0].path)
    names = {"default": adapters[0].weight}
    for i, a in enumerate(adapters[1:], start=1):
        load_more_adapter(peft_model, a.path, f"merge{i}")
        names[f"merge{i}"] = a.weight
    if later:
        raise later[0]
    cfg = adapters[0].config  # a DoRA, non-LoRA or modules_to_save adapter is alone, weight 1 (_check_kinds)
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("modules_to_save"):
        merged = peft_model.merge_and_unload(safe_merge=True)  # peft's own merge
    else:
        add_weighted_deltas(peft_model, names)
        merged = peft_model.unload()
    merged.to(DTYPES[dtype])
    if template:
        loaded.tokenizer.chat_template = template
    return merged, loaded.tokenizer


def _check_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise DesktuneError("the output is a file, not a folder", where=str(output),
                            fix="choose a new folder with --output (nothing was written)")
    if output.exists() and any(output.iterdir()):
        raise DesktuneError("the output folder is not empty", where=str(output),
                            fix="choose a new folder (nothing was written)")
    parent = next(p for p in output.absolute().parents if p.exists())
    if not parent.is_dir():
        raise DesktuneError(f"cannot create the output folder: {parent} is a file", where=str(output),
                            fix="choose a folder in a writable place with --output (nothing was written)")


def merge_adapter(adapter: str | Path | Sequence[str | Path], output: str | Path, *, model: str | None = None,
                  dtype: str = "bf16", device: str = "cpu", weights: Sequence[float] | None = None,
                  into: str | None = None, force_base: bool = False, log: Log | None = None) -> Path:
    """Merge the adapter(s) (see merged_model) and save safetensors + tokenizer + chat template atomically."""
    output = Path(output)
    _check_dtype(dtype)
    _check_output(output)
    merged, tokenizer = merged_model(adapter, model=model, dtype=dtype, device=device, weights=weights, into=into,
                                     force_base=force_base, log=log)

    def write(folder: Path) -> None:
        merged.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    try:  # on failure the temporary folder is removed: `output` is left as it was (absent or empty)
        return write_folder_atomically(output, write)
    except OSError as e:
        raise DesktuneError(f"cannot write the merged model ({e.strerror or e})", where=str(output),
                            fix="choose a writable folder with free space with -o") from e

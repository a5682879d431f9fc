"""Load a base model and its tokenizer from the embedded default, a local folder, a GGUF file, or a hub id."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from desktune.config import EMBEDDED_MODEL, ModelConfig
from desktune.errors import DesktuneError
from desktune.hardware import Hardware
from desktune.models import gguf as gguf_mod
from desktune.models.quantize import (
    choose_backend,
    import_torchao_quietly,
    load_time_config,
    quantize_in_place,
)

EMBEDDED_ALIASES = {EMBEDDED_MODEL, "smollm2-135m", "smollm2", "default", "embedded"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class LoadedModel:
    """A base model ready for adapters, with where it came from."""

    model: Any
    tokenizer: Any
    base_path: str  # what transformers can open again: a local folder or a hub id
    hardware: Hardware
    quant_backend: str


def resolve_source(name: str, gguf_file: str | None = None) -> str:
    """Turn `model.name` into a local folder or hub id that `from_pretrained` opens (GGUFs are converted once)."""
    if name.lower() in EMBEDDED_ALIASES:
        return str(gguf_mod.embedded_model_dir())
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return str(gguf_mod.convert_gguf(path))
        raise DesktuneError("is a file but not a .gguf model", where=name,
                            fix="point model.name at a model folder (with config.json) or a .gguf file")
    if path.is_dir():
        if gguf_file:
            return resolve_source(str(path / gguf_file))
        if (path / "config.json").is_file():
            return str(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(gguf_mod.convert_gguf(ggufs[0]))
        if ggufs:
            raise DesktuneError(f"holds {len(ggufs)} .gguf files", where=name,
                                fix=f"choose one with model.gguf_file (e.g. {ggufs[0].name})")
        raise DesktuneError("is a folder without config.json (not a Hugging Face model folder)", where=name,
                            fix="point model.name at the folder holding config.json and the weights")
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return name
    raise DesktuneError(
        "no such file or folder, and not a hub id (owner/name)", where=f"model.name={name}",
        fix=f"use a local model folder, a .gguf file, a hub id, or the embedded default '{EMBEDDED_MODEL}'",
    )


def _is_offline_error(err: Exception) -> bool:
    text = f"{type(err).__name__}: {err}".lower()
    return any(s in text for s in ("offline", "connect", "resolve", "couldn't", "cannot find", "not found",
                                   "does not appear", "local_files_only", "is not a local folder"))


def check_safetensors(file: Path, what: str, fix: str) -> None:
    """Raise DesktuneError naming `file` when its safetensors header is unreadable (truncated or damaged)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt"):
            pass
    except Exception as e:  # safetensors raises its own error type (and OSError) for a damaged file
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DesktuneError(f"could not load the {what}: the weights file is damaged or incomplete, perhaps "
                            f"truncated ({detail})", where=str(file), fix=fix) from None


def _check_folder(path: Path) -> None:
    """Give a clear message for a damaged local model folder before transformers does."""
    cfg = path / "config.json"
    try:
        raw = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DesktuneError(f"config.json is not valid JSON ({e})", where=str(cfg),
                            fix="restore the model folder from its source") from None
    if not isinstance(raw, dict):
        raise DesktuneError("config.json is not a JSON object", where=str(cfg),
                            fix="restore the model folder from its source")
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not any(path.glob("*.bin")):
        raise DesktuneError("holds no weights (*.safetensors or *.bin)", where=str(path),
                            fix="copy the model's weight files into the folder")
    for file in weights:
        check_safetensors(file, "model", fix="download or copy it again from the model's source")


def load_tokenizer(source: str) -> Any:
    """The tokenizer of a model folder or hub id, with a pad token."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except Exception as e:
        raise DesktuneError(f"could not load the tokenizer: {e}", where=source,
                            fix="make sure the folder has tokenizer.json / tokenizer_config.json") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def quiet_transformers() -> None:
    """Silence transformers' per-tensor progress bars and advice (desktune prints its own progress)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def load_model(cfg: ModelConfig, hw: Hardware, *, quant: str | None = None) -> LoadedModel:
    """Load the base model frozen, in the run's precision, quantized if asked (`quant` overrides cfg.quant)."""
    quiet_transformers()
    import_torchao_quietly()  # transformers imports torchao while loading models: do it once, without its noise
    from transformers import AutoModelForCausalLM

    quant = cfg.quant if quant is None else quant
    source = resolve_source(cfg.name, cfg.gguf_file)
    local = Path(source).is_dir()
    if local:
        _check_folder(Path(source))
    backend = choose_backend(quant, hw.device.type)
    kwargs: dict[str, Any] = {
        "dtype": hw.dtype,
        "attn_implementation": cfg.attn_implementation,
        "trust_remote_code": cfg.trust_remote_code,
    }
    bnb = load_time_config(quant, cfg.double_quant, hw.dtype, hw.device.type)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
        kwargs["device_map"] = {"": hw.device.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as e:
        if not local and _is_offline_error(e):
            raise DesktuneError(
                f"model '{source}' is not a local folder nor in the local cache, and the model hub cannot be reached",
                where="model.name",
                fix=f"set model.name to an existing model folder, or download it where you have internet "
                f"(huggingface-cli download {source} --local-dir DIR) and set model.name to that DIR",
            ) from None
        config_file = Path(source) / "config.json"
        if local and "model_type" in str(e) and "model_type" not in json.loads(config_file.read_text("utf-8")):
            raise DesktuneError("config.json has no 'model_type', so the architecture is unknown",
                                where=str(config_file), fix="restore the model folder from its source") from None
        fix = "check the folder is complete (config.json, all weight files)"
        if "does not recognize this architecture" in str(e):
            fix = ("upgrade transformers (pip install -U transformers), or set model.trust_remote_code: true for a "
                   "model that ships its own code")
        raise DesktuneError(f"could not load the model: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                            where=source, fix=fix) from None
    tokenizer = load_tokenizer(source)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if bnb is None:
        model.to(hw.device)
    model.requires_grad_(False)
    quantize_in_place(model, quant, cfg.double_quant, hw.dtype, hw.device.type)
    return LoadedModel(model=model, tokenizer=tokenizer, base_path=source, hardware=hw, quant_backend=backend)

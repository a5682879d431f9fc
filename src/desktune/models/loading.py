"""Load a base model and its tokenizer from the embedded default, a local folder, a GGUF file, or a hub id."""

from __future__ import annotations

import json
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from desktune.config import ModelConfig
from desktune.constants import EMBEDDED_ALIASES, EMBEDDED_MODEL
from desktune.errors import DesktuneError
from desktune.hardware import Hardware
from desktune.memory.catalog import cached_hub_config
from desktune.models import gguf as gguf_mod
from desktune.models.quantize import (
    choose_backend,
    import_torchao_quietly,
    load_time_config,
    quantize_in_place,
)
from desktune.safety import is_pickle, pickle_allowed, refuse_pickle
from desktune.units import human_bytes

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# the weight files from_pretrained fetches (not e.g. Mistral's consolidated.safetensors beside them)
_HUB_WEIGHTS = (re.compile(r"^model(-\d+-of-\d+)?\.safetensors$"), re.compile(r"^pytorch_model(-\d+-of-\d+)?\.bin$"))


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


def _hub_unreachable(err: BaseException) -> bool:
    """A hub file that is neither in the local cache nor downloadable (offline mode, or no connection).

    huggingface_hub raises LocalEntryNotFoundError for exactly that, and transformers re-raises it as an OSError
    `from` it; the cause chain is checked for that type (a structural test) rather than the message text. Any
    other OSError for a hub id (a repository that does not exist, a gated one) is reported as it is.
    """
    from huggingface_hub.errors import LocalEntryNotFoundError

    seen: BaseException | None = err
    for _ in range(8):  # a chain is short; the bound guards against a cycle
        if seen is None:
            return False
        if isinstance(seen, LocalEntryNotFoundError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def check_safetensors(file: Path, what: str, fix: str) -> None:
    """Raise DesktuneError naming `file` when its safetensors header is unreadable (truncated or damaged)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:  # a damaged header; OSError: unreadable, or not a regular file
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DesktuneError(f"could not load the {what}: the weights file is damaged or incomplete, perhaps "
                            f"truncated ({detail})", where=str(file), fix=fix) from e


def _read_config(cfg: Path) -> dict[str, Any]:
    """config.json of a model folder as a dict, with clear errors."""
    try:
        raw = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DesktuneError(f"config.json is not valid JSON ({e})", where=str(cfg),
                            fix="restore the model folder from its source") from e
    if not isinstance(raw, dict):
        raise DesktuneError("config.json is not a JSON object", where=str(cfg),
                            fix="restore the model folder from its source")
    return raw


def _check_architecture(raw: dict[str, Any], cfg: Path, source: str, trust_remote_code: bool) -> None:
    """Refuse a config.json whose architecture transformers cannot build, decided as AutoConfig does: the model's
    own code (auto_map.AutoConfig, with trust_remote_code), else `model_type` must be in CONFIG_MAPPING."""
    from transformers import CONFIG_MAPPING, __version__

    auto_map = raw.get("auto_map")
    if trust_remote_code and isinstance(auto_map, dict) and "AutoConfig" in auto_map:
        return
    if "model_type" not in raw:
        raise DesktuneError("config.json has no 'model_type', so the architecture is unknown", where=str(cfg),
                            fix="restore the model folder from its source")
    model_type = raw["model_type"]
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    if not known and isinstance(auto_map, dict) and auto_map:
        refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
        files = sorted({r.split("--")[-1].split(".")[0] + ".py" for r in refs})
        raise DesktuneError(
            f"this model needs its own Python code to load ({', '.join(files)}, named by auto_map in config.json), "
            "and desktune runs no code from a model unless asked", where=source,
            fix="read that code first; if you trust it, set model.trust_remote_code: true in the run config "
            "(-o model.trust_remote_code=true)")
    if not known:
        raise DesktuneError(
            f"could not load the model: transformers {__version__} does not know the architecture {model_type!r} "
            "(model_type in config.json)", where=source,
            fix="upgrade transformers (pip install -U transformers), or set model.trust_remote_code: true for a "
            "model that ships its own code")


def _cached_hub_config(source: str) -> tuple[dict[str, Any], Path] | None:
    """config.json of a hub id when it is in the local cache (nothing is downloaded), else None."""
    cached = cached_hub_config(source)  # None for an invalid repo id too: from_pretrained says so
    if cached is None:
        return None
    try:
        raw = json.loads(cached.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # transformers reports a damaged cache entry itself
        return None
    return (raw, cached) if isinstance(raw, dict) else None


def _in_hub_cache(repo_id: str, filename: str) -> Path | None:
    """The cached copy of one file of a hub repository, else None (never downloads)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # an invalid repo id: from_pretrained reports it
        return None
    return Path(found) if isinstance(found, str) else None


def hub_model_cached(repo_id: str) -> bool:
    """Whether config.json, tokenizer_config.json and all weights of a hub id are in the local Hugging Face cache.

    Weights: every shard a cached model.safetensors.index.json (or pytorch_model.bin.index.json) lists, else
    model.safetensors or pytorch_model.bin.
    """
    if _in_hub_cache(repo_id, "config.json") is None or _in_hub_cache(repo_id, "tokenizer_config.json") is None:
        return False
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = _in_hub_cache(repo_id, index_name)
        if index is None:
            continue
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return all(_in_hub_cache(repo_id, shard) is not None for shard in shards)
    return any(_in_hub_cache(repo_id, name) is not None for name in ("model.safetensors", "pytorch_model.bin"))


def hub_download_size(repo_id: str, timeout: float = 10.0) -> int | None:
    """Bytes of the weight files from_pretrained fetches for a hub id (model*.safetensors, else pytorch_model*.bin),
    as the hub lists them; None when unknown.

    One metadata request, never in offline mode; any failure (no connection, a gated or missing repository)
    gives None, and `from_pretrained` then reports the problem itself.
    """
    import huggingface_hub

    if huggingface_hub.is_offline_mode():
        return None
    try:
        info = huggingface_hub.model_info(repo_id, files_metadata=True, timeout=timeout)
    except Exception:  # the size is only informative: whatever went wrong, from_pretrained says it next
        return None
    files = [(s.rfilename, s.size) for s in info.siblings or [] if s.size is not None]
    for pattern in _HUB_WEIGHTS:
        sizes = [size for name, size in files if pattern.match(name)]
        if sizes:
            return sum(sizes)
    return None


def announce_download(repo_id: str, log: Callable[[str], None]) -> None:
    """Say that a hub id is about to be downloaded, from where and how big, unless it is cached or offline."""
    import huggingface_hub

    if huggingface_hub.is_offline_mode() or hub_model_cached(repo_id):
        return
    size = hub_download_size(repo_id)
    of = f"{human_bytes(size)} of weights" if size is not None else "size unknown"
    log(f"downloading model '{repo_id}' from the Hugging Face hub (https://huggingface.co/{repo_id}, {of}) into "
        "the local cache; set HF_HUB_OFFLINE=1 to never download")


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _check_folder(path: Path, trust_remote_code: bool) -> None:
    """Give a clear message for a damaged local model folder before transformers does."""
    cfg = path / "config.json"
    _check_architecture(_read_config(cfg), cfg, str(path), trust_remote_code)
    weights = sorted(path.glob("*.safetensors"))
    pickles = sorted(p for p in path.glob("*") if p.is_file() and is_pickle(p) and p.name.startswith("pytorch_model"))
    if not weights and not pickles:
        raise DesktuneError("holds no weights (*.safetensors or pytorch_model*.bin)", where=str(path),
                            fix="copy the model's weight files into the folder")
    if not weights:
        refuse_pickle(pickles, "model's weights", path, convert=_CONVERT_MODEL)
    for file in weights:
        check_safetensors(file, "model", fix="download or copy it again from the model's source")


_CONVERT_MODEL = ("use the model's safetensors release, or convert it once where you trust it "
                  "(AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR2, safe_serialization=True))")


def _check_hub_pickles(repo_id: str) -> None:
    """Refuse a cached hub model whose weights are only pickles (before transformers would unpickle them)."""
    if any(_in_hub_cache(repo_id, name) for name in ("model.safetensors", "model.safetensors.index.json")):
        return
    pickles = [p for name in ("pytorch_model.bin", "pytorch_model.bin.index.json")
               if (p := _in_hub_cache(repo_id, name)) is not None]
    refuse_pickle(pickles, "model's weights", repo_id, convert=_CONVERT_MODEL)


def load_tokenizer(source: str) -> Any:
    """The tokenizer of a model folder or hub id, with a pad token."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except Exception as e:
        # OSError: files missing or unreadable; ValueError: invalid JSON, no tokenizer files; KeyError: a
        # tokenizer.json without its parts; a plain Exception (no subclass) is how tokenizers (Rust) reports a
        # tokenizer.json it cannot parse. Anything else is a bug, not a bad folder.
        if not isinstance(e, (OSError, ValueError, KeyError)) and type(e) is not Exception:
            raise
        raise DesktuneError(f"could not load the tokenizer: {e}", where=source,
                            fix="make sure the folder has tokenizer.json / tokenizer_config.json") from e
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


def _load_error(err: Exception, source: str, local: bool) -> DesktuneError:
    """The user-facing error for a failed `from_pretrained` of `source`."""
    if not local and _hub_unreachable(err):
        return DesktuneError(
            f"model '{source}' is not a local folder nor in the local cache, and the model hub cannot be reached",
            where="model.name",
            fix=f"set model.name to an existing model folder, or download it where you have internet "
            f"(huggingface-cli download {source} --local-dir DIR) and set model.name to that DIR",
        )
    detail = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "not enough memory" in detail:
        return DesktuneError(f"out of memory while loading the model ({detail})", where=source,
                             fix="load the base in 4 bit (model.quant: nf4), pick a smaller model, or close what "
                             "else uses the memory; `desktune plan CONFIG` shows what a run needs")
    if isinstance(err, ImportError) and "FlashAttention" in detail:
        return DesktuneError(f"flash_attention_2 was asked for, but it cannot be used ({detail})",
                             where="model.attn_implementation",
                             fix="install flash-attn on a CUDA machine (pip install flash-attn), or set "
                             "model.attn_implementation: sdpa (the default)")
    if isinstance(err, ImportError):
        return DesktuneError(f"could not load the model: a package it needs is missing ({detail})", where=source,
                             fix="install the package the message names (pip install NAME)")
    return DesktuneError(f"could not load the model: {detail}", where=source,
                         fix="check the folder is complete (config.json, all weight files)")


def load_model(cfg: ModelConfig, hw: Hardware, *, quant: str | None = None,
               log: Callable[[str], None] | None = None, shardable: bool = False) -> LoadedModel:
    """Load the base model frozen, in the run's precision, quantized if asked (`quant` overrides cfg.quant).

    A hub id missing from the local cache is downloaded (when the hub is reachable and HF_HUB_OFFLINE is unset);
    `log` (default: stderr) is told so, with the size, before the download starts. `shardable`: 4-bit weights
    FSDP2 can shard (train.distributed: fsdp2 with several processes).
    """
    quiet_transformers()
    import_torchao_quietly()  # transformers imports torchao while loading models: do it once, without its noise
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoModelForCausalLM

    quant = cfg.quant if quant is None else quant
    source = resolve_source(cfg.name, cfg.gguf_file)
    local = Path(source).is_dir()
    if local:
        _check_folder(Path(source), cfg.trust_remote_code)
    elif (cached := _cached_hub_config(source)) is not None:
        _check_architecture(cached[0], cached[1], source, cfg.trust_remote_code)
        _check_hub_pickles(source)
    if not local:
        announce_download(source, log or _stderr)
    backend = choose_backend(quant, hw.device.type)
    kwargs: dict[str, Any] = {
        "dtype": hw.dtype,
        "attn_implementation": cfg.attn_implementation,
        "trust_remote_code": cfg.trust_remote_code,
        "use_safetensors": None if pickle_allowed() else True,  # never unpickle weights the user did not allow
    }
    bnb = load_time_config(quant, cfg.double_quant, hw.dtype, hw.device.type, shardable=shardable)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
        kwargs["device_map"] = {"": hw.device.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError, RuntimeError, StrictDataclassError, ImportError, MemoryError) as e:
        # OSError: files missing or not downloadable; ValueError: a config transformers refuses; RuntimeError:
        # weights that do not fit the config, or out of memory; StrictDataclassError: a config value of the wrong
        # type; ImportError: an attention kernel or another optional package missing; MemoryError: the CPU's OOM
        raise _load_error(e, source, local) from e
    tokenizer = load_tokenizer(source)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if bnb is None:
        model.to(hw.device)
    model.requires_grad_(False)
    quantize_in_place(model, quant, cfg.double_quant, hw.dtype, hw.device.type)
    return LoadedModel(model=model, tokenizer=tokenizer, base_path=source, hardware=hw, quant_backend=backend)
